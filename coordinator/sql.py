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
    (error,) = send_claims(conn, [env])([None])
    if error is not None:
        raise error


def send_claims(
    conn: sqlite3.Connection, envs: Sequence[Envelope]
) -> Callable[[Sequence[str | None]], list[ApiError | None]]:
    """Claim many requests' nonces in one statement, and return what settles them: called with each
    request's refusal (see :func:`refusal`; None for a request that is applied), it returns for each None
    when its nonce was new, else the replay error that refuses it, and records the refusals. A nonce
    repeated within ``envs`` is new only the first time.

    The two steps let a caller send its own reads between them: on PostgreSQL (pipeline mode) the claim
    then travels in the same round trip as those reads. Call the result before acting on what was read,
    so that a replay is refused as a replay whatever the state says now.
    """
    first: dict[tuple[int, str, str], int] = {}
    for i, env in enumerate(envs):
        first.setdefault((env.timestamp, env.account, env.nonce), i)
    rows = [(envs[i].account, envs[i].nonce, envs[i].timestamp) for i in first.values()]
    cursor = conn.execute(
        f"INSERT INTO nonces (account, nonce, timestamp) VALUES {value_rows(len(rows), 3)}"
        " ON CONFLICT DO NOTHING RETURNING timestamp, account, nonce",
        [value for row in rows for value in row],
    )

    def settle(refusals: Sequence[str | None]) -> list[ApiError | None]:
        claimed = {(row[0], row[1], row[2]) for row in cursor}
        errors: list[ApiError | None] = []
        for i, (env, refused) in enumerate(zip(envs, refusals, strict=True)):
            key = (env.timestamp, env.account, env.nonce)
            if key not in claimed:  # claimed before this batch
                (earlier,) = conn.execute(
                    "SELECT refused FROM nonces WHERE timestamp = ? AND account = ? AND nonce = ?", key
                ).fetchone()
                errors.append(_replayed(env, earlier))
            elif first[key] != i:  # claimed by the first of this batch
                errors.append(_replayed(env, refusals[first[key]]))
            else:
                errors.append(None)
                if refused is not None:
                    conn.execute(
                        "UPDATE nonces SET refused = ? WHERE timestamp = ? AND account = ? AND nonce = ?",
                        (refused, *key),
                    )
        return errors

    return settle


def value_rows(count: int, width: int) -> str:
    """``count`` rows of ``width`` placeholders, for a multi-row VALUES list."""
    return ",".join(["(" + ", ".join("?" * width) + ")"] * count)


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


def remember_refusal(conn: sqlite3.Connection, error: Exception, env: Envelope) -> None:
    """Keep the nonce of a refused request, so that it cannot be replayed once the state would allow it
    (the error hook of a signed write: ``Call(remember_refusal, env)``)."""
    refused = refusal(error)
    if refused is not None:
        conn.execute(
            "INSERT INTO nonces (account, nonce, timestamp, refused) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (env.account, env.nonce, env.timestamp, refused),
        )


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
