"""Delivered capacity (coordinator.capacity): a peer claiming more than it delivers is paid no more per
verified sample, re-rated and flagged; an honest peer with noise, of any size, is not, nor is anyone when
one peer reports a tiny ``seconds``; a throttling peer is re-rated without a penalty as far as its clock
ratio explains its shortfall. And the filter keys that select on power and capacity."""

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


H1, H2 = Delivery("h1", 10.0, 2, 200, 20.0), Delivery("h2", 10.0, 2, 200, 20.0)  # 1 sample/s per TFLOP/s


def test_a_lone_peer_a_pair_or_a_first_report_is_not_measured() -> None:
    alone = assess([Delivery("a", 10.0, 3, 300, 30.0)], "a", None, POLICY)
    assert (alone.ratio, alone.pay_factor, alone.flag) == (1.0, Fraction(1), None)
    assert "not measured" in alone.reason
    # one other peer is not a reference: either one's word would set the other's ratio
    pair = assess([H1, Delivery("l", 40.0, 2, 200, 20.0)], "l", None, POLICY)
    assert (pair.pay_factor, pair.delivered_tflops) == (1, None)
    none_yet = assess([Delivery("a", 10.0, 0, 0, 0.0), H1, H2], "a", None, POLICY)
    assert none_yet.pay_factor == 1 and none_yet.delivered_tflops is None


def test_a_liar_is_rated_at_what_it_delivers_and_flagged_after_min_reports() -> None:
    # same machine, same samples and seconds: the liar claims 40 TFLOP/s against the honest peers' 10
    liar = Delivery("l", 40.0, 2, 200, 20.0)
    verdict = assess([H1, H2, liar], "l", None, POLICY)
    assert verdict.ratio == pytest.approx(0.25)
    assert verdict.delivered_tflops == pytest.approx(10.0)
    assert verdict.pay_factor == pytest.approx(Fraction(1, 4))  # flagged: no slack
    assert verdict.flag == "short" and "without throttling" in verdict.reason
    for honest in ("h1", "h2"):  # their others' lower median is the liar's rate: above it, never cut
        assert assess([H1, H2, liar], honest, None, POLICY).ratio == 1.0
    first = assess([H1, H2, Delivery("l", 40.0, 1, 100, 10.0)], "l", None, POLICY)
    assert first.flag is None and first.pay_factor < 1  # cut at once, flagged from min_reports on


def test_one_peer_reporting_a_tiny_seconds_sets_no_one_elses_reference() -> None:
    """A peer that reports 1% of its compute time shows 100 times the others' rate: the best rate would
    make it everyone's reference (ratio 0.01, flagged short, pay cut to nothing). Against the others'
    median, it moves no one, and it is not flagged itself (its rate is above theirs)."""
    tiny = Delivery("t", 10.0, 2, 200, 0.2)
    for peers in ([H1, H2, tiny], [H1, H2, Delivery("h3", 10.0, 2, 200, 20.0), tiny]):
        for d in peers:
            verdict = assess(peers, d.key, None, POLICY)
            assert (verdict.ratio, verdict.pay_factor, verdict.flag) == (1.0, 1, None), (d, verdict)


def test_honest_peers_of_every_size_are_measured_and_paid_alike() -> None:
    """Claims of 10, 20 and 30 TFLOP/s, each training the same 100-sample share in its compute time (30, 15
    and 10 s): every one delivers its claim, and each is paid the same per sample (three times the price
    for a third of the time)."""
    peers = [Delivery(f"x{k}", 10.0 * k, 1, 100, 30.0 / k) for k in (1, 2, 3)]
    paid = {}
    for d in peers:
        verdict = assess(peers, d.key, None, POLICY)
        assert (verdict.ratio, verdict.pay_factor, verdict.flag) == (pytest.approx(1.0), 1, None), verdict
        price = PRICE * round(d.claimed_tflops)
        plain = report_pay(d.billed, price, 0.0, d.billed, 10**12).units
        paid[d.key] = capped_units(plain, entitled_units(price, d.billed, verdict.pay_factor), 0)
    assert paid["x1"] == paid["x2"] == paid["x3"] == PRICE * 10 * 30 // 3600


def test_a_peer_above_the_median_is_never_cut() -> None:
    fast = assess([H1, H2, Delivery("f", 10.0, 2, 300, 20.0)], "f", None, POLICY)
    assert (fast.ratio, fast.pay_factor, fast.flag) == (1.0, 1, None)


def test_throttling_explains_a_shortfall_only_as_far_as_its_clock_ratio() -> None:
    hot = Delivery("t", 10.0, 3, 75, 30.0)  # a quarter of H1's and H2's rate
    peers = [Delivery("h1", 10.0, 3, 300, 30.0), Delivery("h2", 10.0, 3, 300, 30.0), hot]
    explained = assess(peers, "t", 0.25, POLICY)
    assert explained.flag == "throttled" and explained.delivered_tflops == pytest.approx(2.5)
    assert explained.pay_factor == pytest.approx(Fraction(0.25) * Fraction(1.1))
    # clocks at 60% explain a 60% rate, give or take the noise any peer is allowed (flag_ratio of it)...
    noisy = [*peers[:2], Delivery("t", 10.0, 3, 138, 30.0)]  # 46%
    assert assess(noisy, "t", 0.6, POLICY).flag == "throttled"
    # ...not a 25% one
    beyond = assess(peers, "t", 0.6, POLICY)
    assert beyond.flag == "short" and "more than the throttling it reported explains" in beyond.reason
    assert beyond.pay_factor == pytest.approx(Fraction(1, 4))
    # "throttled" without a clock ratio (heartbeats store 1): the peer's word alone explains nothing
    bare = assess(peers, "t", 1.0, POLICY)
    assert bare.flag == "short" and "without a clock ratio" in bare.reason
    assert assess(peers, "t", None, POLICY).flag == "short"


def test_run_to_run_noise_costs_honest_peers_nothing() -> None:
    # 9% slower than the others: inside the tolerance, paid in full and not flagged
    peers = [Delivery("a", 10.0, 5, 500, 50.0), Delivery("c", 10.0, 5, 500, 50.0)]
    slow = assess([*peers, Delivery("b", 10.0, 5, 500, 54.5)], "b", None, POLICY)
    assert slow.pay_factor == 1 and slow.flag is None


def test_pay_per_verified_sample_does_not_grow_with_the_claim() -> None:
    """Three peers train lock-step on the same machine for 10 epochs of 10 s and 100 samples; the liar
    claims 4x and was matched at 4x the hourly price. Its first report (before any other) is paid in
    full; the next ones make up for it."""
    prices = {"h": PRICE * 10, "g": PRICE * 10, "l": PRICE * 40}
    claims = {"h": 10.0, "g": 10.0, "l": 40.0}
    tallies = {k: [0, 0, 0.0, 0] for k in prices}  # reports, samples, billed, units
    for epoch in range(10):
        for key in ("l", "h", "g"):  # the liar reports first every epoch
            plain = report_pay(10.0 * (epoch + 1), prices[key], 10.0 * epoch, 10.0, 10**12)
            t = tallies[key]
            t[0], t[1], t[2] = t[0] + 1, t[1] + 100, t[2] + 10.0
            deliveries = [Delivery(k, claims[k], v[0], v[1], v[2]) for k, v in tallies.items()]
            verdict = assess(deliveries, key, None, POLICY)
            t[3] += capped_units(plain.units, entitled_units(prices[key], t[2], verdict.pay_factor), t[3])
    per_sample = {k: v[3] / v[1] for k, v in tallies.items()}
    assert per_sample["h"] == (PRICE * 10 * 10 // 3600) / 100  # the honest peer: the old rule, to the unit
    assert per_sample["l"] <= 1.1 * per_sample["h"]


def test_under_reporting_seconds_to_look_fast_buys_nothing() -> None:
    """The liar on the same machine claims 4x and reports a quarter of its compute time, so it looks as
    fast as it claims: not flagged, but billed a quarter of the time at 4x the price, it is paid per
    sample what the honest peers are."""
    liar = Delivery("l", 40.0, 2, 200, 5.0)
    verdict = assess([H1, H2, liar], "l", None, POLICY)
    assert (verdict.ratio, verdict.flag) == (1.0, None)
    honest = capped_units(report_pay(20.0, PRICE * 10, 0.0, 20.0, 10**12).units, 10**12, 0)
    lying = report_pay(20.0, PRICE * 40, 0.0, 5.0, 10**12).units
    assert capped_units(lying, entitled_units(PRICE * 40, 5.0, verdict.pay_factor), 0) == honest


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
    per verified sample and flagged within 3 epochs, and one that under-reports its seconds no more; no
    honest peer (of 1x, 2x and 3x capacity, beside a throttling peer and one reporting a tiny ``seconds``)
    is flagged short, and the throttling peer is re-rated but not penalised."""
    row = capacity_trials(liar_trials=20, honest_trials=100, epochs=10, seed=1)
    assert row["liar"]["max_pay_ratio"] <= 1.1
    # hiding its seconds, it is paid as an honest peer is: within the spread of their probes' noise
    assert row["liar"]["hiding_flagged"] == 0 and 0.95 <= row["liar"]["hiding_mean_pay_ratio"] <= 1.05
    assert row["liar"]["flagged"] == 20 and row["liar"]["max_epochs_to_flag"] <= 3
    assert row["honest"]["false_positives"] == 0 and row["honest"]["min_ratio"] > 0.5
    assert row["honest"]["size_pay_ratio"] == pytest.approx(1.0, abs=0.05)  # a 3x peer paid as a 1x one
    assert row["honest"]["throttled_rerated"] == 100 and row["honest"]["throttled_penalised"] == 0
