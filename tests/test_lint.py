"""The tree stays ruff clean (part of the default test command, so CI enforces it)."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import REPO


def test_ruff_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
