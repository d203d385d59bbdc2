"""Delivered capacity: what each peer of a run delivers against the capacity its offer claimed, the verdict
on a shortfall, and the pay that follows what was delivered. Pure functions of their arguments (no clock,
no I/O); :mod:`coordinator.report_store` gathers the run's tallies at each report and writes what these
return, with the reason.

Why: a match's hourly price is ``unit price * claimed TFLOP/s * reliability`` (:mod:`coordinator.market`)
and a report is paid that price for its billable time. Lock-step training makes an epoch's wall clock the
same for every member, so a peer that claims four times the TFLOP/s its machine has was matched at four
times the hourly price and earned four times an honest peer's pay per verified sample, while the swarm
waited for it.

The measure. Per match, over its accepted reports: ``samples`` and ``billed`` seconds (each report's
``min(seconds, wall clock since the previous report or the join)``, the time its pay is counted on). A
peer's delivered rate per claimed TFLOP/s is ``samples / billed / claimed``; the run's reference is the
best such rate among its matches (a peer cannot raise it by claiming more: claiming more lowers its own),
and a peer's ``ratio`` is its rate over the reference: 1 for the peer that delivers most per TFLOP/s it
claimed, ``1/4`` for one that claims four times what it delivers beside honest peers. Its delivered
capacity is ``claimed * ratio`` TFLOP/s: what its claim would be were it rated like the reference.

The pay rule (:func:`entitled_units`). A match is entitled, over all its reports, to its hourly price for
its billed time, scaled by ``min(1, ratio * tolerance)``: the hourly price of the capacity it delivered,
with ``tolerance`` (1.1) of slack so that run-to-run noise between honest peers costs them nothing (none
for a peer flagged ``short``: it is paid for what it delivered). A report
is paid what the old rule gives (``floor(price * billed / 3600)``) but never more than the match's
entitlement less what its earlier reports were given, so pay per verified sample cannot grow with a
claim the peer does not deliver, and a first report paid before the run had a reference is made up for
by the next ones. Nothing is taken back: the money not paid stays in the escrow (the ledger is conserved
as before: every unit paid or held still moves from the escrow by one entry).

The verdict (:func:`assess`). Once a match has ``min_reports`` reports and another match of the run has
one, a ratio below ``flag_ratio`` (0.5) re-rates the peer: its offer's TFLOP/s become the delivered
capacity (later rounds price and match it on that), and the match and offer are flagged. If a heartbeat
of the peer reported throttling (NVML: clocks held down for heat or power) since it was matched, the flag
is ``throttled`` and nothing else follows; otherwise it is ``short`` and the peer's reputation drops as
for a failed audit (once per match).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

SECONDS_PER_HOUR = 3600

CapacityFlag = Literal["short", "throttled"]


@dataclass(frozen=True)
class CapacityPolicy:
    """Coordinator-wide settings (:class:`coordinator.settings.ServerSettings`: ``capacity_*``)."""

    tolerance: float = 1.1
    flag_ratio: float = 0.5
    min_reports: int = 2


@dataclass(frozen=True)
class Delivery:
    """One match's tallies over its accepted reports: the capacity its offer claimed when it was matched,
    its reports, their samples and their billed seconds."""

    key: str  # the match (its lease id)
    claimed_tflops: float
    reports: int
    samples: int
    billed: float

    @property
    def rate(self) -> float | None:
        """Samples per billed second per claimed TFLOP/s; None before any report."""
        if self.reports <= 0 or self.billed <= 0 or self.claimed_tflops <= 0:
            return None
        return self.samples / self.billed / self.claimed_tflops


@dataclass(frozen=True)
class Assessment:
    """What a match delivers against its claim: ``ratio`` (1 when not measured), the delivered TFLOP/s, the
    pay factor ``min(1, ratio * tolerance)``, the flag (None: none) and why."""

    ratio: float
    delivered_tflops: float | None
    pay_factor: Fraction
    flag: CapacityFlag | None
    reason: str


def assess(deliveries: Sequence[Delivery], key: str, throttled: bool, policy: CapacityPolicy) -> Assessment:
    """The assessment of match ``key`` among the run's ``deliveries`` (its own included).

    Not measured (ratio 1, full pay) while it has no report or no other match of the run has one: there is
    nothing to compare it with. ``throttled``: a heartbeat of its peer reported throttling since the match.
    """
    mine = next((d for d in deliveries if d.key == key), None)
    own = mine.rate if mine is not None else None
    others = [r for d in deliveries if d.key != key and (r := d.rate) is not None]
    if mine is None or own is None or not others:
        return Assessment(1.0, None, Fraction(1), None, "not measured: no other peer of the run to compare")
    best = max(own, *others)
    ratio = own / best
    delivered = mine.claimed_tflops * ratio
    factor = min(Fraction(1), Fraction(ratio) * Fraction(policy.tolerance))
    measured = (
        f"delivered {ratio:.0%} of the {mine.claimed_tflops:g} TFLOP/s claimed ({delivered:.3g} TFLOP/s "
        f"at the run's best rate, {mine.samples} samples in {mine.billed:.1f} s over {mine.reports} reports)"
    )
    if ratio >= policy.flag_ratio or mine.reports < policy.min_reports:
        return Assessment(ratio, delivered, factor, None, measured)
    if throttled:
        return Assessment(ratio, delivered, factor, "throttled", f"{measured}; it reported throttling")
    # flagged short, it is paid for what it delivered without the slack meant for honest noise
    short = min(Fraction(1), Fraction(ratio))
    return Assessment(
        ratio, delivered, short, "short", f"{measured}; below {policy.flag_ratio:g} without throttling"
    )


def entitled_units(price_units: int, billed: float, factor: Fraction) -> int:
    """A match's pay over all its billed seconds: ``floor(price * factor * billed / 3600)``, exactly."""
    return math.floor(Fraction(price_units) * factor * Fraction(billed) / SECONDS_PER_HOUR)


def capped_units(plain_units: int, entitled: int, paid_before: int) -> int:
    """A report's pay: the old rule's ``plain_units``, cut to what the match is still entitled to (never
    below 0; with a factor of 1 the cut never bites, as the floor of a sum is at least the sum of floors)."""
    return max(0, min(plain_units, entitled - paid_before))


def watts_per_tflop(power_w: float | None, tflops: float) -> float | None:
    """Power drawn per TFLOP/s of capacity (the filter key ``watts_per_tflop``); None without a reading."""
    if power_w is None or tflops <= 0:
        return None
    return power_w / tflops
