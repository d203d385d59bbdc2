"""bench/coordinator_load.py runs end to end on a tiny setting and reports its three rows and their ratios.

Structure only: the rates of a few seconds on a shared machine say nothing, so no goal is asserted; what
is asserted is that each row was measured (a positive rate, a p99, no failed request) and that the
ratios and the projection are the ones its rows give (a broken computation fails here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.postgres import binaries

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--peers", "20", "--duration", "1", "--warmup", "0.5", "--workers", "1", "--concurrency", "8"]


@pytest.mark.timeout(150)
@pytest.mark.skipif(binaries() is None, reason="PostgreSQL is not installed (apt-get install postgresql)")
def test_the_load_bench_reports_sqlite_postgresql_and_two_replicas() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "coordinator_load.py"), *TINY, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=140,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)

    rows = {row["store"]: row for row in outcome["rows"]}
    assert list(rows) == ["sqlite", "postgresql", "postgresql-2"]
    assert [row["replicas"] for row in rows.values()] == [1, 1, 2]
    for row, run in zip(rows.values(), outcome["runs"], strict=True):
        assert row["heartbeats_per_s"] > 0, row
        assert row["p99_ms"] is not None and row["p99_ms"] > 0, row
        assert row["p50_ms"] <= row["p99_ms"], row
        failed = {s["scenario"]: s["errors_by_status"] for s in run["scenarios"] if s["errors"]}
        assert row["errors"] == 0, (row["store"], failed)
        assert row["healthz_per_s"] > 0, row
        assert row["replica_cores"] > 0, row
        assert row["heartbeats_per_replica_cpu_s"] == pytest.approx(
            row["heartbeats_per_s"] / row["replica_cores"]
        )
    assert rows["sqlite"]["database_cores"] is None  # SQLite runs inside the replica
    assert rows["postgresql"]["database_cores"] > 0  # the PostgreSQL server's processes were measured

    # Each replica of the two-replica row served requests: its CPU time is its own.
    signed = outcome["runs"][2]["cpu_in_window"]["signed"]
    assert len(signed["replicas"]) == 2 and all(cores > 0 for cores in signed["replicas"])
    assert len(set(outcome["runs"][2]["urls"])) == 2

    ratios = outcome["comparison"]["ratios"]
    pg_vs_sqlite, two_vs_one = ratios["postgresql_vs_sqlite"], ratios["two_replicas_vs_one"]
    assert pg_vs_sqlite["value"] == pytest.approx(
        rows["postgresql"]["heartbeats_per_s"] / rows["sqlite"]["heartbeats_per_s"]
    )
    assert two_vs_one["value"] == pytest.approx(
        rows["postgresql-2"]["heartbeats_per_s"] / rows["postgresql"]["heartbeats_per_s"]
    )
    assert (pg_vs_sqlite["goal"], two_vs_one["goal"]) == (0.8, 1.3)
    assert pg_vs_sqlite["trials"] == [pg_vs_sqlite["value"]]  # one trial: its own ratio is the one judged
    for ratio in (pg_vs_sqlite, two_vs_one):
        assert ratio["met"] == (ratio["value"] >= ratio["goal"])
    p99_met = all(row["p99_ms"] <= outcome["goals"]["p99_ms"] for row in rows.values())
    assert outcome["comparison"]["p99_goal_met_every_row"] == p99_met

    projection = outcome["comparison"]["projection"]
    assert projection["basis"] == "postgresql-2"
    assert projection["two_replicas_on_own_hosts_heartbeats_per_s"] == pytest.approx(
        2 * rows["postgresql-2"]["heartbeats_per_replica_cpu_s"]
    )

    assert outcome["machine"]["cores"] >= 1
    assert outcome["postgresql"]["durable"] is True  # fsync on, as SQLite's synchronous=FULL
    assert outcome["sqlite_synchronous"] == "FULL"


def test_with_several_trials_the_judged_ratio_is_the_median_of_the_trials() -> None:
    """The rows alternate over trials; each trial's ratio is of its own rows, and the median is judged."""
    from bench.coordinator_load import compare

    def run(store: str, trial: int, rate: float) -> dict[str, Any]:
        summary = {
            "heartbeats_per_s": rate,
            "heartbeats_per_healthz": rate / 10_000,
            "p99_goal_met": True,
            "heartbeats_per_replica_cpu_s": rate,
            "database_cpu_s_per_1000_heartbeats": None if store == "sqlite" else 0.1,
        }
        return {"store": store, "trial": trial, "summary": summary}

    rates = [(2000, 1000), (3000, 2700), (2000, 1600)]  # (sqlite, postgresql): 0.5x, 0.9x, 0.8x
    runs = [
        run(store, trial, rate)
        for trial, pair in enumerate(rates, 1)
        for store, rate in zip(("sqlite", "postgresql"), pair, strict=True)
    ]

    ratio = compare(runs)["ratios"]["postgresql_vs_sqlite"]

    assert ratio["trials"] == pytest.approx([0.5, 0.9, 0.8])
    assert ratio["value"] == pytest.approx(0.8) and ratio["met"] is True
    assert "two_replicas_vs_one" not in compare(runs)["ratios"]  # no row of two replicas was measured
