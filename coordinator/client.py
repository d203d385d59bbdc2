"""The typed async client of the coordinator's HTTP API, used by peers and the CLI.

Bodies are built from the models in :mod:`coordinator.schemas` (money travels as decimal strings) and
every POST carries the signed envelope of :mod:`peer.envelope`, signed over the exact bytes sent.

Retries are safe by construction: only a request that never got an HTTP answer (connection error,
timeout) is retried, and a retry re-sends the same bytes with the same signed headers, nonce included.
The coordinator applies a nonce at most once, so a retried POST can never be applied twice; when a retry
is answered "nonce_replayed" the first attempt was applied, which :class:`AlreadyApplied` tells the caller.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import msgpack
from pydantic import BaseModel, ValidationError
from yarl import URL

from coordinator.schemas import (
    MSGPACK,
    AccountView,
    AuditView,
    ClearingRoundView,
    DepositBody,
    Health,
    LeaseView,
    MarketView,
    OfferBody,
    OfferList,
    OfferResponse,
    OfferView,
    RunBody,
    RunList,
    RunView,
)
from coordinator.settings import ClientSettings
from peer.envelope import sign_request
from peer.identity import Identity

M = TypeVar("M", bound=BaseModel)


# The bodies without a model in coordinator.schemas, validated like every other answer.
class CoordinatorError(Exception):
    """The coordinator answered with an error status; fields are those of its error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(status, code, message, field)
        self.status, self.code, self.message, self.field = status, code, message, field

    def __str__(self) -> str:
        where = f", field {self.field}" if self.field else ""
        return f"{' '.join(self.message.split())} ({self.status} {self.code}{where})"


class AlreadyApplied(CoordinatorError):
    """A retried POST was answered "nonce replayed": its first attempt WAS applied; re-read the state."""


class CoordinatorUnreachable(Exception):
    """No HTTP answer from the coordinator after every retry (refused, reset, timed out)."""


class CoordinatorClient:
    """One aiohttp session to one coordinator; use as ``async with CoordinatorClient(url, me) as c:``."""

    def __init__(
        self,
        base_url: str,
        identity: Identity | None = None,
        *,
        settings: ClientSettings | None = None,
        use_msgpack: bool = False,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"coordinator URL {base_url!r} is not of the form http://HOST:PORT")
        self.base_url = base_url.rstrip("/")
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._prefix = parts.path.rstrip("/")  # the server sees and verifies the full path
        self.identity = identity
        self.settings = settings or ClientSettings()
        self.use_msgpack = use_msgpack
        self._session: aiohttp.ClientSession | None = None

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

    async def account(self, account: str) -> AccountView:
        return await self._request(AccountView, "GET", f"/v1/accounts/{_seg(account)}")

    async def deposit(self, account: str, amount: Decimal | str) -> AccountView:
        """Credit ``account``; the client's identity must be the coordinator's admin key."""
        body = DepositBody(amount=format(amount, "f") if isinstance(amount, Decimal) else amount)
        return await self._request(AccountView, "POST", f"/v1/accounts/{_seg(account)}/deposit", body)

    async def audit(self) -> AuditView:
        return await self._request(AuditView, "GET", "/v1/ledger/audit")

    async def post_offer(self, body: OfferBody) -> OfferResponse:
        """Create or update this identity's offer; the answer holds the lease to keep alive."""
        return await self._request(OfferResponse, "POST", "/v1/offers", body)

    async def heartbeat(self, lease_id: str) -> LeaseView:
        """Renew a lease; a lapsed one is a 409 ``lease_lapsed`` (post the offer again)."""
        return await self._request(LeaseView, "POST", f"/v1/leases/{_seg(lease_id)}/heartbeat", b"")

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

    async def market(self) -> MarketView:
        return await self._request(MarketView, "GET", "/v1/market")

    async def clear_market(self) -> ClearingRoundView:
        """Run a clearing round now; admin-signed."""
        return await self._request(ClearingRoundView, "POST", "/v1/market/clear", b"")

    # ------------------------------------------------------------------------------------------ transport

    async def _request(
        self, model: type[M], method: str, path: str, body: BaseModel | bytes | None = None
    ) -> M:
        """Send, retry only while no HTTP answer comes, parse the answer as ``model`` or raise its error."""
        if self._session is None:
            raise RuntimeError("CoordinatorClient is used outside `async with`")
        full_path = self._prefix + path
        headers = {"Accept": MSGPACK} if self.use_msgpack else {}
        data = self._encode(body) if isinstance(body, BaseModel) else body
        if method == "POST":
            if self.identity is None:
                raise ValueError(f"POST {path} must be signed: create the client with an identity")
            if isinstance(body, BaseModel):
                headers["Content-Type"] = MSGPACK if self.use_msgpack else "application/json"
            headers |= sign_request(self.identity, method, full_path, data or b"")
        url = URL(self._origin + full_path, encoded=True)  # encoded: send the path exactly as signed
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                async with self._session.request(method, url, data=data, headers=headers) as resp:
                    raw = await resp.read()
                    status, content_type = resp.status, resp.content_type
                break
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
                if attempt == s.retries:
                    raise CoordinatorUnreachable(
                        f"cannot reach the coordinator at {self.base_url} after {attempt + 1} attempts: "
                        f"{str(e) or type(e).__name__}"
                    ) from e
                await asyncio.sleep(min(s.retry_backoff * 2**attempt, s.retry_backoff_max))
        decoded = _decode(raw, content_type)
        if status < 400:
            return _parse(model, status, decoded)
        error = decoded.get("error") if isinstance(decoded, dict) else None
        if not isinstance(error, dict):
            text = raw.decode("utf-8", "replace")[:200] or "no error body"
            raise CoordinatorError(status, f"http_{status}", text)
        code, field = str(error.get("code")), error.get("field")
        cls = AlreadyApplied if attempt > 0 and code == "nonce_replayed" else CoordinatorError
        raise cls(status, code, str(error.get("message")), field if isinstance(field, str) else None)

    def _encode(self, body: BaseModel) -> bytes:
        value = body.model_dump(mode="json")
        return msgpack.packb(value, use_bin_type=True) if self.use_msgpack else json.dumps(value).encode()


def _seg(value: str) -> str:
    """One path segment, quoted so an id can never change which route is called."""
    return quote(value, safe="")


def _decode(raw: bytes, content_type: str) -> Any:
    """The body as data, by its content type; None when it is not JSON or msgpack (a proxy's HTML page)."""
    try:
        if content_type == MSGPACK:
            return msgpack.unpackb(raw, raw=False)
        return json.loads(raw) if raw else None
    except (ValueError, msgpack.UnpackException):
        return None


def _parse(model: type[M], status: int, data: Any) -> M:
    """A success body as its model; one that does not fit means another API version, said in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        message = f"unexpected {model.__name__} from the coordinator: {where}: {first['msg']}"
        raise CoordinatorError(status, "invalid_response", message) from None
