"""What a trainer reports as an epoch's ``seconds``, end to end: a real coordinator, two renting peers and
their trainers on 127.0.0.1, the digits task, on the synchronous round and on the overlapped one.

The schema says ``seconds`` is the compute time of the epoch's work, and the coordinator bills it and
measures each peer's delivered capacity on it (coordinator.capacity): a peer that counted its wait in the
round (the slowest member's pace, in lock-step epochs) would show the same samples/s as every other member
whatever its GPU, and an honest fast one would be flagged beside a slow one. Each report's ``seconds`` is
checked against the ``compute_s`` of the same epoch in its trainer's event log.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tests.harness import local_market

# compute_s is written rounded to 4 decimals, the report's seconds as measured
ROUNDING = 1e-4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overlap", [False, True], ids=["synchronous", "overlapped"])
def test_a_report_claims_its_epochs_compute_time_not_its_wait_in_the_round(tmp_path: Path, overlap: bool):
    with local_market(tmp_path, peers=2, timeout=180) as (demo, accounts):
        run = demo.launch(
            peers_min=2,
            peers_max=2,
            bid_over_asks=Decimal(20),
            changes={
                "batch": {"target": 512, "per_peer": 64},
                "averaging": {"overlap": overlap},
                "verification": {"rate": 0},  # the reports alone are checked here
                "stop": {"samples": 512 * 12},
            },
        )
        final, _ = demo.follow(run)
        assert final.state == "finished", final.reason
        reports = demo.ask(lambda c: c.reports(run.id))
        checked, waited = 0, 0.0
        for account in accounts:
            epochs = [e for e in demo.events(demo.peers[account].name) if e["event"] == "epoch"]
            compute: dict[int, list[float]] = {}
            for e in epochs:
                compute.setdefault(e["epoch"], []).append(e["compute_s"])
                waited = max(waited, e["round_s"])
            for r in (r for r in reports if r.account == account):
                assert r.epoch in compute, (r.epoch, sorted(compute))
                gap = min(abs(r.seconds - c) for c in compute[r.epoch])
                assert gap <= ROUNDING, (r.epoch, r.seconds, compute[r.epoch])
                checked += 1
        assert checked >= 10, checked
        # the rounds took time that the reports did not count (else the check above would prove nothing)
        assert waited > 100 * ROUNDING, waited
