"""Run lifecycle decisions and the pay rule as pure functions: same (now, state, config), same answer."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.runs import (
    ENDED,
    RunConfig,
    RunState,
    RunStatus,
    Transition,
    advance,
    decide,
    report_pay,
)

CONFIG = RunConfig(peers_min=2, target_samples=1000, wait_seconds=30.0, settle_timeout=60.0)


def status(state: RunState, *, since: float = 100.0, active: int = 2, samples: int = 0, escrow: int = 10**6):
    return RunStatus(state=state, state_since=since, active=active, samples=samples, escrow_units=escrow)


def test_recruiting_runs_once_enough_peers_are_live() -> None:
    assert decide(200.0, status("recruiting", active=1), CONFIG) is None
    assert decide(200.0, status("recruiting", active=3), CONFIG) == Transition(
        "running", "3 of min 2 peers live"
    )


def test_running_pauses_below_the_minimum_and_says_how_long_it_waits() -> None:
    assert decide(200.0, status("running", active=2), CONFIG) is None
    step = decide(200.0, status("running", active=1), CONFIG)
    assert step == Transition("paused", "1 of min 2 peers live; waiting up to 30 s for replacements")


def test_paused_resumes_with_a_replacement_even_past_its_wait() -> None:
    assert decide(110.0, status("paused", active=2), CONFIG) == Transition("running", "2 of min 2 peers live")
    assert decide(1000.0, status("paused", active=2), CONFIG) == Transition(
        "running", "2 of min 2 peers live"
    )


def test_paused_fails_only_after_waiting_longer_than_wait_seconds() -> None:
    assert decide(129.0, status("paused", active=1), CONFIG) is None
    assert decide(130.0, status("paused", active=1), CONFIG) is None  # "longer than": not at the bound
    step = decide(130.5, status("paused", active=1), CONFIG)
    assert step == Transition("failed", "paused 30 s without replacements (1 of min 2 peers live)")


@pytest.mark.parametrize("state", ["running", "paused"])
def test_reaching_the_target_settles_whatever_the_peers(state: RunState) -> None:
    step = decide(200.0, status(state, active=0, samples=1000), CONFIG)
    assert step == Transition("settling", "target of 1000 samples reached (1000)")
    assert decide(200.0, status(state, active=2, samples=999), CONFIG) in (
        None,
        Transition("running", "2 of min 2 peers live"),
    )


def test_an_empty_escrow_settles_with_budget_exhausted() -> None:
    assert decide(200.0, status("running", escrow=0), CONFIG) == Transition("settling", "budget exhausted")
    assert decide(200.0, status("paused", active=0, escrow=0), CONFIG) == Transition(
        "settling", "budget exhausted"
    )


def test_a_run_without_target_never_settles_by_samples() -> None:
    legacy = RunConfig(peers_min=1, target_samples=0, wait_seconds=120.0, settle_timeout=60.0)
    assert decide(200.0, status("running", active=1, samples=10**9), legacy) is None


def test_settling_finishes_without_a_model_after_the_settle_timeout() -> None:
    assert decide(160.0, status("settling", active=0), CONFIG) is None
    step = decide(160.5, status("settling", active=0), CONFIG)
    assert step == Transition("finished", "no model uploaded within 60 s of settling")


def test_settling_finishes_once_the_model_is_in_and_every_audit_decided() -> None:
    uploaded = RunStatus("settling", 100.0, 2, 1000, 10**6, model_uploaded=True, audits_pending=3)
    assert decide(120.0, uploaded, CONFIG) is None  # the last epochs' pay waits for its audits
    assert decide(120.0, replace(uploaded, audits_pending=0), CONFIG) == Transition(
        "finished", "final model uploaded; every audit decided"
    )
    assert decide(160.5, uploaded, CONFIG) == Transition("finished", "3 audits undecided 60 s into settling")


@pytest.mark.parametrize("state", [*ENDED, "pending"])
def test_ended_and_pending_runs_do_not_move(state: RunState) -> None:
    assert decide(10**9, status(state, active=0, samples=10**6, escrow=0), CONFIG) is None


def test_advance_follows_a_chain_and_stops() -> None:
    steps = advance(200.0, status("recruiting", active=2, samples=1000), CONFIG)
    assert [s.state for s in steps] == ["running", "settling"]
    assert advance(200.0, status("running"), CONFIG) == []
    # settling now (since = now) does not time out in the same call
    assert [s.state for s in advance(200.0, status("paused", active=0, samples=5000), CONFIG)] == ["settling"]


ALLOWED = {
    "recruiting": {"running"},
    "running": {"paused", "settling", "failed"},
    "paused": {"running", "settling", "failed"},
    "settling": {"finished"},
}


@given(
    state=st.sampled_from(["pending", "recruiting", "running", "paused", "settling", *ENDED]),
    now=st.floats(0, 1e6),
    since=st.floats(0, 1e6),
    active=st.integers(0, 5),
    samples=st.integers(0, 2000),
    escrow=st.integers(0, 10),
    peers_min=st.integers(1, 4),
    target=st.integers(0, 1500),
    wait=st.floats(0.1, 1e4),
)
def test_decide_only_takes_the_documented_edges_and_is_deterministic(
    state, now, since, active, samples, escrow, peers_min, target, wait
) -> None:
    config = RunConfig(peers_min=peers_min, target_samples=target, wait_seconds=wait, settle_timeout=60.0)
    run = RunStatus(state=state, state_since=since, active=active, samples=samples, escrow_units=escrow)
    step = decide(now, run, config)
    assert step == decide(now, run, config)
    if step is not None:
        assert step.state in ALLOWED[state], (state, step)
        assert step.reason
    assert len(advance(now, run, config)) <= 3


def test_pay_is_the_price_for_the_compute_time_when_the_clock_allows_it() -> None:
    pay = report_pay(now=110.0, price_units=1_000_000, since=100.0, seconds=0.25, escrow_units=10**9)
    assert pay.units == math.floor(Fraction(1_000_000) * Fraction(0.25) / 3600) == 69
    assert "capped" not in pay.reason


def test_pay_is_capped_by_the_wall_clock_since_the_last_report() -> None:
    pay = report_pay(now=100.5, price_units=3_600_000, since=100.0, seconds=86400.0, escrow_units=10**9)
    assert pay.units == 500 and "wall clock" in pay.reason


def test_pay_is_capped_by_the_escrow_and_never_negative() -> None:
    pay = report_pay(now=200.0, price_units=3_600_000, since=100.0, seconds=100.0, escrow_units=42)
    assert pay.units == 42 and "escrow" in pay.reason
    assert report_pay(now=99.0, price_units=3_600_000, since=100.0, seconds=5.0, escrow_units=10).units == 0
    assert report_pay(now=200.0, price_units=0, since=100.0, seconds=5.0, escrow_units=10).units == 0


def test_pay_is_exact_for_large_prices() -> None:
    price = 999_999_999_999_999_999  # floats would lose the last digits
    pay = report_pay(now=1e9, price_units=price, since=0.0, seconds=0.1, escrow_units=2**63 - 1)
    assert pay.units == (price * Fraction(0.1)) // 3600


def test_a_running_run_without_reports_fails_after_the_stall_timeout() -> None:
    config = RunConfig(
        peers_min=1, target_samples=1000, wait_seconds=30.0, settle_timeout=60.0, stall_timeout=100
    )
    quiet = RunStatus(
        state="running", state_since=0.0, active=2, samples=10, escrow_units=5, last_report_at=50.0
    )
    assert decide(149.0, quiet, config) is None  # 99 s since the last report
    step = decide(151.0, quiet, config)
    assert step is not None and step.state == "failed" and "no work reported for 100 s" in step.reason
    fresh = RunStatus(state="running", state_since=0.0, active=2, samples=0, escrow_units=5)
    assert decide(99.0, fresh, config) is None  # counted from the start when nothing was reported yet
    assert decide(101.0, fresh, config) is not None


def test_recruiting_fails_at_its_deadline_quoting_the_market() -> None:
    config = replace(CONFIG, recruit_seconds=60.0)
    waiting = replace(status("recruiting", active=1), market_reason="no open offers in the market")
    assert decide(160.0, waiting, config) is None  # "longer than": not at the bound
    assert decide(160.5, waiting, config) == Transition(
        "failed", "recruited 1 of min 2 peers live in 60 s: no open offers in the market"
    )
    assert decide(160.5, replace(waiting, active=2), config) == Transition("running", "2 of min 2 peers live")
    assert decide(10_000.0, waiting, CONFIG) is None  # a run created before deadlines recruits on
