"""``bench/verification.py`` runs, in a small configuration, and its measurements mean what they say: every
cheat caught, no honest audit failed, a cost figure computed. (Its timings are not asserted: they are the
bench's to report.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peer.adversary import KINDS

BENCH = Path(__file__).resolve().parent.parent / "bench" / "verification.py"


@pytest.mark.timeout(300)
def test_the_verification_bench_catches_every_cheat_and_no_honest_peer() -> None:
    small = ["--trials", "5", "--honest-audits", "90", "--honest-rounds", "30", "--cost-micro-batches", "8"]
    small += ["--repeat", "2", "--json", "--honest-canaries", "60"]
    done = subprocess.run([sys.executable, str(BENCH), *small], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert [c["kind"] for c in result["catch"]] == [*KINDS, "poisoned-round"]
    for cheat in result["catch"]:
        assert cheat["caught"] == cheat["trials"] == 5, cheat
        assert cheat["min_distance"] > result["policy"]["tolerance"], cheat
    assert {h["condition"] for h in result["honest"]} >= {
        "same as the validator",
        "bfloat16 autocast vs float32",
    }
    for honest in result["honest"]:
        assert honest["false_positives"] == 0 and honest["audits"] >= 30, honest
        assert honest["max_distance"] < result["policy"]["tolerance"], honest
        assert honest["round_checks"] >= 10 and honest["max_round_distance"] < 1e-3, (
            honest
        )  # BINDING_TOLERANCE
    lazy, canaries = result["validators"]["lazy"], result["validators"]["honest"]
    assert lazy["kind"] == "lazy-validator" and lazy["caught"] == lazy["trials"] == 5, lazy  # within 5 epochs
    assert lazy["banned"] == 5 and lazy["faked_audits"] > 0, lazy
    assert lazy["fees_earned"] == 0 and lazy["fees_forfeit"] > 0, lazy  # nothing for the audits it faked
    assert lazy["min_distance"] > result["policy"]["tolerance"], lazy
    assert canaries["false_positives"] == 0 and canaries["canaries"] >= 60, canaries
    assert canaries["max_distance"] < result["policy"]["tolerance"], canaries
    cost = result["cost"]
    assert cost["audits_per_report"] == 2 and cost["micro_batches"] == 8  # the minimum, on 8 micro-batches
    assert cost["canaries_per_epoch"] == result["policy"]["canary_rate"] > 0  # counted in the cost
    assert cost["ratio"] > 0 and cost["verification_s"] > 0
