"""Persistence of the coordinator: the :class:`Store` interface and its SQLite implementation.

Every signed write claims its nonce in the same transaction as its effect, so a request is applied at
most once even when it is replayed after a crash, and an acknowledged request is never lost (group
commit in :mod:`coordinator.db`). Decisions (ledger checks, lapses, clearing) are pure functions from
:mod:`coordinator.ledger`, :mod:`coordinator.leases` and :mod:`coordinator.market`; this module only
reads the state they need and writes what they decide.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from coordinator import leases, ledger, market
from coordinator.db import Database
from coordinator.errors import (
    ApiError,
    Conflict,
    Forbidden,
    NonceReplayed,
    NonceReused,
    NotFound,
    PaymentRequired,
    Unauthorized,
)
from coordinator.money import MAX_UNITS, from_units, to_units
from coordinator.schemas import (
    AccountView,
    ClearingRoundView,
    LeaseView,
    OfferBody,
    OfferResponse,
    OfferView,
    RunBody,
    RunPeerView,
    RunView,
)
from peer.envelope import Envelope

MIGRATIONS = (
    """
    CREATE TABLE books (
        name TEXT PRIMARY KEY,
        units INTEGER NOT NULL,
        CHECK (name = 'external' OR units >= 0)
    );
    CREATE TABLE entries (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        debit TEXT NOT NULL,
        credit TEXT NOT NULL,
        units INTEGER NOT NULL CHECK (units > 0),
        created_at REAL NOT NULL
    );
    CREATE INDEX entries_debit ON entries (debit, kind);
    CREATE TABLE nonces (
        timestamp INTEGER NOT NULL,
        account TEXT NOT NULL,
        nonce TEXT NOT NULL,
        refused TEXT,
        PRIMARY KEY (timestamp, account, nonce)
    ) WITHOUT ROWID;
    CREATE TABLE peers (
        account TEXT PRIMARY KEY,
        uptime REAL NOT NULL DEFAULT 0,
        lapses INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        account TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_heartbeat REAL NOT NULL,
        run_id TEXT,
        price_units INTEGER
    );
    CREATE INDEX leases_state ON leases (state);
    CREATE TABLE offers (
        account TEXT PRIMARY KEY,
        price_units INTEGER NOT NULL,
        gpu TEXT NOT NULL,
        gpu_count INTEGER NOT NULL,
        vram_gb REAL NOT NULL,
        tflops REAL NOT NULL,
        ram_gb REAL NOT NULL,
        cpu_cores INTEGER NOT NULL,
        roles TEXT NOT NULL,
        min_lease_seconds INTEGER NOT NULL,
        peer_id TEXT,
        maddrs TEXT NOT NULL,
        lease_id TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        spec TEXT NOT NULL,
        max_price_units INTEGER NOT NULL,
        peers_min INTEGER NOT NULL,
        peers_max INTEGER NOT NULL,
        min_vram_gb REAL NOT NULL,
        budget_units INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX runs_owner ON runs (owner);
    CREATE TABLE matches (
        run_id TEXT NOT NULL,
        lease_id TEXT NOT NULL,
        account TEXT NOT NULL,
        price_units INTEGER NOT NULL,
        state TEXT NOT NULL,
        matched_at REAL NOT NULL,
        PRIMARY KEY (run_id, lease_id)
    );
    CREATE INDEX matches_lease ON matches (lease_id);
    CREATE TABLE rounds (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        clearing_price_units INTEGER,
        trades INTEGER NOT NULL,
        supply INTEGER NOT NULL,
        demand INTEGER NOT NULL,
        reason TEXT NOT NULL
    )
    """,
)

LIVE_RUN_STATES = ("recruiting", "running")


@dataclass(frozen=True)
class LeaseConfig:
    heartbeat_interval: float
    ttl: float


class Store(Protocol):
    """What the HTTP layer needs from persistence; SQLite today, PostgreSQL can implement it later."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def deposit(self, now: float, env: Envelope, account: str, units: int) -> AccountView: ...
    async def account(self, account: str) -> AccountView: ...
    async def audit(self, *, replay: bool) -> ledger.Audit: ...
    async def post_offer(self, now: float, env: Envelope, body: OfferBody) -> OfferResponse: ...
    async def heartbeat(self, now: float, env: Envelope, lease_id: str) -> LeaseView: ...
    async def offers(self) -> list[OfferView]: ...
    async def create_run(self, now: float, env: Envelope, body: RunBody) -> RunView: ...
    async def runs(self) -> list[RunView]: ...
    async def run(self, run_id: str) -> RunView: ...
    async def cancel_run(self, now: float, env: Envelope, run_id: str) -> RunView: ...
    async def clear_market(
        self, now: float, env: Envelope | None, config: market.MarketConfig
    ) -> ClearingRoundView | None: ...
    async def rounds(self, limit: int) -> list[ClearingRoundView]: ...
    async def market_depth(self) -> tuple[int, int]: ...
    async def sweep(self, now: float, nonce_horizon: float) -> list[leases.Lapse]: ...
    async def resume_leases(self, now: float) -> int: ...
    async def counts(self) -> dict[str, int]: ...


def open_store(url: str, lease_config: LeaseConfig, *, synchronous: str, batch_max: int) -> Store:
    """A store for ``sqlite:///PATH`` (the only backend so far); other schemes are refused by name.

    As in SQLAlchemy, ``sqlite:///market.db`` is relative to the working directory and
    ``sqlite:////var/lib/market.db`` (four slashes) is absolute.
    """
    parsed = urlparse(url)
    if parsed.scheme != "sqlite" or parsed.netloc or len(parsed.path) < 2:
        raise ValueError(f"--db {url!r}: only sqlite:///PATH is supported (PostgreSQL is planned)")
    path = Path(parsed.path[1:])
    return SQLiteStore(path, lease_config, synchronous=synchronous, batch_max=batch_max)


def _claim_nonce(conn: sqlite3.Connection, env: Envelope) -> None:
    """Record the nonce as applied, or refuse a request whose nonce was seen before (a replay).

    Nonces are keyed by (timestamp, account, nonce): the timestamp is signed, so a replay always carries
    the one it was signed with, and keying by time first makes inserts append-only and lets the sweep
    forget old nonces by a range of the primary key (measured: a third of the bytes written per request).
    """
    try:
        conn.execute(
            "INSERT INTO nonces (account, nonce, timestamp) VALUES (?, ?, ?)",
            (env.account, env.nonce, env.timestamp),
        )
    except sqlite3.IntegrityError:
        (refused,) = conn.execute(
            "SELECT refused FROM nonces WHERE timestamp = ? AND account = ? AND nonce = ?",
            (env.timestamp, env.account, env.nonce),
        ).fetchone()
        if refused is None:
            raise NonceReplayed(
                f"nonce {env.nonce} was already used; the request it carried was applied",
                field="X-Hivemarket-Nonce",
            ) from None
        raise NonceReused(
            f"nonce {env.nonce} was already used by a request refused with {refused}; nothing was applied",
            field="X-Hivemarket-Nonce",
        ) from None


def _remember_refusal(env: Envelope) -> Callable[[sqlite3.Connection, Exception], None]:
    """Keep the nonce of a refused request, so that it cannot be replayed once the state would allow it."""

    def hook(conn: sqlite3.Connection, error: Exception) -> None:
        if isinstance(error, ApiError) and not isinstance(error, Unauthorized):
            conn.execute(
                "INSERT OR IGNORE INTO nonces (account, nonce, timestamp, refused) VALUES (?, ?, ?, ?)",
                (env.account, env.nonce, env.timestamp, f"{error.status} {error.code}"),
            )

    return hook


def _books(conn: sqlite3.Connection, names: set[str]) -> dict[str, int]:
    marks = ",".join("?" * len(names))
    rows = conn.execute(f"SELECT name, units FROM books WHERE name IN ({marks})", tuple(names))
    return {row["name"]: row["units"] for row in rows}


def _post(conn: sqlite3.Connection, entries: list[ledger.Entry], now: float) -> None:
    """Apply ledger entries, refusing (and writing nothing) if a book would go negative."""
    if not entries:
        return
    names = {e.debit for e in entries} | {e.credit for e in entries}
    try:
        after = ledger.apply(_books(conn, names), entries, MAX_UNITS)
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


def _book(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT units FROM books WHERE name = ?", (name,)).fetchone()
    return row["units"] if row else 0


def _reliability(conn: sqlite3.Connection, account: str) -> float:
    row = conn.execute("SELECT uptime, lapses FROM peers WHERE account = ?", (account,)).fetchone()
    return leases.reliability(row["uptime"], row["lapses"]) if row else leases.reliability(0.0, 0)


class SQLiteStore:
    """The SQLite implementation of :class:`Store` (WAL mode, group commit)."""

    def __init__(self, path: Path, lease_config: LeaseConfig, *, synchronous: str, batch_max: int):
        self.path = path
        self.lease_config = lease_config
        self._db = Database(path, MIGRATIONS, synchronous=synchronous, batch_max=batch_max)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    # ------------------------------------------------------------------------------------------ accounts

    async def deposit(self, now: float, env: Envelope, account: str, units: int) -> AccountView:
        def op(conn: sqlite3.Connection) -> AccountView:
            _claim_nonce(conn, env)
            _post(conn, ledger.deposit(account, units), now)
            return self._account(conn, account)

        return await self._db.write(op, _remember_refusal(env))

    async def account(self, account: str) -> AccountView:
        return await self._db.read(lambda conn: self._account(conn, account))

    def _account(self, conn: sqlite3.Connection, account: str) -> AccountView:
        escrow = conn.execute(
            "SELECT COALESCE(SUM(b.units), 0) FROM runs r JOIN books b ON b.name = 'escrow:' || r.id"
            " WHERE r.owner = ?",
            (account,),
        ).fetchone()[0]
        return AccountView(
            account=account,
            balance=from_units(_book(conn, ledger.balance_book(account))),
            escrow=from_units(escrow),
            earned=from_units(_book(conn, ledger.earned_book(account))),
            reputation=_reliability(conn, account),
        )

    async def audit(self, *, replay: bool) -> ledger.Audit:
        """Check the books against the deposits, and with ``replay`` against every entry too (a scan of
        the whole ledger, kept for the audit endpoint rather than every metrics scrape)."""

        def op(conn: sqlite3.Connection) -> ledger.Audit:
            books = {row["name"]: row["units"] for row in conn.execute("SELECT name, units FROM books")}
            if not replay:
                return ledger.audit(books)
            replayed: dict[str, int] = {}
            for row in conn.execute(
                "SELECT debit, credit, SUM(units) AS units FROM entries GROUP BY debit, credit"
            ):
                replayed[row["debit"]] = replayed.get(row["debit"], 0) - row["units"]
                replayed[row["credit"]] = replayed.get(row["credit"], 0) + row["units"]
            result = ledger.audit(books)
            if {k: v for k, v in replayed.items() if v} != {k: v for k, v in books.items() if v}:
                return ledger.Audit(False, result.deposits, result.holdings, "books differ from the entries")
            return result

        return await self._db.read(op)

    # ------------------------------------------------------------------------------------- offers, leases

    def _lease_view(self, row: Mapping[str, Any]) -> LeaseView:
        return LeaseView(
            id=row["id"],
            account=row["account"],
            state=row["state"],
            heartbeat_interval=self.lease_config.heartbeat_interval,
            expires_at=row["last_heartbeat"] + self.lease_config.ttl,
            run_id=row["run_id"],
            price_per_hour=None if row["price_units"] is None else from_units(row["price_units"]),
        )

    _OFFER_QUERY = """
        SELECT o.*, l.state AS lease_state, l.run_id, p.uptime, p.lapses
        FROM offers o JOIN leases l ON l.id = o.lease_id JOIN peers p ON p.account = o.account
    """

    @staticmethod
    def _offer_view(row: sqlite3.Row) -> OfferView:
        state = "offline" if row["lease_state"] != "active" else "matched" if row["run_id"] else "open"
        return OfferView(
            account=row["account"],
            price_per_hour=from_units(row["price_units"]),
            gpu=row["gpu"],
            gpu_count=row["gpu_count"],
            vram_gb=row["vram_gb"],
            tflops=row["tflops"],
            reliability=leases.reliability(row["uptime"], row["lapses"]),
            roles=json.loads(row["roles"]),
            min_lease_seconds=row["min_lease_seconds"],
            state=state,
            lease_id=row["lease_id"],
            peer_id=row["peer_id"],
            maddrs=json.loads(row["maddrs"]),
            updated_at=row["updated_at"],
        )

    async def post_offer(self, now: float, env: Envelope, body: OfferBody) -> OfferResponse:
        account = env.account

        def op(conn: sqlite3.Connection) -> OfferResponse:
            _claim_nonce(conn, env)
            conn.execute("INSERT OR IGNORE INTO peers (account) VALUES (?)", (account,))
            row = conn.execute(
                "SELECT l.* FROM offers o JOIN leases l ON l.id = o.lease_id"
                " WHERE o.account = ? AND l.state = 'active'",
                (account,),
            ).fetchone()
            if row is not None:
                lease_id = row["id"]
                self._renew(conn, row, now)
            else:
                lease_id = secrets.token_hex(8)
                conn.execute(
                    "INSERT INTO leases (id, account, state, created_at, last_heartbeat)"
                    " VALUES (?, ?, 'active', ?, ?)",
                    (lease_id, account, now, now),
                )
            hw = body.hardware
            conn.execute(
                """INSERT INTO offers (account, price_units, gpu, gpu_count, vram_gb, tflops, ram_gb,
                                       cpu_cores, roles, min_lease_seconds, peer_id, maddrs, lease_id,
                                       updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (account) DO UPDATE SET
                     price_units = excluded.price_units, gpu = excluded.gpu, gpu_count = excluded.gpu_count,
                     vram_gb = excluded.vram_gb, tflops = excluded.tflops, ram_gb = excluded.ram_gb,
                     cpu_cores = excluded.cpu_cores, roles = excluded.roles,
                     min_lease_seconds = excluded.min_lease_seconds, peer_id = excluded.peer_id,
                     maddrs = excluded.maddrs, lease_id = excluded.lease_id,
                     updated_at = excluded.updated_at""",
                (
                    account,
                    to_units(body.price_per_hour),
                    hw.gpu,
                    hw.gpu_count,
                    hw.vram_gb,
                    hw.tflops,
                    hw.ram_gb,
                    hw.cpu_cores,
                    json.dumps(sorted(set(body.roles))),
                    body.min_lease_seconds,
                    body.peer_id,
                    json.dumps(body.maddrs),
                    lease_id,
                    now,
                ),
            )
            offer = conn.execute(self._OFFER_QUERY + " WHERE o.account = ?", (account,)).fetchone()
            lease = conn.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            return OfferResponse(offer=self._offer_view(offer), lease=self._lease_view(lease))

        return await self._db.write(op, _remember_refusal(env))

    def _renew(self, conn: sqlite3.Connection, lease: sqlite3.Row, now: float) -> None:
        uptime = leases.credited_uptime(now, lease["last_heartbeat"], self.lease_config.ttl)
        conn.execute("UPDATE leases SET last_heartbeat = ? WHERE id = ?", (now, lease["id"]))
        conn.execute("UPDATE peers SET uptime = uptime + ? WHERE account = ?", (uptime, lease["account"]))

    async def heartbeat(self, now: float, env: Envelope, lease_id: str) -> LeaseView:
        def op(conn: sqlite3.Connection) -> LeaseView:
            _claim_nonce(conn, env)
            lease = conn.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None:
                raise NotFound(f"lease {lease_id!r} does not exist", field="lease_id")
            if lease["account"] != env.account:
                raise Forbidden(f"lease {lease_id!r} belongs to another account", field="lease_id")
            if lease["state"] != "active":
                raise Conflict(
                    f"lease {lease_id!r} has {lease['state']}; post your offer again for a new lease",
                    code=f"lease_{lease['state']}",
                    field="lease_id",
                )
            self._renew(conn, lease, now)
            return self._lease_view({**dict(lease), "last_heartbeat": now})

        return await self._db.write(op, _remember_refusal(env))

    async def offers(self) -> list[OfferView]:
        return await self._db.read(
            lambda conn: [
                self._offer_view(row) for row in conn.execute(self._OFFER_QUERY + " ORDER BY o.account")
            ]
        )

    # ------------------------------------------------------------------------------------------------ runs

    @staticmethod
    def _run_view(conn: sqlite3.Connection, row: sqlite3.Row) -> RunView:
        spent = conn.execute(
            "SELECT COALESCE(SUM(units), 0) FROM entries WHERE debit = ? AND kind IN ('payout', 'fee')",
            (ledger.escrow_book(row["id"]),),
        ).fetchone()[0]
        peers = [
            RunPeerView(
                account=m["account"],
                lease_id=m["lease_id"],
                price_per_hour=from_units(m["price_units"]),
                state=m["state"],
                matched_at=m["matched_at"],
            )
            for m in conn.execute(
                "SELECT * FROM matches WHERE run_id = ? ORDER BY matched_at, account", (row["id"],)
            )
        ]
        return RunView(
            id=row["id"],
            owner=row["owner"],
            name=row["name"],
            state=row["state"],
            spec=json.loads(row["spec"]),
            max_price=from_units(row["max_price_units"]),
            peers_min=row["peers_min"],
            peers_max=row["peers_max"],
            min_vram_gb=row["min_vram_gb"],
            budget=from_units(row["budget_units"]),
            escrow=from_units(_book(conn, ledger.escrow_book(row["id"]))),
            spent=from_units(spent),
            peers=peers,
            created_at=row["created_at"],
        )

    def _get_run(self, conn: sqlite3.Connection, run_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run {run_id!r} does not exist", field="run_id")
        return row

    async def create_run(self, now: float, env: Envelope, body: RunBody) -> RunView:
        def op(conn: sqlite3.Connection) -> RunView:
            _claim_nonce(conn, env)
            run_id = f"run-{secrets.token_hex(6)}"
            budget = to_units(body.budget)
            conn.execute(
                """INSERT INTO runs (id, owner, name, state, spec, max_price_units, peers_min, peers_max,
                                     min_vram_gb, budget_units, created_at)
                   VALUES (?, ?, ?, 'recruiting', ?, ?, ?, ?, ?, ?, ?)""",
                (
                    run_id,
                    env.account,
                    body.spec["name"],
                    json.dumps(body.spec),
                    to_units(body.max_price),
                    body.peers_min,
                    body.peers_max,
                    body.min_vram_gb,
                    budget,
                    now,
                ),
            )
            _post(conn, ledger.hold_escrow(env.account, run_id, budget), now)
            return self._run_view(conn, self._get_run(conn, run_id))

        return await self._db.write(op, _remember_refusal(env))

    async def runs(self) -> list[RunView]:
        return await self._db.read(
            lambda conn: [
                self._run_view(conn, row) for row in conn.execute("SELECT * FROM runs ORDER BY created_at")
            ]
        )

    async def run(self, run_id: str) -> RunView:
        return await self._db.read(lambda conn: self._run_view(conn, self._get_run(conn, run_id)))

    async def cancel_run(self, now: float, env: Envelope, run_id: str) -> RunView:
        def op(conn: sqlite3.Connection) -> RunView:
            _claim_nonce(conn, env)
            run = self._get_run(conn, run_id)
            if run["owner"] != env.account:
                raise Forbidden(f"run {run_id!r} belongs to another account", field="run_id")
            if run["state"] not in ("pending", *LIVE_RUN_STATES):
                raise Conflict(f"run {run_id!r} is already {run['state']}", code="run_ended", field="run_id")
            _post(conn, ledger.refund(run_id, run["owner"], _book(conn, ledger.escrow_book(run_id))), now)
            conn.execute("UPDATE runs SET state = 'cancelled' WHERE id = ?", (run_id,))
            conn.execute(
                "UPDATE matches SET state = 'released' WHERE run_id = ? AND state = 'active'", (run_id,)
            )
            conn.execute("UPDATE leases SET run_id = NULL, price_units = NULL WHERE run_id = ?", (run_id,))
            return self._run_view(conn, self._get_run(conn, run_id))

        return await self._db.write(op, _remember_refusal(env))

    # ---------------------------------------------------------------------------------------------- market

    async def clear_market(
        self, now: float, env: Envelope | None, config: market.MarketConfig
    ) -> ClearingRoundView | None:
        """One clearing round over the live book, decided by :func:`coordinator.market.clear`.

        A scheduled round (no ``env``) over an empty side of the book is skipped and returns None, so the
        history only holds rounds that could have traded; an admin's round is always recorded.
        """

        def op(conn: sqlite3.Connection) -> ClearingRoundView | None:
            if env is not None:
                _claim_nonce(conn, env)
            asks, lease_of = self._asks(conn)
            bids = self._bids(conn)
            if env is None and not (asks and bids):
                return None
            result = market.clear(asks, bids, config)
            for match in result.matches:
                units = to_units(match.price_per_hour)
                conn.execute(
                    "INSERT INTO matches (run_id, lease_id, account, price_units, state, matched_at)"
                    " VALUES (?, ?, ?, ?, 'active', ?)",
                    (match.run_id, lease_of[match.account], match.account, units, now),
                )
                conn.execute(
                    "UPDATE leases SET run_id = ?, price_units = ? WHERE id = ?",
                    (match.run_id, units, lease_of[match.account]),
                )
            conn.execute(
                """UPDATE runs SET state = 'running' WHERE state = 'recruiting' AND peers_min <=
                   (SELECT COUNT(*) FROM matches m WHERE m.run_id = runs.id AND m.state = 'active')"""
            )
            price = None if result.clearing_price is None else to_units(result.clearing_price)
            cursor = conn.execute(
                "INSERT INTO rounds (at, clearing_price_units, trades, supply, demand, reason)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (now, price, len(result.matches), result.supply, result.demand, result.reason),
            )
            return self._round_view(
                conn.execute("SELECT * FROM rounds WHERE id = ?", (cursor.lastrowid,)).fetchone()
            )

        return await self._db.write(op, None if env is None else _remember_refusal(env))

    _ASKS_QUERY = """
        SELECT l.id AS lease_id, o.account, o.price_units, o.tflops, o.vram_gb, p.uptime, p.lapses
        FROM leases l JOIN offers o ON o.lease_id = l.id JOIN peers p ON p.account = o.account
        WHERE l.state = 'active' AND l.run_id IS NULL AND o.roles LIKE '%"trainer"%'
    """
    _BIDS_QUERY = """
        SELECT r.id, r.max_price_units, r.peers_max, r.min_vram_gb,
               (SELECT COUNT(*) FROM matches m WHERE m.run_id = r.id AND m.state = 'active') AS active
        FROM runs r WHERE r.state IN ('recruiting', 'running')
    """

    def _asks(self, conn: sqlite3.Connection) -> tuple[list[market.Ask], dict[str, str]]:
        asks, lease_of = [], {}
        for row in conn.execute(self._ASKS_QUERY):
            asks.append(
                market.Ask(
                    account=row["account"],
                    price_per_hour=from_units(row["price_units"]),
                    tflops=row["tflops"],
                    vram_gb=row["vram_gb"],
                    reliability=leases.reliability(row["uptime"], row["lapses"]),
                )
            )
            lease_of[row["account"]] = row["lease_id"]
        return asks, lease_of

    def _bids(self, conn: sqlite3.Connection) -> list[market.Bid]:
        return [
            market.Bid(
                run_id=row["id"],
                max_price=from_units(row["max_price_units"]),
                units=row["peers_max"] - row["active"],
                min_vram_gb=row["min_vram_gb"],
            )
            for row in conn.execute(self._BIDS_QUERY)
            if row["peers_max"] > row["active"]
        ]

    @staticmethod
    def _round_view(row: sqlite3.Row) -> ClearingRoundView:
        price = row["clearing_price_units"]
        return ClearingRoundView(
            at=row["at"],
            clearing_price=None if price is None else from_units(price),
            trades=row["trades"],
            supply=row["supply"],
            demand=row["demand"],
            reason=row["reason"],
        )

    async def rounds(self, limit: int) -> list[ClearingRoundView]:
        return await self._db.read(
            lambda conn: [
                self._round_view(row)
                for row in conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT ?", (limit,))
            ]
        )

    async def market_depth(self) -> tuple[int, int]:
        """(supply, demand): open trainer offers with a live lease, and peers wanted by live runs."""

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            return len(self._asks(conn)[0]), sum(bid.units for bid in self._bids(conn))

        return await self._db.read(op)

    # ------------------------------------------------------------------------------------------ upkeep

    async def sweep(self, now: float, nonce_horizon: float) -> list[leases.Lapse]:
        """Lapse leases that missed their heartbeats (dropping their matches) and forget old nonces."""

        def op(conn: sqlite3.Connection) -> list[leases.Lapse]:
            active = [
                leases.LeaseState(row["id"], row["account"], row["last_heartbeat"])
                for row in conn.execute(
                    "SELECT id, account, last_heartbeat FROM leases WHERE state = 'active'"
                )
            ]
            lapses = leases.lapsed(now, active, self.lease_config.ttl)
            for lapse in lapses:
                conn.execute("UPDATE leases SET state = 'lapsed' WHERE id = ?", (lapse.lease_id,))
                conn.execute("UPDATE peers SET lapses = lapses + 1 WHERE account = ?", (lapse.account,))
                conn.execute(
                    "UPDATE matches SET state = 'dropped' WHERE lease_id = ? AND state = 'active'",
                    (lapse.lease_id,),
                )
            conn.execute("DELETE FROM nonces WHERE timestamp < ?", (now - nonce_horizon,))
            return lapses

        return await self._db.write(op)

    async def resume_leases(self, now: float) -> int:
        """After a restart, give every active lease a fresh heartbeat deadline: peers could not renew
        while the coordinator was down, and that is not their fault."""
        return await self._db.write(
            lambda conn: (
                conn.execute(
                    "UPDATE leases SET last_heartbeat = ? WHERE state = 'active' AND last_heartbeat < ?",
                    (now, now),
                ).rowcount
            )
        )

    async def counts(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            counts = {
                f"runs_{row[0]}": row[1]
                for row in conn.execute("SELECT state, COUNT(*) FROM runs GROUP BY state")
            }
            counts["live_leases"] = conn.execute(
                "SELECT COUNT(*) FROM leases WHERE state = 'active'"
            ).fetchone()[0]
            return counts

        return await self._db.read(op)
