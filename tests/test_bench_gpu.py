"""``bench/gpu.py`` in its CPU dry run (CI has no GPU): the plain process of each workload trains and is
reported, the adaptation task with only its adapters trained. (The swarm modes and every figure that
means something need a GPU: the bench's to report there.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("task", "trained"), [("bytes-lm", None), ("embed-lora", "LoRA rank 8 on query,key,value,dense")]
)
def test_the_gpu_bench_dry_run_trains_each_workload_plainly(task: str, trained: str | None) -> None:
    tiny = ["--cpu", "--modes", "plain", "--seconds", "0.5", "--target", "16", "--micro", "8"]
    sizes = ["--dim", "64", "--layers", "1", "--heads", "2"] if task == "bytes-lm" else []
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--task", task, *tiny, *sizes, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    (row,) = result["rows"]
    assert row["mode"] == "plain" and row["samples_per_s"] > 0 and row["steps"] >= 1, row
    assert row["ratio"] == 1.0 and row["goal_met"] is False, row  # no GPU: busy 0
    assert result["model"].startswith(task) and result["batch"] == {"target": 16, "micro": 8, "peers": 2}
    if trained is not None:  # the adapters only: 110,592 of 22.8M parameters
        assert trained in result["model"] and "0.11M trained" in result["model"], result["model"]
