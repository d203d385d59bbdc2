"""The coordinator's HTTP API: an aiohttp application over a :class:`coordinator.store.Store`.

Each route is declared once in :data:`ROUTES` (method, path, auth, body and response models); the same
table drives dispatch, validation and ``/openapi.json``. Signed routes verify the envelope, its freshness
and the per-account rate limit before anything else runs; nonces are claimed inside the store's
transaction. Client input never causes a 500: every refusal is an :class:`ApiError` with a JSON body.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from coordinator import dashboard, market, model_files
from coordinator.errors import ApiError, BadRequest, BodyTooLarge, Forbidden, RateLimited, Unauthorized
from coordinator.filters import FieldKind, FilterError, compile_filter, parse_sort
from coordinator.metrics import CoordinatorMetrics
from coordinator.openapi import build_openapi
from coordinator.ratelimit import Bucket, take
from coordinator.settings import ServerSettings
from coordinator.store import Store
from peer.protocol import states
from peer.protocol.envelope import Envelope, EnvelopeError, check_fresh, verify_request_digest
from peer.protocol.identity import ACCOUNT_RE
from peer.protocol.money import from_units, to_units
from peer.protocol.schemas import (
    FIELD_ERROR,
    MSGPACK,
    OCTET_STREAM,
    SHA256_HEADER,
    TIME_HEADER,
    AccountView,
    AuditClaimBody,
    AuditList,
    AuditResultBody,
    AuditTaskList,
    AuditView,
    ClearingRoundView,
    DepositBody,
    Health,
    HeartbeatBody,
    JoinBody,
    LeaseView,
    LedgerAuditView,
    LossCurve,
    MarketView,
    OfferBody,
    OfferList,
    OfferResponse,
    OfferView,
    PeerList,
    ReportBody,
    ReportList,
    ReportView,
    RunBody,
    RunList,
    RunView,
)

logger = logging.getLogger(__name__)

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
}


@dataclass
class Context:
    """What a handler gets: the request, the time it arrived, its verified envelope and parsed body."""

    request: web.Request
    now: float
    envelope: Envelope | None = None
    body: Any = None

    def path_id(self, name: str) -> str:
        value = self.request.match_info[name]
        pattern = ACCOUNT_RE if name == "account" else _ID_RE
        if not pattern.fullmatch(value):
            raise BadRequest(f"{name} {value[:80]!r} is malformed", field=name)
        return value


Handler = Callable[["Coordinator", Context], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: Literal["none", "signed", "admin"] = "none"
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    query: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    # The request body is raw bytes of this type, streamed by the handler (which verifies the envelope
    # against the declared digest before reading, then the body against it); the dispatcher then neither
    # reads nor authenticates it.
    raw_body: str | None = None


@dataclass
class Coordinator:
    """Application state: settings, the store, metrics, the admin account and rate-limit buckets."""

    settings: ServerSettings
    store: Store
    admin: str
    clock: Callable[[], float] = time.time
    metrics: CoordinatorMetrics = field(default_factory=CoordinatorMetrics)
    market_config: market.MarketConfig = field(default_factory=market.MarketConfig)
    buckets: dict[str, Bucket] = field(default_factory=dict)
    # Serialises publishing a model file with recording it, so that an upload that will be refused never
    # replaces the file of one that is being recorded.
    model_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # ------------------------------------------------------------------------------------- handlers

    async def dashboard(self, ctx: Context) -> web.Response:
        query = ctx.request.query
        board = await dashboard.gather(self, query.get("q", ""), query.get("sort", "price"), query.get("run"))
        page = dashboard.render(board, partial="partial" in query)
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def healthz(self, ctx: Context) -> Health:
        return Health(status="ok")

    async def openapi(self, ctx: Context) -> dict[str, Any]:
        return _openapi_document()

    async def prometheus(self, ctx: Context) -> web.Response:
        counts = await self.store.counts()
        for state in typing.get_args(states.RunState):
            self.metrics.runs.labels(state).set(counts.get(f"runs_{state}", 0))
        self.metrics.live_peers.set(counts["live_leases"])
        await self.ledger(replay=False)  # sets the conservation gauge
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def deposit(self, ctx: Context) -> AccountView:
        return await self.store.deposit(
            ctx.now, ctx.envelope, ctx.path_id("account"), to_units(ctx.body.amount)
        )

    async def account(self, ctx: Context) -> AccountView:
        return await self.store.account(ctx.path_id("account"))

    async def ledger_audit(self, ctx: Context) -> LedgerAuditView:
        return await self.ledger(replay=True)

    async def ledger(self, *, replay: bool) -> LedgerAuditView:
        """Holdings against deposits; ``replay`` also checks every entry (a scan of the whole ledger)."""
        result = await self.store.audit(replay=replay)
        self.metrics.ledger_conserved.set(1 if result.conserved else 0)
        return LedgerAuditView(
            conserved=result.conserved,
            deposits=from_units(result.deposits),
            holdings=from_units(result.holdings),
        )

    async def post_offer(self, ctx: Context) -> OfferResponse:
        return await self.store.post_offer(ctx.now, ctx.envelope, ctx.body)

    async def heartbeat(self, ctx: Context) -> LeaseView:
        return await self.store.heartbeat(ctx.now, ctx.envelope, ctx.path_id("lease_id"), ctx.body.telemetry)

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

    async def post_report(self, ctx: Context) -> ReportView:
        """Accept an epoch's report and pay it: ``floor(price_units * min(seconds, now - since) / 3600)``
        units, where ``since`` is the later of the match's join and its previous report and the price is the
        matched hourly price, capped by what the escrow holds (see :func:`coordinator.runs.report_pay`)."""
        return await self.store.report(ctx.now, ctx.envelope, ctx.path_id("run_id"), ctx.body)

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
                raw = await _read_body(request, self.settings.max_body_bytes)
                if route.auth != "none":
                    digest = hashlib.sha256(raw).hexdigest()
                    ctx.envelope = self._authenticate(request, digest, ctx.now, admin=route.auth == "admin")
                if route.body is not None:
                    ctx.body = _parse_body(route.body, request, raw)
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
        """Open the store, resume leases, and run clearing and lapse sweeps while the app lives."""
        await self.store.open()
        removed = await asyncio.to_thread(model_files.remove_partials, self.settings.model_dir)
        if removed:
            logger.info(f"Removed {removed} partial model uploads left by an earlier process")
        resumed = await self.store.resume_leases(self.clock())
        if resumed:
            logger.info(f"Resumed {resumed} active leases after a restart")
        tasks = [
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

    async def _clearing_round(self) -> None:
        await self._clear(self.clock(), None)

    async def _sweep(self) -> None:
        now = self.clock()
        lapses = await self.store.sweep(now, nonce_horizon=2 * self.settings.signature_window)
        # A bucket idle long enough to refill is the same as no bucket: forget it, or keys (free to make)
        # would grow this dict without bound.
        refill = self.settings.rate_limit_burst / self.settings.rate_limit_per_second
        self.buckets = {k: b for k, b in self.buckets.items() if now - b.updated < refill}
        for lapse in lapses:
            logger.info(f"Lease {lapse.lease_id} of {lapse.account[:12]} lapsed: {lapse.reason}")
        self.metrics.lapsed_leases.inc(len(lapses))


def _filter_record(offer: OfferView) -> dict[str, Any]:
    record = offer.model_dump(
        include={"account", "gpu", "gpu_count", "vram_gb", "tflops", "reliability", "state"}
    )
    record["price"] = offer.price_per_hour
    record["min_lease_seconds"] = offer.min_lease_seconds
    return record


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"body exceeds the limit of {limit} bytes") from None
    except (ConnectionError, HttpProcessingError) as e:  # the client hung up, or sent a broken chunk
        raise BadRequest(f"the body ended before it was complete: {e}", code="body_incomplete") from None


def _parse_body(model: type[BaseModel], request: web.Request, raw: bytes) -> BaseModel:
    try:
        if not raw:  # no body: the model's defaults, or an error naming its first required field
            data = {}
        elif request.content_type == MSGPACK:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        else:
            data = json.loads(raw or b"null")
    except RecursionError:
        raise BadRequest("body is nested too deeply", code="malformed_body") from None
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        kind = "msgpack" if request.content_type == MSGPACK else "JSON"
        raise BadRequest(f"body is not valid {kind}: {e}", code="malformed_body") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        if error["type"] == FIELD_ERROR:  # a check that names its own field (a dotted path in the spec)
            raise BadRequest(error["msg"], field=error["ctx"]["field"]) from None
        where = ".".join(str(part) for part in error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error":
            message += f" (got {_short(error.get('input'))})"
        raise BadRequest(f"{where or 'body'}: {message}", field=where) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def encode(
    request: web.Request, value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """JSON for people and curl; msgpack when the client's Accept header asks for it."""
    if MSGPACK in request.headers.get("Accept", ""):
        body = msgpack.packb(_jsonable(value), use_bin_type=True)
        return web.Response(body=body, status=status, content_type=MSGPACK, headers=headers)
    # pydantic serialises a model straight to JSON bytes (in Rust): the hot path of every heartbeat.
    body = value.model_dump_json().encode() if isinstance(value, BaseModel) else json.dumps(value).encode()
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


@web.middleware
async def _errors_and_metrics(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
):
    """Every refusal becomes the documented error body; every request is counted and timed."""
    coordinator: Coordinator = request.app["coordinator"]
    started = time.perf_counter()
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    try:
        response = await handler(request)
    except ApiError as e:
        headers = {"Retry-After": f"{e.retry_after:.3f}"} if isinstance(e, RateLimited) else None
        response = encode(request, e.body(), e.status, headers)
    except web.HTTPException as e:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            e.status, "http_error"
        )
        response = encode(
            request, ApiError(f"{request.method} {request.path}: {e.reason}", code=code).body(), e.status
        )
    except Exception:
        logger.exception(f"Unhandled error in {request.method} {request.path}")
        response = encode(request, ApiError("internal error", code="internal").body(), 500)
    if not response.prepared:  # a streamed model is under way already
        response.headers[TIME_HEADER] = f"{time.time():.6f}"  # lets peers agree on one clock (client.py)
    coordinator.metrics.requests.labels(route, request.method, str(response.status)).inc()
    coordinator.metrics.latency.labels(route).observe(time.perf_counter() - started)
    return response


ROUTES: Sequence[Route] = (
    Route(
        "GET",
        "/",
        Coordinator.dashboard,
        "The web dashboard: market, offers, runs, peers, ledger (HTML, updating live)",
        query=(
            ("q", "offer filter"),
            ("sort", "offer order"),
            ("run", "run to plot"),
            ("partial", "live parts"),
        ),
        content_type="text/html",
    ),
    Route("GET", "/healthz", Coordinator.healthz, "Liveness", response=Health),
    Route(
        "GET", "/openapi.json", Coordinator.openapi, "This OpenAPI document", content_type="application/json"
    ),
    Route("GET", "/metrics", Coordinator.prometheus, "Prometheus metrics", content_type=CONTENT_TYPE_LATEST),
    Route(
        "POST",
        "/v1/accounts/{account}/deposit",
        Coordinator.deposit,
        "Credit an account (admin)",
        auth="admin",
        body=DepositBody,
        response=AccountView,
    ),
    Route("GET", "/v1/accounts/{account}", Coordinator.account, "An account's money", response=AccountView),
    Route(
        "GET",
        "/v1/ledger/audit",
        Coordinator.ledger_audit,
        "Holdings against deposits",
        response=LedgerAuditView,
    ),
    Route(
        "POST",
        "/v1/offers",
        Coordinator.post_offer,
        "Create or update your offer; returns its lease",
        auth="signed",
        body=OfferBody,
        response=OfferResponse,
    ),
    Route(
        "POST",
        "/v1/leases/{lease_id}/heartbeat",
        Coordinator.heartbeat,
        "Renew your lease; the body may carry your GPUs' telemetry",
        auth="signed",
        body=HeartbeatBody,
        response=LeaseView,
    ),
    Route(
        "GET",
        "/v1/offers",
        Coordinator.list_offers,
        "List offers",
        query=(
            ("q", "filter, e.g. 'gpu=H100 vram_gb>=40 price<=2.5'"),
            ("sort", "field, '-' for descending"),
        ),
        response=OfferList,
    ),
    Route(
        "POST",
        "/v1/runs",
        Coordinator.create_run,
        "Create a run, escrowing its budget",
        auth="signed",
        body=RunBody,
        response=RunView,
        status=201,
    ),
    Route(
        "GET",
        "/v1/peers",
        Coordinator.list_peers,
        "Peers: standing, verified work, earnings, telemetry",
        response=PeerList,
    ),
    Route("GET", "/v1/runs", Coordinator.list_runs, "List runs", response=RunList),
    Route("GET", "/v1/runs/{run_id}", Coordinator.get_run, "One run", response=RunView),
    Route(
        "POST",
        "/v1/runs/{run_id}/cancel",
        Coordinator.cancel_run,
        "Cancel your run; refunds what is unspent",
        auth="signed",
        response=RunView,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/join",
        Coordinator.join_run,
        "Join a run you are matched to: say where other peers reach you",
        auth="signed",
        body=JoinBody,
        response=RunView,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/leave",
        Coordinator.leave_run,
        "Give up your place in a run you cannot train; the run recruits a replacement",
        auth="signed",
        response=RunView,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/reports",
        Coordinator.post_report,
        "Report an epoch's work; paid the matched price for its compute time, capped by wall clock, once "
        "its audits pass",
        auth="signed",
        body=ReportBody,
        response=ReportView,
        status=201,
    ),
    Route(
        "GET", "/v1/runs/{run_id}/reports", Coordinator.list_reports, "A run's reports", response=ReportList
    ),
    Route(
        "GET",
        "/v1/runs/{run_id}/loss",
        Coordinator.loss_curve,
        "A run's mean loss per epoch",
        response=LossCurve,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/audits/claim",
        Coordinator.claim_audits,
        "Take audits to recompute: other peers' micro-batches of this run (peers of the run only)",
        auth="signed",
        body=AuditClaimBody,
        response=AuditTaskList,
    ),
    Route(
        "POST",
        "/v1/runs/{run_id}/audits/{audit_id}",
        Coordinator.submit_audit,
        "Answer an audit you hold: the recomputed gradient sketch and loss, or declined with a reason",
        auth="signed",
        body=AuditResultBody,
        response=AuditView,
    ),
    Route("GET", "/v1/runs/{run_id}/audits", Coordinator.list_audits, "A run's audits", response=AuditList),
    Route(
        "PUT",
        "/v1/runs/{run_id}/model",
        Coordinator.put_model,
        "Upload the final model of a settling run (raw bytes, signed over their SHA-256); the run finishes "
        "when its audits are decided",
        auth="signed",
        response=RunView,
        raw_body=OCTET_STREAM,
    ),
    Route(
        "GET",
        "/v1/runs/{run_id}/model",
        Coordinator.get_model,
        f"The run's final model; its SHA-256 is in {SHA256_HEADER}",
        content_type=OCTET_STREAM,
    ),
    Route(
        "GET", "/v1/market", Coordinator.market_view, "Clearing price, supply, demand", response=MarketView
    ),
    Route(
        "POST",
        "/v1/market/clear",
        Coordinator.clear_market,
        "Run a clearing round now (admin)",
        auth="admin",
        response=ClearingRoundView,
    ),
)


@functools.cache
def _openapi_document() -> dict[str, Any]:
    """Built once: the routes and schemas do not change while the process runs."""
    return build_openapi(ROUTES)


def create_app(coordinator: Coordinator) -> web.Application:
    # aiohttp's own limit sits above ours so that our check produces the documented error body.
    app = web.Application(
        middlewares=[_errors_and_metrics], client_max_size=coordinator.settings.max_body_bytes + 1
    )
    app["coordinator"] = coordinator
    for route in ROUTES:
        app.router.add_route(route.method, route.path, coordinator.endpoint(route))
    app.cleanup_ctx.append(coordinator.background)
    return app
