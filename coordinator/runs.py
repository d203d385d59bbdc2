"""Run lifecycle decisions and the pay rule: pure functions of (now, state, config), no I/O and no clock.

A run moves ``recruiting -> running -> settling -> finished`` (once the final model is uploaded and every
audit decided, or after the settle timeout); ``running <-> paused`` while its live peers fall below the
minimum and replacements arrive; ``paused -> failed`` when none arrive in time, ``recruiting -> failed`` when
the run has not had its minimum of peers by its recruiting deadline (the reason quotes the market's, so a
launcher learns why nobody served it; nothing was spent, so the whole escrow returns), ``running -> failed``
when live peers report nothing for the stall timeout, and any live run can be ``cancelled`` by its owner. The
store gathers a :class:`RunStatus`, asks :func:`decide` (or :func:`advance`, which follows a chain of
transitions) and writes what it returns, with the reason, so that every change of state can be explained from
the run's own record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction

from coordinator.capacity import CapacityPolicy
from coordinator.groups import GroupConfig
from peer.protocol.states import ENDED, RunState

SECONDS_PER_HOUR = 3600


@dataclass(frozen=True)
class RunPolicy:
    """Coordinator-wide run settings (from :class:`coordinator.settings.ServerSettings`)."""

    settle_timeout: float = 60.0
    stall_timeout: float = 600.0
    audit_timeout: float = 120.0
    audit_claim_timeout: float = 30.0
    group: GroupConfig = field(default_factory=GroupConfig)  # the training group (coordinator.groups)
    capacity: CapacityPolicy = field(default_factory=CapacityPolicy)  # coordinator.capacity


@dataclass(frozen=True)
class RunConfig:
    """What one run was launched with.

    ``target_samples`` is ``spec.stop.samples``; 0 only for runs created before specs were validated,
    which have no target and never settle by samples. ``wait_seconds`` is ``spec.peers.wait_seconds``,
    ``recruit_seconds`` ``spec.peers.recruit_seconds`` (None for runs created before it existed: they
    recruit without a deadline).
    """

    peers_min: int
    target_samples: int
    wait_seconds: float
    settle_timeout: float
    stall_timeout: float = 600.0
    recruit_seconds: float | None = None


@dataclass(frozen=True)
class RunStatus:
    """What the store knows of a run now: its state and since when, live peers, work and money left."""

    state: RunState
    state_since: float
    active: int  # matches whose lease is alive
    samples: int  # samples of accepted reports
    escrow_units: int  # what the escrow still holds
    last_report_at: float | None = None  # when the last report was accepted
    model_uploaded: bool = False
    audits_pending: int = 0
    market_reason: str | None = None  # why the last clearing round left it short of peers


@dataclass(frozen=True)
class Transition:
    state: RunState
    reason: str


def decide(now: float, status: RunStatus, config: RunConfig) -> Transition | None:
    """The run's next state and why, or None when it stays where it is.

    Reaching the target (or emptying the escrow) wins over counting peers: the work is done or cannot be
    paid, so there is nothing left to wait for. A paused run resumes as soon as enough peers are live,
    even past its wait bound, because failing it then would throw away a run that can go on.
    """
    state = status.state
    if state in ENDED or state == "pending":
        return None
    if state == "settling":
        if status.model_uploaded and status.audits_pending == 0:
            return Transition("finished", "final model uploaded; every audit decided")
        if now - status.state_since > config.settle_timeout:
            if not status.model_uploaded:
                return Transition(
                    "finished", f"no model uploaded within {config.settle_timeout:g} s of settling"
                )
            return Transition(
                "finished",
                f"{status.audits_pending} audits undecided {config.settle_timeout:g} s into settling",
            )
        return None
    live = f"{status.active} of min {config.peers_min} peers live"
    if state in ("running", "paused"):
        if config.target_samples > 0 and status.samples >= config.target_samples:
            return Transition(
                "settling", f"target of {config.target_samples} samples reached ({status.samples})"
            )
        if status.escrow_units <= 0:
            return Transition("settling", "budget exhausted")
    if state == "running" and status.active >= config.peers_min:
        progress = max(status.state_since, status.last_report_at or status.state_since)
        if now - progress > config.stall_timeout:  # live leases, but nobody's training gets anywhere
            return Transition("failed", f"no work reported for {config.stall_timeout:g} s ({live})")
        return None
    if status.active >= config.peers_min:
        return Transition("running", live) if state in ("recruiting", "paused") else None
    if state == "running":
        return Transition("paused", f"{live}; waiting up to {config.wait_seconds:g} s for replacements")
    if state == "paused" and now - status.state_since > config.wait_seconds:
        return Transition("failed", f"paused {config.wait_seconds:g} s without replacements ({live})")
    if (
        state == "recruiting"
        and config.recruit_seconds is not None
        and now - status.state_since > config.recruit_seconds
    ):
        why = status.market_reason or "no clearing round has looked at it"
        return Transition("failed", f"recruited {live} in {config.recruit_seconds:g} s: {why}")
    return None


def advance(now: float, status: RunStatus, config: RunConfig) -> list[Transition]:
    """Every transition :func:`decide` makes in a row at ``now`` (e.g. recruiting -> running -> settling
    when the last missing peer arrives after the target was met); at most one visit per state."""
    steps: list[Transition] = []
    seen = {status.state}
    while (step := decide(now, status, config)) is not None and step.state not in seen:
        steps.append(step)
        seen.add(step.state)
        status = replace(status, state=step.state, state_since=now)
    return steps


@dataclass(frozen=True)
class Pay:
    units: int
    reason: str


def report_pay(now: float, price_units: int, since: float, seconds: float, escrow_units: int) -> Pay:
    """What a report earns before its match's delivered capacity is counted: the matched hourly price for
    the compute time it claims, capped by wall clock (:mod:`coordinator.capacity` then cuts it to what the
    match delivered).

    ``units = floor(price_units * min(seconds, now - since) / 3600)``, where ``since`` is when the peer
    joined or last reported, whichever is later: a peer cannot claim more compute time than has passed
    since its previous claim, whatever it reports. The result is then capped by what the escrow holds.
    Exact rational arithmetic (floats are exact rationals), so the figure is reproducible to the unit.
    """
    elapsed = max(0.0, now - since)
    billable = min(seconds, elapsed)
    units = math.floor(Fraction(price_units) * Fraction(billable) / SECONDS_PER_HOUR)
    why = f"{billable:.3f} s at {price_units} units/h" + (
        " (capped by wall clock)" if elapsed < seconds else ""
    )
    if units > escrow_units:
        return Pay(max(0, escrow_units), f"{why}; capped by the escrow's {escrow_units} units")
    return Pay(units, why)
