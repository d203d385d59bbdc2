"""Delivered capacity: what each peer of a run delivers against the capacity its offer claimed, the verdict
on a shortfall, and the pay that follows what was delivered. Pure functions of their arguments (no clock,
no I/O); :mod:`coordinator.report_store` gathers the run's tallies at each report and writes what these
return, with the reason.

Why: a match's hourly price is ``unit price * claimed TFLOP/s * reliability`` (:mod:`coordinator.market`)
and a report is paid that price for its billable time, so a peer that claims four times the TFLOP/s its
machine has was matched at four times the hourly price and, doing the same work in the same time as an
honest peer on the same machine, earned four times its pay per verified sample, while the swarm waited
for it.

The measure. Per match, over its accepted reports: ``samples`` and ``billed`` seconds (each report's
``min(seconds, wall clock since the previous report or the join)``, the time its pay is counted on). A
report's ``seconds`` is its epoch's compute time (from the epoch's start to the end of its micro-batches,
without the wait in the round: :class:`peer.trainer_overlap.EpochDone`), so a fast GPU that trains its
share in a third of a slow one's time shows three times its rate, and is billed a third of the time at
three times the price: honest peers of every size are paid alike per verified sample. A peer's delivered
rate per claimed TFLOP/s is ``samples / billed / claimed``.

The reference (:func:`assess`) is the lower median of that rate over the run's *other active* matches that
have reported, and is only taken when at least ``min_others`` (2) of them have: a peer is compared against
the others, not against the best one, so no single peer sets anyone's reference. (The best rate was the
reference before; one peer reporting a tiny ``seconds`` made it huge and cut every other match to nothing.
A dropped or banned match is left out: it no longer speaks for the run, nor does one whose work failed
an audit, since a peer that computes nothing reports next to no ``seconds`` and looks very fast
(:mod:`coordinator.report_store` passes only the others that count). The *lower* median of an even
count is the smaller of the middle two, which flags no more than the median would; with two others, one
of them cannot raise it alone.) A peer's ``ratio`` is its rate over the reference, at most 1: a match
whose own rate is above the reference is never cut. ``1/4`` for one that claims four times what it
delivers beside honest peers. Its delivered capacity is ``claimed * ratio`` TFLOP/s: what its claim would
be were it rated like the others.

Why the seconds cannot be gamed: a peer that under-reports its ``seconds`` to look as fast as it claims is
not flagged, but it is billed for those fewer seconds at the higher price its claim got it, so its pay
per verified sample stays an honest peer's; over-reporting is capped by the wall clock, and lowers its
rate. Either way the claim buys nothing.

The pay rule (:func:`entitled_units`). A match is entitled, over all its reports, to its hourly price for
its billed time, scaled by ``min(1, ratio * tolerance)``: the hourly price of the capacity it delivered,
with ``tolerance`` (1.1) of slack so that run-to-run noise between honest peers costs them nothing (none
for a peer flagged ``short``: it is paid for what it delivered). A report
is paid what the old rule gives (``floor(price * billed / 3600)``) but never more than the match's
entitlement less what its earlier reports were given, so pay per verified sample cannot grow with a
claim the peer does not deliver, and a first report paid before the run had a reference is made up for
by the next ones. Nothing is taken back: the money not paid stays in the escrow (the ledger is conserved
as before: every unit paid or held still moves from the escrow by one entry).

The verdict (:func:`assess`). Once a match has ``min_reports`` reports and is measured, a ratio below
``flag_ratio`` (0.5) re-rates the peer: its offer's TFLOP/s become the delivered capacity (later rounds
price and match it on that), and the match and offer are flagged. Throttling (NVML: clocks held down for
heat or power, reported in the peer's heartbeats) explains a shortfall only as far as the clock ratio the
heartbeats reported does. With ``clock`` the lowest reported since the match over the one the match was
priced at (:mod:`coordinator.market_store` weighs a throttled ask by its clock ratio), a throttled peer
is expected to deliver ``clock`` of its claim, and is judged on that as any peer is on its claim: the flag
is ``throttled`` and nothing else follows when ``ratio >= flag_ratio * clock``; below, or without a
report of throttling, it is ``short`` and the peer's reputation drops as for a failed audit (once per
match). (A margin of the tolerance alone, ``ratio * tolerance >= clock``, flagged about 5% of honest
peers throttled to 60% short in the bench: an epoch's noise is 10%, and the first verdict comes at the
second report.) A heartbeat that says "throttled" without a clock ratio counts as clock 1 and explains
nothing: else an over-claimer that always says so would never be flagged, and its claim would come back
at its next post (a ``throttled`` re-rating is lifted by a fresh probe). The clock ratio a peer reports
before it is matched weighs its own ask, so reporting one low only prices it lower.
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
    # other reporting matches the reference needs: with one, either peer's word would set the other's
    min_others: int = 2


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


def assess(
    deliveries: Sequence[Delivery], key: str, clock: float | None, policy: CapacityPolicy
) -> Assessment:
    """The assessment of match ``key`` among ``deliveries``: the run's active matches, its own included.

    Not measured (ratio 1, full pay) while it has no report or fewer than ``policy.min_others`` other
    matches have one: there is no reference to compare it with. ``clock``: how far reported throttling
    explains a shortfall (the lowest clock ratio its peer's heartbeats reported while throttled since the
    match, over the clock ratio the match was priced at; 1 when they gave none); None when its heartbeats
    reported no throttling since the match.
    """
    mine = next((d for d in deliveries if d.key == key), None)
    own = mine.rate if mine is not None else None
    others = sorted(r for d in deliveries if d.key != key and (r := d.rate) is not None)
    if mine is None or own is None or len(others) < policy.min_others:
        return Assessment(
            1.0,
            None,
            Fraction(1),
            None,
            f"not measured: {len(others)} other peers of the run have reported, {policy.min_others} needed",
        )
    reference = others[(len(others) - 1) // 2]  # the lower median: one outlier cannot move it
    ratio = min(1.0, own / reference)  # above the others' median: delivered its claim, never cut
    delivered = mine.claimed_tflops * ratio
    factor = min(Fraction(1), Fraction(ratio) * Fraction(policy.tolerance))
    measured = (
        f"delivered {ratio:.0%} of the {mine.claimed_tflops:g} TFLOP/s claimed ({delivered:.3g} TFLOP/s "
        f"at the median rate of the run's {len(others)} other peers, {mine.samples} samples in "
        f"{mine.billed:.1f} s over {mine.reports} reports)"
    )
    if ratio >= policy.flag_ratio or mine.reports < policy.min_reports:
        return Assessment(ratio, delivered, factor, None, measured)
    if clock is not None and ratio >= policy.flag_ratio * clock:  # judged on what its clocks allow
        return Assessment(
            ratio, delivered, factor, "throttled", f"{measured}; it reported throttling to {clock:.0%} clocks"
        )
    why = (
        "without throttling"
        if clock is None
        else f"more than the throttling it reported explains ({clock:.0%} clocks)"
        if clock < 1
        else "with throttling reported without a clock ratio below the one it was priced at, which explains "
        "nothing"
    )
    # flagged short, it is paid for what it delivered without the slack meant for honest noise
    short = min(Fraction(1), Fraction(ratio))
    return Assessment(ratio, delivered, short, "short", f"{measured}; below {policy.flag_ratio:g} {why}")


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
