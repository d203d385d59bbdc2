"""Market clearing: McAfee's trade-reduction double auction over normalised GPU offers.

Everything here is a pure function of its arguments (no I/O, no clock, no randomness) so that a
clearing round can be replayed, tested with generated markets and benchmarked in isolation.

Why McAfee: it is dominant-strategy truthful for single-unit traders (a peer gains nothing by
misstating its price) and weakly budget-balanced (the market never pays out more than it takes in),
at the cost of at most one efficient trade per round. Two limits: a run wanting several peers is a
multi-unit buyer, and if its last unit is the (k+1)-th bid it sets the price its other units pay,
so it may gain by asking for fewer peers (demand reduction); and the VRAM assignment can leave a
priced pair unmatched, which McAfee's efficiency bound does not cover. The assignment never looks at
prices, so it adds no incentive to misstate them.

Exactness: prices are money, so every comparison that decides who trades and at what price is done
on exact integers counted in ``MarketConfig.price_quantum`` units ("quanta"). Each trader's price is
first moved onto that grid in the direction that protects the trader: a normalised ask is rounded
*up* (a seller never gets less than it asked for), a bid is rounded *down* (a buyer never pays more
than it offered). Prices that come out of the auction are therefore already on the grid.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from operator import itemgetter


@dataclass(frozen=True, slots=True)
class Ask:
    """An open offer: one peer selling its GPU time, one unit of supply.

    ``price_per_hour`` is money per GPU-hour; ``tflops`` (measured) and ``reliability`` (observed,
    0..1) turn it into money per *effective* TFLOP-hour, the unit all runs bid in.
    """

    account: str
    price_per_hour: Decimal
    tflops: float
    vram_gb: float
    reliability: float


@dataclass(frozen=True, slots=True)
class Bid:
    """A run wanting ``units`` more peers, paying at most ``max_price`` per effective TFLOP-hour."""

    run_id: str
    max_price: Decimal
    units: int
    min_vram_gb: float


@dataclass(frozen=True, slots=True)
class MarketConfig:
    """Clearing parameters; ``price_quantum`` is the money grid every reported price lies on."""

    price_quantum: Decimal = Decimal("0.000001")

    def __post_init__(self) -> None:
        if not (self.price_quantum.is_finite() and self.price_quantum > 0):
            raise ValueError(f"price_quantum must be a positive finite Decimal, got {self.price_quantum}")


@dataclass(frozen=True, slots=True)
class Match:
    """One peer booked for one run.

    The seller is paid ``price_per_hour`` per GPU-hour: ``unit_price * tflops * reliability`` rounded
    *up* to the quantum, so never below its ask. The buyer pays ``buyer_unit_price`` per effective
    TFLOP-hour of this peer (never above its bid, never below ``unit_price``).
    """

    run_id: str
    account: str
    unit_price: Decimal
    price_per_hour: Decimal
    buyer_unit_price: Decimal


@dataclass(frozen=True, slots=True)
class ClearingResult:
    """The outcome of one clearing round.

    ``clearing_price`` is what sellers receive per effective TFLOP-hour (in a uniform-price round also
    what buyers pay); ``None`` when no trade is priced. ``supply`` counts tradeable asks, ``demand``
    the units wanted by valid bids; ``excluded_asks`` / ``excluded_bids`` count orders left out
    (no capacity, a non-finite price, or a second order from the same account / run).
    """

    clearing_price: Decimal | None
    matches: tuple[Match, ...]
    supply: int
    demand: int
    reason: str
    excluded_asks: int = 0
    excluded_bids: int = 0


# A seller on the quantum grid: (normalised ask in quanta, account, the ask, capacity = tflops *
# reliability as an exact integer ratio (numerator, denominator)).
_Seller = tuple[int, str, Ask, int, int]
# A buyer on the quantum grid: (max price in quanta, the bid).
_Buyer = tuple[int, Bid]


@dataclass(frozen=True, slots=True)
class _Grid:
    """The price grid: ``quantum = num / den = coefficient * 10**exponent``."""

    num: int
    den: int
    coefficient: int
    exponent: int

    @classmethod
    def of(cls, quantum: Decimal) -> _Grid:
        _, digits, exponent = quantum.as_tuple()
        assert isinstance(exponent, int)  # MarketConfig guarantees a positive finite quantum
        return cls(*quantum.as_integer_ratio(), int("".join(map(str, digits))), exponent)

    def decimal(self, quanta: int) -> Decimal:
        """quanta * quantum as an exact Decimal (construction from a string never rounds)."""
        return Decimal(f"{quanta * self.coefficient}E{self.exponent}")


def clear(asks: Sequence[Ask], bids: Sequence[Bid], config: MarketConfig | None = None) -> ClearingResult:
    """Clear one round: McAfee trade reduction on prices, then a VRAM-feasible assignment.

    Steps: (1) normalise asks and expand bids into unit demands, both on the quantum grid; (2) k is
    the number of efficient trades (k-th highest unit bid >= k-th lowest ask); (3) if a (k+1)-th
    pair exists and p = (b_{k+1} + a_{k+1}) / 2 lies in [a_k, b_k], the k best pairs trade at p,
    otherwise the k-1 best pairs trade, buyers paying b_k and sellers receiving a_k; when no (k+1)-th
    pair exists (a thin market), all k trade at the price of ``_thin_market_price``; (4) the trading
    sellers are assigned to the trading runs respecting ``min_vram_gb`` (see ``_assign``).
    """
    grid = _Grid.of((config or MarketConfig()).price_quantum)
    return _clear(_supply(asks, grid), _demand(bids, grid), grid)


def clear_round(
    asks: Sequence[Ask], bids: Sequence[Bid], config: MarketConfig | None = None
) -> tuple[ClearingResult, dict[str, str | None]]:
    """:func:`clear`, and why each bid got fewer peers than it wanted (None for one that got them all),
    in the words a launcher acts on; one sort of the book serves both.

    The first cause that applies, looking at the bid alone: no open offer; no offer with the VRAM it
    needs; too few of those asking at most its price (the lowest ask above it, and the price that would
    reach the peers it wants); else the offers it could have had went to higher bids, or the round's
    trade reduction left its marginal trade out.
    """
    grid = _Grid.of((config or MarketConfig()).price_quantum)
    supply, demand = _supply(asks, grid), _demand(bids, grid)
    result = _clear(supply, demand, grid)
    return result, _shortfalls(supply[0], demand[0], bids, result, grid)


def _clear(
    supply: tuple[list[_Seller], int], demand_: tuple[list[_Buyer], int, int], grid: _Grid
) -> ClearingResult:
    sellers, excluded_asks = supply
    buyers, demand, excluded_bids = demand_

    def result(price: int | None, matches: tuple[Match, ...], reason: str) -> ClearingResult:
        excluded = ((excluded_asks, "asks"), (excluded_bids, "bids"))
        if notes := [f"{n} {what} excluded" for n, what in excluded if n]:
            reason = f"{reason} ({', '.join(notes)})"
        cleared = None if price is None else grid.decimal(price)
        return ClearingResult(cleared, matches, len(sellers), demand, reason, excluded_asks, excluded_bids)

    if not sellers:
        return result(None, (), "no asks")
    if demand == 0:
        return result(None, (), "no bids")

    # Unit demands, best first; more than len(sellers) + 1 of them can never matter.
    unit_bids: list[int] = []
    for price, bid in buyers:
        n = min(bid.units, len(sellers) + 1 - len(unit_bids))
        if n <= 0:
            break
        unit_bids += [price] * n
    unit_asks = list(map(itemgetter(0), sellers))

    # b is non-increasing and a non-decreasing, so "b_i < a_i" flips once: binary search for k.
    n_pairs = min(len(unit_bids), len(unit_asks))
    k = bisect_left(range(n_pairs), True, key=lambda i: unit_bids[i] < unit_asks[i])
    if k == 0:
        return result(
            None,
            (),
            f"no bid reaches the lowest ask (best bid {grid.decimal(unit_bids[0])}"
            f" < lowest ask {grid.decimal(unit_asks[0])})",
        )

    a_k, b_k = unit_asks[k - 1], unit_bids[k - 1]
    if k == n_pairs:
        price, source = _thin_market_price(unit_asks, unit_bids, k)
        matches = _matches(_first_units(buyers, k), sellers[:k], price, price, grid)
        trades = _count(len(matches), "trade")
        reason = f"thin market: {trades} at uniform price {grid.decimal(price)}, {source}"
        return result(price, matches, reason + _unmatched_note(k, matches))

    twice_p = unit_bids[k] + unit_asks[k]
    if 2 * a_k <= twice_p <= 2 * b_k:
        price = _half_even(twice_p)
        matches = _matches(_first_units(buyers, k), sellers[:k], price, price, grid)
        reason = f"{_count(len(matches), 'trade')} at uniform price {grid.decimal(price)}"
        return result(price, matches, reason + _unmatched_note(k, matches))
    p, ask, bid = grid.decimal(twice_p) / 2, grid.decimal(a_k), grid.decimal(b_k)
    matches = _matches(_first_units(buyers, k - 1), sellers[: k - 1], a_k, b_k, grid)
    reason = (
        f"trade reduction: {len(matches)} of {_count(k, 'trade')} at bid {grid.decimal(b_k)}"
        f" / ask {grid.decimal(a_k)} (candidate price {p} outside [{ask}, {bid}])"
    )
    return result(a_k if k > 1 else None, matches, reason + _unmatched_note(k - 1, matches))


def depth_for(asks: Sequence[Ask], bid: Bid, config: MarketConfig | None = None) -> tuple[int, int, int]:
    """How much of the book one bid can draw on: (tradeable offers, those with its VRAM, those of them
    asking at most its price)."""
    grid = _Grid.of((config or MarketConfig()).price_quantum)
    sellers, _ = _supply(asks, grid)
    buyers, _, _ = _demand([bid], grid)
    fit = _fit(sellers, bid)
    return len(sellers), len(fit), bisect_right(fit, buyers[0][0]) if buyers else 0


def _shortfalls(
    sellers: Sequence[_Seller],
    buyers: Sequence[_Buyer],
    bids: Sequence[Bid],
    result: ClearingResult,
    grid: _Grid,
) -> dict[str, str | None]:
    matched: dict[str, int] = {}
    for match in result.matches:
        matched[match.run_id] = matched.get(match.run_id, 0) + 1
    reasons: dict[str, str | None] = {bid.run_id: None for bid in bids}
    fits: dict[float, list[int]] = {}  # by min_vram_gb: most runs share a few values, so O(asks) each
    for price, bid in buyers:
        got = matched.get(bid.run_id, 0)
        if got >= bid.units:
            continue
        so_far = f"matched {got} of {bid.units} more peers wanted; " if got else ""
        fit = fits.get(bid.min_vram_gb)
        if fit is None:
            fit = fits[bid.min_vram_gb] = _fit(sellers, bid)
        if not sellers:
            why = "no open offers in the market"
        elif not fit:
            most = max(ask.vram_gb for _, _, ask, _, _ in sellers)
            why = (
                f"no offer has the {bid.min_vram_gb:g} GB of VRAM the run needs "
                f"({_count(len(sellers), 'open offer')}, with at most {most:g} GB)"
            )
        elif (affordable := bisect_right(fit, price)) < bid.units:
            reach = min(bid.units, len(fit))
            above = (
                f"; the lowest ask above it is {grid.decimal(fit[affordable])}, and a max price of "
                f"{grid.decimal(fit[reach - 1])} would reach {_count(reach, 'offer')}"
                if affordable < len(fit)
                else ""
            )
            why = (
                f"{_count(len(fit), 'offer')} with the VRAM, {affordable} asking at most the bid's "
                f"{grid.decimal(price)} per effective TFLOP-hour{above}"
            )
        else:
            why = (
                f"the bid reaches {_count(affordable, 'offer')} with the VRAM, but the round gave them to "
                f"higher bids or its trade reduction left them out ({result.reason})"
            )
        reasons[bid.run_id] = so_far + why
    return reasons


def _fit(sellers: Sequence[_Seller], bid: Bid) -> list[int]:
    """The normalised asks (cheapest first) of the sellers with the VRAM ``bid`` needs."""
    return [quanta for quanta, _, ask, _, _ in sellers if ask.vram_gb >= bid.min_vram_gb]


# Words in a thin-market reason when a trading order set its own price (the round is not truthful).
SET_BY_A_TRADER = "set by a trading order"


def _thin_market_price(unit_asks: list[int], unit_bids: list[int], k: int) -> tuple[int, str]:
    """The uniform price when one side is exhausted, so no (k+1)-th pair exists for McAfee.

    Textbook McAfee would drop a trade here, and in a small swarm (one run, a few peers) that means
    nothing ever trades. Instead all k efficient pairs trade at the first losing order's price when it
    lies within [a_k, b_k], which is still truthful (a (k+1)-th price auction); otherwise the marginal
    trading order's own price, or the midpoint when both sides are exhausted. Those last cases are not
    truthful for the marginal trader; the reason says so with SET_BY_A_TRADER.
    """
    a_k, b_k = unit_asks[k - 1], unit_bids[k - 1]
    if len(unit_asks) > k:  # every unit of demand trades; the cheapest losing ask is the reference
        if unit_asks[k] <= b_k:
            return unit_asks[k], "the first losing ask"
        return b_k, f"the last bid ({SET_BY_A_TRADER})"
    if len(unit_bids) > k:  # every seller trades; the best losing bid is the reference
        if unit_bids[k] >= a_k:
            return unit_bids[k], "the first losing bid"
        return a_k, f"the last ask ({SET_BY_A_TRADER})"
    return _half_even(a_k + b_k), f"the midpoint of the last ask and bid ({SET_BY_A_TRADER})"


def _supply(asks: Sequence[Ask], grid: _Grid) -> tuple[list[_Seller], int]:
    """Tradeable asks on the grid, cheapest first (ties by account), and how many were excluded.

    The normalised ask price_per_hour / (tflops * reliability) is computed exactly (Decimal and
    float both convert to integer ratios without loss) and rounded *up* to the grid. An ask without
    a positive finite capacity, a finite price and a VRAM >= 0 cannot trade. An account counts once
    (one peer = one unit): of several asks only its most competitive one stays, so no account can be
    booked twice in a round. This is the hot loop of a round (100k asks), hence inlined arithmetic
    and two stable sorts on plain keys.
    """
    best: dict[str, _Seller] = {}
    excluded = 0
    for ask in asks:
        tflops, reliability, price = ask.tflops, ask.reliability, ask.price_per_hour
        finite = price.is_finite() and ask.vram_gb >= 0  # False for NaN
        if not (finite and 0 < tflops < math.inf and 0 < reliability < math.inf):
            excluded += 1
            continue
        p_num, p_den = price.as_integer_ratio()
        t_num, t_den = tflops.as_integer_ratio()
        r_num, r_den = reliability.as_integer_ratio()
        cap_num, cap_den = t_num * r_num, t_den * r_den
        quanta = -((-p_num * cap_den * grid.den) // (p_den * cap_num * grid.num))
        seen = best.get(ask.account)
        if seen is not None:
            excluded += 1
            if _seller_rank(quanta, ask) >= _seller_rank(seen[0], seen[2]):
                continue
        best[ask.account] = (quanta, ask.account, ask, cap_num, cap_den)
    sellers = sorted(best.values(), key=itemgetter(1))
    sellers.sort(key=itemgetter(0))
    return sellers, excluded


def _seller_rank(quanta: int, ask: Ask) -> tuple[int, float, float, float, Decimal]:
    """Total order among one account's asks: cheapest, then the most capable."""
    return (quanta, -ask.vram_gb, -ask.tflops, -ask.reliability, ask.price_per_hour)


def _demand(bids: Sequence[Bid], grid: _Grid) -> tuple[list[_Buyer], int, int]:
    """Valid bids on the grid, highest first (ties by run_id), total units wanted, and exclusions.

    A bid is rounded *down* to the grid, so a run never pays more than it offered. A run counts
    once: of several bids only its most competitive one stays.
    """
    best: dict[str, _Buyer] = {}
    excluded = 0
    for bid in bids:
        if not (bid.max_price.is_finite() and bid.min_vram_gb == bid.min_vram_gb):  # NaN != NaN
            excluded += 1
            continue
        num, den = bid.max_price.as_integer_ratio()
        buyer = ((num * grid.den) // (den * grid.num), bid)
        seen = best.get(bid.run_id)
        if seen is not None:
            excluded += 1
            if _buyer_rank(buyer) >= _buyer_rank(seen):
                continue
        best[bid.run_id] = buyer
    buyers = sorted((b for b in best.values() if b[1].units > 0), key=lambda b: (-b[0], b[1].run_id))
    return buyers, sum(bid.units for _, bid in buyers), excluded


def _buyer_rank(buyer: _Buyer) -> tuple[int, int, float, Decimal]:
    """Total order among one run's bids: highest price, then most units, then least VRAM."""
    quanta, bid = buyer
    return (-quanta, -bid.units, bid.min_vram_gb, -bid.max_price)


def _first_units(buyers: Sequence[_Buyer], m: int) -> list[tuple[Bid, int]]:
    """The runs holding the best ``m`` unit demands, each with how many of them it holds."""
    runs = []
    for _, bid in buyers:
        if m <= 0:
            break
        runs.append((bid, min(bid.units, m)))
        m -= bid.units
    return runs


def _assign(runs: Sequence[tuple[Bid, int]], sellers: Sequence[_Seller]) -> list[tuple[Bid, _Seller]]:
    """Pair the runs (each wanting a number of peers) with ``sellers`` so that every seller has at
    least the run's ``min_vram_gb``.

    Runs are served most-demanding VRAM first and each takes the eligible sellers with the *least*
    VRAM (ties by account). Because eligibility is a threshold (vram >= min), these sets are nested
    and this best-fit greedy yields a maximum matching: a pair is left out only when no assignment
    could have served it. It also never looks at reported prices, so a trader cannot buy a better
    place in the assignment by misstating its price; that keeps McAfee's truthfulness (prices are
    uniform inside the trading set anyway). O(n log n): after sorting, sellers enter a stack in
    descending VRAM order as the threshold drops, and the top of the stack is always the best fit.
    """
    order = sorted(runs, key=lambda run: (-run[0].min_vram_gb, run[0].run_id))
    pool = sorted(sellers, key=itemgetter(1), reverse=True)  # two stable sorts: by VRAM, then by
    pool.sort(key=lambda s: s[2].vram_gb, reverse=True)  # account, both descending
    minus_vram = [-s[2].vram_gb for s in pool]  # ascending, for bisect

    pairs: list[tuple[Bid, _Seller]] = []
    eligible: list[_Seller] = []  # VRAM non-increasing from bottom to top
    pushed = 0
    for bid, wanted in order:
        reach = bisect_right(minus_vram, -bid.min_vram_gb)  # pool[:reach] have vram >= min_vram_gb
        eligible += pool[pushed:reach]
        pushed = max(pushed, reach)
        take = min(wanted, len(eligible))
        if take:
            pairs += [(bid, seller) for seller in reversed(eligible[-take:])]
            del eligible[-take:]
    return pairs


def _matches(
    runs: Sequence[tuple[Bid, int]],
    sellers: Sequence[_Seller],
    seller_quanta: int,
    buyer_quanta: int,
    grid: _Grid,
) -> tuple[Match, ...]:
    """Assign the trading sellers to the trading runs and price each pair."""
    unit_price, buyer_price = grid.decimal(seller_quanta), grid.decimal(buyer_quanta)
    return tuple(
        # unit_price * capacity in quanta, rounded up: the seller never gets below its ask per hour.
        Match(bid.run_id, account, unit_price, grid.decimal(-((-seller_quanta * num) // den)), buyer_price)
        for bid, (_, account, _, num, den) in _assign(runs, sellers)
    )


def _unmatched_note(trading: int, matches: tuple[Match, ...]) -> str:
    left = trading - len(matches)
    return f"; {_count(left, 'pair')} left unmatched by min_vram_gb" if left else ""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _half_even(twice: int) -> int:
    """twice / 2 rounded half to even: the candidate midpoint price on the quantum grid."""
    half, odd = divmod(twice, 2)
    return half + 1 if odd and half % 2 else half
