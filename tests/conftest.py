from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peer.protocol.identity import Identity
from tests.harness import CoordinatorProcess, PeerSwarm, group_members, start_coordinator
from tests.postgres import PostgresServer


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (each test takes a database of its own)."""
    with PostgresServer() as server:
        yield server


@dataclass
class Databases:
    """Where one test module's coordinators keep their state, on one kind of store."""

    kind: str
    server: PostgresServer | None

    def url(self) -> str | None:
        """A new, empty database: None for SQLite (the harness's file in the coordinator's home)."""
        return None if self.server is None else self.server.database()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def databases(request: pytest.FixtureRequest) -> Databases:
    """Run the module's tests once on each store: the coordinator's tests must pass on both."""
    if request.param == "sqlite":
        return Databases("sqlite", None)
    return Databases("postgresql", request.getfixturevalue("postgres_server"))
