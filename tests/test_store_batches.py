"""Batched writes (coordinator.db.Database.write_batched) on a real SQLite file and a real PostgreSQL server:
heartbeats that arrive together are renewed in a few statements, each decided as if it ran alone."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.db import Call, StoreUnavailable
from coordinator.errors import Conflict, Forbidden, NonceReplayed, NonceReused, NotFound
from coordinator.leases import LeaseConfig
from coordinator.postgres import PostgresDatabase
from coordinator.schema import MIGRATIONS
from coordinator.store import SQLStore, open_store
from peer.protocol.envelope import Envelope
from peer.protocol.schemas import HardwareSummary, OfferBody, Telemetry
from tests.conftest import Databases
from tests.postgres import PostgresServer

pytestmark = pytest.mark.timeout(120)

TIMES = LeaseConfig(heartbeat_interval=5.0, ttl=15.0)
T0 = 1_000_000.0
HARDWARE = HardwareSummary(gpu="A10", gpu_count=1, vram_gb=24.0, tflops=60.0, ram_gb=64.0, cpu_cores=8)


@pytest.fixture
async def store(tmp_path: Path, databases: Databases) -> AsyncIterator[SQLStore]:
    url = databases.url() or f"sqlite:///{tmp_path}/market.db"
    opened = open_store(url, TIMES, synchronous="FULL", batch_max=64)
    await opened.open()
    try:
        yield opened  # type: ignore[misc]
    finally:
        await opened.close()


def envelope(account: str, at: float, nonce: str | None = None) -> Envelope:
    return Envelope(account, int(at), nonce or secrets.token_hex(8))


async def offer(store: SQLStore, account: str, at: float) -> str:
    body = OfferBody(price_per_hour="1", hardware=HARDWARE)
    response = await store.post_offer(at, envelope(account, at), body)
    return response.lease.id


# The writes below are module-level functions bound with Call: on PostgreSQL they run in the writer's process.


def _add(conn: Any, account: str) -> str:
    conn.execute("INSERT INTO peers (account) VALUES (?)", (account,))
    return f"added {account}"


def add(account: str) -> Call:
    """A write that adds peer ``account`` and answers so."""
    return Call(_add, account)


def _add_each(conn: Any, accounts: list[str]) -> list[str]:
    """A batched kind: adds every account, and fails as a whole at the account "bad" (a missing table)."""
    for account in accounts:
        conn.execute("INSERT INTO peers (account) VALUES (?)", (account,))
        if account == "bad":
            conn.execute("SELECT * FROM no_such_table")
    return [f"added {account}" for account in accounts]


def _fails_at_commit(conn: Any) -> None:
    conn.execute("INSERT INTO peers (account) VALUES (?)", ("z",))
    conn.execute("INSERT INTO no_such_table VALUES (1)")


def _fails_late(conn: Any) -> None:  # fails once the server has run it, 50 ms after it was sent
    conn.execute("INSERT INTO peers (account) VALUES (?)", ("z",))
    conn.execute("UPDATE peers SET uptime = 1 / (SELECT 0 FROM pg_sleep(0.05)) WHERE account = 'z'")


def _add_and_count(conn: Any) -> int:
    conn.execute("INSERT INTO peers (account) VALUES (?)", ("r",))
    return conn.execute("SELECT COUNT(*) FROM peers").fetchone()[0]


def _refused(conn: Any) -> None:
    conn.execute("INSERT INTO peers (account) VALUES (?)", ("q",))
    raise Conflict("refused after a statement", field="account")


async def rows(store: SQLStore, query: str, *params: Any) -> list[tuple[Any, ...]]:
    return await store._db.read(lambda conn: [tuple(row) for row in conn.execute(query, params)])


async def test_heartbeats_that_arrive_together_are_each_decided_as_if_alone(store: SQLStore) -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    lapsed = await offer(store, c, T0)
    lease_a, _ = await offer(store, a, T0 + 10), await offer(store, b, T0 + 10)
    assert [lapse.lease_id for lapse in await store.sweep(T0 + 16, nonce_horizon=3600)] == [lapsed]

    first = envelope(a, T0 + 12)
    refused = envelope(c, T0 + 12)
    telemetry = Telemetry(power_w=250.0, temperature_c=None, utilization_pct=None)
    beats = [
        store.heartbeat(T0 + 12, first, lease_a),
        store.heartbeat(T0 + 12, first, lease_a),  # the same request twice: applied once
        store.heartbeat(T0 + 13, envelope(a, T0 + 13), lease_a, telemetry),  # credited after the first
        store.heartbeat(T0 + 13, envelope(b, T0 + 13), lease_a),  # another account's lease
        store.heartbeat(T0 + 13, envelope(b, T0 + 13), "0" * 16),  # no such lease
        store.heartbeat(T0 + 13, refused, lapsed),
    ]
    outcomes = await asyncio.gather(*beats, return_exceptions=True)

    assert outcomes[0].expires_at == T0 + 12 + TIMES.ttl
    assert isinstance(outcomes[1], NonceReplayed), outcomes[1]
    assert outcomes[2].expires_at == T0 + 13 + TIMES.ttl
    assert isinstance(outcomes[3], Forbidden), outcomes[3]
    assert isinstance(outcomes[4], NotFound), outcomes[4]
    assert isinstance(outcomes[5], Conflict) and outcomes[5].code == "lease_lapsed", outcomes[5]
    assert await rows(store, "SELECT last_heartbeat FROM leases WHERE id = ?", lease_a) == [(T0 + 13,)]
    # the offer renewed the lease at T0 + 10; the two heartbeats credit 2 s and then 1 s
    assert await rows(store, "SELECT uptime FROM peers WHERE account = ?", a) == [(3.0,)]
    assert await rows(store, "SELECT uptime FROM peers WHERE account = ?", b) == [(0.0,)]
    telemetry_row = (
        "SELECT power_w, temperature_c, utilization_pct, telemetry_at FROM offers WHERE account = ?"
    )
    assert await rows(store, telemetry_row, a) == [(250.0, None, None, T0 + 13)]

    # the refused heartbeat's nonce was kept with its refusal: replayed, it is refused as reused
    with pytest.raises(NonceReused, match="409 lease_lapsed"):
        await store.heartbeat(T0 + 14, refused, lapsed)


async def test_a_kind_that_fails_as_a_whole_runs_each_item_alone(store: SQLStore) -> None:
    """A database error in one item (here a missing table) refuses that item only; the others commit."""
    kind = Call(_add_each)
    outcomes = await asyncio.gather(
        *(store._db.write_batched(kind, account) for account in ("x", "bad", "y")), return_exceptions=True
    )

    assert outcomes[0] == "added x" and outcomes[2] == "added y"
    assert "no_such_table" in str(outcomes[1])
    assert await rows(store, "SELECT account FROM peers ORDER BY account") == [("x",), ("y",)]


async def test_a_replayed_offer_is_refused_as_replayed_and_changes_nothing(store: SQLStore) -> None:
    """The offer's nonce claim is settled after its first read (one round trip on PostgreSQL): a replay is
    still refused as a replay, before the offer is written again."""
    a = "d" * 64
    env = envelope(a, T0)
    body = OfferBody(price_per_hour="1", hardware=HARDWARE)
    first = await store.post_offer(T0, env, body)
    assert first.lease.state == "active" and first.lease.expires_at == T0 + TIMES.ttl
    with pytest.raises(NonceReplayed):
        await store.post_offer(T0 + 5, env, OfferBody(price_per_hour="9", hardware=HARDWARE))
    assert await rows(store, "SELECT price_units, updated_at FROM offers WHERE account = ?", a) == [
        (1_000_000, T0)
    ]
    assert await rows(store, "SELECT last_heartbeat FROM leases WHERE account = ?", a) == [(T0,)]


async def test_a_batch_whose_last_write_fails_at_the_commit_refuses_only_that_write(store: SQLStore) -> None:
    """On PostgreSQL no write of a batch is settled alone: the last one's statements go with the COMMIT. A
    database error there (a write that reads nothing back) must still refuse that write only, and be
    raised as the database's error, not as a lost database; writes after it run as before."""
    bad = Call(_fails_at_commit)
    outcomes = await asyncio.gather(
        store._db.write(add("x")), store._db.write(add("y")), store._db.write(bad), return_exceptions=True
    )

    assert outcomes[:2] == ["added x", "added y"], outcomes
    assert "no_such_table" in str(outcomes[2]), outcomes[2]
    assert await store._db.write(add("w")) == "added w"
    assert await rows(store, "SELECT account FROM peers ORDER BY account") == [("w",), ("x",), ("y",)]


async def test_an_offer_answers_what_the_book_then_lists(store: SQLStore) -> None:
    """post_offer builds its answer from one read and the body instead of reading the row back: the offer
    it answers (new, then renewed with uptime credited) is the one the book lists, on both stores."""
    a = "e" * 64
    for at, price in ((T0, "1.5"), (T0 + 4, "2.25")):
        body = OfferBody(price_per_hour=price, hardware=HARDWARE, roles=["trainer", "validator"])
        answered = await store.post_offer(at, envelope(a, at), body)
        (listed,) = [o for o in await store.offers() if o.account == a]
        assert answered.offer == listed, (answered.offer, listed)
        assert answered.lease.expires_at == at + TIMES.ttl
    assert answered.offer.reliability > 0 and answered.offer.updated_at == T0 + 4
    assert await rows(store, "SELECT uptime FROM peers WHERE account = ?", a) == [(4.0,)]


async def test_a_write_that_fails_where_a_later_write_reads_refuses_only_the_first(store: SQLStore) -> None:
    """On PostgreSQL a write's failed statement surfaces in the round trip of the next read, a later
    write's, or when a later write is refused and rolls back: the error must refuse the write that sent
    the statement, never the one that met it, and nothing of the failed write may be committed."""
    bad, reader, refused = Call(_fails_late), Call(_add_and_count), Call(_refused)
    outcomes = await asyncio.gather(
        *(store._db.write(op) for op in (add("x"), bad, reader, refused, bad, add("y"))),
        return_exceptions=True,
    )

    assert outcomes[0] == "added x", outcomes
    for failed in (outcomes[1], outcomes[4]):  # PostgreSQL divides by zero; SQLite has no pg_sleep
        assert "division by zero" in str(failed) or "pg_sleep" in str(failed), outcomes
    assert outcomes[2] == 2, outcomes  # x and r: nothing of the failed write
    assert isinstance(outcomes[3], Conflict), outcomes
    assert outcomes[5] == "added y", outcomes
    assert await rows(store, "SELECT account FROM peers ORDER BY account") == [("r",), ("x",), ("y",)]


async def test_a_writer_process_that_dies_costs_a_503_and_nothing_acknowledged(
    postgres_server: PostgresServer,
) -> None:
    """PostgreSQL's writer runs in a process of its own: SIGKILLed, the writes in hand are answered 503
    (StoreUnavailable, which clients retry), a new writer takes the next batch, and every write answered
    before is still there."""
    store = open_store(postgres_server.database(), TIMES, synchronous="FULL", batch_max=64)
    await store.open()
    try:
        await _kill_the_writer(store)
    finally:
        await store.close()


async def _kill_the_writer(store: SQLStore) -> None:
    assert isinstance(store._db, PostgresDatabase)
    assert await store._db.write(add("before")) == "added before"
    (writer,) = store._db._process._processes.values()  # type: ignore[union-attr]
    os.kill(writer.pid, signal.SIGKILL)
    outcomes: list[Any] = []
    deadline = time.monotonic() + 30
    while not outcomes or isinstance(outcomes[-1], StoreUnavailable):
        assert time.monotonic() < deadline, outcomes
        outcomes.append(
            (await asyncio.gather(store._db.write(add(f"after-{len(outcomes)}")), return_exceptions=True))[0]
        )
    assert len(outcomes) <= 2 and outcomes[-1].startswith("added after-"), outcomes
    assert all("writer process" in str(o) for o in outcomes[:-1]), outcomes
    assert writer.pid not in {p.pid for p in store._db._process._processes.values()}  # type: ignore[union-attr]
    assert ("before",) in await rows(store, "SELECT account FROM peers")


async def _catalog(url: str) -> tuple[int, dict[str, set[str]]]:
    """The schema version a new database of ``url`` reaches and its tables' columns."""
    opened = open_store(url, TIMES, synchronous="FULL", batch_max=64)
    await opened.open()
    query = (
        "SELECT table_name AS t, column_name AS c FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
        if url.startswith("postgresql")
        else "SELECT m.name AS t, p.name AS c FROM sqlite_master m JOIN pragma_table_info(m.name) p"
        " WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'"
    )

    def read(conn: Any) -> tuple[int, list[tuple[str, str]]]:
        version = conn.execute("SELECT version FROM schema_version").fetchone()["version"]
        return version, [(row["t"], row["c"]) for row in conn.execute(query)]

    try:
        version, rows = await opened._db.read(read)  # type: ignore[attr-defined]
    finally:
        await opened.close()
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    return version, tables


async def test_both_engines_reach_the_last_migration_with_the_same_columns(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """PostgreSQL starts from its baseline and runs the shared scripts after it: each script appended to
    MIGRATIONS (capacity, canaries, round commitments...) must run there too and leave the columns it
    leaves on SQLite, or the store's queries break on one engine only."""
    lite = await _catalog(f"sqlite:///{tmp_path}/market.db")
    pg = await _catalog(postgres_server.database())
    assert lite[0] == pg[0] == len(MIGRATIONS)
    assert pg[1] == lite[1]
    assert {"claimed_tflops", "capacity_flag", "throttled_at", "clock_ratio"} <= pg[1]["offers"]
    assert {"tflops", "billed_units", "capacity_ratio", "capacity_flag"} <= pg[1]["matches"]
    assert {"priced_clock_ratio", "throttled_clock_ratio"} <= pg[1]["matches"]
    assert "shortfalls" in pg[1]["peers"]
