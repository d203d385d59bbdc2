"""Benchmark: audits catch each cheat, never an honest peer, and cost the swarm little compute.

Everything runs in this process on a real task and dataset (``--task``: the digits MLP by default,
``embed-lora`` for MiniLM adapted with LoRA, ``causal-lm`` for the small Llama; each with the options,
dataset and micro-batch of its example spec, the dataset built untimed in a temporary folder) with the
code peers and the coordinator run: the contribution behaviours of peer.adversary, the recomputation of
peer.validator, the draw and the verdict of coordinator.verification, at the default ``[verification]``
settings of a run spec unless flags change them.

1. Catch rate. ``--trials`` trials per cheat. A trial is a fresh run (a new secret audit key, a new model
   seed) of ``--epochs`` epochs; each epoch the cheat reports ``--micro-batches`` micro-batches of
   ``--per-peer`` samples, the coordinator's draw picks micro-batches, a validator recomputes them at the
   epoch's start parameters and the trial counts as caught at the first failed audit. Between epochs the
   model takes an honest step, as the swarm would. Goal: >= 99% within 5 epochs.
2. False positives. ``--honest-audits`` audits of honest reports, recomputed by a float32 CPU validator
   while the reporting peer computed (a) the same way, (b) on another number of threads, (c) in bfloat16
   autocast (reduced precision), (d) on CUDA, where a GPU is present. Prints the largest sketch distance
   and loss gap per condition against the tolerances, and the count of failed audits. Goal: 0.
3. Cost. For one peer of a ``--peers``-peer swarm whose epoch is ``--cost-micro-batches`` micro-batches
   of the task's (its example spec's micro-batch; for digits, ``--cost-per-peer`` samples of the bytes-lm
   transformer instead, ``--cost-dim``, ``--cost-layers``: the digits MLP does too little work per sample
   to stand for a model anyone rents GPUs for): the time it
   spends on verification (sketching each micro-batch's gradient, drawing the epoch's sketchers, keeping
   the epoch's start parameters, recomputing its share of the audits: on average as many as one report
   draws; the data of audited samples is read from the local cache, as after a first fetch) over the time
   it spends
   training (the same micro-batches without sketches). Every peer reports and audits alike, so this is
   the swarm's ratio. Goal: <= 5%. Per micro-batch timings are medians of ``--repeat`` micro-batches.

    python bench/verification.py [--task digits-mlp|embed-lora|causal-lm]
                                 [--trials N] [--epochs E] [--micro-batches M] [--per-peer B]
                                 [--honest-audits N] [--cost-micro-batches M] [--cost-per-peer B]
                                 [--cost-dim D] [--cost-layers L] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.verification import AuditPolicy, choose_audits, verdict
from peer.adversary import KINDS, EpochWork, behaviour, local_work
from peer.data.examples import build_example
from peer.data.reader import DatasetReader
from peer.protocol.run_schemas import AuditTask
from peer.protocol.sketch import grad_seed, params_seed
from peer.protocol.spec import load_spec
from peer.samples import train_ids
from peer.sketch import Sketcher
from peer.tasks import Task, load_task, trained_parameters
from peer.tasks.bytes_lm import BytesLM
from peer.tasks.digits import DigitsMLP
from peer.validator import Snapshots, Validator, micro_batch_gradient, micro_seed

RUN = "run-bench"
PEER = "c" * 64
GOAL_CATCH = 0.99
GOAL_COST = 0.05
LR = 0.1


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: The task of each row and the example spec whose options, dataset and micro-batch it takes.
TASKS = {"digits-mlp": "digits.toml", "embed-lora": "adapt_minilm.toml", "causal-lm": "llama_tiny.toml"}


@dataclass
class Data:
    reader: DatasetReader
    ids: list[int]  # the training split


@dataclass
class Setting:
    task: Task
    data: Data
    per_peer: int  # the example spec's micro-batch
    label: str


def load_setting(name: str, folder: Path) -> Setting:
    """The task ``name`` as its example spec sets it up, on that spec's example dataset."""
    spec = load_spec(EXAMPLES / TASKS[name])
    dataset = spec.dataset.name
    assert dataset is not None, f"examples/{TASKS[name]} names no dataset"
    manifest = build_example(dataset, folder / dataset, shard_bytes=1 << 20).manifest
    reader = DatasetReader(manifest, lambda s: folder / dataset / s.file)
    ids = train_ids(torch.arange(manifest.samples).numpy(), spec.dataset.test_every).tolist()
    options = ", ".join(f"{k} {v}" for k, v in spec.options.items() if k != "base")
    task = load_task(spec.task, dict(spec.options))
    return Setting(task, Data(reader, ids), spec.batch.per_peer, f"{spec.task} ({options}) on {dataset}")


class Epochs:
    """A stream of micro-batches over a shuffled training split, cycling, with spare ids after them."""

    def __init__(self, ids: list[int], seed: int, micro_batches: int, per_peer: int):
        self.order = list(ids)
        random.Random(seed).shuffle(self.order)
        self.micro_batches, self.per_peer, self.position = micro_batches, per_peer, 0

    def _take(self, start: int, count: int) -> list[int]:
        return [self.order[(start + j) % len(self.order)] for j in range(count)]

    def next(self) -> list[list[int]]:
        flat = self._take(self.position, self.micro_batches * self.per_peer)
        self.position += len(flat)
        return [flat[i : i + self.per_peer] for i in range(0, len(flat), self.per_peer)]

    def spare(self, count: int) -> list[int]:
        return self._take(self.position, min(count, len(self.order) - self.micro_batches * self.per_peer))


def sketchers(n_params: int, epoch: int) -> tuple[Sketcher, Sketcher]:
    return Sketcher(n_params, grad_seed(RUN, epoch, PEER)), Sketcher(n_params, params_seed(RUN, epoch))


def start_epoch(
    task: Task,
    model: torch.nn.Module,
    data: Data,
    stream: Epochs,
    snapshots: Snapshots,
    epoch: int,
    device: str = "cpu",
) -> tuple[EpochWork, list[float]]:
    """What a peer does as an epoch starts: keep the start parameters for audits, and set up the epoch's
    work on its next micro-batches; the work, and the parameter sketch its reports carry."""
    trained = trained_parameters(model)
    grads, params = sketchers(sum(p.numel() for p in trained), epoch)
    param_sketch = params(trained)
    snapshots.put(epoch, model, param_sketch)
    seed = lambda i: micro_seed(RUN, epoch, PEER, i)  # noqa: E731
    work = local_work(task, model, data.reader, stream.next(), grads, seed, stream.spare, device=device)
    return work, param_sketch


def audit_task(epoch: int, index: int, micro: dict[str, Any], param_sketch: list[float]) -> AuditTask:
    return AuditTask(
        id=f"a{index}",
        run_id=RUN,
        epoch=epoch,
        account=PEER,
        index=index,
        ids=micro["ids"],
        param_sketch=param_sketch,
        device="cpu",
    )


def step(model: torch.nn.Module, update: list[torch.Tensor]) -> None:
    """The swarm's step: plain SGD with the averaged gradient (moves the parameters between epochs)."""
    with torch.no_grad():
        for p, g in zip(trained_parameters(model), update, strict=True):
            p.sub_(LR * g.to(p.device))


# ------------------------------------------------------------------------------------------ catch rate


def catch_trials(
    setting: Setting, kind: str, args: argparse.Namespace, policy: AuditPolicy
) -> dict[str, Any]:
    task, data, per_peer = setting.task, setting.data, args.per_peer or setting.per_peer
    caught_at: list[int | None] = []
    distances: list[float] = []  # of the audit that caught each trial
    for trial in range(args.trials):
        key, model = secrets.token_bytes(32), task.build_model(trial)
        snapshots = Snapshots(keep=args.epochs)
        validator = Validator(RUN, task, task.build_model(0), data.reader, snapshots, agreement=1e-4)
        cheat, stream = behaviour(kind), Epochs(data.ids, trial, args.micro_batches, per_peer)  # type: ignore[arg-type]
        caught_at.append(None)
        for epoch in range(args.epochs):
            work, param_sketch = start_epoch(task, model, data, stream, snapshots, epoch)
            report = cheat.contribute(work).micro
            failed = []
            for i in choose_audits(key, epoch, PEER, len(report), policy):
                answer = validator.recompute(audit_task(epoch, i, report[i], param_sketch))
                assert answer.sketch is not None and answer.loss is not None, answer.declined
                result = verdict(report[i]["sketch"], report[i]["loss"], answer.sketch, answer.loss, policy)
                if not result.passed:
                    failed.append(result.distance)
            if failed:
                caught_at[-1] = epoch + 1
                distances.append(min(failed))
                break
            step(model, work.compute(False).update)
    caught = [e for e in caught_at if e is not None]
    return {
        "kind": kind,
        "trials": args.trials,
        "caught": len(caught),
        "rate": len(caught) / args.trials,
        "mean_epochs_to_catch": statistics.fmean(caught) if caught else None,
        "max_epochs_to_catch": max(caught) if caught else None,
        "min_distance": min(distances) if distances else None,
    }


# ------------------------------------------------------------------------------------- false positives


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def conditions() -> dict[str, tuple[Callable[[], contextlib.AbstractContextManager[Any]], str]]:
    """How the reporting peer computes: a context and a device. The validator is always the CPU in
    float32 with torch's default threads."""
    found: dict[str, tuple[Callable[[], contextlib.AbstractContextManager[Any]], str]] = {
        "same as the validator": (contextlib.nullcontext, "cpu"),
        "1 thread vs default": (lambda: threads(1), "cpu"),
        "bfloat16 autocast vs float32": (lambda: torch.autocast("cpu", dtype=torch.bfloat16), "cpu"),
    }
    if torch.cuda.is_available():
        found["CUDA vs CPU"] = (contextlib.nullcontext, "cuda")
    return found


def honest_audits(setting: Setting, args: argparse.Namespace, policy: AuditPolicy) -> list[dict[str, Any]]:
    task, data, per_peer = setting.task, setting.data, args.per_peer or setting.per_peer
    results = []
    found = conditions()
    per_condition = -(-args.honest_audits // len(found))
    for name, (context, device) in found.items():
        model = task.build_model(1).to(device)
        snapshots = Snapshots(keep=2)
        validator = Validator(RUN, task, task.build_model(0), data.reader, snapshots, agreement=1e-4)
        stream = Epochs(data.ids, 7, args.micro_batches, per_peer)
        distances, gaps, failed, audits, epoch = [], [], 0, 0, 0
        while audits < per_condition:
            work, param_sketch = start_epoch(task, model, data, stream, snapshots, epoch, device)
            with context():
                contribution = behaviour(None).contribute(work)
            for i, micro in enumerate(contribution.micro):
                answer = validator.recompute(audit_task(epoch, i, micro, param_sketch))
                assert answer.sketch is not None and answer.loss is not None, answer.declined
                result = verdict(micro["sketch"], micro["loss"], answer.sketch, answer.loss, policy)
                distances.append(result.distance)
                gaps.append(abs(micro["loss"] - answer.loss) / max(1.0, abs(answer.loss)))
                failed += not result.passed
                audits += 1
            step(model, contribution.update)
            epoch += 1
        results.append(
            {
                "condition": name,
                "audits": audits,
                "false_positives": failed,
                "max_distance": max(distances),
                "max_loss_gap": max(gaps),
            }
        )
    return results


# ------------------------------------------------------------------------------------------------ cost


def cost_setting(args: argparse.Namespace, setting: Setting, folder: Path) -> Setting:
    """What the cost is measured on: the task itself, but for digits a byte-level transformer language
    model (the MLP does too little work per sample to stand for a model anyone rents GPUs for)."""
    if not isinstance(setting.task, DigitsMLP):
        return setting
    manifest = build_example("text", folder / "text", shard_bytes=1 << 20).manifest
    reader = DatasetReader(manifest, lambda s: folder / "text" / s.file)
    task = BytesLM(dim=args.cost_dim, layers=args.cost_layers, heads=4, dropout=0.1)
    label = f"bytes-lm dim {args.cost_dim}, {args.cost_layers} layers, dropout 0.1"
    return Setting(task, Data(reader, list(range(manifest.samples))), args.cost_per_peer, label)


def cost(args: argparse.Namespace, policy: AuditPolicy, setting: Setting) -> dict[str, Any]:
    """Per micro-batch timings, scaled to an epoch of ``--cost-micro-batches`` micro-batches (training
    them all would take minutes on a CPU)."""
    task, reader = setting.task, setting.data.reader
    per_peer = setting.per_peer
    model = task.build_model(0)
    params = trained_parameters(model)
    n_params = sum(p.numel() for p in params)
    stream = Epochs(setting.data.ids, 3, args.repeat, per_peer)
    snapshots = Snapshots(keep=2)
    validator = Validator(RUN, task, task.build_model(0), reader, snapshots, agreement=1e-4)
    m = args.cost_micro_batches
    audits_per_report = statistics.fmean(
        len(choose_audits(secrets.token_bytes(32), 0, PEER, m, policy)) for _ in range(2000)
    )
    started = time.perf_counter()
    grads, param_sketcher = sketchers(n_params, 0)
    sketchers_s = time.perf_counter() - started  # per epoch a peer draws a gradient sketcher, and audits
    param_sketch = param_sketcher(params)  # need one per audited (epoch, peer): about as many again
    started = time.perf_counter()
    snapshots.put(0, model, param_sketch)
    snapshot_s = time.perf_counter() - started
    update = [torch.zeros_like(p) for p in params]
    rounds: dict[str, list[float]] = {"train": [], "sketch": [], "audit": []}
    chunks = stream.next()
    for index, chunk in enumerate([chunks[0], *chunks]):  # the first micro-batch warms up, left out
        batch = task.batch(reader.read(chunk))
        started = time.perf_counter()
        _, g = micro_batch_gradient(task, model, params, batch, micro_seed(RUN, 0, PEER, index))
        for u, x in zip(update, g, strict=True):
            u.add_(x, alpha=1 / m)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        sketch = grads(g)
        sketch_s = time.perf_counter() - started
        started = time.perf_counter()
        validator.recompute(audit_task(0, index, {"ids": chunk, "loss": 0.0, "sketch": sketch}, param_sketch))
        audit_s = time.perf_counter() - started
        if index:
            rounds["train"].append(train_s)
            rounds["sketch"].append(sketch_s)
            rounds["audit"].append(audit_s)
    train, sketch, audit = (statistics.median(rounds[k]) for k in ("train", "sketch", "audit"))
    verification = m * sketch + sketchers_s + snapshot_s + audits_per_report * audit
    return {
        "model": setting.label,
        "parameters": n_params,
        "peers": args.peers,
        "micro_batches": m,
        "per_peer": per_peer,
        "target": args.peers * m * per_peer,
        "train_s": m * train,
        "sketch_s": m * sketch,
        "snapshot_s": snapshot_s,
        "sketchers_s": sketchers_s,
        "audit_s": audit,
        "audits_per_report": audits_per_report,
        "verification_s": verification,
        "ratio": verification / (m * train),
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="digits-mlp")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=8, help="per report, in the catch trials")
    parser.add_argument(
        "--per-peer", type=int, default=None, help="samples per micro-batch (trials) [the example spec's]"
    )
    parser.add_argument("--honest-audits", type=int, default=3000)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--cost-micro-batches", type=int, default=64, help="per peer and epoch")
    parser.add_argument(
        "--cost-per-peer", type=int, default=16, help="samples (of 128 bytes) per micro-batch (digits' cost)"
    )
    parser.add_argument("--cost-dim", type=int, default=128)
    parser.add_argument("--cost-layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7, help="micro-batches timed for the cost")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    policy = AuditPolicy.default()
    with tempfile.TemporaryDirectory(prefix="bench-verification-") as folder:
        setting = load_setting(args.task, Path(folder))
        catch = [catch_trials(setting, kind, args, policy) for kind in KINDS]
        honest = honest_audits(setting, args, policy)
        spend = cost(args, policy, cost_setting(args, setting, Path(folder)))
    result = {
        "task": setting.label,
        "policy": {
            "rate": policy.rate,
            "min_audits": policy.min_audits,
            "tolerance": policy.tolerance,
            "loss_tolerance": policy.loss_tolerance,
        },
        "catch": catch,
        "honest": honest,
        "cost": spend,
        "goals": {
            "catch_rate": all(c["rate"] >= GOAL_CATCH for c in catch),
            "false_positives": sum(h["false_positives"] for h in honest) == 0,
            "cost": spend["ratio"] <= GOAL_COST,
        },
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"task: {setting.label}")
    print(f"audits: rate {policy.rate:g}, >= {policy.min_audits} per report, tolerance {policy.tolerance:g}")
    header = ("CHEAT", "TRIALS", "CAUGHT", "RATE", "MEAN EPOCHS", "MAX", "MIN DISTANCE")
    print(
        "\n"
        + "".join(
            f"{h:<18}" if i == 0 else f"{h:>{w}}"
            for i, (h, w) in enumerate(zip(header, (18, 7, 8, 8, 13, 5, 14), strict=True))
        )
    )
    for c in catch:
        print(
            f"{c['kind']:<18}{c['trials']:>7}{c['caught']:>8}{c['rate']:>8.1%}"
            f"{c['mean_epochs_to_catch'] or 0:>13.2f}{c['max_epochs_to_catch'] or 0:>5}"
            f"{c['min_distance'] or 0:>14.3f}"
        )
    print(f"\n{'HONEST PEER COMPUTED':<32}{'AUDITS':>7}{'FAILED':>8}{'MAX DISTANCE':>14}{'MAX LOSS GAP':>14}")
    for h in honest:
        print(
            f"{h['condition']:<32}{h['audits']:>7}{h['false_positives']:>8}{h['max_distance']:>14.2e}"
            f"{h['max_loss_gap']:>14.2e}"
        )
    c = spend
    print(
        f"\ncost: {c['peers']} peers x {c['micro_batches']} micro-batches of {c['per_peer']} "
        f"(target {c['target']}), {c['model']} ({c['parameters']:,} parameters)\n"
        f"  training {c['train_s'] * 1000:.1f} ms/epoch; sketches {c['sketch_s'] * 1000:.1f} ms, "
        f"sketchers drawn {c['sketchers_s'] * 1000:.1f} ms, snapshot {c['snapshot_s'] * 1000:.2f} ms, "
        f"{c['audits_per_report']:.2f} audits x {c['audit_s'] * 1000:.2f} ms\n"
        f"  verification / training = {c['ratio']:.2%} (goal <= {GOAL_COST:.0%})"
    )
    goals = result["goals"]
    print(
        f"\ngoals: catch >= {GOAL_CATCH:.0%} {'met' if goals['catch_rate'] else 'NOT met'}; "
        f"false positives 0 {'met' if goals['false_positives'] else 'NOT met'}; "
        f"cost {'met' if goals['cost'] else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
