"""The typed async client of the coordinator's HTTP API, used by peers and the CLI.

Bodies are built from the models in :mod:`peer.protocol.schemas` (money travels as decimal strings) and
every POST carries the signed envelope of :mod:`peer.protocol.envelope`, signed over the exact bytes sent.

Retries are safe by construction: only a request that never got an HTTP answer (connection error,
timeout) or was answered 502/503/504 (the replica, or a proxy in front of it, cannot serve now) is
retried, and a retry re-sends the same bytes with the same signed headers, nonce included. The
coordinator applies a nonce at most once, so a retried POST can never be applied twice; when a retry is
answered "nonce_replayed" the first attempt was applied, which :class:`AlreadyApplied` tells the caller.

The client may be given several URLs of coordinator replicas over one store (comma-separated, as in
``--coordinator`` and ``HIVEMARKET_COORDINATOR``). A request that gets no usable answer from one goes to
the next at once, with the same bytes; after a round in which none answered it waits the retry backoff
and starts the next round. The URL that answered last is tried first by the next request. All the URLs
must serve the API under the same path prefix: the signature covers the path, so the one envelope is
then valid on every replica and a request is never signed twice.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import msgpack
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from peer.protocol.envelope import sign_request
from peer.protocol.identity import Identity
from peer.protocol.run_schemas import (
    AuditClaimBody,
    AuditList,
    AuditResultBody,
    AuditTask,
    AuditTaskList,
    AuditView,
    BlameBody,
    BlameView,
    CheckinBody,
    GroupView,
    JoinBody,
    LossCurve,
    LossPoint,
    QuoteBody,
    QuoteView,
    RendezvousGetBody,
    RendezvousSetBody,
    RendezvousValues,
    RendezvousWritten,
    ReportBody,
    ReportList,
    ReportView,
    RunBody,
    RunList,
    RunView,
)
from peer.protocol.schemas import (
    MSGPACK,
    OCTET_STREAM,
    SHA256_HEADER,
    TIME_HEADER,
    AccountView,
    ClearingRoundView,
    DepositBody,
    Health,
    HeartbeatBody,
    LeaseView,
    LedgerAuditView,
    MarketView,
    OfferBody,
    OfferList,
    OfferResponse,
    OfferView,
    PeerList,
    PeerView,
    ReachBody,
    ReachView,
    Telemetry,
    TransferBody,
    WithdrawBody,
)


class ClientSettings(BaseSettings):
    """How peers and the CLI talk to a coordinator."""

    model_config = SettingsConfigDict(env_prefix="HIVEMARKET_", frozen=True)

    coordinator: str = Field(
        "http://127.0.0.1:8470",
        description="Coordinator URL used when --coordinator is omitted; several comma-separated URLs are "
        "replicas, tried in turn when one does not answer.",
    )
    request_timeout: float = Field(10.0, gt=0, description="Seconds one HTTP request may take.")
    retries: int = Field(
        5,
        ge=0,
        description="Retries of a request that failed to reach the coordinator (each retry tries every URL "
        "of --coordinator).",
    )
    retry_backoff: float = Field(0.2, gt=0, description="First retry delay in seconds; doubles each retry.")
    retry_backoff_max: float = Field(5.0, gt=0, description="Longest delay between retries.")
    model_transfer_timeout: float = Field(
        600.0, gt=0, description="Seconds a model upload or download may take (they can be large)."
    )
    long_poll_margin: float = Field(
        5.0,
        gt=0,
        description="Seconds a rendezvous read may take beyond the wait it asks for (it waits on the "
        "coordinator, so the request timeout alone could cut it).",
    )


M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
HASH_CHUNK = 1 << 20
#: Answers that mean "this replica (or the proxy in front of it) cannot serve now": try the next URL.
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


# The bodies without a model in peer.protocol.schemas, validated like every other answer.
class CoordinatorError(Exception):
    """The coordinator answered with an error status; fields are those of its error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(status, code, message, field)
        self.status, self.code, self.message, self.field = status, code, message, field

    def __str__(self) -> str:
        where = f", field {self.field}" if self.field else ""
        return f"{' '.join(self.message.split())} ({self.status} {self.code}{where})"

    @property
    def for_load(self) -> bool:
        """Whether the coordinator refused for load (429, 5xx): the same request may succeed later."""
        return self.status == 429 or self.status >= 500


class AlreadyApplied(CoordinatorError):
    """A retried POST was answered "nonce replayed": its first attempt WAS applied; re-read the state."""


class CoordinatorUnreachable(Exception):
    """No usable HTTP answer from any coordinator URL after every retry (refused, reset, timed out, or
    502/503/504); the message names each URL tried and its last error."""


class _Unavailable(Exception):
    """An answer of :data:`UNAVAILABLE_STATUSES`: this URL cannot serve now, the next one may."""

    def __init__(self, status: int, raw: bytes):
        text = " ".join(raw.decode("utf-8", "replace").split())[:120]
        super().__init__(f"HTTP {status}" + (f" {text}" if text else ""))


#: What makes a request go to the next URL (and, after a round of them, back off and retry).
_FAILOVER_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, _Unavailable)


def parse_coordinator_urls(urls: str | Sequence[str]) -> tuple[tuple[str, ...], str]:
    """The URLs of ``--coordinator`` (a comma-separated string, or a sequence), without trailing slashes,
    and the path prefix they share; a ValueError quotes the bad one."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    found: list[str] = []
    prefix: str | None = None
    for item in items:
        url = item.strip()
        if not url:
            raise ValueError(f"coordinator URL list {urls!r} has an empty entry")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"coordinator URL {url!r} is not of the form http://HOST:PORT")
        url, path = url.rstrip("/"), parts.path.rstrip("/")
        if url in found:
            raise ValueError(f"coordinator URL {url!r} is listed twice")
        if prefix is not None and path != prefix:
            raise ValueError(
                f"coordinator URLs {found[0]!r} and {url!r} have different paths ({prefix or '/'!r} and "
                f"{path or '/'!r}): requests are signed over their path, so every replica must serve the "
                "API under the same one"
            )
        prefix = path
        found.append(url)
    if not found:
        raise ValueError("no coordinator URL given")
    assert prefix is not None
    return tuple(found), prefix


class CoordinatorClient:
    """One aiohttp session to a coordinator (one URL, or the URLs of its replicas, tried in turn); use as
    ``async with CoordinatorClient(url, me) as c:``. ``urls`` is one URL, several comma-separated, or a
    sequence of them."""

    def __init__(
        self,
        urls: str | Sequence[str],
        identity: Identity | None = None,
        *,
        settings: ClientSettings | None = None,
        use_msgpack: bool = False,
    ):
        self.urls, self._prefix = parse_coordinator_urls(urls)  # the server sees and verifies the full path
        self._origins = tuple(url[: len(url) - len(self._prefix)] for url in self.urls)
        self._current = 0  # the URL that answered last: every request starts there
        self.identity = identity
        self.settings = settings or ClientSettings()
        self.use_msgpack = use_msgpack
        self._session: aiohttp.ClientSession | None = None
        self.clock = ClockEstimate()

    @property
    def base_url(self) -> str:
        """The URL that answered last (the first one before any answer): where to fetch from a replica
        that is up, such as the coordinator's dataset."""
        return self.urls[self._current]

    @property
    def coordinator(self) -> str:
        """All the URLs, comma-separated, as ``--coordinator`` takes them (to hand to another process)."""
        return ",".join(self.urls)

    async def __aenter__(self) -> CoordinatorClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout)
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------------------------------ routes

    async def health(self) -> str:
        """The service's status ("ok" when it serves requests)."""
        return (await self._request(Health, "GET", "/healthz")).status

    async def reachability(self, port: int) -> ReachView:
        """Ask the coordinator to dial this host back at ``port`` (see :mod:`peer.reachability`)."""
        return await self._request(ReachView, "POST", "/v1/reachability", ReachBody(port=port))

    async def account(self, account: str) -> AccountView:
        return await self._request(AccountView, "GET", f"/v1/accounts/{_seg(account)}")

    async def deposit(self, account: str, amount: Decimal | str) -> AccountView:
        """Credit ``account``; the client's identity must be the coordinator's admin key."""
        body = DepositBody(amount=format(amount, "f") if isinstance(amount, Decimal) else amount)
        return await self._request(AccountView, "POST", f"/v1/accounts/{_seg(account)}/deposit", body)

    async def withdraw(self, amount: Decimal) -> AccountView:
        """Pay ``amount`` out of the market to this identity's account, from its earnings first, then its
        balance; 409 ``insufficient_funds`` (field ``amount``) when they hold less. Answers the account."""
        body = WithdrawBody(amount=format(amount, "f"))
        return await self._request(AccountView, "POST", f"/v1/accounts/{self._me()}/withdraw", body)

    async def transfer(self, to: str, amount: Decimal) -> AccountView:
        """Move ``amount`` from this identity's account (earnings first, then balance) to the balance of
        the account ``to``; 409 ``insufficient_funds`` as for :meth:`withdraw`. Answers the sender's
        account."""
        body = TransferBody(to=to, amount=format(amount, "f"))
        return await self._request(AccountView, "POST", f"/v1/accounts/{self._me()}/transfer", body)

    async def audit(self) -> LedgerAuditView:
        return await self._request(LedgerAuditView, "GET", "/v1/ledger/audit")

    async def audit_replay(self) -> LedgerAuditView:
        """Replay every ledger entry against the books; admin-signed."""
        return await self._request(LedgerAuditView, "POST", "/v1/ledger/audit/replay", b"")

    async def post_offer(self, body: OfferBody) -> OfferResponse:
        """Create or update this identity's offer; the answer holds the lease to keep alive."""
        return await self._request(OfferResponse, "POST", "/v1/offers", body)

    async def heartbeat(self, lease_id: str, telemetry: Telemetry | None = None) -> LeaseView:
        """Renew a lease, with the GPUs' telemetry when there is any; a lapsed one is a 409
        ``lease_lapsed`` (post the offer again)."""
        body = HeartbeatBody(telemetry=telemetry) if telemetry is not None else b""
        return await self._request(LeaseView, "POST", f"/v1/leases/{_seg(lease_id)}/heartbeat", body)

    async def withdraw_offer(self, lease_id: str) -> OfferResponse:
        """Withdraw this identity's offer, whose lease is ``lease_id``: the lease ends released, not lapsed
        (no reliability lost), and a run it trains goes on with its other peers."""
        return await self._request(OfferResponse, "POST", f"/v1/leases/{_seg(lease_id)}/withdraw", b"")

    async def peers(self) -> list[PeerView]:
        return (await self._request(PeerList, "GET", "/v1/peers")).peers

    async def offers(self, q: str = "", sort: str | None = None) -> list[OfferView]:
        """Offers matching the filter expression ``q``, ordered by ``sort`` ("-price" for descending)."""
        params = {"q": q} if q else {}
        if sort:
            params["sort"] = sort
        path = "/v1/offers" + (f"?{urlencode(params, quote_via=quote)}" if params else "")
        return (await self._request(OfferList, "GET", path)).offers

    async def create_run(self, body: RunBody) -> RunView:
        """Launch a run; its budget moves from this identity's balance into escrow (402 when short)."""
        return await self._request(RunView, "POST", "/v1/runs", body)

    async def runs(self) -> list[RunView]:
        return (await self._request(RunList, "GET", "/v1/runs")).runs

    async def run(self, run_id: str) -> RunView:
        return await self._request(RunView, "GET", f"/v1/runs/{_seg(run_id)}")

    async def cancel_run(self, run_id: str) -> RunView:
        """Cancel a run this identity launched; what is unspent is refunded."""
        return await self._request(RunView, "POST", f"/v1/runs/{_seg(run_id)}/cancel", b"")

    async def join(self, run_id: str, peer_id: str, maddrs: list[str]) -> RunView:
        """Tell the run where this matched peer is reached (its libp2p id and multiaddrs)."""
        body = JoinBody(peer_id=peer_id, maddrs=maddrs)
        return await self._request(RunView, "POST", f"/v1/runs/{_seg(run_id)}/join", body)

    async def leave(self, run_id: str) -> RunView:
        """Give up this identity's place in a run (a run it cannot train); the run recruits another peer."""
        return await self._request(RunView, "POST", f"/v1/runs/{_seg(run_id)}/leave", b"")

    async def blame(self, run_id: str, body: BlameBody) -> BlameView:
        """Blame the members of a fast-path round this peer refused that revealed other than they committed
        to (:meth:`coordinator.app.Coordinator.blame_round`); answers whom that failed. 409
        ``stale_version`` once the run's group moved on from ``body.version``."""
        return await self._request(BlameView, "POST", f"/v1/runs/{_seg(run_id)}/blames", body)

    async def group_checkin(self, run_id: str, body: CheckinBody) -> GroupView:
        """Check in with the run's group: where this peer is reached, the version it is on, a version whose
        collective failed for it, members it could not reach. Answers the run's current group (this peer
        may not be in it yet); with ``wait_ms`` (and ``version``), the answer waits for the version after
        it (:meth:`coordinator.app.Coordinator.group_checkin`). 403 ``not_in_run`` unless this identity
        holds an active match in the run, 409 ``not_joined`` before it joined. A check-in is safe to
        repeat, so one whose retry finds it applied already is sent again to get the answer."""
        route = f"/v1/runs/{_seg(run_id)}/group"
        timeout = self._long_poll_timeout(body.wait_ms)
        try:
            return await self._request(GroupView, "POST", route, body, timeout=timeout)
        except AlreadyApplied:
            return await self._request(GroupView, "POST", route, body, timeout=timeout)

    async def rendezvous_set(self, run_id: str, version: int, key: str, value: bytes) -> None:
        """Write ``key`` of the rendezvous store of the run's group ``version`` (members only; a key whose
        last '/'-separated part is a number is that rank's; the first member to write a key owns it). 409
        ``stale_version`` when ``version`` is not the current one, 403 ``not_in_group`` or
        ``key_not_yours``. A retry that finds the first attempt applied is a success: the value is written."""
        body = RendezvousSetBody(version=version, key=key, value=base64.b64encode(value).decode())
        with contextlib.suppress(AlreadyApplied):
            await self._request(RendezvousWritten, "POST", f"/v1/runs/{_seg(run_id)}/rendezvous/set", body)

    async def rendezvous_get(
        self, run_id: str, version: int, keys: list[str], wait_ms: int
    ) -> dict[str, bytes]:
        """The values of ``keys`` in the rendezvous store of the run's group ``version`` (members only),
        waiting up to ``wait_ms`` (at most 5000) for them all; the keys still missing then are left out.
        409 ``stale_version`` when ``version`` is not (or stops being) the current one."""
        body = RendezvousGetBody(version=version, keys=keys, wait_ms=wait_ms)
        route = f"/v1/runs/{_seg(run_id)}/rendezvous/get"
        timeout = self._long_poll_timeout(wait_ms)
        found = await self._request(RendezvousValues, "POST", route, body, timeout=timeout)
        return {key: base64.b64decode(value) for key, value in found.values.items()}

    async def report(self, run_id: str, body: ReportBody) -> ReportView:
        """Report an epoch's work; the answer says what it was paid."""
        return await self._request(ReportView, "POST", f"/v1/runs/{_seg(run_id)}/reports", body)

    async def reports(self, run_id: str) -> list[ReportView]:
        return (await self._request(ReportList, "GET", f"/v1/runs/{_seg(run_id)}/reports")).reports

    async def loss_curve(self, run_id: str) -> list[LossPoint]:
        return (await self._request(LossCurve, "GET", f"/v1/runs/{_seg(run_id)}/loss")).points

    async def claim_audits(self, run_id: str, limit: int) -> list[AuditTask]:
        """Take up to ``limit`` audits of other peers' reports in a run this identity trains."""
        body = AuditClaimBody(limit=limit)
        return (
            await self._request(AuditTaskList, "POST", f"/v1/runs/{_seg(run_id)}/audits/claim", body)
        ).audits

    async def submit_audit(self, run_id: str, audit_id: str, body: AuditResultBody) -> AuditView:
        route = f"/v1/runs/{_seg(run_id)}/audits/{_seg(audit_id)}"
        return await self._request(AuditView, "POST", route, body)

    async def audits(self, run_id: str) -> list[AuditView]:
        return (await self._request(AuditList, "GET", f"/v1/runs/{_seg(run_id)}/audits")).audits

    async def upload_model(self, run_id: str, path: Path) -> RunView:
        """Upload the final model of a settling run from ``path``; signed over the file's SHA-256 and
        streamed, so the file is never held in memory. The run finishes when it is recorded."""
        digest = await asyncio.to_thread(_sha256_file, path)
        headers = {"Content-Type": OCTET_STREAM, SHA256_HEADER: digest}
        route = f"/v1/runs/{_seg(run_id)}/model"
        return await self._request(
            RunView, "PUT", route, lambda: path.open("rb"), headers=headers, body_sha256=digest
        )

    async def download_model(self, run_id: str, out: Path) -> str:
        """Download the run's final model to ``out`` (written atomically) and return its SHA-256; a body
        that does not match the coordinator's hash is a :class:`CoordinatorError` and leaves ``out`` as it
        was."""
        session = self._open_session()
        path = self._prefix + f"/v1/runs/{_seg(run_id)}/model"
        timeout = aiohttp.ClientTimeout(total=self.settings.model_transfer_timeout)
        partial = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"

        async def attempt(origin: str) -> tuple[str, str]:
            async with session.get(URL(origin + path, encoded=True), timeout=timeout) as resp:
                if resp.status in UNAVAILABLE_STATUSES:
                    raise _Unavailable(resp.status, await resp.read())
                if resp.status >= 400:
                    _raise_error(resp.status, await resp.read(), resp.content_type, retried=False)
                digest = hashlib.sha256()
                with partial.open("wb") as f:
                    async for chunk in resp.content.iter_chunked(HASH_CHUNK):
                        digest.update(chunk)
                        await asyncio.to_thread(f.write, chunk)
                return resp.headers.get(SHA256_HEADER, ""), digest.hexdigest()

        try:
            (expected, actual), _ = await self._failover(attempt)
            if actual != expected:
                raise CoordinatorError(
                    200,
                    "hash_mismatch",
                    f"the model of run {run_id} has SHA-256 {actual}, "
                    f"the coordinator says {expected or 'nothing'}",
                )
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        return expected

    async def market(self) -> MarketView:
        return await self._request(MarketView, "GET", "/v1/market")

    async def quote(self, body: QuoteBody) -> QuoteView:
        """What a run with ``body`` would get from the market now and cost; creates nothing, unsigned."""
        return await self._request(QuoteView, "POST", "/v1/market/quote", body, signed=False)

    async def clear_market(self) -> ClearingRoundView:
        """Run a clearing round now; admin-signed."""
        return await self._request(ClearingRoundView, "POST", "/v1/market/clear", b"")

    # ------------------------------------------------------------------------------------------ transport

    def _long_poll_timeout(self, wait_ms: int) -> float:
        """A request the coordinator may hold up to ``wait_ms`` gets that long on top of its own limit."""
        return max(self.settings.request_timeout, wait_ms / 1000 + self.settings.long_poll_margin)

    async def _request(
        self,
        model: type[M],
        method: str,
        path: str,
        body: BaseModel | bytes | Callable[[], Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        body_sha256: str | None = None,
        signed: bool = True,
        timeout: float | None = None,
    ) -> M:
        """Send, retry (on the next URL, then after a backoff) only while no usable HTTP answer comes, parse
        the answer as ``model`` or raise its error. Every attempt sends the same bytes and headers. Every
        request but a GET is signed unless ``signed`` is False (a POST that changes nothing).

        ``body`` may be a callable that opens a fresh payload for each attempt (a file to stream); it is
        then signed by ``body_sha256`` and may take the model transfer timeout rather than a request's.
        ``timeout`` replaces the request timeout (a long poll's).
        """
        session = self._open_session()
        full_path = self._prefix + path
        headers = dict(headers or {})
        if self.use_msgpack:
            headers["Accept"] = MSGPACK
        data = self._encode(body) if isinstance(body, BaseModel) else body
        if isinstance(body, BaseModel):
            headers["Content-Type"] = MSGPACK if self.use_msgpack else "application/json"
        if method != "GET" and signed:
            if self.identity is None:
                raise ValueError(f"{method} {path} must be signed: create the client with an identity")
            content = data if isinstance(data, bytes) else b""
            headers |= sign_request(self.identity, method, full_path, content, body_sha256=body_sha256)
        streamed = callable(data)
        options: dict[str, Any] = {}
        if streamed:
            options["timeout"] = aiohttp.ClientTimeout(total=self.settings.model_transfer_timeout)
        elif timeout is not None:
            options["timeout"] = aiohttp.ClientTimeout(total=timeout)

        async def attempt(origin: str) -> tuple[int, bytes, str]:
            url = URL(origin + full_path, encoded=True)  # encoded: send the path exactly as signed
            payload = data() if callable(data) else data
            try:
                sent = time.time()
                async with session.request(method, url, data=payload, headers=headers, **options) as resp:
                    raw = await resp.read()
                    self.clock.observe(sent, time.time(), resp.headers.get(TIME_HEADER))
                    if resp.status in UNAVAILABLE_STATUSES:
                        raise _Unavailable(resp.status, raw)
                    return resp.status, raw, resp.content_type
            finally:
                if streamed:
                    payload.close()

        (status, raw, content_type), retried = await self._failover(attempt)
        if status < 400:
            return _parse(model, status, _decode(raw, content_type))
        _raise_error(status, raw, content_type, retried=retried)

    def _me(self) -> str:
        """This identity's account, as a path segment (for the routes that act on one's own account)."""
        if self.identity is None:
            raise ValueError(
                "moving money out of an account must be signed: create the client with an identity"
            )
        return _seg(self.identity.account)

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("CoordinatorClient is used outside `async with`")
        return self._session

    async def _failover(self, attempt: Callable[[str], Awaitable[R]]) -> tuple[R, bool]:
        """``attempt(origin)`` on the URL that answered last, then on the next ones in turn while it gets no
        usable answer; after a round in which no URL answered, wait the backoff and start another, up to
        ``retries`` more rounds. Returns the first answer, and whether an attempt was made before it (one
        that may have reached a coordinator, so "nonce_replayed" then means applied). Raises
        :class:`CoordinatorUnreachable` naming every URL and its last error when no round got an answer."""
        s = self.settings
        count = len(self.urls)
        errors: dict[int, BaseException] = {}
        last: BaseException | None = None
        for round_ in range(s.retries + 1):
            start = self._current
            for i in [(start + k) % count for k in range(count)]:
                try:
                    result = await attempt(self._origins[i])
                except _FAILOVER_ERRORS as e:
                    errors[i] = last = e
                    continue
                self._current = i
                return result, bool(errors)
            if round_ < s.retries:
                await asyncio.sleep(min(s.retry_backoff * 2**round_, s.retry_backoff_max))
        raise CoordinatorUnreachable(self._unreachable(errors, s.retries + 1)) from last

    def _unreachable(self, errors: dict[int, BaseException], attempts: int) -> str:
        def said(e: BaseException) -> str:
            if isinstance(e, TimeoutError) and not str(e):
                return "timed out waiting for an answer"
            return str(e) or type(e).__name__

        if len(self.urls) == 1:
            return (
                f"cannot reach the coordinator at {self.urls[0]} after {attempts} attempts: {said(errors[0])}"
            )
        each = "; ".join(f"{url}: {said(errors[i])}" for i, url in enumerate(self.urls))
        return (
            f"cannot reach the coordinator at any of its {len(self.urls)} URLs after {attempts} attempts "
            f"each: {each}"
        )

    def _encode(self, body: BaseModel) -> bytes:
        value = body.model_dump(mode="json")
        return msgpack.packb(value, use_bin_type=True) if self.use_msgpack else json.dumps(value).encode()


def _seg(value: str) -> str:
    """One path segment, quoted so an id can never change which route is called."""
    return quote(value, safe="")


def _raise_error(status: int, raw: bytes, content_type: str, *, retried: bool) -> NoReturn:
    """Raise the coordinator's error body as a :class:`CoordinatorError` (:class:`AlreadyApplied` for a
    retry answered "nonce_replayed": the first attempt was applied)."""
    decoded = _decode(raw, content_type)
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if not isinstance(error, dict):
        text = raw.decode("utf-8", "replace")[:200] or "no error body"
        raise CoordinatorError(status, f"http_{status}", text)
    code, field = str(error.get("code")), error.get("field")
    cls = AlreadyApplied if retried and code == "nonce_replayed" else CoordinatorError
    raise cls(status, code, str(error.get("message")), field if isinstance(field, str) else None)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _decode(raw: bytes, content_type: str) -> Any:
    """The body as data, by its content type; None when it is not JSON or msgpack (a proxy's HTML page)."""
    try:
        if content_type == MSGPACK:
            return msgpack.unpackb(raw, raw=False)
        return json.loads(raw) if raw else None
    except (ValueError, msgpack.UnpackException):
        return None


class ClockEstimate:
    """How far the coordinator's clock is ahead of this machine's, from the time it stamps on each
    answer (``X-Hivemarket-Time``): the estimate of the answer with the shortest round trip, whose error
    is at most half that round trip (as NTP does). hivemind's matchmaking compares wall-clock expiration
    times between peers, so a trainer sets its DHT time by this (peer.node.follow_clock)."""

    def __init__(self) -> None:
        self.offset: float | None = None
        self.round_trip = float("inf")

    def observe(self, sent: float, received: float, stamped: str | None) -> None:
        try:
            server = float(stamped) if stamped is not None else math.nan
        except ValueError:
            return
        if math.isfinite(server) and 0 <= received - sent < self.round_trip:
            self.round_trip = received - sent
            self.offset = server - (sent + received) / 2


def _parse(model: type[M], status: int, data: Any) -> M:
    """A success body as its model; one that does not fit means another API version, said in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        message = f"unexpected {model.__name__} from the coordinator: {where}: {first['msg']}"
        raise CoordinatorError(status, "invalid_response", message) from None
