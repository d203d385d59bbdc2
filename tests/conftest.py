from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PeerSwarm


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[PeerSwarm]:
    """Real peer processes on 127.0.0.1; every child (p2pd included) is gone after the test."""
    peers = PeerSwarm(tmp_path)
    try:
        yield peers
    finally:
        survivors = peers.close()
        assert not survivors, f"processes left behind: {survivors}"
