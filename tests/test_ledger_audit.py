"""The ledger audit that scales: the public ``GET /v1/ledger/audit`` replays only the entries added since the
last audit onto running totals, tampering with the database (SQLite or PostgreSQL) is reported naming the
book, and the full replay of every entry is the admin's (``POST /v1/ledger/audit/replay``)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from coordinator import ledger, ledger_store, postgres
from peer.protocol.envelope import sign_request
from peer.protocol.identity import Identity
from tests.conftest import Databases
from tests.harness import CoordinatorProcess, minimal_spec, prometheus_series, start_coordinator

REPLAY = "/v1/ledger/audit/replay"


class Http:
    """Raw HTTP as any client would speak it, with the envelope signed by hand."""

    def __init__(self, server: CoordinatorProcess, session: aiohttp.ClientSession):
        self.server, self.session = server, session

    async def call(self, method: str, path: str, signer: Identity | None = None, body: Any = None) -> Any:
        raw = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if signer is not None:
            headers.update(sign_request(signer, method, path, raw))
        async with self.session.request(method, self.server.url + path, data=raw, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None) if resp.content_type.endswith(
                "json"
            ) else None

    async def ok(self, method: str, path: str, signer: Identity | None = None, body: Any = None) -> Any:
        status, data = await self.call(method, path, signer, body)
        assert 200 <= status < 300, (status, data)
        return data

    async def deposit(self, account: str, amount: str) -> None:
        await self.ok("POST", f"/v1/accounts/{account}/deposit", self.server.admin, {"amount": amount})

    async def audit(self) -> dict[str, Any]:
        return await self.ok("GET", "/v1/ledger/audit")


@pytest.fixture
async def http(tmp_path: Path, databases: Databases) -> AsyncIterator[Http]:
    server = start_coordinator(tmp_path / "coordinator", Identity.generate(), db_url=databases.url())
    try:
        async with aiohttp.ClientSession() as session:
            yield Http(server, session)
    finally:
        server.stop()


@contextmanager
def database(server: CoordinatorProcess) -> Iterator[Any]:
    """A second connection to the running coordinator's database, each statement committed at once: the
    SQLite file (WAL: the server sees its commits) or the PostgreSQL database, speaking the same SQL."""
    if server.db_url.startswith("postgresql"):
        with closing(postgres.connect(server.db_url)) as pg:
            yield pg
        return
    with closing(sqlite3.connect(server.db_path, timeout=30, isolation_level=None)) as conn:
        conn.row_factory = sqlite3.Row
        yield conn


def ledger_state(server: CoordinatorProcess) -> tuple[int, int, int, dict[str, int], dict[str, int]]:
    """(entries, their max id, the audit's checkpoint, the running totals, the books)."""
    with database(server) as conn:
        count, last = conn.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM entries").fetchone()
        checkpoint = conn.execute("SELECT last_entry FROM ledger_checkpoint WHERE id = 1").fetchone()[0]
        totals = {r["book"]: r["units"] for r in conn.execute("SELECT book, units FROM ledger_totals")}
        books = {r["name"]: r["units"] for r in conn.execute("SELECT name, units FROM books")}
    return count, last, checkpoint, totals, books


async def activity(http: Http) -> list[Identity]:
    """Deposits, a run's escrow and its refund: entries of several kinds between several books."""
    launcher, others = Identity.generate(), [Identity.generate() for _ in range(2)]
    await http.deposit(launcher.account, "25")
    for i, other in enumerate(others):
        await http.deposit(other.account, f"{i + 1}.5")
    body = {
        "spec": minimal_spec("audit-me"),
        "max_price": "0.01",
        "peers_min": 1,
        "peers_max": 1,
        "budget": "10",
    }
    run = await http.ok("POST", "/v1/runs", launcher, body)
    await http.ok("POST", f"/v1/runs/{run['id']}/cancel", launcher)  # the refund: nothing moves later
    return [launcher, *others]


# ------------------------------------------------------------------------------------------ pure functions


def test_replay_sums_entries_onto_running_totals() -> None:
    totals = ledger.replay({}, [("external", "balance:a", 10), ("balance:a", "escrow:r", 4)])
    assert totals == {"external": -10, "balance:a": 6, "escrow:r": 4}
    # Continuing from the totals is the same as replaying everything; a book that comes to zero is dropped.
    assert ledger.replay(totals, [("escrow:r", "balance:a", 4)]) == {"external": -10, "balance:a": 10}
    assert ledger.replay(totals, []) == totals


def test_audit_entries_names_the_books_that_differ() -> None:
    books = {"external": -10, "balance:a": 6, "escrow:r": 4, "fees": 0}
    replayed = {"external": -10, "balance:a": 6, "escrow:r": 4}
    result = ledger.audit_entries(books, replayed, entries_checked=2, last_entry=7)
    assert result == ledger.Audit(True, 10, 10, "holdings equal deposits and every book its entries", 2, 7)

    tampered = ledger.audit_entries({**books, "balance:a": 9}, replayed, entries_checked=0, last_entry=7)
    assert not tampered.conserved
    assert tampered.reason == (
        "books differ from their entries: balance:a holds 9 units, its entries 6; holdings 13 != deposits 10"
    )
    # A bogus entry that no book followed: the books alone still balance, the entries do not.
    bogus = ledger.replay(replayed, [("external", "balance:b", 5)])
    result = ledger.audit_entries(books, bogus, entries_checked=1, last_entry=8)
    assert not result.conserved and (result.deposits, result.holdings) == (10, 10)
    assert "balance:b holds 0 units, its entries 5" in result.reason
    assert "external holds -10 units, its entries -15" in result.reason

    many = {f"balance:{i}": 1 for i in range(8)}
    assert ledger.differences(many, {}).endswith("and 3 more")
    assert ledger.differences(books, replayed) == ""


def test_the_incremental_audit_reads_only_the_new_entries(tmp_path: Path) -> None:
    """The SQL trace of one audit: its one query over ``entries`` is a search of the id range past the
    checkpoint, never a scan of the table."""
    from coordinator.schema import MIGRATIONS

    with closing(sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)) as conn:
        conn.row_factory = sqlite3.Row
        for script in MIGRATIONS:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
        conn.executemany(
            "INSERT INTO entries (kind, debit, credit, units, created_at) VALUES ('deposit', ?, ?, ?, 0)",
            [("external", f"balance:{i % 7}", 3) for i in range(500)],
        )
        conn.executemany(
            "INSERT INTO books (name, units) VALUES (?, ?)",
            [("external", -1500), *((f"balance:{i}", 3 * len(range(i, 500, 7))) for i in range(7))],
        )
        first = ledger_store.audit(conn, incremental=True)
        assert first.conserved and (first.entries_checked, first.last_entry) == (500, 500), first

        traced: list[str] = []
        conn.set_trace_callback(traced.append)
        again = ledger_store.audit(conn, incremental=True)
        conn.set_trace_callback(None)
        assert again.conserved and (again.entries_checked, again.last_entry) == (0, 500), again
        over_entries = [sql for sql in traced if "FROM entries" in sql]
        assert len(over_entries) == 1, traced
        plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {over_entries[0]}"))
        assert "SEARCH entries USING INTEGER PRIMARY KEY (rowid>?)" in plan, plan
        assert not any(sql.lstrip().upper().startswith(("INSERT", "UPDATE")) for sql in traced), traced


# ---------------------------------------------------------------------------------- a real coordinator


async def test_public_audit_checks_the_entries_added_since_the_last(http: Http) -> None:
    server = http.server
    await activity(http)
    count, last, checkpoint, _, books = ledger_state(server)
    assert count >= 5 and checkpoint == 0  # nothing audited yet

    first = await http.audit()
    assert first["conserved"] is True, first
    assert (first["entries_checked"], first["last_entry"]) == (count, last), first
    count, last, checkpoint, totals, books = ledger_state(server)
    assert checkpoint == last
    assert {k: v for k, v in totals.items() if v} == {k: v for k, v in books.items() if v}

    # The metrics scrape checks the books alone: it leaves the running totals where they are.
    await http.deposit(Identity.generate().account, "1")
    async with http.session.get(server.url + "/metrics") as resp:
        assert prometheus_series(await resp.text())["hivemarket_ledger_conserved"] == 1
    assert ledger_state(server)[2] == checkpoint

    for amount in ("0.25", "3", "7.000001"):
        await http.deposit(Identity.generate().account, amount)
    audit = await http.audit()
    assert audit["conserved"] is True, audit
    assert audit["entries_checked"] == 4  # the deposit before the scrape and these three
    _, newest, checkpoint, _, _ = ledger_state(server)
    assert audit["last_entry"] == checkpoint == newest > last
    assert audit["deposits"] == audit["holdings"] == "40.250001"

    nothing_new = await http.audit()
    assert nothing_new["conserved"] is True
    assert (nothing_new["entries_checked"], nothing_new["last_entry"]) == (0, newest)


async def test_audits_among_concurrent_postings_check_each_entry_once(http: Http) -> None:
    """Audits interleaved with deposits: each sees a consistent ledger, and between them they check every
    entry exactly once."""
    accounts = [Identity.generate().account for _ in range(6)]
    deposits = [http.deposit(accounts[i % len(accounts)], f"{i + 1}") for i in range(30)]
    audits = [http.audit() for _ in range(15)]
    results = await asyncio.gather(*deposits, *audits)
    seen = [r for r in results if r is not None]
    seen.append(await http.audit())
    assert all(r["conserved"] for r in seen), [r for r in seen if not r["conserved"]]
    count, last, checkpoint, _, _ = ledger_state(http.server)
    assert count == 30 and checkpoint == last
    assert sum(r["entries_checked"] for r in seen) == count
    assert seen[-1]["deposits"] == seen[-1]["holdings"] == f"{sum(range(1, 31))}.000000"


async def test_tampering_with_the_file_is_reported_naming_the_book(http: Http) -> None:
    server = http.server
    launcher, *_ = await activity(http)
    assert (await http.audit())["conserved"] is True
    book = f"balance:{launcher.account}"

    with database(server) as conn:  # while the server runs
        conn.execute("UPDATE books SET units = units + 7 WHERE name = ?", (book,))
    audit = await http.audit()
    assert audit["conserved"] is False, audit
    assert f"{book} holds" in audit["reason"] and "holdings" in audit["reason"], audit
    assert audit["entries_checked"] == 0

    with database(server) as conn:
        conn.execute("UPDATE books SET units = units - 7 WHERE name = ?", (book,))
    assert (await http.audit())["conserved"] is True

    # An entry no book followed: the books alone still balance, only the entries tell.
    stranger = f"balance:{Identity.generate().account}"
    with database(server) as conn:
        conn.execute(
            "INSERT INTO entries (kind, debit, credit, units, created_at)"
            " VALUES ('deposit', 'external', ?, 5, 0)",
            (stranger,),
        )
    audit = await http.audit()
    assert audit["conserved"] is False and audit["entries_checked"] == 1, audit
    assert f"{stranger} holds 0 units, its entries 5" in audit["reason"], audit
    assert audit["deposits"] == audit["holdings"]
    again = await http.audit()  # the totals went on past the bogus entry: it is reported until repaired
    assert again["conserved"] is False and again["entries_checked"] == 0
    assert again["reason"] == audit["reason"]


async def test_the_full_replay_is_the_admins_and_finds_changed_entries(http: Http) -> None:
    server = http.server
    launcher, *_ = await activity(http)
    count, _, _, _, _ = ledger_state(server)

    stranger = Identity.generate()
    status, body = await http.call("POST", REPLAY, stranger)
    assert status == 403 and body["error"]["code"] == "forbidden", body
    assert stranger.account in body["error"]["message"], body
    status, body = await http.call("POST", REPLAY)
    assert status == 401, body

    replayed = await http.ok("POST", REPLAY, server.admin)
    assert replayed["conserved"] is True and replayed["entries_checked"] == count, replayed
    assert ledger_state(server)[2] == replayed["last_entry"]  # the running totals start from the replay
    assert (await http.audit())["entries_checked"] == 0

    # Change an entry the running totals already include: out of the incremental audit's reach.
    with database(server) as conn:
        first = conn.execute("SELECT id, debit, credit FROM entries ORDER BY id LIMIT 1").fetchone()
        conn.execute("UPDATE entries SET units = units + 3 WHERE id = ?", (first["id"],))
    assert (await http.audit())["conserved"] is True

    replayed = await http.ok("POST", REPLAY, server.admin)
    assert replayed["conserved"] is False, replayed
    assert replayed["entries_checked"] == count
    reason = replayed["reason"]
    assert f"{first['credit']} holds" in reason and f"{first['debit']} holds" in reason, reason
    assert f"the entries up to #{replayed['last_entry']} changed since they were checked: " in reason
    assert first["credit"] in reason.split("changed since they were checked: ")[1], reason
    # The replay rebuilt the running totals from the entries as they are: the public audit now says so.
    audit = await http.audit()
    assert audit["conserved"] is False and f"{first['credit']} holds" in audit["reason"], audit
    assert first["credit"] == f"balance:{launcher.account}"  # the launcher's deposit came first
