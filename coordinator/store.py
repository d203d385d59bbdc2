"""Persistence of the coordinator: the :class:`Store` interface the HTTP layer uses, and its implementation,
which runs each request as one write (or read) of a :class:`coordinator.db.Database`: SQLite or PostgreSQL.

Every signed write claims its nonce in the same transaction as its effect, so a request is applied at
most once even when it is replayed after a crash, and an acknowledged request is never lost (group
commit in :mod:`coordinator.db`). Decisions (ledger checks, lapses, clearing, run states) are pure functions
from :mod:`coordinator.ledger`, :mod:`coordinator.leases`, :mod:`coordinator.market` and
:mod:`coordinator.runs`; the SQL that reads the state they need and writes what they decide is in one module
per concept, each function taking the connection of the transaction it is part of:
:mod:`coordinator.ledger_store` (deposits, accounts, the ledger's audit), :mod:`coordinator.offer_store`
(offers, leases, peers), :mod:`coordinator.market_store` (clearing rounds), :mod:`coordinator.run_store`
(runs), :mod:`coordinator.match_store` (a peer's place in a run), :mod:`coordinator.group_store` (the run's
training group and its rendezvous store), :mod:`coordinator.report_store` (reports,
their pay and audits), :mod:`coordinator.model_store` (the final model) and :mod:`coordinator.audit_store`
(audits). Their tables are :mod:`coordinator.schema`. This module binds each request to its transaction, and
holds the upkeep that spans them all (lapse sweeps, resuming after a restart, counts).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from coordinator import (
    audit_store,
    group_store,
    groups,
    leases,
    ledger,
    ledger_store,
    market,
    market_store,
    match_store,
    model_store,
    offer_store,
    quotes,
    report_store,
    run_store,
    runs,
    sql,
)
from coordinator.db import Call, Database, SQLiteDatabase
from coordinator.leases import LeaseConfig
from coordinator.schema import postgres_migrations, sqlite_migrations
from peer.protocol import states
from peer.protocol.envelope import Envelope
from peer.protocol.run_schemas import (
    AuditResultBody,
    AuditTask,
    AuditView,
    BlameBody,
    BlameView,
    CheckinBody,
    GroupView,
    JoinBody,
    LossCurve,
    ModelView,
    QuoteBody,
    QuoteView,
    RendezvousGetBody,
    RendezvousSetBody,
    RendezvousWritten,
    ReportBody,
    ReportView,
    RunBody,
    RunView,
)
from peer.protocol.schemas import (
    AccountView,
    ClearingRoundView,
    LeaseView,
    OfferBody,
    OfferResponse,
    OfferView,
    PeerView,
    Telemetry,
)

if TYPE_CHECKING:
    from coordinator.postgres import Leadership


class Store(Protocol):
    """What the HTTP layer needs from persistence."""

    name: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def lead(self) -> bool: ...
    async def deposit(self, now: float, env: Envelope, account: str, units: int) -> AccountView: ...
    async def withdraw(self, now: float, env: Envelope, account: str, units: int) -> AccountView: ...
    async def transfer(
        self, now: float, env: Envelope, account: str, recipient: str, units: int
    ) -> AccountView: ...
    async def account(self, account: str) -> AccountView: ...
    async def audit(self, *, incremental: bool) -> ledger.Audit: ...
    async def replay_audit(self, env: Envelope) -> ledger.Audit: ...
    async def post_offer(self, now: float, env: Envelope, body: OfferBody) -> OfferResponse: ...
    async def heartbeat(
        self, now: float, env: Envelope, lease_id: str, telemetry: Telemetry | None = None
    ) -> LeaseView: ...
    async def withdraw_offer(self, now: float, env: Envelope, lease_id: str) -> OfferResponse: ...
    async def peers(self) -> list[PeerView]: ...
    async def loss_curve(self, run_id: str) -> LossCurve: ...
    async def offers(self) -> list[OfferView]: ...
    async def create_run(self, now: float, env: Envelope, body: RunBody) -> RunView: ...
    async def runs(self) -> list[RunView]: ...
    async def run(self, run_id: str) -> RunView: ...
    async def cancel_run(self, now: float, env: Envelope, run_id: str) -> RunView: ...
    async def join(self, now: float, env: Envelope, run_id: str, body: JoinBody) -> RunView: ...
    async def leave(self, now: float, env: Envelope, run_id: str) -> RunView: ...
    async def group_checkin(self, now: float, env: Envelope, run_id: str, body: CheckinBody) -> GroupView: ...
    async def group_after(self, now: float, run_id: str, version: int) -> GroupView | None: ...
    async def rendezvous_set(
        self, now: float, env: Envelope, run_id: str, body: RendezvousSetBody
    ) -> RendezvousWritten: ...
    async def rendezvous_get(
        self, account: str, run_id: str, body: RendezvousGetBody
    ) -> dict[str, bytes]: ...
    async def report(self, now: float, env: Envelope, run_id: str, body: ReportBody) -> ReportView: ...
    async def blame_round(self, now: float, env: Envelope, run_id: str, body: BlameBody) -> BlameView: ...
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
    async def quote(
        self, body: QuoteBody, config: market.MarketConfig, quote_config: quotes.QuoteConfig, history: int
    ) -> QuoteView: ...
    async def sweep(self, now: float, nonce_horizon: float) -> list[leases.Lapse]: ...
    async def resume_leases(self, now: float) -> int: ...
    async def counts(self) -> dict[str, int]: ...


def open_store(
    url: str,
    lease_config: LeaseConfig,
    *,
    synchronous: str,
    batch_max: int,
    readers: int = 4,
    run_policy: runs.RunPolicy | None = None,
) -> Store:
    """A store for ``sqlite:///PATH`` or ``postgresql://USER@HOST[:PORT]/DB``; other schemes are refused.

    As in SQLAlchemy, ``sqlite:///market.db`` is relative to the working directory and
    ``sqlite:////var/lib/market.db`` (four slashes) is absolute. A PostgreSQL URL is libpq's (any of its
    parameters, ``?sslmode=require`` for one); several coordinator replicas may share that database.
    ``readers`` is the number of PostgreSQL connections that serve reads (SQLite reads on its writer).
    """
    parsed = urlparse(url)
    if parsed.scheme in ("postgresql", "postgres"):
        try:  # psycopg only where it is used: the postgres extra
            from coordinator.postgres import Leadership, PostgresDatabase
        except ImportError as e:
            raise ValueError(
                f"--db {url!r}: PostgreSQL needs psycopg ({e}): pip install 'hivemarket[postgres]'"
            ) from None

        db: Database = PostgresDatabase(url, postgres_migrations(), batch_max=batch_max, readers=readers)
        return SQLStore(db, lease_config, run_policy=run_policy, leadership=Leadership(url))
    if parsed.scheme != "sqlite" or parsed.netloc or len(parsed.path) < 2:
        raise ValueError(f"--db {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DATABASE")
    path = Path(parsed.path[1:])
    db = SQLiteDatabase(path, sqlite_migrations(), synchronous=synchronous, batch_max=batch_max)
    return SQLStore(db, lease_config, run_policy=run_policy)


class SQLStore:
    """:class:`Store` over a :class:`coordinator.db.Database`: SQLite (one process) or PostgreSQL (replicas).

    ``leadership`` decides which replica runs the work that must happen once (clearing, sweeps); without
    one (SQLite: one process per file) this process always leads.
    """

    def __init__(
        self,
        db: Database,
        lease_config: LeaseConfig,
        *,
        run_policy: runs.RunPolicy | None = None,
        leadership: Leadership | None = None,
    ):
        self.lease_config = lease_config
        self.run_policy = run_policy or runs.RunPolicy()
        self._db = db
        self._leadership = leadership
        # one object, so that pending heartbeats are batched together (see Database.write_batched)
        self._heartbeats = Call(offer_store.heartbeats, times=lease_config)

    @property
    def name(self) -> str:
        return self._db.name

    async def lead(self) -> bool:
        """Whether this process should run the market's once-only work now (checked before each job)."""
        if self._leadership is None:
            return True
        return await asyncio.to_thread(self._leadership.check)

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()
        if self._leadership is not None:
            await asyncio.to_thread(self._leadership.close)

    # ------------------------------------------------------------------------------------------ accounts

    async def deposit(self, now: float, env: Envelope, account: str, units: int) -> AccountView:
        return await self._db.write(
            Call(ledger_store.deposit, now, env, account, units), Call(sql.remember_refusal, env)
        )

    async def withdraw(self, now: float, env: Envelope, account: str, units: int) -> AccountView:
        return await self._db.write(
            Call(ledger_store.withdraw, now, env, account, units), Call(sql.remember_refusal, env)
        )

    async def transfer(
        self, now: float, env: Envelope, account: str, recipient: str, units: int
    ) -> AccountView:
        return await self._db.write(
            Call(ledger_store.transfer, now, env, account, recipient, units), Call(sql.remember_refusal, env)
        )

    async def account(self, account: str) -> AccountView:
        return await self._db.read(Call(ledger_store.account_view, account))

    async def audit(self, *, incremental: bool) -> ledger.Audit:
        """The books against the deposits (a read) and, ``incremental``, against the entries added since
        the last audit (a write: it advances the running totals; see :func:`ledger_store.audit`)."""
        if not incremental:
            return await self._db.read(Call(ledger_store.audit, incremental=False))
        return await self._db.write(Call(ledger_store.audit, incremental=True))

    async def replay_audit(self, env: Envelope) -> ledger.Audit:
        """Every entry replayed (admin-signed; see :func:`ledger_store.replay`)."""
        return await self._db.write(Call(ledger_store.replay, env), Call(sql.remember_refusal, env))

    # ------------------------------------------------------------------------------------- offers, leases

    async def post_offer(self, now: float, env: Envelope, body: OfferBody) -> OfferResponse:
        return await self._db.write(
            Call(offer_store.post_offer, now, env, body, self.lease_config),
            Call(sql.remember_refusal, env),
        )

    async def heartbeat(
        self, now: float, env: Envelope, lease_id: str, telemetry: Telemetry | None = None
    ) -> LeaseView:
        beat = offer_store.Heartbeat(now, env, lease_id, telemetry)
        return await self._db.write_batched(self._heartbeats, beat)

    async def withdraw_offer(self, now: float, env: Envelope, lease_id: str) -> OfferResponse:
        return await self._db.write(
            Call(offer_store.withdraw, now, env, lease_id, self.lease_config, self.run_policy),
            Call(sql.remember_refusal, env),
        )

    async def offers(self) -> list[OfferView]:
        return await self._db.read(offer_store.offers)

    async def peers(self) -> list[PeerView]:
        return await self._db.read(offer_store.peers)

    # ------------------------------------------------------------------------------------------------ runs

    async def create_run(self, now: float, env: Envelope, body: RunBody) -> RunView:
        return await self._db.write(
            Call(run_store.create_run, now, env, body), Call(sql.remember_refusal, env)
        )

    async def runs(self) -> list[RunView]:
        return await self._db.read(
            lambda conn: run_store.run_views(
                conn, conn.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
            )
        )

    async def run(self, run_id: str) -> RunView:
        return await self._db.read(Call(run_store.run_view, run_id))

    async def cancel_run(self, now: float, env: Envelope, run_id: str) -> RunView:
        return await self._db.write(
            Call(run_store.cancel_run, now, env, run_id), Call(sql.remember_refusal, env)
        )

    async def join(self, now: float, env: Envelope, run_id: str, body: JoinBody) -> RunView:
        return await self._db.write(
            Call(match_store.join, now, env, run_id, body), Call(sql.remember_refusal, env)
        )

    async def leave(self, now: float, env: Envelope, run_id: str) -> RunView:
        return await self._db.write(
            Call(match_store.leave, now, env, run_id, self.run_policy), Call(sql.remember_refusal, env)
        )

    async def group_checkin(self, now: float, env: Envelope, run_id: str, body: CheckinBody) -> GroupView:
        return await self._db.write(
            Call(match_store.checkin, now, env, run_id, body, self.run_policy),
            Call(sql.remember_refusal, env),
        )

    async def group_after(self, now: float, run_id: str, version: int) -> GroupView | None:
        """The run's group if a check-in waiting on ``version`` is answered now (:func:`groups.answers_wait`),
        else None."""
        group = await self._db.read(Call(group_store.current, run_id))
        if group is None or not groups.answers_wait(now, group, version, self.run_policy.group):
            return None
        return group_store.group_view(group)

    async def rendezvous_set(
        self, now: float, env: Envelope, run_id: str, body: RendezvousSetBody
    ) -> RendezvousWritten:
        return await self._db.write(
            Call(match_store.rendezvous_set, now, env, run_id, body), Call(sql.remember_refusal, env)
        )

    async def rendezvous_get(self, account: str, run_id: str, body: RendezvousGetBody) -> dict[str, bytes]:
        return await self._db.read(Call(match_store.rendezvous_get, account, run_id, body))

    async def report(self, now: float, env: Envelope, run_id: str, body: ReportBody) -> ReportView:
        return await self._db.write(
            Call(report_store.add_report, now, env, run_id, body, self.run_policy),
            Call(sql.remember_refusal, env),
        )

    async def blame_round(self, now: float, env: Envelope, run_id: str, body: BlameBody) -> BlameView:
        return await self._db.write(
            Call(report_store.blame_round, now, env, run_id, body, self.run_policy),
            Call(sql.remember_refusal, env),
        )

    async def reports(self, run_id: str) -> list[ReportView]:
        return await self._db.read(Call(report_store.reports, run_id))

    async def loss_curve(self, run_id: str) -> LossCurve:
        return await self._db.read(Call(report_store.loss_curve, run_id))

    async def accepts_model(self, run_id: str) -> bool:
        return await self._db.read(Call(model_store.accepts_model, run_id))

    async def check_uploader(self, account: str, run_id: str) -> None:
        await self._db.read(Call(model_store.check_uploader, run_id, account))

    async def record_model(self, now: float, env: Envelope, run_id: str, sha256: str, size: int) -> RunView:
        return await self._db.write(
            Call(model_store.record_model, now, env, run_id, sha256, size, self.run_policy),
            Call(sql.remember_refusal, env),
        )

    async def model(self, run_id: str) -> ModelView:
        return await self._db.read(Call(model_store.model, run_id))

    async def claim_audits(self, now: float, env: Envelope, run_id: str, limit: int) -> list[AuditTask]:
        return await self._db.write(
            Call(report_store.claim_audits, now, env, run_id, limit, self.run_policy),
            Call(sql.remember_refusal, env),
        )

    async def submit_audit(
        self, now: float, env: Envelope, run_id: str, audit_id: str, body: AuditResultBody
    ) -> AuditView:
        return await self._db.write(
            Call(report_store.submit_audit, now, env, run_id, audit_id, body, self.run_policy),
            Call(sql.remember_refusal, env),
        )

    async def audits(self, run_id: str) -> list[AuditView]:
        return await self._db.read(Call(report_store.audits, run_id))

    # ---------------------------------------------------------------------------------------------- market

    async def clear_market(
        self, now: float, env: Envelope | None, config: market.MarketConfig
    ) -> ClearingRoundView | None:
        return await self._db.write(
            Call(market_store.clear, now, env, config, self.run_policy),
            None if env is None else Call(sql.remember_refusal, env),
        )

    async def rounds(self, limit: int) -> list[ClearingRoundView]:
        return await self._db.read(Call(market_store.rounds, limit))

    async def market_depth(self) -> tuple[int, int]:
        return await self._db.read(market_store.depth)

    async def quote(
        self, body: QuoteBody, config: market.MarketConfig, quote_config: quotes.QuoteConfig, history: int
    ) -> QuoteView:
        return await self._db.read(Call(market_store.quote, body, config, quote_config, history))

    # ------------------------------------------------------------------------------------------ upkeep

    async def sweep(self, now: float, nonce_horizon: float) -> list[leases.Lapse]:
        """Lapse leases that missed their heartbeats (dropping their matches, which changes their runs'
        groups), settle failed group versions whose survivors waited long enough, expire audits past their
        deadline, move the runs on (a drop may pause a run; a pause or a settling may time out) and forget
        old nonces."""
        return await self._db.write(Call(_sweep, now, nonce_horizon, self.lease_config, self.run_policy))

    async def resume_leases(self, now: float) -> int:
        """After a restart, give every active lease a fresh heartbeat deadline, and every live run fresh
        clocks (pause, stall and settle deadlines): peers could neither renew nor report while the
        coordinator was down, and that is not their fault."""
        return await self._db.write(Call(_resume, now))

    async def counts(self) -> dict[str, int]:
        def op(conn: Any) -> dict[str, int]:
            counts = {
                f"runs_{row[0]}": row[1]
                for row in conn.execute("SELECT state, COUNT(*) FROM runs GROUP BY state")
            }
            counts["live_leases"] = conn.execute(
                "SELECT COUNT(*) FROM leases WHERE state = 'active'"
            ).fetchone()[0]
            return counts

        return await self._db.read(op)


def _sweep(
    conn: Any, now: float, nonce_horizon: float, lease_config: LeaseConfig, run_policy: runs.RunPolicy
) -> list[leases.Lapse]:
    """:meth:`SQLStore.sweep`'s write."""
    # only the leases silent for ttl can lapse: reading every live lease would hold the writer
    # (2,000 rows: tens of ms on PostgreSQL); which of them lapse stays leases.lapsed's decision
    active = [
        leases.LeaseState(row["id"], row["account"], row["last_heartbeat"])
        for row in conn.execute(
            "SELECT id, account, last_heartbeat FROM leases WHERE state = 'active' AND last_heartbeat <= ?",
            (now - lease_config.ttl,),
        )
    ]
    lapses = leases.lapsed(now, active, lease_config.ttl)
    dropped_from: set[str] = set()
    for lapse in lapses:
        conn.execute("UPDATE peers SET lapses = lapses + 1 WHERE account = ?", (lapse.account,))
        dropped_from.update(match_store.end_lease(conn, lapse.lease_id, "lapsed", "dropped"))
    for run_id in sorted(dropped_from):
        group_store.refresh_group(conn, now, run_id, run_policy.group)
    group_store.refresh_failed(conn, now, run_policy.group)
    audit_store.expire(conn, now)
    run_store.advance(conn, now, run_policy)
    conn.execute("DELETE FROM nonces WHERE timestamp < ?", (now - nonce_horizon,))
    return lapses


def _resume(conn: Any, now: float) -> int:
    """:meth:`SQLStore.resume_leases`'s write."""
    marks = ",".join("?" * len(states.LIVE))
    conn.execute(
        f"UPDATE runs SET state_since = ? WHERE state IN ({marks}) AND state_since < ?",
        (now, *states.LIVE, now),
    )
    return conn.execute(
        "UPDATE leases SET last_heartbeat = ? WHERE state = 'active' AND last_heartbeat < ?", (now, now)
    ).rowcount
