"""Delivered capacity (coordinator.capacity): a peer claiming more than it delivers is paid no more per
verified sample, re-rated and flagged; an honest peer with noise is not; a throttling peer is re-rated
without a penalty. And the filter keys that select on power and capacity."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from bench.verification import capacity_trials
from coordinator.app import OFFER_FIELDS, _filter_record
from coordinator.capacity import CapacityPolicy, Delivery, assess, capped_units, entitled_units
from coordinator.filters import compile_filter
from coordinator.runs import report_pay
from peer.protocol.schemas import OfferView

POLICY = CapacityPolicy()
PRICE = 1_000_000  # units per hour for 1 TFLOP/s


def test_a_lone_peer_or_a_first_report_is_not_measured() -> None:
    alone = assess([Delivery("a", 10.0, 3, 300, 30.0)], "a", False, POLICY)
    assert (alone.ratio, alone.pay_factor, alone.flag) == (1.0, Fraction(1), None)
    assert "not measured" in alone.reason
    none_yet = assess([Delivery("a", 10.0, 0, 0, 0.0), Delivery("b", 10.0, 1, 100, 10.0)], "a", False, POLICY)
    assert none_yet.pay_factor == 1 and none_yet.delivered_tflops is None


def test_a_liar_is_rated_at_what_it_delivers_and_flagged_after_min_reports() -> None:
    # same machine, same samples and seconds: the liar claims 40 TFLOP/s against the honest peer's 10
    honest, liar = Delivery("h", 10.0, 2, 200, 20.0), Delivery("l", 40.0, 2, 200, 20.0)
    verdict = assess([honest, liar], "l", False, POLICY)
    assert verdict.ratio == pytest.approx(0.25)
    assert verdict.delivered_tflops == pytest.approx(10.0)
    assert verdict.pay_factor == pytest.approx(Fraction(1, 4))  # flagged: no slack
    assert verdict.flag == "short" and "without throttling" in verdict.reason
    assert assess([honest, liar], "h", False, POLICY).flag is None  # the reference is not flagged
    first = assess([honest, Delivery("l", 40.0, 1, 100, 10.0)], "l", False, POLICY)
    assert first.flag is None and first.pay_factor < 1  # cut at once, flagged from min_reports on


def test_throttling_explains_a_shortfall() -> None:
    hot = assess([Delivery("h", 10.0, 3, 300, 30.0), Delivery("t", 10.0, 3, 120, 30.0)], "t", True, POLICY)
    assert hot.flag == "throttled" and hot.delivered_tflops == pytest.approx(4.0)


def test_run_to_run_noise_costs_honest_peers_nothing() -> None:
    # 9% slower than the best peer: inside the tolerance, paid in full and not flagged
    slow = assess([Delivery("a", 10.0, 5, 500, 50.0), Delivery("b", 10.0, 5, 500, 54.5)], "b", False, POLICY)
    assert slow.pay_factor == 1 and slow.flag is None


def test_pay_per_verified_sample_does_not_grow_with_the_claim() -> None:
    """Both peers train lock-step on the same machine for 10 epochs of 10 s and 100 samples; the liar
    claims 4x and was matched at 4x the hourly price. Its first report (before any other) is paid in
    full; the next ones make up for it."""
    prices = {"h": PRICE * 10, "l": PRICE * 40}
    claims = {"h": 10.0, "l": 40.0}
    tallies = {k: [0, 0, 0.0, 0] for k in prices}  # reports, samples, billed, units
    for epoch in range(10):
        for key in ("l", "h"):  # the liar reports first every epoch
            plain = report_pay(10.0 * (epoch + 1), prices[key], 10.0 * epoch, 10.0, 10**12)
            t = tallies[key]
            t[0], t[1], t[2] = t[0] + 1, t[1] + 100, t[2] + 10.0
            deliveries = [Delivery(k, claims[k], v[0], v[1], v[2]) for k, v in tallies.items()]
            verdict = assess(deliveries, key, False, POLICY)
            t[3] += capped_units(plain.units, entitled_units(prices[key], t[2], verdict.pay_factor), t[3])
    per_sample = {k: v[3] / v[1] for k, v in tallies.items()}
    assert per_sample["h"] == (PRICE * 10 * 10 // 3600) / 100  # the honest peer: the old rule, to the unit
    assert per_sample["l"] <= 1.1 * per_sample["h"]


def test_entitlement_never_cuts_an_unmeasured_report() -> None:
    """With a factor of 1, the cap never bites: pay is the old rule's to the unit (floor of a sum >= sum of
    floors)."""
    paid, billed = 0, 0.0
    for seconds in (0.7, 1.3, 2.9, 0.1):
        plain = report_pay(100.0, 777, 0.0, seconds, 10**9).units
        billed += seconds
        got = capped_units(plain, entitled_units(777, billed, Fraction(1)), paid)
        assert got == plain
        paid += got


def _offer(**fields: object) -> OfferView:
    base: dict[str, object] = {
        "account": "a" * 64,
        "price_per_hour": Decimal("1.5"),
        "gpu": "H100",
        "gpu_count": 1,
        "vram_gb": 80.0,
        "tflops": 400.0,
        "reliability": 1.0,
        "roles": ["trainer"],
        "min_lease_seconds": 0,
        "state": "open",
        "lease_id": "x",
        "peer_id": None,
        "maddrs": [],
        "updated_at": 0.0,
    }
    return OfferView.model_validate(base | fields)


def test_filters_select_on_power_headroom_and_capacity() -> None:
    frugal = _offer(power_w=600.0, watts_per_tflop=1.5, thermal_headroom_c=20.0)
    hungry = _offer(power_w=700.0, watts_per_tflop=7.0, thermal_headroom_c=3.0)
    unknown = _offer()  # no NVML: matches no term on power
    liar = _offer(tflops=100.0, claimed_tflops=400.0, capacity_flag="short", capacity_reason="run r: ...")

    def kept(expr: str) -> list[OfferView]:
        keep = compile_filter(expr, OFFER_FIELDS)
        return [o for o in (frugal, hungry, unknown, liar) if keep(_filter_record(o))]

    assert kept("watts_per_tflop<=4") == [frugal]
    assert kept("watts>=650 headroom_c<5") == [hungry]
    assert kept("capacity=short") == [liar]
    assert kept("capacity!=short") == [frugal, hungry, unknown]
    assert kept("claimed_tflops>=400 tflops<200") == [liar]


def test_capacity_bench_row_meets_its_goals() -> None:
    """The bench's row (bench/verification.py, at fewer trials): the liar is paid <= 1.1x an honest peer
    per verified sample and flagged within 3 epochs; no honest peer is flagged short, and a throttling
    peer that reports it is re-rated but not penalised."""
    row = capacity_trials(liar_trials=20, honest_trials=100, epochs=10, seed=1)
    assert row["liar"]["max_pay_ratio"] <= 1.1
    assert row["liar"]["flagged"] == 20 and row["liar"]["max_epochs_to_flag"] <= 3
    assert row["honest"]["false_positives"] == 0
    assert row["honest"]["throttled_rerated"] == 100 and row["honest"]["throttled_penalised"] == 0
