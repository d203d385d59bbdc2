"""The dry-run estimate as a pure function: who a run would get, how fast a step goes, what it costs."""

from __future__ import annotations

from decimal import Decimal

import pytest

from coordinator.market import Ask, Bid, clear
from coordinator.quotes import QUOTE_RUN, QuoteConfig, quote
from peer.protocol.spec import RunSpec, validate_spec
from tests.harness import minimal_spec

D = Decimal
CONFIG = QuoteConfig(round_seconds=0.5, efficiency=0.25, spread=2.0)
# Normalised asks 0.10 and 0.20 per effective TFLOP-hour; 10 and 4 TFLOP/s.
ASKS = [Ask("s1", D("1.00"), 10.0, 24.0, 1.0), Ask("s2", D("0.80"), 4.0, 24.0, 1.0)]


def spec(**sections: object) -> RunSpec:
    base = {"stop": {"samples": 2560}, "batch": {"target": 256, "per_peer": 32}}
    return validate_spec(minimal_spec("q", **(base | sections)))


def test_probe_estimate_adds_the_slowest_peers_compute_to_the_round_prior() -> None:
    bid = Bid(QUOTE_RUN, D("0.9"), 2, 0.0)
    got = quote(ASKS, [], bid, spec(), [], 1e9, CONFIG)
    assert (got.peers, got.offers_open, got.offers_with_vram, got.offers_affordable) == (2, 2, 2, 2)
    matches = clear(ASKS, [bid]).matches
    assert got.price_per_hour == sum(m.price_per_hour for m in matches)
    # 128 samples a peer at 1e9 FLOPs each on 4 TFLOP/s at 25%: 0.128 s, plus the 0.5 s round.
    compute = 128 * 1e9 / (4e12 * 0.25)
    assert got.basis == "probe" and "probe, 4 TFLOP/s, at 25% efficiency" in got.basis_note
    assert got.steps == 10
    assert got.seconds == pytest.approx(
        (10 * (compute + 0.5) / 2, 10 * (compute + 0.5), 20 * (compute + 0.5))
    )
    assert got.samples_per_second[1] == pytest.approx(256 / (compute + 0.5))
    assert got.audit_share == 0.0  # minimal_spec audits nothing
    assert got.cost[1] == (got.price_per_hour * D(got.seconds[1]) / 3600).quantize(D("0.000001"))
    assert got.reason is None


def test_measured_epoch_times_win_over_the_probe() -> None:
    measured = [0.9, 1.0, 1.1, 1.2, 2.0]
    got = quote(ASKS, [], Bid(QUOTE_RUN, D("0.9"), 2, 0.0), spec(), measured, None, CONFIG)
    assert got.basis == "measured" and "last 5 accepted reports of digits-mlp" in got.basis_note
    low, mid, high = got.seconds
    assert mid == pytest.approx(10 * 1.24)  # the mean: pay adds up every epoch's time, slow ones too
    assert low == pytest.approx(10 * 0.94) and high == pytest.approx(10 * 1.68)  # 10th, 90th percentiles
    # Too few measurements: back to the probe, and without FLOPs the compute is left out (said so).
    few = quote(ASKS, [], Bid(QUOTE_RUN, D("0.9"), 2, 0.0), spec(), measured[:2], None, CONFIG)
    assert few.basis == "probe" and "compute left out" in few.basis_note
    assert few.seconds[1] == pytest.approx(10 * 0.5)


def test_audit_fees_pay_the_audited_share_again() -> None:
    audited = spec(verification={"rate": 0.03, "min_audits": 2})
    # 2 peers: 128 samples each in 4 micro-batches of 32, of which 2 are audited.
    got = quote(ASKS, [], Bid(QUOTE_RUN, D("0.9"), 2, 0.0), audited, [], None, CONFIG)
    assert got.audit_share == 0.5
    assert got.cost[1] == (got.price_per_hour * D(got.seconds[1]) / 3600 * D("1.5")).quantize(D("0.000001"))


def test_a_run_nobody_would_serve_gets_the_reason_and_no_figures() -> None:
    got = quote(ASKS, [], Bid(QUOTE_RUN, D("0.9"), 2, 48.0), spec(), [], 1e9, CONFIG)
    assert got.peers == 0 and got.offers_with_vram == 0 and got.unit_price is None
    assert got.reason == "no offer has the 48 GB of VRAM the run needs (2 open offers, with at most 24 GB)"
    assert got.seconds == (0.0, 0.0, 0.0) and got.cost == (0, 0, 0)
    # Outbid by a live run for the one cheap offer: the other bids in the book count.
    rival = Bid("run-rival", D("5"), 1, 0.0)
    got = quote(ASKS[:1], [rival], Bid(QUOTE_RUN, D("0.9"), 1, 0.0), spec(), [], None, CONFIG)
    assert got.peers == 0 and got.reason is not None and got.reason.startswith("the bid reaches 1 offer")
