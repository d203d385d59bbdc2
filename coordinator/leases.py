"""Lease decisions: which leases lapse, and how reliable a peer has proven to be. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# A new peer starts as if it had this much clean uptime and this fraction of a lapse, so one early lapse
# does not ruin it and one hour of uptime does not make it perfect.
RELIABILITY_PRIOR_SECONDS = 600.0
RELIABILITY_PRIOR_LAPSES = 0.1
LAPSE_COST_SECONDS = 600.0


@dataclass(frozen=True)
class LeaseConfig:
    """How often a lease's peer must renew it (``heartbeat_interval``), and how long it lives unrenewed."""

    heartbeat_interval: float
    ttl: float


@dataclass(frozen=True)
class LeaseState:
    id: str
    account: str
    last_heartbeat: float


@dataclass(frozen=True)
class Lapse:
    lease_id: str
    account: str
    reason: str


def lapsed(now: float, leases: Iterable[LeaseState], ttl: float) -> list[Lapse]:
    """Active leases not renewed for ``ttl`` seconds (3 heartbeat intervals by default) lapse."""
    return [
        Lapse(
            lease.id, lease.account, f"no heartbeat for {now - lease.last_heartbeat:.1f} s (limit {ttl:g} s)"
        )
        for lease in leases
        if now - lease.last_heartbeat > ttl
    ]


def credited_uptime(now: float, last_heartbeat: float, ttl: float) -> float:
    """Uptime a heartbeat proves: the time since the last one, capped at the lease's life."""
    return max(0.0, min(now - last_heartbeat, ttl))


def reliability(uptime_seconds: float, lapses: int) -> float:
    """Observed reliability in (0, 1]: uptime against uptime plus a cost per lapse."""
    up = uptime_seconds + RELIABILITY_PRIOR_SECONDS
    return up / (up + (lapses + RELIABILITY_PRIOR_LAPSES) * LAPSE_COST_SECONDS)
