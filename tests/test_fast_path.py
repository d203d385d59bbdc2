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

from peer.demo import Demo
from peer.events import AGREEMENT_TOLERANCE
from peer.protocol.run_schemas import ReportView, RunView
from peer.protocol.sketch import relative_distance
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
def test_a_member_that_sends_other_than_it_committed_to_gets_no_round_applied(tmp_path: Path):
    with local_market(tmp_path, peers=2, timeout=180) as (demo, accounts):
        cheat = demo.add_peer(adversary="noisy-round")
        demo.wait_offers(3)
        run = _launch(demo, peers_min=3, peers_max=3, epochs=40)
        everyone = [*accounts, cheat]

        def refused() -> bool:
            return all(
                sum(1 for e in demo.events(demo.peers[a].name) if e["event"] == "round_refused") >= 3
                for a in everyone
            )

        wait_until(refused, 150, "every member to refuse three rounds")
        for account in everyone:
            events = demo.events(demo.peers[account].name)
            rounds = [e for e in events if e["event"] == "round_refused"]
            assert all(e["outcome"] == "rejected" and "commitments" in e["reason"] for e in rounds), rounds
            assert not [e for e in _epochs(demo, account) if e["outcome"] == "averaged"]
        assert demo.ask(lambda c: c.reports(run.id)) == []  # nothing applied, nothing reported or paid


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
