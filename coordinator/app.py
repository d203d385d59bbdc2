"""The coordinator's HTTP API: the service's state and a handler per route, over a
:class:`coordinator.store.Store`.

The route table that binds the handlers to paths (:data:`coordinator.routes.ROUTES`) also drives
validation and ``/openapi.json``. Signed routes verify the envelope, its freshness and the per-account
rate limit before anything else runs; nonces are claimed inside the store's transaction. Client input
never causes a 500: every refusal is an :class:`ApiError` with a JSON body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator import ledger, market, model_files, quotes
from coordinator.errors import BadRequest, BodyTooLarge, Forbidden, RateLimited, Unauthorized
from coordinator.filters import FieldKind, FilterError, compile_filter, parse_sort
from coordinator.http import Context, Route, encode, parse_body, read_body
from coordinator.metrics import CoordinatorMetrics
from coordinator.ratelimit import Bucket, take
from coordinator.settings import ServerSettings
from coordinator.store import Store
from peer.protocol import states
from peer.protocol.envelope import Envelope, EnvelopeError, check_fresh, verify_request_digest
from peer.protocol.money import from_units, to_units
from peer.protocol.run_schemas import (
    AuditList,
    AuditTaskList,
    AuditView,
    BlameView,
    GroupView,
    LossCurve,
    QuoteView,
    RendezvousValues,
    RendezvousWritten,
    ReportList,
    ReportView,
    RunList,
    RunView,
)
from peer.protocol.schemas import (
    OCTET_STREAM,
    SHA256_HEADER,
    AccountView,
    ClearingRoundView,
    Health,
    LeaseView,
    LedgerAuditView,
    MarketView,
    OfferList,
    OfferResponse,
    OfferView,
    PeerList,
    ReachView,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

# Fields of the offer filter language, and the offer attribute each reads.
OFFER_FIELDS = {
    "account": FieldKind.STRING,
    "gpu": FieldKind.STRING,
    "gpu_count": FieldKind.NUMBER,
    "vram_gb": FieldKind.NUMBER,
    "tflops": FieldKind.NUMBER,
    "price": FieldKind.NUMBER,
    "reliability": FieldKind.NUMBER,
    "state": FieldKind.STRING,
    "min_lease_seconds": FieldKind.NUMBER,
    # measured by the probe (NVML; offers without a reading match no term on them) and by runs
    "watts": FieldKind.NUMBER,
    "watts_per_tflop": FieldKind.NUMBER,
    "headroom_c": FieldKind.NUMBER,
    "claimed_tflops": FieldKind.NUMBER,
    "capacity": FieldKind.STRING,
}


@dataclass
class Coordinator:
    """Application state: settings, the store, metrics, the admin account, rate-limit buckets, leadership."""

    settings: ServerSettings
    store: Store
    admin: str
    clock: Callable[[], float] = time.time
    metrics: CoordinatorMetrics = field(default_factory=CoordinatorMetrics)
    market_config: market.MarketConfig = field(default_factory=market.MarketConfig)
    buckets: dict[str, Bucket] = field(default_factory=dict)
    leading: bool = False  # whether this replica runs clearing and sweeps (see background)
    # Serialises publishing a model file with recording it, so that an upload that will be refused never
    # replaces the file of one that is being recorded.
    model_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # ------------------------------------------------------------------------------------- handlers

    async def healthz(self, ctx: Context) -> Health:
        return Health(status="ok")

    async def reachability(self, ctx: Context) -> ReachView:
        """Dial the asking host back at the port it names: whether others can reach it there. Only ever
        the address the request came from, so the check cannot be pointed at another host; signed, so it
        counts against the account's rate limit."""
        address, port = ctx.request.remote or "", ctx.body.port
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(address, port), self.settings.reach_check_timeout
            )
        except TimeoutError:
            reason = f"no answer in {self.settings.reach_check_timeout:g} s"
        except OSError as e:
            reason = e.strerror or type(e).__name__
        else:
            writer.close()
            return ReachView(address=address, port=port, reachable=True, reason="connected")
        return ReachView(address=address, port=port, reachable=False, reason=reason)

    async def prometheus(self, ctx: Context) -> web.Response:
        counts = await self.store.counts()
        for state in typing.get_args(states.RunState):
            self.metrics.runs.labels(state).set(counts.get(f"runs_{state}", 0))
        self.metrics.live_peers.set(counts["live_leases"])
        await self.ledger(incremental=False)  # sets the conservation gauge
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def deposit(self, ctx: Context) -> AccountView:
        return await self.store.deposit(
            ctx.now, ctx.envelope, ctx.path_id("account"), to_units(ctx.body.amount)
        )

    async def withdraw(self, ctx: Context) -> AccountView:
        return await self.store.withdraw(
            ctx.now, ctx.envelope, ctx.path_id("account"), to_units(ctx.body.amount)
        )

    async def transfer(self, ctx: Context) -> AccountView:
        body = ctx.body
        return await self.store.transfer(
            ctx.now, ctx.envelope, ctx.path_id("account"), body.to, to_units(body.amount)
        )

    async def account(self, ctx: Context) -> AccountView:
        return await self.store.account(ctx.path_id("account"))

    async def ledger_audit(self, ctx: Context) -> LedgerAuditView:
        return await self.ledger(incremental=True)

    async def ledger_replay(self, ctx: Context) -> LedgerAuditView:
        """The full audit, every entry replayed: admin-signed, as it scans the whole ledger."""
        assert ctx.envelope is not None  # an admin route is authenticated before it runs
        return self._ledger_view(await self.store.replay_audit(ctx.envelope))

    async def ledger(self, *, incremental: bool) -> LedgerAuditView:
        """Holdings against deposits; ``incremental`` also checks the books against the entries added since
        the last audit, replayed onto the running totals of those before (cheap: it reads only the new
        entries; the metrics scrape and the dashboard still check the books alone)."""
        return self._ledger_view(await self.store.audit(incremental=incremental))

    def _ledger_view(self, result: ledger.Audit) -> LedgerAuditView:
        self.metrics.ledger_conserved.set(1 if result.conserved else 0)
        return LedgerAuditView(
            conserved=result.conserved,
            deposits=from_units(result.deposits),
            holdings=from_units(result.holdings),
            reason=result.reason,
            entries_checked=result.entries_checked,
            last_entry=result.last_entry,
        )

    async def post_offer(self, ctx: Context) -> OfferResponse:
        return await self.store.post_offer(ctx.now, ctx.envelope, ctx.body)

    async def heartbeat(self, ctx: Context) -> LeaseView:
        return await self.store.heartbeat(ctx.now, ctx.envelope, ctx.path_id("lease_id"), ctx.body.telemetry)

    async def withdraw_offer(self, ctx: Context) -> OfferResponse:
        return await self.store.withdraw_offer(ctx.now, ctx.envelope, ctx.path_id("lease_id"))

    async def list_peers(self, ctx: Context) -> PeerList:
        return PeerList(peers=await self.store.peers())

    async def loss_curve(self, ctx: Context) -> LossCurve:
        return await self.store.loss_curve(ctx.path_id("run_id"))

    async def list_offers(self, ctx: Context) -> OfferList:
        query = ctx.request.query
        return OfferList(offers=await self.offers(query.get("q", ""), query.get("sort", "price")))

    async def offers(self, q: str, sort: str) -> list[OfferView]:
        """The offers the filter expression ``q`` keeps, ordered by ``sort``; a bad one is a BadRequest
        naming the parameter."""
        try:
            keep = compile_filter(q, OFFER_FIELDS)
        except FilterError as e:
            raise BadRequest(str(e), field="q", code="bad_filter") from None
        try:
            sort_field, descending = parse_sort(sort, OFFER_FIELDS)
        except FilterError as e:
            raise BadRequest(str(e), field="sort", code="bad_sort") from None
        rows = [(offer, _filter_record(offer)) for offer in await self.store.offers()]
        rows = [row for row in rows if keep(row[1])]
        rows.sort(key=lambda row: (row[1][sort_field] is None, row[1][sort_field]), reverse=descending)
        return [offer for offer, _ in rows]

    async def create_run(self, ctx: Context) -> RunView:
        return await self.store.create_run(ctx.now, ctx.envelope, ctx.body)

    async def list_runs(self, ctx: Context) -> RunList:
        return RunList(runs=await self.store.runs())

    async def get_run(self, ctx: Context) -> RunView:
        return await self.store.run(ctx.path_id("run_id"))

    async def cancel_run(self, ctx: Context) -> RunView:
        return await self.store.cancel_run(ctx.now, ctx.envelope, ctx.path_id("run_id"))

    async def join_run(self, ctx: Context) -> RunView:
        return await self.store.join(ctx.now, ctx.envelope, ctx.path_id("run_id"), ctx.body)

    async def leave_run(self, ctx: Context) -> RunView:
        return await self.store.leave(ctx.now, ctx.envelope, ctx.path_id("run_id"))

    async def group_checkin(self, ctx: Context) -> GroupView:
        """Record the check-in and answer the run's group; with ``wait_ms``, a check-in on a version that is
        still current waits (a long poll) until a newer version forms or the failed one is due to regroup:
        the survivors of a broken round learn of the next version when it forms, not at their next poll."""
        run_id, body = ctx.path_id("run_id"), ctx.body
        view = await self.store.group_checkin(ctx.now, ctx.envelope, run_id, body)
        version = body.version
        if version is None or body.wait_ms == 0 or view.version > version:
            return view
        later = await self._long_poll(
            body.wait_ms, lambda: self.store.group_after(self.clock(), run_id, version), lambda found: found
        )
        return later or view

    async def rendezvous_set(self, ctx: Context) -> RendezvousWritten:
        return await self.store.rendezvous_set(ctx.now, ctx.envelope, ctx.path_id("run_id"), ctx.body)

    async def rendezvous_get(self, ctx: Context) -> RendezvousValues:
        """A long poll: answer once every key is written, or after ``wait_ms`` with the ones that are; a
        read of a version that stops being current is refused (409 ``stale_version``) at once."""
        run_id, body = ctx.path_id("run_id"), ctx.body
        account = ctx.envelope.account
        wanted = set(body.keys)
        found = await self._long_poll(
            body.wait_ms,
            lambda: self.store.rendezvous_get(account, run_id, body),
            lambda values: wanted <= values.keys(),
        )
        return RendezvousValues(values={k: base64.b64encode(v).decode() for k, v in found.items()})

    async def _long_poll(
        self, wait_ms: int, look: Callable[[], Awaitable[T]], answered: Callable[[T], object]
    ) -> T:
        """``look()`` again every ``rendezvous_poll_interval`` until what it found is ``answered`` or
        ``wait_ms`` passed; what it found last. The loop sleeps in between and the state stays in the
        database, so any replica may answer."""
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            found = await look()
            left = deadline - time.monotonic()
            if answered(found) or left <= 0:
                return found
            await asyncio.sleep(min(self.settings.rendezvous_poll_interval, left))

    async def post_report(self, ctx: Context) -> ReportView:
        """Accept an epoch's report and pay it: ``floor(price_units * min(seconds, now - since) / 3600)``
        units, where ``since`` is the later of the match's join and its previous report and the price is the
        matched hourly price, capped by what the escrow holds (see :func:`coordinator.runs.report_pay`)."""
        return await self.store.report(ctx.now, ctx.envelope, ctx.path_id("run_id"), ctx.body)

    async def blame_round(self, ctx: Context) -> BlameView:
        return await self.store.blame_round(ctx.now, ctx.envelope, ctx.path_id("run_id"), ctx.body)

    async def list_reports(self, ctx: Context) -> ReportList:
        return ReportList(reports=await self.store.reports(ctx.path_id("run_id")))

    async def claim_audits(self, ctx: Context) -> AuditTaskList:
        tasks = await self.store.claim_audits(ctx.now, ctx.envelope, ctx.path_id("run_id"), ctx.body.limit)
        return AuditTaskList(audits=tasks)

    async def submit_audit(self, ctx: Context) -> AuditView:
        view = await self.store.submit_audit(
            ctx.now, ctx.envelope, ctx.path_id("run_id"), ctx.path_id("audit_id"), ctx.body
        )
        if view.state in ("passed", "failed"):
            self.metrics.audits.labels(view.state).inc()
        return view

    async def list_audits(self, ctx: Context) -> AuditList:
        return AuditList(audits=await self.store.audits(ctx.path_id("run_id")))

    async def put_model(self, ctx: Context) -> RunView:
        """Check who uploads before reading a byte: the envelope is signed over the SHA-256 the client
        declares in ``X-Hivemarket-Sha256``, and must be fresh, within the rate limit and from a peer the
        run takes a model from. Then stream the model to disk while hashing it; a body that does not hash
        to the declared digest is refused. The file takes its final name only while no other upload can
        (the lock) and only when the run still takes a model; if the transaction refuses, the file is
        removed, so the store never references a file that is not complete, nor one another upload
        replaced."""
        run_id = ctx.path_id("run_id")
        limit = self.settings.max_model_bytes
        length = ctx.request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(f"model of {length} bytes exceeds the limit of {limit} bytes")
        declared = ctx.request.headers.get(SHA256_HEADER, "")
        if not _SHA256_RE.fullmatch(declared):
            raise BadRequest(
                f"{SHA256_HEADER} must be the model's SHA-256 in lowercase hex, got {declared[:80]!r}",
                field=SHA256_HEADER,
            )
        envelope = self._authenticate(ctx.request, declared, ctx.now, admin=False)
        await self.store.check_uploader(envelope.account, run_id)
        received = await model_files.receive(ctx.request.content, self.settings.model_dir, limit)
        published: Path | None = None
        try:
            if received.size == 0:
                raise BadRequest("the model is empty (0 bytes)", code="empty_model")
            if received.sha256 != declared:
                raise BadRequest(
                    f"the body's SHA-256 is {received.sha256}, not the declared {declared}",
                    field=SHA256_HEADER,
                    code="hash_mismatch",
                )
            async with self.model_lock:
                if await self.store.accepts_model(run_id):
                    published = model_files.final_path(self.settings.model_dir, run_id)
                    await asyncio.to_thread(model_files.publish, received, published)
                view = await self.store.record_model(
                    self.clock(), envelope, run_id, received.sha256, received.size
                )
                published = None  # recorded: the file is the run's now
                return view
        finally:
            received.path.unlink(missing_ok=True)
            if published is not None:
                published.unlink(missing_ok=True)

    async def get_model(self, ctx: Context) -> web.StreamResponse:
        run_id = ctx.path_id("run_id")
        model = await self.store.model(run_id)
        path = model_files.final_path(self.settings.model_dir, run_id)
        headers = {SHA256_HEADER: model.sha256, "Content-Type": OCTET_STREAM}
        return web.FileResponse(path, headers=headers)

    async def market_view(self, ctx: Context) -> MarketView:
        return await self.market()

    async def market(self) -> MarketView:
        rounds = await self.store.rounds(self.settings.market_history)
        supply, demand = await self.store.market_depth()
        price = next((r.clearing_price for r in rounds if r.clearing_price is not None), None)
        return MarketView(clearing_price=price, supply=supply, demand=demand, rounds=rounds)

    async def quote(self, ctx: Context) -> QuoteView:
        s = self.settings
        config = quotes.QuoteConfig(s.quote_round_seconds, s.quote_efficiency, s.quote_spread)
        return await self.store.quote(ctx.body, self.market_config, config, s.quote_history)

    async def clear_market(self, ctx: Context) -> ClearingRoundView | None:  # None only when unsigned
        return await self._clear(ctx.now, ctx.envelope)

    async def _clear(self, now: float, envelope: Envelope | None) -> ClearingRoundView | None:
        result = await self.store.clear_market(now, envelope, self.market_config)
        if result is None:  # a scheduled round with nothing to trade
            return None
        self.metrics.clearing_rounds.inc()
        self.metrics.trades.inc(result.trades)
        if result.clearing_price is not None:
            self.metrics.clearing_price.set(float(result.clearing_price))
        return result

    # -------------------------------------------------------------------------------------- dispatch

    def endpoint(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            ctx = Context(request, self.clock())
            if route.raw_body is None:  # else the handler streams and authenticates the body itself
                raw = await read_body(request, self.settings.max_body_bytes)
                if route.auth != "none":
                    digest = hashlib.sha256(raw).hexdigest()
                    ctx.envelope = self._authenticate(request, digest, ctx.now, admin=route.auth == "admin")
                if route.body is not None:
                    ctx.body = parse_body(route.body, request, raw)
            result = await route.handler(self, ctx)
            if isinstance(result, web.StreamResponse):
                return result
            return encode(request, result, route.status)

        return handle

    def _authenticate(self, request: web.Request, body_sha256: str, now: float, *, admin: bool) -> Envelope:
        try:
            envelope = verify_request_digest(request.headers, request.method, request.raw_path, body_sha256)
            check_fresh(envelope, now, self.settings.signature_window)
        except EnvelopeError as e:
            raise Unauthorized(str(e), field=e.field, code="bad_signature") from None
        decision = take(
            self.buckets.get(envelope.account),
            now,
            self.settings.rate_limit_per_second,
            self.settings.rate_limit_burst,
        )
        self.buckets[envelope.account] = decision.bucket
        if not decision.allowed:
            raise RateLimited(
                f"account {envelope.account[:12]}... exceeds "
                f"{self.settings.rate_limit_per_second:g} requests/s",
                decision.retry_after,
            )
        if admin and envelope.account != self.admin:
            raise Forbidden(
                f"only the admin key may do this; {envelope.account} is not it", field="X-Hivemarket-Key"
            )
        return envelope

    # ---------------------------------------------------------------------------------- background

    async def background(self, app: web.Application) -> AsyncIterator[None]:
        """Open the store, and while the app lives: check whether this replica leads, and run clearing and
        lapse sweeps while it does.

        Replicas on one PostgreSQL database serve requests alike, but the work that must happen once (a
        clearing round, a lapse sweep, settling) runs on the one that leads (:meth:`Store.lead`); on SQLite
        the only process always leads. The first check happens before the app takes requests, so a
        single coordinator clears and sweeps from its first second as before.
        """
        await self.store.open()
        await self._check_leadership()
        tasks = [
            asyncio.create_task(self._every(self.settings.leader_check_interval, self._check_leadership)),
            asyncio.create_task(self._every(self.settings.clearing_interval, self._clearing_round)),
            asyncio.create_task(self._every(self.settings.sweep_interval, self._sweep)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.store.close()

    async def _every(self, interval: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception:
                logger.exception(f"Background job {job.__name__} failed; retrying in {interval:g} s")

    async def _check_leadership(self) -> None:
        """Take or keep the lead; on taking it, resume the leases and runs (nobody swept while no replica
        led, or while the coordinator was down, and that is not the peers' fault)."""
        leading = await self.store.lead()
        if leading and not self.leading:
            logger.info(f"Leading: this replica clears the market and sweeps leases of {self.store.name}")
            resumed = await self.store.resume_leases(self.clock())
            if resumed:
                logger.info(f"Resumed {resumed} active leases")
        elif self.leading and not leading:
            logger.warning("No longer leading: another replica clears the market and sweeps leases")
        self.leading = leading
        self.metrics.leader.set(1 if leading else 0)

    async def _clearing_round(self) -> None:
        if self.leading:
            await self._clear(self.clock(), None)

    async def _sweep(self) -> None:
        now = self.clock()
        # A bucket idle long enough to refill is the same as no bucket: forget it, or keys (free to make)
        # would grow this dict without bound. Buckets are this replica's own (see the README on replicas).
        refill = self.settings.rate_limit_burst / self.settings.rate_limit_per_second
        self.buckets = {k: b for k, b in self.buckets.items() if now - b.updated < refill}
        if not self.leading:
            return
        lapses = await self.store.sweep(now, nonce_horizon=2 * self.settings.signature_window)
        removed = await asyncio.to_thread(
            model_files.remove_partials,
            self.settings.model_dir,
            time.time() - self.settings.stale_upload_seconds,
        )
        if removed:
            logger.info(
                f"Removed {removed} partial model uploads, untouched for "
                f"{self.settings.stale_upload_seconds:g} s"
            )
        for lapse in lapses:
            logger.info(f"Lease {lapse.lease_id} of {lapse.account[:12]} lapsed: {lapse.reason}")
        self.metrics.lapsed_leases.inc(len(lapses))


def _filter_record(offer: OfferView) -> dict[str, Any]:
    record = offer.model_dump(
        include={"account", "gpu", "gpu_count", "vram_gb", "tflops", "reliability", "state"}
    )
    record["price"] = offer.price_per_hour
    record["min_lease_seconds"] = offer.min_lease_seconds
    record["watts"] = offer.power_w
    record["watts_per_tflop"] = offer.watts_per_tflop
    record["headroom_c"] = offer.thermal_headroom_c
    # an offer never re-rated claims what it is rated at; "ok" lets 'capacity!=short' keep it
    record["claimed_tflops"] = offer.claimed_tflops if offer.claimed_tflops is not None else offer.tflops
    record["capacity"] = offer.capacity_flag or "ok"
    return record
