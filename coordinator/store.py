"""Persistence of the coordinator: the :class:`Store` interface and its SQLite implementation.

Every signed write claims its nonce in the same transaction as its effect, so a request is applied at
most once even when it is replayed after a crash, and an acknowledged request is never lost (group
commit in :mod:`coordinator.db`). Decisions (ledger checks, lapses, clearing, run states) are pure functions
from :mod:`coordinator.ledger`, :mod:`coordinator.leases`, :mod:`coordinator.market` and
:mod:`coordinator.runs`; this module (and :mod:`coordinator.run_store` for runs) only reads the state they
need and writes what they decide.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from coordinator import audit_store, leases, ledger, market, run_store, runs, sql, verification
from coordinator.db import Database
from coordinator.errors import Conflict, Forbidden, NotFound
from peer.protocol import states
from peer.protocol.envelope import Envelope
from peer.protocol.money import from_units, to_units
from peer.protocol.schemas import (
    AccountView,
    AuditResultBody,
    AuditTask,
    AuditView,
    ClearingRoundView,
    JoinBody,
    LeaseView,
    LossCurve,
    LossPoint,
    ModelView,
    OfferBody,
    OfferResponse,
    OfferView,
    PeerView,
    ReportBody,
    ReportView,
    RunBody,
    RunView,
    Telemetry,
)

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
    run_store.MIGRATION,
    audit_store.MIGRATION,
    # A peer's last telemetry (HeartbeatBody), shown by the dashboard.
    """
    ALTER TABLE offers ADD COLUMN power_w REAL;
    ALTER TABLE offers ADD COLUMN temperature_c REAL;
    ALTER TABLE offers ADD COLUMN utilization_pct REAL;
    ALTER TABLE offers ADD COLUMN telemetry_at REAL
    """,
)


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
    async def heartbeat(
        self, now: float, env: Envelope, lease_id: str, telemetry: Telemetry | None = None
    ) -> LeaseView: ...
    async def peers(self) -> list[PeerView]: ...
    async def loss_curve(self, run_id: str) -> LossCurve: ...
    async def offers(self) -> list[OfferView]: ...
    async def create_run(self, now: float, env: Envelope, body: RunBody) -> RunView: ...
    async def runs(self) -> list[RunView]: ...
    async def run(self, run_id: str) -> RunView: ...
    async def cancel_run(self, now: float, env: Envelope, run_id: str) -> RunView: ...
    async def join(self, now: float, env: Envelope, run_id: str, body: JoinBody) -> RunView: ...
    async def leave(self, now: float, env: Envelope, run_id: str) -> RunView: ...
    async def report(self, now: float, env: Envelope, run_id: str, body: ReportBody) -> ReportView: ...
    async def reports(self, run_id: str) -> list[ReportView]: ...
    async def accepts_model(self, run_id: str) -> bool: ...
    async def check_uploader(self, account: str, run_id: str) -> None: ...
    async def record_model(
        self, now: float, env: Envelope, run_id: str, sha256: str, size: int
    ) -> RunView: ...
    async def model(self, run_id: str) -> ModelView: ...
    async def claim_audits(self, now: float, env: Envelope, run_id: str, limit: int) -> list[AuditTask]: ...
    async def submit_audit(
        self, now: float, env: Envelope, run_id: str, audit_id: str, body: AuditResultBody
    ) -> AuditView: ...
    async def audits(self, run_id: str) -> list[AuditView]: ...
    async def clear_market(
        self, now: float, env: Envelope | None, config: market.MarketConfig
    ) -> ClearingRoundView | None: ...
    async def rounds(self, limit: int) -> list[ClearingRoundView]: ...
    async def market_depth(self) -> tuple[int, int]: ...
    async def sweep(self, now: float, nonce_horizon: float) -> list[leases.Lapse]: ...
    async def resume_leases(self, now: float) -> int: ...
    async def counts(self) -> dict[str, int]: ...


def open_store(
    url: str,
    lease_config: LeaseConfig,
    *,
    synchronous: str,
    batch_max: int,
    run_policy: runs.RunPolicy | None = None,
) -> Store:
    """A store for ``sqlite:///PATH`` (the only backend so far); other schemes are refused by name.

    As in SQLAlchemy, ``sqlite:///market.db`` is relative to the working directory and
    ``sqlite:////var/lib/market.db`` (four slashes) is absolute.
    """
    parsed = urlparse(url)
    if parsed.scheme != "sqlite" or parsed.netloc or len(parsed.path) < 2:
        raise ValueError(f"--db {url!r}: only sqlite:///PATH is supported (PostgreSQL is planned)")
    path = Path(parsed.path[1:])
    return SQLiteStore(
        path, lease_config, synchronous=synchronous, batch_max=batch_max, run_policy=run_policy
    )


def _reliability(conn: sqlite3.Connection, account: str) -> float:
    row = conn.execute("SELECT * FROM peers WHERE account = ?", (account,)).fetchone()
    return _standing(row) if row else leases.reliability(0.0, 0)


def _standing(row: Mapping[str, Any]) -> float:
    """A peer's reliability as the market prices it: uptime against lapses, times its audit reputation."""
    return leases.reliability(row["uptime"], row["lapses"]) * verification.reputation(
        row["audits_passed"], row["audits_failed"] + row["verdicts_overturned"]
    )


class SQLiteStore:
    """The SQLite implementation of :class:`Store` (WAL mode, group commit)."""

    def __init__(
        self,
        path: Path,
        lease_config: LeaseConfig,
        *,
        synchronous: str,
        batch_max: int,
        run_policy: runs.RunPolicy | None = None,
    ):
        self.path = path
        self.lease_config = lease_config
        self.run_policy = run_policy or runs.RunPolicy()
        self._db = Database(path, MIGRATIONS, synchronous=synchronous, batch_max=batch_max)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    # ------------------------------------------------------------------------------------------ accounts

    async def deposit(self, now: float, env: Envelope, account: str, units: int) -> AccountView:
        def op(conn: sqlite3.Connection) -> AccountView:
            sql.claim_nonce(conn, env)
            sql.post(conn, ledger.deposit(account, units), now)
            return self._account(conn, account)

        return await self._db.write(op, sql.remember_refusal(env))

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
            balance=from_units(sql.book(conn, ledger.balance_book(account))),
            escrow=from_units(escrow),
            earned=from_units(sql.book(conn, ledger.earned_book(account))),
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
        SELECT o.*, l.state AS lease_state, l.run_id, p.uptime, p.lapses, p.audits_passed, p.audits_failed,
               p.verdicts_overturned
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
            reliability=_standing(row),
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
            sql.claim_nonce(conn, env)
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

        return await self._db.write(op, sql.remember_refusal(env))

    def _renew(self, conn: sqlite3.Connection, lease: sqlite3.Row, now: float) -> None:
        uptime = leases.credited_uptime(now, lease["last_heartbeat"], self.lease_config.ttl)
        conn.execute("UPDATE leases SET last_heartbeat = ? WHERE id = ?", (now, lease["id"]))
        conn.execute("UPDATE peers SET uptime = uptime + ? WHERE account = ?", (uptime, lease["account"]))

    async def heartbeat(
        self, now: float, env: Envelope, lease_id: str, telemetry: Telemetry | None = None
    ) -> LeaseView:
        def op(conn: sqlite3.Connection) -> LeaseView:
            sql.claim_nonce(conn, env)
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
            if telemetry is not None:
                conn.execute(
                    "UPDATE offers SET power_w = ?, temperature_c = ?, utilization_pct = ?, telemetry_at = ?"
                    " WHERE account = ?",
                    (telemetry.power_w, telemetry.temperature_c, telemetry.utilization_pct, now, env.account),
                )
            return self._lease_view({**dict(lease), "last_heartbeat": now})

        return await self._db.write(op, sql.remember_refusal(env))

    async def offers(self) -> list[OfferView]:
        return await self._db.read(
            lambda conn: [
                self._offer_view(row) for row in conn.execute(self._OFFER_QUERY + " ORDER BY o.account")
            ]
        )

    async def peers(self) -> list[PeerView]:
        """Every peer with an offer: its standing, the samples of its paid reports, what it earned and
        its last telemetry (one query, for the dashboard)."""

        def op(conn: sqlite3.Connection) -> list[PeerView]:
            query = (
                "SELECT q.*, (SELECT COALESCE(SUM(r.samples), 0) FROM reports r"
                " WHERE r.account = q.account AND r.pay_state = 'paid') AS verified,"
                " COALESCE((SELECT b.units FROM books b WHERE b.name = 'earned:' || q.account), 0) AS earned"
                f" FROM ({self._OFFER_QUERY}) q"
            )
            return [self._peer_view(row) for row in conn.execute(query + " ORDER BY q.account")]

        return await self._db.read(op)

    def _peer_view(self, row: sqlite3.Row) -> PeerView:
        offer = self._offer_view(row)
        telemetry = (
            Telemetry(
                power_w=row["power_w"],
                temperature_c=row["temperature_c"],
                utilization_pct=row["utilization_pct"],
            )
            if row["telemetry_at"] is not None
            else None
        )
        return PeerView(
            account=offer.account,
            gpu=offer.gpu,
            gpu_count=offer.gpu_count,
            state=offer.state,
            reliability=offer.reliability,
            samples=row["verified"],
            earned=from_units(row["earned"]),
            audits_passed=row["audits_passed"],
            audits_failed=row["audits_failed"],
            run_id=row["run_id"] if offer.state == "matched" else None,
            telemetry=telemetry,
            telemetry_at=row["telemetry_at"],
        )

    # ------------------------------------------------------------------------------------------------ runs

    async def create_run(self, now: float, env: Envelope, body: RunBody) -> RunView:
        return await self._db.write(
            lambda conn: run_store.create_run(conn, now, env, body), sql.remember_refusal(env)
        )

    async def runs(self) -> list[RunView]:
        return await self._db.read(
            lambda conn: run_store.run_views(
                conn, conn.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
            )
        )

    async def run(self, run_id: str) -> RunView:
        return await self._db.read(lambda conn: run_store.run_view(conn, run_id))

    async def cancel_run(self, now: float, env: Envelope, run_id: str) -> RunView:
        return await self._db.write(
            lambda conn: run_store.cancel_run(conn, now, env, run_id), sql.remember_refusal(env)
        )

    async def join(self, now: float, env: Envelope, run_id: str, body: JoinBody) -> RunView:
        return await self._db.write(
            lambda conn: run_store.join(conn, now, env, run_id, body), sql.remember_refusal(env)
        )

    async def leave(self, now: float, env: Envelope, run_id: str) -> RunView:
        return await self._db.write(
            lambda conn: run_store.leave(conn, now, env, run_id, self.run_policy), sql.remember_refusal(env)
        )

    async def report(self, now: float, env: Envelope, run_id: str, body: ReportBody) -> ReportView:
        return await self._db.write(
            lambda conn: run_store.add_report(conn, now, env, run_id, body, self.run_policy),
            sql.remember_refusal(env),
        )

    async def reports(self, run_id: str) -> list[ReportView]:
        return await self._db.read(lambda conn: run_store.reports(conn, run_id))

    async def loss_curve(self, run_id: str) -> LossCurve:
        """Each epoch's mean reported loss, weighted by samples: what a run's loss plot draws."""

        def op(conn: sqlite3.Connection) -> LossCurve:
            run_store.get_run(conn, run_id)  # 404 for a run that does not exist
            rows = conn.execute(
                "SELECT epoch, SUM(loss * samples) / SUM(samples) AS loss, SUM(samples) AS samples"
                " FROM reports WHERE run_id = ? GROUP BY epoch ORDER BY epoch",
                (run_id,),
            )
            return LossCurve(
                run_id=run_id,
                points=[LossPoint(epoch=r["epoch"], loss=r["loss"], samples=r["samples"]) for r in rows],
            )

        return await self._db.read(op)

    async def accepts_model(self, run_id: str) -> bool:
        return await self._db.read(lambda conn: run_store.accepts_model(conn, run_id))

    async def check_uploader(self, account: str, run_id: str) -> None:
        await self._db.read(lambda conn: run_store.check_uploader(conn, run_id, account))

    async def record_model(self, now: float, env: Envelope, run_id: str, sha256: str, size: int) -> RunView:
        return await self._db.write(
            lambda conn: run_store.record_model(conn, now, env, run_id, sha256, size, self.run_policy),
            sql.remember_refusal(env),
        )

    async def model(self, run_id: str) -> ModelView:
        return await self._db.read(lambda conn: run_store.model(conn, run_id))

    async def claim_audits(self, now: float, env: Envelope, run_id: str, limit: int) -> list[AuditTask]:
        return await self._db.write(
            lambda conn: run_store.claim_audits(conn, now, env, run_id, limit, self.run_policy),
            sql.remember_refusal(env),
        )

    async def submit_audit(
        self, now: float, env: Envelope, run_id: str, audit_id: str, body: AuditResultBody
    ) -> AuditView:
        return await self._db.write(
            lambda conn: run_store.submit_audit(conn, now, env, run_id, audit_id, body, self.run_policy),
            sql.remember_refusal(env),
        )

    async def audits(self, run_id: str) -> list[AuditView]:
        return await self._db.read(lambda conn: run_store.audits(conn, run_id))

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
                sql.claim_nonce(conn, env)
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
            run_store.advance(conn, now, self.run_policy)  # recruiting or paused runs may now run
            price = None if result.clearing_price is None else to_units(result.clearing_price)
            cursor = conn.execute(
                "INSERT INTO rounds (at, clearing_price_units, trades, supply, demand, reason)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (now, price, len(result.matches), result.supply, result.demand, result.reason),
            )
            return self._round_view(
                conn.execute("SELECT * FROM rounds WHERE id = ?", (cursor.lastrowid,)).fetchone()
            )

        return await self._db.write(op, None if env is None else sql.remember_refusal(env))

    _ASKS_QUERY = """
        SELECT l.id AS lease_id, o.account, o.price_units, o.tflops, o.vram_gb, p.uptime, p.lapses,
               p.audits_passed, p.audits_failed, p.verdicts_overturned
        FROM leases l JOIN offers o ON o.lease_id = l.id JOIN peers p ON p.account = o.account
        WHERE l.state = 'active' AND l.run_id IS NULL AND o.roles LIKE '%"trainer"%'
          -- a peer that gave a run its place back (it cannot train it) or was banned from it sits out
          -- while that run bids: the market would otherwise pick it for the run again and again
          AND o.account NOT IN (
            SELECT m.account FROM matches m JOIN runs r ON r.id = m.run_id
            WHERE m.state IN ('left', 'banned') AND r.state IN ('recruiting', 'running', 'paused'))
    """
    _BIDS_QUERY = """
        SELECT r.id, r.max_price_units, r.peers_max, r.min_vram_gb,
               (SELECT COUNT(*) FROM matches m WHERE m.run_id = r.id AND m.state = 'active') AS active
        FROM runs r WHERE r.state IN ('recruiting', 'running', 'paused')
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
                    reliability=_standing(row),
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
        """Lapse leases that missed their heartbeats (dropping their matches), expire audits past their
        deadline, move the runs on (a drop may pause a run; a pause or a settling may time out) and forget
        old nonces."""

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
            audit_store.expire(conn, now)
            run_store.advance(conn, now, self.run_policy)
            conn.execute("DELETE FROM nonces WHERE timestamp < ?", (now - nonce_horizon,))
            return lapses

        return await self._db.write(op)

    async def resume_leases(self, now: float) -> int:
        """After a restart, give every active lease a fresh heartbeat deadline, and every live run fresh
        clocks (pause, stall and settle deadlines): peers could neither renew nor report while the
        coordinator was down, and that is not their fault."""

        def op(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(states.LIVE))
            conn.execute(
                f"UPDATE runs SET state_since = ? WHERE state IN ({marks}) AND state_since < ?",
                (now, *states.LIVE, now),
            )
            return conn.execute(
                "UPDATE leases SET last_heartbeat = ? WHERE state = 'active' AND last_heartbeat < ?",
                (now, now),
            ).rowcount

        return await self._db.write(op)

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
