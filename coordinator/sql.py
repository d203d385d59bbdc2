"""SQL helpers every part of the store shares: nonces claimed in the write's transaction, ledger postings.

They take the connection of the transaction they are part of; callers run them inside
:meth:`coordinator.db.Database.write`, so a nonce and the effect it authorises commit together.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from coordinator import ledger
from coordinator.errors import ApiError, Conflict, NonceReplayed, NonceReused, PaymentRequired, Unauthorized
from peer.protocol.envelope import Envelope
from peer.protocol.money import MAX_UNITS, from_units


def claim_nonce(conn: sqlite3.Connection, env: Envelope) -> None:
    """Record the nonce as applied, or refuse a request whose nonce was seen before (a replay).

    Nonces are keyed by (timestamp, account, nonce): the timestamp is signed, so a replay always carries
    the one it was signed with, and keying by time first makes inserts append-only and lets the sweep
    forget old nonces by a range of the primary key (measured: a third of the bytes written per request).
    """
    (error,) = claim_nonces(conn, [(env, None)])
    if error is not None:
        raise error


def claim_nonces(
    conn: sqlite3.Connection, claims: Sequence[tuple[Envelope, str | None]]
) -> list[ApiError | None]:
    """Record many requests' nonces in one statement, each as applied (None) or as refused with the given
    reason (see :func:`refusal`); for each, None when its nonce was new, else the replay error that refuses
    it. A nonce repeated within ``claims`` is new only the first time."""
    first: dict[tuple[int, str, str], int] = {}
    for i, (env, _) in enumerate(claims):
        first.setdefault((env.timestamp, env.account, env.nonce), i)
    rows = [
        (claims[i][0].account, claims[i][0].nonce, claims[i][0].timestamp, claims[i][1])
        for i in first.values()
    ]
    marks = ",".join(["(?, ?, ?, ?)"] * len(rows))
    claimed = {
        (row[0], row[1], row[2])
        for row in conn.execute(
            f"INSERT INTO nonces (account, nonce, timestamp, refused) VALUES {marks}"
            " ON CONFLICT DO NOTHING RETURNING timestamp, account, nonce",
            [value for row in rows for value in row],
        )
    }
    errors: list[ApiError | None] = []
    for i, (env, refused) in enumerate(claims):
        key = (env.timestamp, env.account, env.nonce)
        if first[key] == i and key in claimed:
            errors.append(None)
            continue
        if first[key] != i and key in claimed:  # the first of this batch took it
            refused = claims[first[key]][1]
        else:
            (refused,) = conn.execute(
                "SELECT refused FROM nonces WHERE timestamp = ? AND account = ? AND nonce = ?", key
            ).fetchone()
        errors.append(_replayed(env, refused))
    return errors


def _replayed(env: Envelope, refused: str | None) -> ApiError:
    if refused is None:
        return NonceReplayed(
            f"nonce {env.nonce} was already used; the request it carried was applied",
            field="X-Hivemarket-Nonce",
        )
    return NonceReused(
        f"nonce {env.nonce} was already used by a request refused with {refused}; nothing was applied",
        field="X-Hivemarket-Nonce",
    )


def refusal(error: Exception) -> str | None:
    """What the nonce of a request refused with ``error`` records (its status and code), or None for an
    error that must not burn the nonce (a request that was not authenticated did not spend it)."""
    if isinstance(error, ApiError) and not isinstance(error, Unauthorized):
        return f"{error.status} {error.code}"
    return None


def remember_refusal(env: Envelope) -> Callable[[sqlite3.Connection, Exception], None]:
    """Keep the nonce of a refused request, so that it cannot be replayed once the state would allow it."""

    def hook(conn: sqlite3.Connection, error: Exception) -> None:
        refused = refusal(error)
        if refused is not None:
            conn.execute(
                "INSERT INTO nonces (account, nonce, timestamp, refused) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (env.account, env.nonce, env.timestamp, refused),
            )

    return hook


def books(conn: sqlite3.Connection, names: set[str]) -> dict[str, int]:
    marks = ",".join("?" * len(names))
    rows = conn.execute(f"SELECT name, units FROM books WHERE name IN ({marks})", tuple(names))
    return {row["name"]: row["units"] for row in rows}


def post(conn: sqlite3.Connection, entries: list[ledger.Entry], now: float) -> None:
    """Apply ledger entries, refusing (and writing nothing) if a book would go negative."""
    if not entries:
        return
    names = {e.debit for e in entries} | {e.credit for e in entries}
    try:
        after = ledger.apply(books(conn, names), entries, MAX_UNITS)
    except ledger.BookLimit as e:
        holder = "the total of all deposits" if e.book == ledger.EXTERNAL else e.book.split(":", 1)[-1]
        raise Conflict(
            f"{holder} would exceed {from_units(e.limit)}",
            code="limit_exceeded",
            field="amount",
        ) from None
    except ledger.InsufficientFunds as e:
        owner = e.book.split(":", 1)[-1]
        raise PaymentRequired(
            f"the balance of {owner} is {from_units(e.available)}, {from_units(e.needed)} is needed",
            field="budget",
        ) from None
    conn.executemany(
        "INSERT INTO books (name, units) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET units = excluded.units",
        [(name, after[name]) for name in names],
    )
    conn.executemany(
        "INSERT INTO entries (kind, debit, credit, units, created_at) VALUES (?, ?, ?, ?, ?)",
        [(e.kind, e.debit, e.credit, e.amount, now) for e in entries],
    )


def book(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT units FROM books WHERE name = ?", (name,)).fetchone()
    return row["units"] if row else 0
