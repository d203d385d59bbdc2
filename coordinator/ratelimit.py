"""Per-account token buckets: a pure step function, the state kept by the caller.

Named tuples rather than frozen dataclasses: ``take`` runs on every signed request, and a tuple is built
several times faster.
"""

from __future__ import annotations

from typing import NamedTuple


class Bucket(NamedTuple):
    tokens: float
    updated: float


class Decision(NamedTuple):
    allowed: bool
    bucket: Bucket
    retry_after: float


def take(bucket: Bucket | None, now: float, rate: float, burst: float) -> Decision:
    """Spend one token if there is one; otherwise say how long until there will be."""
    if bucket is None:
        bucket = Bucket(burst, now)
    tokens = min(burst, bucket.tokens + max(0.0, now - bucket.updated) * rate)
    if tokens >= 1.0:
        return Decision(True, Bucket(tokens - 1.0, now), 0.0)
    return Decision(False, Bucket(tokens, now), (1.0 - tokens) / rate)
