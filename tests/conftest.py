from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from peer.protocol.identity import Identity
from tests.harness import CoordinatorProcess, PeerSwarm, group_members, start_coordinator


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[PeerSwarm]:
    """Real peer processes on 127.0.0.1; every child (p2pd included) is gone after the test."""
    peers = PeerSwarm(tmp_path)
    try:
        yield peers
    finally:
        survivors = peers.close()
        assert not survivors, f"processes left behind: {survivors}"


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    """A real coordinator process on a free port with a fresh SQLite file; its admin is ``.admin``."""
    server = start_coordinator(tmp_path / "coordinator", Identity.generate())
    try:
        yield server
    finally:
        server.stop()
        assert not group_members(server.proc.pid), "the coordinator left processes behind"
