"""The signed envelope every mutating coordinator request carries; both sides import this module.

A client in any language can produce it: four headers, and an Ed25519 signature over the UTF-8 bytes of

    METHOD \\n PATH-WITH-QUERY \\n TIMESTAMP \\n NONCE \\n lowercase-hex-SHA-256(raw body)

The signed bytes use the header values exactly as sent (no re-formatting), so changing any byte of any
part changes what is verified. Freshness (the timestamp window) and replay (nonces seen before) need
state and a clock, so they stay with the coordinator; :func:`check_fresh` is the pure part of it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from peer.protocol.identity import ACCOUNT_RE, Identity, verify_signature

KEY_HEADER = "X-Hivemarket-Key"
TIMESTAMP_HEADER = "X-Hivemarket-Timestamp"
NONCE_HEADER = "X-Hivemarket-Nonce"
SIGNATURE_HEADER = "X-Hivemarket-Signature"
HEADERS = (KEY_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)

NONCE_BYTES = 16
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_NONCE_RE = re.compile(rf"(?:[0-9a-f]{{2}}){{{NONCE_BYTES},128}}")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{128}")


class EnvelopeError(ValueError):
    """A request whose envelope is missing, malformed or does not verify; ``field`` names the header."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    """The verified facts of a signed request."""

    account: str
    timestamp: int
    nonce: str


def signed_bytes(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The exact bytes that are signed; ``path`` includes the query string as sent."""
    return signed_digest_bytes(method, path, timestamp, nonce, hashlib.sha256(body).hexdigest())


def signed_digest_bytes(method: str, path: str, timestamp: str, nonce: str, body_sha256: str) -> bytes:
    """:func:`signed_bytes` from the body's hex SHA-256, for bodies streamed rather than held in memory."""
    return "\n".join([method, path, timestamp, nonce, body_sha256]).encode("utf-8")


def sign_request(
    identity: Identity,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
    body_sha256: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate ``method path body`` as sent by ``identity``.

    ``body_sha256`` (hex) signs a body by its digest instead, so a large file need not be read into memory.
    """
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = secrets.token_hex(NONCE_BYTES) if nonce is None else nonce
    digest = hashlib.sha256(body).hexdigest() if body_sha256 is None else body_sha256
    signature = identity.sign(signed_digest_bytes(method, path, ts, nonce, digest))
    return {
        KEY_HEADER: identity.account,
        TIMESTAMP_HEADER: ts,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: signature.hex(),
    }


def verify_request(headers: Mapping[str, str], method: str, path: str, body: bytes) -> Envelope:
    """Check the envelope's form and signature; raise :class:`EnvelopeError` naming the bad header."""
    return verify_request_digest(headers, method, path, hashlib.sha256(body).hexdigest())


def verify_request_digest(headers: Mapping[str, str], method: str, path: str, body_sha256: str) -> Envelope:
    """:func:`verify_request` for a body known by its hex SHA-256 (hashed while it was streamed to disk)."""
    values = {}
    for name in HEADERS:
        value = headers.get(name)
        if value is None:
            raise EnvelopeError(name, "header is missing")
        values[name] = value
    account, ts, nonce, signature = (values[name] for name in HEADERS)
    if not ACCOUNT_RE.fullmatch(account):
        raise EnvelopeError(KEY_HEADER, f"{account[:80]!r} is not 64 lowercase hex characters")
    if not _TIMESTAMP_RE.fullmatch(ts):
        raise EnvelopeError(TIMESTAMP_HEADER, f"{ts[:80]!r} is not unix seconds")
    if not _NONCE_RE.fullmatch(nonce):
        raise EnvelopeError(
            NONCE_HEADER, f"{nonce[:80]!r} is not {NONCE_BYTES} to 128 bytes of lowercase hex"
        )
    if not _SIGNATURE_RE.fullmatch(signature):
        raise EnvelopeError(SIGNATURE_HEADER, "is not 64 bytes of lowercase hex")
    signed = signed_digest_bytes(method, path, ts, nonce, body_sha256)
    if not verify_signature(account, bytes.fromhex(signature), signed):
        raise EnvelopeError(
            SIGNATURE_HEADER, "does not match the request (or the key is not a valid Ed25519 key)"
        )
    return Envelope(account=account, timestamp=int(ts), nonce=nonce)


def check_fresh(envelope: Envelope, now: float, window: float) -> None:
    """Reject a timestamp more than ``window`` seconds away from ``now`` (a replay or a broken clock)."""
    skew = envelope.timestamp - now
    if abs(skew) > window:
        raise EnvelopeError(
            TIMESTAMP_HEADER,
            f"{envelope.timestamp} is {skew:+.0f} s from the server's clock (window {window:g} s)",
        )
