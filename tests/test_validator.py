"""Recomputation of audited micro-batches on the real digits task and dataset: an honest micro-batch is
confirmed exactly, each cheat fails the audits of the micro-batches it did not compute, and a validator
declines what it cannot check."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from coordinator.verification import AuditPolicy, verdict
from peer.adversary import KINDS, Contribution, behaviour, local_work
from peer.data.examples import build_example
from peer.data.reader import DatasetReader
from peer.protocol.run_schemas import AuditTask
from peer.protocol.sketch import grad_seed, params_seed
from peer.sketch import Sketcher
from peer.tasks.digits import DigitsMLP
from peer.validator import Snapshots, Validator, micro_batch_gradient, micro_seed

RUN = "run-test"
PEER = "a" * 64
POLICY = AuditPolicy.default()


@dataclass
class Setup:
    task: DigitsMLP
    reader: DatasetReader

    def model(self, seed: int = 0) -> torch.nn.Module:
        return self.task.build_model(seed)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    folder: Path = tmp_path_factory.mktemp("digits") / "digits"
    manifest = build_example("digits", folder, shard_bytes=1 << 16).manifest
    yield Setup(DigitsMLP(hidden=32), DatasetReader(manifest, lambda s: folder / s.file))


def epoch_of(setup: Setup, model: torch.nn.Module, epoch: int, first_id: int):
    """The work of one epoch of a peer on 4 micro-batches of 16 samples (ids from ``first_id``; spare ids
    after them), and the number of parameters."""
    n_params = sum(p.numel() for p in model.parameters())
    chunks = [list(range(first_id + 16 * i, first_id + 16 * (i + 1))) for i in range(4)]
    work = local_work(
        setup.task,
        model,
        setup.reader,
        chunks,
        Sketcher(n_params, grad_seed(RUN, epoch)),
        lambda index: micro_seed(RUN, epoch, PEER, index),
        spare_ids=lambda n: list(range(first_id + 64, first_id + 64 + n)),
    )
    return work, n_params


def audits_of(contribution: Contribution, epoch: int, param_sketch: list[float]) -> list[AuditTask]:
    return [
        AuditTask(
            id=f"a{i}",
            run_id=RUN,
            epoch=epoch,
            account=PEER,
            index=i,
            ids=m["ids"],
            param_sketch=param_sketch,
            device="cpu",
        )
        for i, m in enumerate(contribution.micro)
    ]


def check(validator: Validator, contribution: Contribution, audits: list[AuditTask]) -> list[bool]:
    """The verdict on every reported micro-batch."""
    results = []
    for audit, claim in zip(audits, contribution.micro, strict=True):
        answer = validator.recompute(audit)
        assert answer.sketch is not None and answer.loss is not None, answer.declined
        results.append(verdict(claim["sketch"], claim["loss"], answer.sketch, answer.loss, POLICY).passed)
    return results


def validator_for(setup: Setup, snapshots: Snapshots) -> Validator:
    return Validator(RUN, setup.task, setup.model(seed=99), setup.reader, snapshots, agreement=1e-4)


def test_an_honest_micro_batch_is_recomputed_exactly(setup: Setup) -> None:
    model = setup.model()
    work, n_params = epoch_of(setup, model, 0, 0)
    param_sketch = Sketcher(n_params, params_seed(RUN, 0))(model.parameters())
    snapshots = Snapshots(keep=4)
    snapshots.put(0, model, param_sketch)
    honest = behaviour(None).contribute(work)
    validator = validator_for(setup, snapshots)  # its own model, other initial values: loads the snapshot
    for audit, claim in zip(audits_of(honest, 0, param_sketch), honest.micro, strict=True):
        answer = validator.recompute(audit)
        assert answer.sketch == pytest.approx(claim["sketch"], rel=1e-6, abs=1e-9)
        assert answer.loss == pytest.approx(claim["loss"], rel=1e-6)
    assert sum(torch.count_nonzero(u).item() for u in honest.update) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_each_cheat_fails_the_audits_of_what_it_did_not_compute(setup: Setup, kind: str) -> None:
    model, cheat, snapshots = setup.model(), behaviour(kind), Snapshots(keep=4)  # type: ignore[arg-type]
    validator = validator_for(setup, snapshots)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    verdicts = []
    for epoch in range(2):
        work, n_params = epoch_of(setup, model, epoch, 100 * epoch)
        param_sketch = Sketcher(n_params, params_seed(RUN, epoch))(model.parameters())
        snapshots.put(epoch, model, param_sketch)
        contribution = cheat.contribute(work)
        verdicts.append(check(validator, contribution, audits_of(contribution, epoch, param_sketch)))
        honest = work.compute(False)  # the swarm moves on with an honest step
        for p, g in zip(model.parameters(), honest.update, strict=True):
            p.grad = g.clone()
        optimizer.step()
    if kind == "inflated-samples":  # its own 4 micro-batches are real; the 4 it added are not
        assert verdicts == [[True] * 4 + [False] * 4] * 2
    elif kind == "replay":  # honest once, then the same gradients again
        assert verdicts == [[True] * 4, [False] * 4]
    else:
        assert verdicts == [[False] * 4] * 2


def test_a_validator_declines_epochs_it_does_not_hold_or_whose_parameters_differ(setup: Setup) -> None:
    model, snapshots = setup.model(), Snapshots(keep=2)
    n_params = sum(p.numel() for p in model.parameters())
    sketches = {}
    for epoch in range(3):
        sketches[epoch] = Sketcher(n_params, params_seed(RUN, epoch))(model.parameters())
        snapshots.put(epoch, model, sketches[epoch])
    assert snapshots.get(0) is None and snapshots.get(2) is not None  # the window keeps the last two
    validator = validator_for(setup, snapshots)
    task = AuditTask(
        id="x", run_id=RUN, epoch=0, account=PEER, index=0, ids=[1, 2], param_sketch=sketches[0], device="cpu"
    )
    assert validator.recompute(task).declined == (
        "this peer does not hold epoch 0's parameters (it holds epochs 1-2 of the last 2 it trained)"
    )
    other = [x + 1.0 for x in sketches[2]]
    declined = validator.recompute(task.model_copy(update={"epoch": 2, "param_sketch": other})).declined
    assert declined is not None and "differ from the audited peer's" in declined
    snapshots.forget_from(2)
    assert snapshots.get(2) is None and snapshots.get(1) is not None


def test_a_model_with_dropout_is_audited_only_on_the_same_kind_of_device(setup: Setup) -> None:
    from peer.tasks.bytes_lm import BytesLM

    task = BytesLM(dim=16, layers=1, heads=2, dropout=0.1)
    model = task.build_model(0)
    n_params = sum(p.numel() for p in model.parameters())
    snapshots = Snapshots(keep=2)
    param_sketch = Sketcher(n_params, params_seed(RUN, 0))(model.parameters())
    snapshots.put(0, model, param_sketch)
    validator = Validator(RUN, task, task.build_model(1), setup.reader, snapshots, agreement=1e-4)
    audit = AuditTask(
        id="x",
        run_id=RUN,
        epoch=0,
        account=PEER,
        index=0,
        ids=[1],
        param_sketch=param_sketch,
        device="NVIDIA H100",
    )
    declined = validator.recompute(audit).declined
    assert declined is not None and "draws random masks (dropout)" in declined and "'NVIDIA H100'" in declined
    plain = Validator(RUN, setup.task, setup.model(), setup.reader, Snapshots(keep=1), agreement=1e-4)
    assert not plain.random  # the digits MLP has no dropout: any device may recompute it


def test_a_micro_batch_with_dropout_recomputes_bit_for_bit_from_its_seed_alone() -> None:
    """The seed decides the dropout masks whatever ran before (other seeds, other draws): a validator
    that recomputes an audit after its own training gets the audited gradient exactly; another seed
    gives other masks."""
    from peer.tasks.bytes_lm import BytesLM

    task = BytesLM(dim=16, layers=1, heads=2, dropout=0.5)
    model = task.build_model(0)
    params = list(model.parameters())
    batch = torch.randint(0, 256, (4, 17))
    loss, grads = micro_batch_gradient(task, model, params, batch, seed=7)
    grads = [g.clone() for g in grads]
    torch.rand(1000)  # the generators moved on meanwhile
    micro_batch_gradient(task, model, params, batch, seed=8)
    again, regrads = micro_batch_gradient(task, model, params, batch, seed=7)
    assert again == loss and all(torch.equal(g, r) for g, r in zip(grads, regrads, strict=True))
    other, _ = micro_batch_gradient(task, model, params, batch, seed=8)
    assert other != loss
