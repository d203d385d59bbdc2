"""The HTTP plumbing under the coordinator's routes: how a route is declared, what a handler gets, reading
and parsing a body, answering in JSON or msgpack, and turning every refusal into the documented error
body. It knows nothing of the application (:mod:`coordinator.app`) whose handlers it carries.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from pydantic import BaseModel, ValidationError

from coordinator.errors import ApiError, BadRequest, BodyTooLarge, RateLimited
from coordinator.metrics import CoordinatorMetrics
from peer.protocol.envelope import Envelope
from peer.protocol.identity import ACCOUNT_RE
from peer.protocol.schemas import FIELD_ERROR, MSGPACK, TIME_HEADER

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


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


# Called as handler(coordinator, ctx); typed loosely so that this module needs nothing of the application.
Handler = Callable[[Any, Context], Awaitable[Any]]


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


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body of {request.content_length} bytes exceeds the limit of {limit} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"body exceeds the limit of {limit} bytes") from None
    except (ConnectionError, HttpProcessingError) as e:  # the client hung up, or sent a broken chunk
        raise BadRequest(f"the body ended before it was complete: {e}", code="body_incomplete") from None


def parse_body(model: type[BaseModel], request: web.Request, raw: bytes) -> BaseModel:
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


def errors_and_metrics(metrics: CoordinatorMetrics) -> Middleware:
    """The middleware that turns every refusal into the documented error body and counts and times every
    request in ``metrics``."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
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
        metrics.requests.labels(route, request.method, str(response.status)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    return middleware
