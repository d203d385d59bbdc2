"""``bench/averaging.py`` runs, in a small configuration, and its figures mean what they say: every method
averaged exactly (or is reported failed with its reason), the ratios are against gloo, and no process it
started outlives it. (Its timings are not asserted: they are the bench's to report.)"""

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
        ("hivemarket", "none"),
        ("hivemarket", "8bit"),
        ("hivemind", "none"),
        ("hivemind", "8bit"),
    ]
    assert all((r["peers"], r["mb"]) == (2, 1) for r in rows.values())
    assert rows["gloo", "none"]["ratio"] == 1
    # hivemind 1.1.12 cannot decode its own 8-bit tensors on numpy 2 (peer/codec.py) and reports the
    # round a success with each peer's own values: the bench must see through it.
    hivemind_8bit_broken = int(np.__version__.split(".")[0]) >= 2
    for key, row in rows.items():
        if key == ("hivemind", "8bit") and hivemind_8bit_broken:
            assert not row["ok"] and "off the exact mean" in row["reason"], row
            assert row["max_error"] > 1e-3 and row["seconds"] is None and row["ratio"] is None, row
            continue
        assert row["ok"] and not row["reason"], row
        assert len(row["round_seconds"]) == 1 and row["seconds"] == row["round_seconds"][0] > 0, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["max_error"] <= 1e-3, row
    assert rows["hivemarket", "none"]["max_error"] == rows["hivemarket", "8bit"]["max_error"] == 0
    for goal in ("hivemarket none <= 2x gloo", "hivemarket 8bit <= 1x gloo"):
        (entry,) = result["goals"][goal]
        assert (entry["peers"], entry["mb"]) == (2, 1) and isinstance(entry["met"], bool), entry
