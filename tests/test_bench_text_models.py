"""``bench/text_models.py`` runs in a tiny configuration and reports what it says: both models trained on
the same number of samples, held-out bits per byte for each, and their ratio. (Whether the Llama-style model
wins is the bench's to report at a meaningful size, not asserted here.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "text_models.py"


@pytest.mark.timeout(120)
def test_the_text_models_bench_reports_bits_per_byte_of_both_models() -> None:
    tiny = ["--samples", "32", "--batch", "16", "--evals", "1", "--test-every", "200", "--layers", "1"]
    done = subprocess.run(
        [sys.executable, str(BENCH), *tiny, "--json"], capture_output=True, text=True, timeout=110
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    baseline, candidate = result["baseline"], result["candidate"]
    assert (baseline["task"], candidate["task"]) == ("bytes-lm", "causal-lm")
    for model in (baseline, candidate):
        assert model["samples"] == 32 and model["steps"] == 2
        assert model["held_out_samples"] > 0 and model["parameters"] > 0 and model["flops_per_sample"] > 0
        assert [point["samples"] for point in model["curve"]] == [0, 32]
        assert all(0 < point["bits_per_byte"] < 20 for point in model["curve"])
        assert model["held_out_bits_per_byte"] == model["curve"][-1]["bits_per_byte"]
    assert candidate["text_bytes_seen"] > baseline["text_bytes_seen"]  # a BPE sample holds more text
    assert math.isclose(
        result["ratio"], candidate["held_out_bits_per_byte"] / baseline["held_out_bits_per_byte"]
    )
    assert result["candidate_better"] == (result["ratio"] < 1)
    assert (
        result["options"]["causal-lm"]["family"] == "llama" and result["options"]["bytes-lm"]["layers"] == 1
    )
