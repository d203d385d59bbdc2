"""Market clearing: McAfee's invariants on generated markets, a reference implementation in exact
fractions, truthfulness for single-unit traders, and hand-computed rounds."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from coordinator.market import (
    SET_BY_A_TRADER,
    Ask,
    Bid,
    ClearingResult,
    MarketConfig,
    Match,
    clear,
    clear_round,
)

D = Decimal
CONFIG = MarketConfig()

# Few distinct values so that ties (equal prices, equal VRAM) are common.
prices = st.one_of(
    st.sampled_from([D("0"), D("0.1"), D("0.25"), D("0.5"), D("1"), D("2.5")]),
    st.decimals(min_value=0, max_value=3, places=3),
)
tflops = st.one_of(st.sampled_from([0.0, -1.0, 0.5, 1.0, 2.0, 3.3]), st.floats(0.1, 100))
reliability = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.floats(0.01, 1))
vram = st.sampled_from([8.0, 16.0, 24.0, 40.0, 80.0])
names = st.text(alphabet="abcdef", min_size=1, max_size=3)
asks_st = st.lists(
    st.builds(Ask, names, prices, tflops, vram, reliability), max_size=25, unique_by=lambda a: a.account
)
bids_st = st.lists(
    st.builds(Bid, names, prices, st.integers(0, 4), st.sampled_from([0.0, 8.0, 24.0, 40.0, 80.0])),
    max_size=12,
    unique_by=lambda b: b.run_id,
)
configs = st.sampled_from([MarketConfig(), MarketConfig(D("0.01")), MarketConfig(D("0.05"))])


def normalised(ask: Ask) -> Fraction:
    return Fraction(ask.price_per_hour) / (Fraction(ask.tflops) * Fraction(ask.reliability))


def tradeable(ask: Ask) -> bool:
    return ask.tflops > 0 and ask.reliability > 0


def reference(
    asks: list[Ask], bids: list[Bid], config: MarketConfig
) -> tuple[Fraction, Fraction, list[Ask], list[Bid]]:
    """McAfee read straight off the textbook, in fractions: (seller price, buyer price, trading
    sellers, trading unit demands). Traders' prices are first rounded onto the grid in their favour."""
    q = Fraction(config.price_quantum)
    sellers = sorted((math.ceil(normalised(a) / q) * q, a.account, a) for a in asks if tradeable(a))
    units = sorted(
        (-math.floor(Fraction(b.max_price) / q) * q, b.run_id, b) for b in bids for _ in range(b.units)
    )
    a = [price for price, _, _ in sellers]
    b = [-price for price, _, _ in units]
    k = 0
    while k < min(len(a), len(b)) and b[k] >= a[k]:
        k += 1
    if k == 0:
        return Fraction(0), Fraction(0), [], []
    everyone = [s for _, _, s in sellers[:k]], [u for _, _, u in units[:k]]
    if k == len(b) and k < len(a):  # thin market, all demand trades: the first losing ask if it can
        price = min(a[k], b[k - 1])
        return price, price, *everyone
    if k == len(a) and k < len(b):  # thin market, all supply trades: the first losing bid if it can
        price = max(b[k], a[k - 1])
        return price, price, *everyone
    if k == len(a) == len(b):
        price = round((a[k - 1] + b[k - 1]) / 2 / q) * q
        return price, price, *everyone
    if a[k - 1] <= (p := (a[k] + b[k]) / 2) <= b[k - 1]:
        price = round(p / q) * q  # Fraction rounds half to even
        return price, price, *everyone
    return a[k - 1], b[k - 1], [s for _, _, s in sellers[: k - 1]], [u for _, _, u in units[: k - 1]]


def max_matching(buyers: list[Bid], sellers: list[Ask]) -> int:
    """Size of a maximum VRAM-feasible matching (Kuhn's augmenting paths; fine for small markets)."""
    owner: dict[int, int] = {}

    def augment(u: int, seen: set[int]) -> bool:
        for s, ask in enumerate(sellers):
            if ask.vram_gb >= buyers[u].min_vram_gb and s not in seen:
                seen.add(s)
                if s not in owner or augment(owner[s], seen):
                    owner[s] = u
                    return True
        return False

    return sum(augment(u, set()) for u in range(len(buyers)))


def on_grid(price: Decimal, config: MarketConfig) -> bool:
    return (Fraction(price) / Fraction(config.price_quantum)).denominator == 1


@settings(max_examples=300, deadline=None)
@given(asks_st, bids_st, configs)
def test_invariants_hold_on_every_round(asks: list[Ask], bids: list[Bid], config: MarketConfig) -> None:
    result = clear(asks, bids, config)
    ask_of = {a.account: a for a in asks}
    bid_of = {b.run_id: b for b in bids}
    q = Fraction(config.price_quantum)

    for m in result.matches:
        ask, bid = ask_of[m.account], bid_of[m.run_id]
        assert tradeable(ask)
        assert m.buyer_unit_price <= bid.max_price, "buyer pays above its bid"
        assert Fraction(m.unit_price) >= normalised(ask), "seller paid below its normalised ask"
        assert m.price_per_hour >= ask.price_per_hour, "seller paid below its ask per hour"
        exact_per_hour = Fraction(m.unit_price) * Fraction(ask.tflops) * Fraction(ask.reliability)
        assert 0 <= Fraction(m.price_per_hour) - exact_per_hour < q
        assert m.buyer_unit_price >= m.unit_price, "market runs a deficit"
        assert ask.vram_gb >= bid.min_vram_gb
        assert all(on_grid(p, config) for p in (m.unit_price, m.price_per_hour, m.buyer_unit_price))

    assert len({m.account for m in result.matches}) == len(result.matches), "a seller booked twice"
    for run_id, n in Counter(m.run_id for m in result.matches).items():
        assert n <= bid_of[run_id].units
    assert result.supply == sum(map(tradeable, asks))
    assert result.excluded_asks == len(asks) - result.supply
    assert result.demand == sum(b.units for b in bids)

    # Same prices and trading set as the reference; the assignment loses no feasible pair.
    seller_price, buyer_price, sellers, units = reference(asks, bids, config)
    if units:
        assert Fraction(result.clearing_price) == seller_price
    else:
        assert result.clearing_price is None and not result.matches
    assert {(m.unit_price, m.buyer_unit_price) for m in result.matches} <= {(seller_price, buyer_price)}
    assert {m.account for m in result.matches} <= {s.account for s in sellers}
    assert not Counter(m.run_id for m in result.matches) - Counter(u.run_id for u in units)
    assert len(result.matches) == max_matching(units, sellers)


@settings(max_examples=150, deadline=None)
@given(asks_st, bids_st, configs, st.randoms(use_true_random=False))
def test_same_input_in_any_order_gives_the_same_result(
    asks: list[Ask], bids: list[Bid], config: MarketConfig, rng: random.Random
) -> None:
    shuffled_asks, shuffled_bids = asks[:], bids[:]
    rng.shuffle(shuffled_asks)
    rng.shuffle(shuffled_bids)
    assert clear(shuffled_asks, shuffled_bids, config) == clear(asks, bids, config)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.builds(Ask, st.sampled_from("abcdefgh"), prices, tflops, vram, reliability), max_size=20),
    st.lists(st.builds(Bid, st.sampled_from("uvwxyz"), prices, st.integers(0, 3), vram), max_size=10),
)
def test_duplicate_accounts_and_runs_count_once(asks: list[Ask], bids: list[Bid]) -> None:
    result = clear(asks, bids, CONFIG)
    assert len({m.account for m in result.matches}) == len(result.matches)
    units = {b.run_id: max(x.units for x in bids if x.run_id == b.run_id) for b in bids}
    assert all(n <= units[run] for run, n in Counter(m.run_id for m in result.matches).items())
    assert result.supply == len({a.account for a in asks if tradeable(a)})
    for m in result.matches:  # priced against the account's cheapest ask
        best = min((a for a in asks if a.account == m.account and tradeable(a)), key=normalised)
        assert Fraction(m.unit_price) >= normalised(best)
        assert m.price_per_hour >= best.price_per_hour


def utility(result: ClearingResult, truth: Ask | Bid, asks: list[Ask]) -> Fraction:
    """A trader's gain per hour at its true price: a seller's pay above its ask, a run's value of
    the effective TFLOP/s it got above what it pays for them."""
    for m in result.matches:
        if isinstance(truth, Ask) and m.account == truth.account:
            return Fraction(m.price_per_hour) - Fraction(truth.price_per_hour)
        if isinstance(truth, Bid) and m.run_id == truth.run_id:
            ask = next(a for a in asks if a.account == m.account)
            capacity = Fraction(ask.tflops) * Fraction(ask.reliability)
            return (Fraction(truth.max_price) - Fraction(m.buyer_unit_price)) * capacity
    return Fraction(0)


@settings(max_examples=300, deadline=None)
@given(
    asks_st,
    st.lists(
        st.builds(Bid, names, prices, st.just(1), vram), min_size=1, max_size=12, unique_by=lambda b: b.run_id
    ),
    st.data(),
)
def test_single_unit_traders_gain_nothing_by_misstating_their_price(
    asks: list[Ask], bids: list[Bid], data: st.DataObject
) -> None:
    """McAfee is truthful for single-unit traders; the VRAM assignment must not break that.

    Thin-market rounds priced by a trading order are the documented exception (see
    ``coordinator.market._thin_market_price``): a lie that lands there may pay, so such rounds are skipped.
    """
    lie = data.draw(prices, label="lie")
    truthful = clear(asks, bids, CONFIG)
    assume(SET_BY_A_TRADER not in truthful.reason)  # the documented thin-market exception
    if asks and data.draw(st.booleans(), label="seller lies"):
        i = data.draw(st.integers(0, len(asks) - 1), label="seller")
        lying = clear([*asks[:i], replace(asks[i], price_per_hour=lie), *asks[i + 1 :]], bids, CONFIG)
        assume(SET_BY_A_TRADER not in lying.reason)
        assert utility(lying, asks[i], asks) <= utility(truthful, asks[i], asks)
    else:
        j = data.draw(st.integers(0, len(bids) - 1), label="buyer")
        lying = clear(asks, [*bids[:j], replace(bids[j], max_price=lie), *bids[j + 1 :]], CONFIG)
        assume(SET_BY_A_TRADER not in lying.reason)
        assert utility(lying, bids[j], asks) <= utility(truthful, bids[j], asks)


@settings(max_examples=300, deadline=None)
@given(asks_st, bids_st, st.data())
def test_who_gets_whom_ignores_prices_inside_the_trading_set(
    asks: list[Ask], bids: list[Bid], data: st.DataObject
) -> None:
    """A trading seller that asks less, or a run that bids more, keeps the same partners: the VRAM
    assignment must not sell better places to traders who misstate their price."""
    result = clear(asks, bids, CONFIG)
    _, _, sellers, units = reference(asks, bids, CONFIG)
    whole_runs = sorted(
        run
        for run, n in Counter(u.run_id for u in units).items()
        if n == next(b.units for b in bids if b.run_id == run)
    )
    if sellers and data.draw(st.booleans(), label="seller"):
        account = data.draw(st.sampled_from([s.account for s in sellers]), label="account")
        asks = [replace(a, price_per_hour=D(0)) if a.account == account else a for a in asks]
    elif whole_runs:
        run = data.draw(st.sampled_from(whole_runs), label="run")
        bids = [replace(b, max_price=D(1000)) if b.run_id == run else b for b in bids]
    assert {(m.run_id, m.account) for m in clear(asks, bids, CONFIG).matches} == {
        (m.run_id, m.account) for m in result.matches
    }


# Hand-computed rounds. Normalised asks: 1.00/(10*1)=0.10, 0.80/(4*1)=0.20, 1.50/(10*0.5)=0.30,
# 0.40/(1*1)=0.40, 5.00/(10*1)=0.50.
SELLERS = [
    Ask("s1", D("1.00"), 10.0, 24.0, 1.0),
    Ask("s2", D("0.80"), 4.0, 24.0, 1.0),
    Ask("s3", D("1.50"), 10.0, 24.0, 0.5),
    Ask("s4", D("0.40"), 1.0, 24.0, 1.0),
    Ask("s5", D("5.00"), 10.0, 24.0, 1.0),
]


def pairs(result: ClearingResult) -> set[tuple[str, str, str, str, str]]:
    return {
        (m.run_id, m.account, str(m.unit_price), str(m.price_per_hour), str(m.buyer_unit_price))
        for m in result.matches
    }


def test_uniform_price_round() -> None:
    # Unit bids 0.9, 0.9, 0.7, 0.35, 0.05 against asks 0.1 .. 0.5: k = 3 (0.35 < 0.40);
    # p = (0.35 + 0.40) / 2 = 0.375 lies in [a_3, b_3] = [0.30, 0.70], so all 3 trade at 0.375.
    bids = [
        Bid("ra", D("0.90"), 2, 0.0),
        Bid("rb", D("0.70"), 1, 0.0),
        Bid("rc", D("0.35"), 1, 0.0),
        Bid("rd", D("0.05"), 3, 0.0),
    ]
    result = clear(SELLERS, bids, CONFIG)
    assert result.clearing_price == D("0.375")
    assert result.reason == "3 trades at uniform price 0.375000"
    assert (result.supply, result.demand) == (5, 7)
    assert pairs(result) == {
        ("ra", "s1", "0.375000", "3.750000", "0.375000"),
        ("ra", "s2", "0.375000", "1.500000", "0.375000"),
        ("rb", "s3", "0.375000", "1.875000", "0.375000"),
    }


def test_trade_reduction_round() -> None:
    # Unit bids 0.9, 0.9, 0.7, 0.15: k = 3 again, but p = (0.15 + 0.40) / 2 = 0.275 < a_3 = 0.30,
    # so the 2 best pairs trade: buyers pay b_3 = 0.70, sellers receive a_3 = 0.30; 0.40 is surplus.
    bids = [Bid("ra", D("0.90"), 2, 0.0), Bid("rb", D("0.70"), 1, 0.0), Bid("rc", D("0.15"), 1, 0.0)]
    result = clear(SELLERS, bids, CONFIG)
    assert result.clearing_price == D("0.3")
    assert result.reason == (
        "trade reduction: 2 of 3 trades at bid 0.700000 / ask 0.300000"
        " (candidate price 0.275000 outside [0.300000, 0.700000])"
    )
    assert pairs(result) == {
        ("ra", "s1", "0.300000", "3.000000", "0.700000"),
        ("ra", "s2", "0.300000", "1.200000", "0.700000"),
    }


def test_thin_market_trades_every_efficient_pair() -> None:
    # One run wanting 2 peers, normalised asks s4 0.40, s2 0.20, s1 0.10 (and more): every unit of demand
    # trades, priced by the first losing ask (s4, 0.40 <= the bid 0.9), which no trader sets itself.
    result = clear(SELLERS, [Bid("ra", D("0.9"), 2, 0.0)], CONFIG)
    assert result.reason == "thin market: 2 trades at uniform price 0.300000, the first losing ask"
    assert {m.account for m in result.matches} == {"s1", "s2"}


def test_thin_market_of_one_peer_and_one_run_trades() -> None:
    # McAfee alone would drop the only efficient trade; the swarm of one must still run.
    result = clear([SELLERS[0]], [Bid("ra", D("0.3"), 1, 0.0)], CONFIG)
    assert result.reason == (
        "thin market: 1 trade at uniform price 0.200000, the midpoint of the last ask and bid"
        f" ({SET_BY_A_TRADER})"
    )
    assert pairs(result) == {("ra", "s1", "0.200000", "2.000000", "0.200000")}


def test_thin_market_with_excess_demand_is_priced_by_the_first_losing_bid() -> None:
    bids = [Bid("ra", D("0.9"), 1, 0.0), Bid("rb", D("0.5"), 1, 0.0), Bid("rc", D("0.15"), 1, 0.0)]
    result = clear(SELLERS[:2], bids, CONFIG)
    expected = f"thin market: 2 trades at uniform price 0.200000, the last ask ({SET_BY_A_TRADER})"
    assert result.reason == expected
    assert {m.run_id for m in result.matches} == {"ra", "rb"}


def test_vram_assignment_serves_every_pair_it_can() -> None:
    # k = 2 at uniform price (0.05 + 0.90) / 2 = 0.475. Handing the cheapest seller (s1, 80 GB) to
    # the highest bidder (16 GB needed) would strand the run needing 40 GB; best fit serves both.
    asks = [
        Ask("s1", D("0.1"), 1.0, 80.0, 1.0),
        Ask("s2", D("0.2"), 1.0, 24.0, 1.0),
        Ask("s3", D("0.9"), 1.0, 80.0, 1.0),
    ]
    bids = [Bid("r1", D("0.8"), 1, 16.0), Bid("r2", D("0.7"), 1, 40.0), Bid("r3", D("0.05"), 1, 0.0)]
    result = clear(asks, bids, CONFIG)
    assert result.reason == "2 trades at uniform price 0.475000"
    assert {(m.run_id, m.account) for m in result.matches} == {("r1", "s2"), ("r2", "s1")}


def test_pair_left_unmatched_by_vram_does_not_trade() -> None:
    asks = [
        Ask("s1", D("0.1"), 1.0, 24.0, 1.0),
        Ask("s2", D("0.2"), 1.0, 24.0, 1.0),
        Ask("s3", D("0.9"), 1.0, 80.0, 1.0),
    ]
    bids = [Bid("r1", D("0.8"), 1, 80.0), Bid("r2", D("0.7"), 1, 16.0), Bid("r3", D("0.05"), 1, 0.0)]
    result = clear(asks, bids, CONFIG)
    assert result.reason == "1 trade at uniform price 0.475000; 1 pair left unmatched by min_vram_gb"
    assert [(m.run_id, m.account) for m in result.matches] == [("r2", "s1")]


def test_prices_are_rounded_in_the_traders_favour() -> None:
    # Normalised ask 1/3 rounds up to 0.34; the bid 0.999 rounds down to 0.99; a thin market of one pair
    # trades at the midpoint 0.665, rounded half to even onto the grid: 0.66. The seller's 0.66 * 3 TFLOPs
    # is 1.98 per hour, above its ask of 1.
    config = MarketConfig(D("0.01"))
    result = clear([Ask("s", D("1"), 3.0, 8.0, 1.0)], [Bid("r", D("0.999"), 1, 0.0)], config)
    assert result.matches == (Match("r", "s", D("0.66"), D("1.98"), D("0.66")),)
    assert result.clearing_price == D("0.66")


@pytest.mark.parametrize(
    ("asks", "bids", "reason", "supply", "demand"),
    [
        ([], [], "no asks", 0, 0),
        ([], [Bid("r", D("1"), 2, 0.0)], "no asks", 0, 2),
        (SELLERS, [], "no bids", 5, 0),
        (SELLERS, [Bid("r", D("1"), 0, 0.0)], "no bids", 5, 0),
        (
            [Ask("s", D("1"), 0.0, 8.0, 1.0), Ask("t", D("1"), 1.0, 8.0, 0.0)],
            [Bid("r", D("9"), 1, 0.0)],
            "no asks (2 asks excluded)",
            0,
            1,
        ),
        (
            [
                Ask("n", D("1"), math.nan, 8.0, 1.0),
                Ask("i", D("1"), math.inf, 8.0, 1.0),
                Ask("p", D("NaN"), 1.0, 8.0, 1.0),
                Ask("v", D("1"), 1.0, math.nan, 1.0),
            ],
            [Bid("r", D("9"), 1, 0.0)],
            "no asks (4 asks excluded)",
            0,
            1,
        ),
        (
            SELLERS,
            [Bid("r", D("0.05"), 3, 0.0)],
            "no bid reaches the lowest ask (best bid 0.050000 < lowest ask 0.100000)",
            5,
            3,
        ),
    ],
)
def test_empty_rounds(asks: list[Ask], bids: list[Bid], reason: str, supply: int, demand: int) -> None:
    assert clear(asks, bids, CONFIG) == ClearingResult(
        None, (), supply, demand, reason, excluded_asks=len(asks) - supply
    )


def test_bids_that_cannot_trade_are_excluded() -> None:
    bids = [Bid("r", D("NaN"), 1, 0.0), Bid("s", D("1"), 1, math.nan), Bid("t", D("Infinity"), 1, 0.0)]
    assert clear(SELLERS, bids, CONFIG) == ClearingResult(
        None, (), 5, 0, "no bids (3 bids excluded)", excluded_bids=3
    )


def test_an_accounts_cheapest_ask_is_the_one_that_counts() -> None:
    asks = [
        Ask("s1", D("0.9"), 1.0, 24.0, 1.0),
        Ask("s1", D("0.1"), 1.0, 24.0, 1.0),
        Ask("s2", D("0.5"), 1.0, 24.0, 1.0),
    ]
    result = clear(asks, [Bid("r", D("1"), 2, 0.0), Bid("z", D("0.2"), 1, 0.0)], CONFIG)
    assert result.excluded_asks == 1 and result.supply == 2
    # s1 at 0.1 and s2 at 0.5 both trade (every seller does: a thin market) at s2's ask, as the losing
    # bid 0.2 is below it; s1's expensive second ask played no part.
    assert result.matches == (
        Match("r", "s1", D("0.5"), D("0.5"), D("0.5")),
        Match("r", "s2", D("0.5"), D("0.5"), D("0.5")),
    )


def test_shortfalls_name_the_first_cause_a_launcher_can_act_on() -> None:
    # Normalised asks: s1 0.10, s2 0.20, s3 0.30, s4 0.40, s5 0.50, each with 24 GB.
    def why(asks: list[Ask], bids: list[Bid]) -> dict[str, str | None]:
        result, reasons = clear_round(asks, bids, CONFIG)
        assert result == clear(asks, bids, CONFIG)  # the reasons change nothing of the round
        return reasons

    assert why([], [Bid("ra", D("0.9"), 2, 0.0)]) == {"ra": "no open offers in the market"}
    assert why(SELLERS, [Bid("ra", D("0.9"), 1, 48.0)]) == {
        "ra": "no offer has the 48 GB of VRAM the run needs (5 open offers, with at most 24 GB)"
    }
    assert why(SELLERS, [Bid("ra", D("0.9"), 2, 0.0)]) == {"ra": None}  # it got both
    # Two offers are affordable, three wanted; trade reduction leaves one trade of the two.
    assert why(SELLERS, [Bid("ra", D("0.25"), 3, 0.0)]) == {
        "ra": "matched 1 of 3 more peers wanted; 5 offers with the VRAM, 2 asking at most the bid's 0.250000"
        " per effective TFLOP-hour; the lowest ask above it is 0.300000, and a max price of 0.300000 would"
        " reach 3 offers"
    }
    # Outbid: the one offer goes to the higher bid.
    reasons = why(SELLERS[:1], [Bid("ra", D("0.9"), 1, 0.0), Bid("rb", D("0.5"), 1, 0.0)])
    assert reasons["ra"] is None
    assert reasons["rb"] == (
        "the bid reaches 1 offer with the VRAM, but the round gave them to higher bids or its trade"
        " reduction left them out (thin market: 1 trade at uniform price 0.500000, the first losing bid)"
    )
