"""The fast path end to end: a real coordinator, real renting peers and their trainers on 127.0.0.1, the
digits task, each epoch's round on a gloo process group built through the coordinator's rendezvous
(peer.collective). A member killed mid-run while strangers pester every port the trainers listen on; a
member that sends into the round something other than what it committed to; a peer without a direct
address that moves the run to hivemind's averager and back."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import torch

from peer.data.reader import DatasetReader
from peer.demo import Demo
from peer.events import AGREEMENT_TOLERANCE
from peer.model_file import load_model_file
from peer.protocol.dataset import load_manifest
from peer.protocol.run_schemas import ReportView, RunView
from peer.protocol.sketch import relative_distance
from peer.protocol.spec import validate_spec
from peer.samples import test_ids as held_out_ids
from peer.trainer_overlap import predicted_step
from peer.trainer_setup import make_optimizer
from tests.harness import Strangers, local_market, wait_until

TRAIN_SAMPLES = 1438  # the digits' training split


def _launch(demo: Demo, peers_min: int, peers_max: int, epochs: int) -> RunView:
    return demo.launch(
        peers_min=peers_min,
        peers_max=peers_max,
        bid_over_asks=Decimal(20),
        changes={
            "batch": {"target": 512, "per_peer": 64},
            "optimizer": {"lr": 0.003},
            "stop": {"samples": 512 * epochs},
        },
    )


def _epochs(demo: Demo, account: str) -> list[dict[str, Any]]:
    return [e for e in demo.events(demo.peers[account].name) if e["event"] == "epoch"]


def _banned_for_its_round(demo: Demo, run: RunView, cheat: str, reason: str) -> float:
    """Wait for ``cheat`` to be banned from ``run``; the only failed checks are its rounds' (index -1,
    ``reason`` in their reason). Returns when the ban was seen."""

    def banned() -> bool:
        view = demo.ask(lambda c: c.run(run.id))
        return any(p.account == cheat and p.state == "banned" for p in view.peers)

    wait_until(banned, 150, f"{cheat[:12]}... to be banned for its rounds")
    failed = [a for a in demo.ask(lambda c: c.audits(run.id)) if a.state == "failed"]
    assert failed and {a.account for a in failed} == {cheat}, failed
    assert all(a.index == -1 and reason in a.reason for a in failed), failed
    return time.time()


def _assert_agreement(reports: list[ReportView], accounts: set[str]) -> int:
    """Every epoch two of ``accounts`` reported, they reported it from the same parameters; how many."""
    by_epoch: dict[int, list[ReportView]] = defaultdict(list)
    for r in reports:
        if r.account in accounts:
            by_epoch[r.epoch].append(r)
    shared = [e for e, rs in by_epoch.items() if len(rs) > 1]
    for epoch in shared:
        first, *others = by_epoch[epoch]
        for other in others:
            distance = relative_distance(first.param_sketch, other.param_sketch)
            assert distance <= AGREEMENT_TOLERANCE["none"], (epoch, distance)
    return len(shared)


@pytest.mark.timeout(300)
def test_a_killed_member_breaks_its_round_for_all_and_the_survivors_go_on_while_strangers_pester_them(
    tmp_path: Path,
):
    with local_market(tmp_path, peers=3, timeout=240) as (demo, accounts):
        run = _launch(demo, peers_min=2, peers_max=3, epochs=60)
        wait_until(lambda: demo.ask(lambda c: c.run(run.id)).epoch >= 8, 120, "the run to get under way")

        def trainer_pids() -> list[int]:
            found = [demo.trainer(demo.peers[a].name) for a in accounts]
            return [p.pid for p in found if p is not None]

        with Strangers(trainer_pids) as strangers:
            wait_until(lambda: strangers.connections > 100, 60, "the strangers to connect")
            victim = accounts[2]
            demo.peers[victim].kill_group(signal.SIGKILL)
            killed_at = time.time()
            survivors = set(accounts[:2])

            def regrouped() -> bool:
                group = demo.ask(lambda c: c.run(run.id)).group
                return (
                    group is not None
                    and group.path == "fast"
                    and {m.account for m in group.members} == survivors
                )

            wait_until(regrouped, 60, "a group of the two survivors on the fast path")
            final, _ = demo.follow(run)
        assert final.state == "finished", final.reason
        reports = demo.ask(lambda c: c.reports(run.id))
        assert _assert_agreement(reports, survivors) >= 20
        back = []
        for account in survivors:
            epochs = _epochs(demo, account)
            assert {e["path"] for e in epochs} == {"fast"}, {e["path"] for e in epochs}
            after = [e for e in epochs if e["time"] > killed_at and e["outcome"] == "averaged"]
            assert after and all(e["group"] == 2 for e in after[1:]), after[:3]
            back.append(after[0]["time"] - killed_at)
            # a round applied by only some members would set the parameters apart: the reports' sketches
            # (checked above) and the epochs' run of averaged outcomes show none was
            averaged = [e["epoch"] for e in epochs if e["outcome"] == "averaged"]
            assert averaged == sorted(set(averaged)), averaged
        print(
            f"survivors averaging again {max(back):.2f} s after the kill; {strangers.connections} stranger "
            f"connections to {len(strangers.ports)} ports"
        )


@pytest.mark.timeout(240)
def test_a_member_that_sends_other_than_it_committed_to_gets_no_round_applied_and_is_blamed(tmp_path: Path):
    """peer.adversary's noisy-round adds noise after committing: every member refuses the round, their
    reveal finds who sent other than it committed to, and the coordinator bans it once the others blame
    it; the others then train on without it."""
    with local_market(tmp_path, peers=2, timeout=180) as (demo, accounts):
        cheat = demo.add_peer(adversary="noisy-round")
        demo.wait_offers(3)
        run = _launch(demo, peers_min=2, peers_max=3, epochs=40)
        banned_at = _banned_for_its_round(demo, run, cheat, "not what it committed to")
        for account in accounts:
            events = demo.events(demo.peers[account].name)
            # refused for its result (and, once the ban formed a new group version, the old one failed)
            refused = [e for e in events if e["event"] == "round_refused" and e["outcome"] == "rejected"]
            assert refused and all("commitments" in e["reason"] for e in refused), refused
            blamed = [e for e in events if e["event"] == "round_blamed"]
            assert blamed and all(e["accused"] == [cheat] for e in blamed), blamed
            # no round with the noisy member in it was applied
            averaged = [e for e in _epochs(demo, account) if e["outcome"] == "averaged"]
            assert all(e["time"] > banned_at or e["group"] < 3 for e in averaged), averaged[:3]
        final, _ = demo.follow(run)
        assert final.state == "finished", final.reason
        reports = demo.ask(lambda c: c.reports(run.id))
        assert not [r for r in reports if r.account == cheat]
        assert _assert_agreement(reports, set(accounts)) >= 10


@pytest.mark.timeout(240)
def test_a_member_that_sends_and_commits_to_another_update_than_its_reports_is_failed_and_banned(
    tmp_path: Path,
):
    """peer.adversary's poisoned-round reports honestly (its audits pass) and sends, committing to it,
    four times the opposite of its update: the round's own check passes, the coordinator's check of the
    forwarded commitment against its report fails its epoch and bans it; the others train on. On
    hivemind's path, where this runs (the fast path forwards them the same way, and
    tests/test_round_binding.py checks the coordinator's side), the signed commitments travel in
    hivemind's gather."""
    path, env = "hivemind", {"HIVEMARKET_FAST_PATH": "false"}
    with local_market(tmp_path, peers=2, timeout=180, **env) as (demo, accounts):
        cheat = demo.add_peer(adversary="poisoned-round", **env)
        demo.wait_offers(3)
        run = _launch(demo, peers_min=2, peers_max=3, epochs=60)
        banned_at = _banned_for_its_round(demo, run, cheat, "round commitment")
        final, _ = demo.follow(run)
        assert final.state == "finished", final.reason
        reports = demo.ask(lambda c: c.reports(run.id))
        assert not [r for r in reports if r.account == cheat and r.pay_state == "paid"]
        assert _assert_agreement(reports, set(accounts)) >= 10
        for account in accounts:  # the honest members went on averaging without it
            after = [
                e for e in _epochs(demo, account) if e["time"] > banned_at and e["outcome"] == "averaged"
            ]
            assert after and after[-1]["group"] == 2 and {e["path"] for e in after} == {path}, after[-3:]


@pytest.mark.timeout(300)
def test_a_peer_without_a_direct_address_moves_the_run_to_hivemind_and_its_leaving_moves_it_back(
    tmp_path: Path,
):
    with local_market(tmp_path, peers=2, timeout=240) as (demo, accounts):
        run = _launch(demo, peers_min=2, peers_max=3, epochs=400)
        wait_until(lambda: demo.ask(lambda c: c.run(run.id)).epoch >= 5, 120, "the run to get under way")
        hidden = demo.add_peer(HIVEMARKET_FAST_PATH="false")

        def on(path: str, size: int) -> bool:
            view = demo.ask(lambda c: c.run(run.id))
            if view.group is None or view.group.path != path or len(view.group.members) != size:
                return False
            return all(
                sum(
                    1
                    for e in _epochs(demo, a)
                    if e["path"] == path and e["group"] == size and e["time"] > since
                )
                >= 3
                for a in (accounts if size == 2 else [*accounts, hidden])
            )

        since = time.time()
        wait_until(lambda: on("hivemind", 3), 150, "three peers to train on hivemind's path")
        view = demo.ask(lambda c: c.run(run.id))
        assert "address" in view.group.reason or "reach" in view.group.reason, view.group.reason
        since = time.time()
        demo.peers[hidden].kill_group(signal.SIGKILL)
        wait_until(lambda: on("fast", 2), 150, "the two left to train on the fast path again")
        reports = demo.ask(lambda c: c.reports(run.id))
        assert _assert_agreement(reports, set(accounts)) >= 10
        demo.ask(lambda c: c.cancel_run(run.id), demo.launcher)


@pytest.mark.timeout(240)
def test_overlapped_rounds_apply_each_average_one_epoch_late_at_predicted_parameters_on_every_peer(
    tmp_path: Path,
):
    """``averaging.overlap``: two peers train with each round in the background. The run's model is what
    one process gets by replaying the reported batches with the same rule (the gradient of epoch t taken
    at the parameters plus the optimizer's predicted step, applied after epoch t+1), and not what a
    synchronous replay gets; the peers reported from the same parameters and every audit (recomputed at
    those predicted parameters) passed."""
    with local_market(tmp_path, peers=2, timeout=180) as (demo, accounts):
        run = demo.launch(
            peers_min=2,
            peers_max=2,
            bid_over_asks=Decimal(20),
            changes={
                "batch": {"target": 512, "per_peer": 128},
                "optimizer": {"lr": 0.01},
                "averaging": {"overlap": True},
                "stop": {"samples": 512 * 40},
            },
        )
        final, _ = demo.follow(run)
        assert final.state == "finished", final.reason
        reports = demo.ask(lambda c: c.reports(run.id))
        assert _assert_agreement(reports, set(accounts)) >= 30
        audits = demo.ask(lambda c: c.audits(run.id))
        assert audits and {a.state for a in audits} == {"passed"}, {a.state for a in audits}
        for account in accounts:
            epochs = [e for e in _epochs(demo, account) if e.get("overlap")]
            assert len(epochs) >= 35 and [e["outcome"] for e in epochs[1:]].count("averaged") >= 34, epochs
        model_file = demo.tmp / "model.pt"
        demo.ask(lambda c: c.download_model(run.id, model_file))
        task, swarm_model, saved = load_model_file(model_file)
        spec = validate_spec(final.spec)
        reader = DatasetReader(load_manifest(demo.tmp / "digits"), lambda s: demo.tmp / "digits" / s.file)
        batches: dict[int, list[int]] = defaultdict(list)
        for report in reports:
            batches[report.epoch] += [i for m in report.micro_batches for i in m.ids]
        held_out = held_out_ids(reader.manifest.samples, spec.dataset.test_every).tolist()
        test = task.batch(reader.read(held_out))

        def replay(overlapped: bool) -> float:
            model = task.build_model(spec.seed)
            params = list(model.parameters())
            optimizer = make_optimizer(spec, params)
            pending = None
            for epoch in range(saved["epoch"]):
                real = [p.detach().clone() for p in params]
                if overlapped and pending is not None:
                    with torch.no_grad():
                        for p, step in zip(params, predicted_step(optimizer), strict=True):
                            if step is not None:
                                p.add_(step)
                optimizer.zero_grad()
                grads = None
                if epoch in batches:
                    task.loss(model, task.batch(reader.read(batches[epoch]))).backward()
                    grads = [p.grad.clone() for p in params]
                with torch.no_grad():
                    for p, r in zip(params, real, strict=True):
                        p.copy_(r)
                step_with = pending if overlapped else grads
                if step_with is not None:
                    for p, g in zip(params, step_with, strict=True):
                        p.grad = g
                    optimizer.step()
                pending = grads
            with torch.no_grad():
                return task.evaluate(model, test)["loss"]

        with torch.no_grad():
            swarm = task.evaluate(swarm_model, test)["loss"]
        overlapped, synchronous = replay(True), replay(False)
        print(f"swarm {swarm:.4f}, overlapped replay {overlapped:.4f}, synchronous replay {synchronous:.4f}")
        assert abs(swarm - overlapped) <= 0.01 * overlapped, (swarm, overlapped)
        assert abs(swarm - synchronous) > 0.05 * synchronous, (swarm, synchronous)
