"""``bench/averaging.py`` runs, in a small configuration, and its figures mean what they say: every method
averaged exactly (or is reported failed with its reason), the fast path's rows through a real coordinator
included, the ratios are against gloo, and no process it started (the coordinator included) outlives it.
(Its timings are not asserted: they are the bench's to report.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.harness import marked

BENCH = Path(__file__).resolve().parent.parent / "bench" / "averaging.py"
MARK = "BENCH_AVERAGING_TEST_RUN"  # inherited by every process the bench starts, p2pd included


@pytest.mark.timeout(240)
def test_the_averaging_bench_measures_every_method_against_gloo_and_leaves_no_process() -> None:
    # every method with each compression asked for that it has (the fast path: uncompressed, not 8-bit)
    small = ["--peers", "2", "--sizes", "1", "--rounds", "1", "--compressions", "none,8bit"]
    value = uuid.uuid4().hex
    done = subprocess.run(
        [sys.executable, str(BENCH), *small, "--timeout", "40", "--json"],
        capture_output=True,
        text=True,
        timeout=230,
        env={**os.environ, MARK: value},
    )
    assert not marked(MARK, value), "processes left behind"
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["machine"]["cpus"] == os.cpu_count()
    rows = {(r["method"], r["compression"]): r for r in result["rows"]}
    assert list(rows) == [
        ("gloo", "none"),
        ("fast", "none"),
        ("fast-rebuild", "none"),
        ("hivemarket", "none"),
        ("hivemarket", "8bit"),
        ("hivemind", "none"),
        ("hivemind", "8bit"),
    ]
    assert all((r["peers"], r["mb"]) == (2, 1) for r in rows.values())
    assert rows["gloo", "none"]["ratio"] == 1
    gloo = rows["gloo", "none"]["seconds"]
    # hivemind 1.1.12 cannot decode its own 8-bit tensors on numpy 2 (peer/codec.py) and reports the
    # round a success with each peer's own values: the bench must see through it. (Seen once in CI, with
    # the other core busy: that round did not end within the bench's timeout at all; never ok either.)
    hivemind_8bit_broken = int(np.__version__.split(".")[0]) >= 2
    for key, row in rows.items():
        if key == ("hivemind", "8bit") and hivemind_8bit_broken:
            assert not row["ok"] and row["seconds"] is None and row["ratio"] is None, row
            if "not done within" not in row["reason"]:
                assert "off the exact mean" in row["reason"] and row["max_error"] > 1e-3, row
            continue
        assert row["ok"] and not row["reason"], (key, row["reason"])
        assert len(row["round_seconds"]) == 1 and row["seconds"] == row["round_seconds"][0] > 0, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["ratio"] == pytest.approx(row["seconds"] / gloo), row
        assert row["max_error"] <= 1e-3, row
    assert rows["hivemarket", "none"]["max_error"] == rows["hivemarket", "8bit"]["max_error"] == 0
    # the fast path averages two peers' 0 and 1 exactly: 0.5 is a sum of halves
    assert rows["fast", "none"]["max_error"] == rows["fast-rebuild", "none"]["max_error"] == 0
    # fast: its timed round on the version its warm-up made; fast-rebuild: a new version for each round
    (version,) = rows["fast", "none"]["versions"]
    assert version == 2, rows["fast", "none"]  # the first peer's version 1, then both
    (rebuilt,) = rows["fast-rebuild", "none"]["versions"]
    assert rebuilt == 4, rows["fast-rebuild", "none"]  # 2 made, 3 rebuilt for the warm-up, 4 for the round
    assert all(r["versions"] == [] for key, r in rows.items() if key[0] not in ("fast", "fast-rebuild"))
    goals = (
        "hivemarket none <= 2x gloo",
        "hivemarket 8bit <= 1x gloo",
        "fast none <= 1.2x gloo",
        "fast-rebuild none <= 1.5x gloo",
    )
    assert list(result["goals"]) == list(goals)
    for goal in goals:
        (entry,) = result["goals"][goal]
        assert (entry["peers"], entry["mb"]) == (2, 1) and isinstance(entry["met"], bool), entry
