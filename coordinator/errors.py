"""Errors the API reports: each carries its HTTP status, a stable code, a message and the field at fault."""

from __future__ import annotations


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class NonceReplayed(Unauthorized):
    """The nonce was used by a request that was applied; nothing was done this time."""

    code = "nonce_replayed"


class NonceReused(Unauthorized):
    """The nonce was used by a request that was refused; nothing was applied then or now."""

    code = "nonce_reused"


class PaymentRequired(ApiError):
    status, code = 402, "insufficient_funds"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class BodyTooLarge(ApiError):
    status, code = 413, "body_too_large"


class Unavailable(ApiError):
    """The service cannot answer now (its database is unreachable); another replica, or a retry, may."""

    status, code = 503, "unavailable"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after
