"""Persistence of accounts and the ledger's checks: deposits, withdrawals and transfers, what an account
holds, and the audits of the books against the deposits and against their entries (incrementally, or
every entry for the admin).

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLStore` runs them inside one transaction with the request's nonce. The
entries and the audit are :mod:`coordinator.ledger`'s pure functions; postings go through
:func:`coordinator.sql.post`, which every other store module shares.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Mapping

from coordinator import ledger, offer_store, sql
from coordinator.errors import BadRequest, Conflict, Forbidden
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units
from peer.protocol.schemas import AccountView


def deposit(conn: sqlite3.Connection, now: float, env: Envelope, account: str, units: int) -> AccountView:
    sql.claim_nonce(conn, env)
    sql.post(conn, ledger.deposit(account, units), now)
    return account_view(conn, account)


def withdraw(conn: sqlite3.Connection, now: float, env: Envelope, account: str, units: int) -> AccountView:
    """Pay ``units`` out of the market to the account's owner, who signs: a recorded payout, drawn from its
    earnings first, then its balance (:func:`coordinator.ledger.spendable`)."""
    _claim_as_owner(conn, env, account, "withdraw from")
    _spend(conn, now, account, units, "withdraw", lambda books: ledger.withdraw(books, account, units))
    return account_view(conn, account)


def transfer(
    conn: sqlite3.Connection, now: float, env: Envelope, account: str, recipient: str, units: int
) -> AccountView:
    """Move ``units`` from the signer's account to ``recipient``'s balance, drawn as a withdrawal is."""
    _claim_as_owner(conn, env, account, "transfer from")
    if recipient == account:
        raise BadRequest(
            f"to {recipient!r} is the sending account itself: a transfer moves money to another account",
            field="to",
        )
    _spend(
        conn, now, account, units, "transfer", lambda books: ledger.transfer(books, account, recipient, units)
    )
    return account_view(conn, account)


def _claim_as_owner(conn: sqlite3.Connection, env: Envelope, account: str, doing: str) -> None:
    """Claim the request's nonce, then refuse (403) a signer that is not ``account``: only an account's
    owner moves its money out."""
    sql.claim_nonce(conn, env)
    if env.account != account:
        raise Forbidden(
            f"account {env.account[:12]}... may not {doing} account {account[:12]}...: only its owner may",
            field="account",
        )


def _spend(
    conn: sqlite3.Connection,
    now: float,
    account: str,
    units: int,
    doing: str,
    entries: Callable[[Mapping[str, int]], list[ledger.Entry]],
) -> None:
    """Post the ``entries`` that move ``units`` out of the account's spendable books, or refuse with 409
    ``insufficient_funds`` naming ``amount``, quoting it and what the books hold (nothing is written)."""
    books = sql.books(conn, set(ledger.spendable(account)))
    try:
        moved = entries(books)
    except ledger.InsufficientFunds as e:
        earned, balance = (from_units(books.get(book, 0)) for book in ledger.spendable(account))
        raise Conflict(
            f"amount {from_units(units)} is more than account {account[:12]}... can {doing}: "
            f"{from_units(e.available)} is available (earned {earned} + balance {balance})",
            code="insufficient_funds",
            field="amount",
        ) from None
    sql.post(conn, moved, now)


def account_view(conn: sqlite3.Connection, account: str) -> AccountView:
    escrow = conn.execute(
        "SELECT COALESCE(SUM(b.units), 0) FROM runs r JOIN books b ON b.name = 'escrow:' || r.id"
        " WHERE r.owner = ?",
        (account,),
    ).fetchone()[0]
    return AccountView(
        account=account,
        balance=from_units(sql.book(conn, ledger.balance_book(account))),
        escrow=from_units(escrow),
        earned=from_units(sql.book(conn, ledger.earned_book(account))),
        withdrawn=from_units(sql.book(conn, ledger.withdrawn_book(account))),
        reputation=offer_store.standing_of(conn, account),
    )


def audit(conn: sqlite3.Connection, *, incremental: bool) -> ledger.Audit:
    """Check the books against the deposits and, when ``incremental``, against their entries too: the
    running totals of the entries up to the last checked one (``ledger_totals`` up to
    ``ledger_checkpoint.last_entry``), plus the entries added since, which this replays and then adds to
    the totals. An audit thus reads only the entries that are new, whatever the size of the ledger.

    The incremental audit is a write (:meth:`coordinator.store.SQLStore.audit` runs it through the
    store's write path), for two reasons. It must read the books, the totals and the new entries as one
    consistent state while requests post entries concurrently, and advance the totals in the same
    transaction as it checked them: a write transaction gives both, and orders the audit among the
    postings (a posting's entries are either all before it or all after). And its cost is that of the new
    entries: with none, it writes nothing and the commit is free; otherwise it upserts the totals of the
    books they touched and one checkpoint row. Advancing the totals only in the periodic sweep would leave
    every public audit to replay all the entries since the last sweep, and its answer to depend on when
    the sweep ran.

    The totals advance whether the books match or not: they are what the entries add up to, not the
    books, so a difference is reported again by every audit until it is repaired. An entry changed or
    inserted below the checkpoint after it was checked is out of reach of the incremental audit; the
    admin's full :func:`replay` finds it.

    It relies on entries being committed in the order of their ids, which serialised writes give (SQLite's
    single writer; the write lock every PostgreSQL write transaction holds until it commits): were writers
    to commit concurrently, an entry committed late under an id below the checkpoint would never be
    checked.

    Without ``incremental`` it reads the books alone (the metrics scrape, the dashboard): a read.
    """
    books = _books(conn)
    if not incremental:
        return ledger.audit(books)
    last = _checkpoint(conn)
    totals = _totals(conn)
    movements, checked, through = _new_entries(conn, last)
    replayed = ledger.replay(totals, movements)
    _advance(conn, totals, replayed, last, through)
    return ledger.audit_entries(books, replayed, entries_checked=checked, last_entry=through)


def replay(conn: sqlite3.Connection, env: Envelope) -> ledger.Audit:
    """Replay every entry (the admin-signed full audit, a scan of the whole ledger) and check the books
    against what they add up to, and against the deposits. It also checks the entries the running totals
    already include against those totals: an entry changed, inserted or deleted below the checkpoint since
    it was checked is reported with the books it touched. The running totals are then rebuilt from this
    replay, so the public incremental audit goes on from what the entries say now (and keeps reporting a
    difference the replay found until it is repaired). A write: it claims the request's nonce, and holds
    the write lock for the length of the scan."""
    sql.claim_nonce(conn, env)
    books = _books(conn)
    last = _checkpoint(conn)
    totals = _totals(conn)
    through = max(last, int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM entries").fetchone()[0]))
    old, old_count = _entries_between(conn, 0, last)
    checked_before = ledger.replay({}, old)
    new, new_count = _entries_between(conn, last, through)
    replayed = ledger.replay(checked_before, new)
    _advance(conn, totals, replayed, last, through)
    result = ledger.audit_entries(books, replayed, entries_checked=old_count + new_count, last_entry=through)
    changed = ledger.changed_books(totals, checked_before)
    if not changed:
        return result
    reason = f"the entries up to #{last} changed since they were checked: {', '.join(changed)}"
    return dataclasses.replace(
        result, conserved=False, reason=reason if result.conserved else f"{result.reason}; {reason}"
    )


def _books(conn: sqlite3.Connection) -> dict[str, int]:
    return {row["name"]: int(row["units"]) for row in conn.execute("SELECT name, units FROM books")}


def _checkpoint(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT last_entry FROM ledger_checkpoint WHERE id = 1").fetchone()
    return int(row["last_entry"]) if row else 0


def _totals(conn: sqlite3.Connection) -> dict[str, int]:
    return {row["book"]: int(row["units"]) for row in conn.execute("SELECT book, units FROM ledger_totals")}


def _new_entries(conn: sqlite3.Connection, after: int) -> tuple[list[tuple[str, str, int]], int, int]:
    """The entries with ids above ``after``, summed per pair of books; how many there are; the id of the
    last one (``after`` when there are none).

    Summed here rather than by a GROUP BY: with one, SQLite's planner walks the ``entries_debit`` index to
    group without sorting, a scan of the whole table, where the plain range reads only the new rows by
    their primary key (tests/test_ledger_audit.py asserts the plan)."""
    sums: dict[tuple[str, str], int] = {}
    count, last = 0, after
    for row in conn.execute("SELECT id, debit, credit, units FROM entries WHERE id > ?", (after,)):
        pair = (row["debit"], row["credit"])
        sums[pair] = sums.get(pair, 0) + int(row["units"])
        count, last = count + 1, max(last, int(row["id"]))
    return [(debit, credit, units) for (debit, credit), units in sums.items()], count, last


def _entries_between(
    conn: sqlite3.Connection, after: int, through: int
) -> tuple[list[tuple[str, str, int]], int]:
    """The entries with ids in (``after``, ``through``], summed per pair of books, and how many there are:
    a GROUP BY that may scan the whole ledger, for the admin's replay."""
    rows = conn.execute(
        "SELECT debit, credit, SUM(units) AS units, COUNT(*) AS entries FROM entries WHERE id > ? AND id <= ?"
        " GROUP BY debit, credit",
        (after, through),
    ).fetchall()
    return [(row["debit"], row["credit"], int(row["units"])) for row in rows], sum(
        int(r["entries"]) for r in rows
    )


def _advance(
    conn: sqlite3.Connection, before: dict[str, int], after: dict[str, int], last: int, through: int
) -> None:
    """Store the running totals ``after`` (only the books that changed) and move the checkpoint from
    ``last`` to ``through``: nothing is written when nothing changed."""
    changed = ledger.changed_books(before, after)
    if changed:
        conn.executemany(
            "INSERT INTO ledger_totals (book, units) VALUES (?, ?)"
            " ON CONFLICT (book) DO UPDATE SET units = excluded.units",
            [(name, after.get(name, 0)) for name in changed],
        )
    if through != last:
        conn.execute(
            "INSERT INTO ledger_checkpoint (id, last_entry) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET last_entry = excluded.last_entry",
            (through,),
        )
