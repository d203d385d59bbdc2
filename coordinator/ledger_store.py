"""Persistence of accounts and the ledger's checks: deposits, what an account holds, and the audit of the
books against the deposits (and against every entry).

Every function takes the connection of the write (or read) it is part of;
:class:`coordinator.store.SQLiteStore` runs them inside one transaction with the request's nonce. The
entries and the audit are :mod:`coordinator.ledger`'s pure functions; postings go through
:func:`coordinator.sql.post`, which every other store module shares.
"""

from __future__ import annotations

import sqlite3

from coordinator import ledger, offer_store, sql
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units
from peer.protocol.schemas import AccountView


def deposit(conn: sqlite3.Connection, now: float, env: Envelope, account: str, units: int) -> AccountView:
    sql.claim_nonce(conn, env)
    sql.post(conn, ledger.deposit(account, units), now)
    return account_view(conn, account)


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
        reputation=offer_store.standing_of(conn, account),
    )


def audit(conn: sqlite3.Connection, *, replay: bool) -> ledger.Audit:
    """Check the books against the deposits, and with ``replay`` against every entry too (a scan of
    the whole ledger, kept for the audit endpoint rather than every metrics scrape)."""
    books = {row["name"]: row["units"] for row in conn.execute("SELECT name, units FROM books")}
    if not replay:
        return ledger.audit(books)
    replayed: dict[str, int] = {}
    for row in conn.execute("SELECT debit, credit, SUM(units) AS units FROM entries GROUP BY debit, credit"):
        replayed[row["debit"]] = replayed.get(row["debit"], 0) - row["units"]
        replayed[row["credit"]] = replayed.get(row["credit"], 0) + row["units"]
    result = ledger.audit(books)
    if {k: v for k, v in replayed.items() if v} != {k: v for k, v in books.items() if v}:
        return ledger.Audit(False, result.deposits, result.holdings, "books differ from the entries")
    return result
