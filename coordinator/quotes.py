"""What a run would get from the market now and what it would cost (``launch --dry-run``): a pure function
of the book, the run's bid and spec, what this market has measured of the task, and the settings.

How the estimate is made, so that a launcher can judge it:

- **Who.** A clearing round is simulated over the open offers and the live runs' bids plus this one
  (:func:`coordinator.market.clear_round`); the peers it would get and their hourly prices are what the
  run would pay, and the round says why it would get fewer than it asks for.
- **How fast.** A step takes the slowest peer's compute for its share of ``batch.target`` plus one averaging
  round. ``measured``: the epoch times (report ``seconds``: compute and round) of recent accepted reports of
  runs with the same task, options and ``batch.target`` in this market: their mean (pay adds them up), and
  their 10th and 90th percentiles for the range. ``probe``: no such report yet, so compute comes from the
  matched offers' benchmark TFLOP/s at an assumed efficiency, with the FLOPs per sample the launcher's task
  counts, and the round from a prior (:class:`QuoteConfig`); the range is the middle figure divided and
  multiplied by ``spread``.
- **What it costs.** Each peer is paid its matched hourly price for the epochs it reports (the pay rule,
  :func:`coordinator.runs.report_pay`), so pay is the peers' hourly prices times the wall clock; audit fees
  add what the audited share of each report is paid again (:func:`coordinator.verification.audit_fee`): at
  least ``min_audits`` micro-batches, or ``rate`` of them, out of each peer's share.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from coordinator import market
from peer.protocol.money import PLACES
from peer.protocol.run_schemas import QuoteView
from peer.protocol.spec import RunSpec

#: The run id a quote's bid takes in the simulated round (never a real run's: those are run-HEX).
QUOTE_RUN = "quote"
#: Measured epoch times needed before they are trusted over the probe.
MIN_MEASURED = 3


@dataclass(frozen=True)
class QuoteConfig:
    """The probe's assumptions (:class:`coordinator.settings.ServerSettings`: ``quote_*``)."""

    round_seconds: float = 0.2
    efficiency: float = 0.3
    spread: float = 3.0


def quote(
    asks: Sequence[market.Ask],
    bids: Sequence[market.Bid],
    bid: market.Bid,
    spec: RunSpec,
    measured: Sequence[float],
    flops_per_sample: float | None,
    config: QuoteConfig,
    market_config: market.MarketConfig | None = None,
) -> QuoteView:
    """The quote for ``bid`` (its ``run_id`` is :data:`QUOTE_RUN`) with ``spec``, given ``measured``
    epoch seconds of this task and batch in this market (newest first, any number)."""
    book = [*bids, bid]
    result, shortfalls = market.clear_round(asks, book, market_config)
    mine = [m for m in result.matches if m.run_id == bid.run_id]
    open_offers, with_vram, affordable = market.depth_for(asks, bid, market_config)
    reason = shortfalls[bid.run_id]
    per_hour = sum((m.price_per_hour for m in mine), Decimal(0))
    target = spec.batch.target
    steps = math.ceil((spec.stop.samples or 0) / target)
    (fast, mid, slow), basis, note = _step_seconds(mine, asks, spec, measured, flops_per_sample, config)
    share = _audit_share(spec, len(mine))

    def cost(step: float) -> Decimal:
        return _money(per_hour * Decimal(steps * step) / 3600 * Decimal(1 + share))

    def speed(step: float) -> float:
        return target / step if step > 0 else 0.0

    return QuoteView(
        offers_open=open_offers,
        offers_with_vram=with_vram,
        offers_affordable=affordable,
        peers=len(mine),
        reason=reason,
        unit_price=mine[0].unit_price if mine else None,
        price_per_hour=per_hour,
        basis=basis,
        basis_note=note,
        steps=steps,
        samples_per_second=(speed(slow), speed(mid), speed(fast)),
        seconds=(steps * fast, steps * mid, steps * slow),
        cost=(cost(fast), cost(mid), cost(slow)),
        audit_share=share,
    )


def _step_seconds(
    mine: Sequence[market.Match],
    asks: Sequence[market.Ask],
    spec: RunSpec,
    measured: Sequence[float],
    flops_per_sample: float | None,
    config: QuoteConfig,
) -> tuple[tuple[float, float, float], str, str]:
    """(low, mid, high) seconds a step takes, the basis and what it rests on."""
    what = f"{spec.task} with batch.target {spec.batch.target}"
    if not mine:
        return (0.0, 0.0, 0.0), "probe", "no peer would match now: no time or cost to estimate"
    if len(measured) >= MIN_MEASURED:
        # Pay adds every epoch's time, so the middle figure is their mean; the range their 10th and 90th
        # percentiles (widened to the mean when a few slow epochs pull it outside).
        cuts = statistics.quantiles(measured, n=10, method="inclusive")
        mean = statistics.fmean(measured)
        return (
            (min(cuts[0], mean), mean, max(cuts[-1], mean)),
            "measured",
            f"the epoch times of the last {len(measured)} accepted reports of {what} in this market",
        )
    tflops = {ask.account: ask.tflops for ask in asks}
    slowest = min(tflops[m.account] for m in mine)
    share = spec.batch.target / len(mine)
    if flops_per_sample is None:
        compute, counted = 0.0, "compute left out (no FLOPs per sample given)"
    else:
        compute = share * flops_per_sample / (slowest * 1e12 * config.efficiency)
        counted = (
            f"compute {compute:.3g} s a step from the slowest matched offer's probe, {slowest:g} TFLOP/s, "
            f"at {config.efficiency:.0%} efficiency"
        )
    mid = compute + config.round_seconds
    note = (
        f"the probe's figure: {counted}, plus a {config.round_seconds:g} s averaging round; no accepted "
        f"report of {what} in this market yet"
    )
    return (mid / config.spread, mid, mid * config.spread), "probe", note


def _audit_share(spec: RunSpec, peers: int) -> float:
    """The expected share of a report's samples that audits recompute, each paid again as a fee."""
    rule = spec.verification
    if peers == 0 or rule.rate == 0:
        return 0.0
    micro = math.ceil(spec.batch.target / peers / spec.batch.per_peer)
    return min(micro, max(rule.min_audits, rule.rate * micro)) / micro


def _money(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-PLACES), rounding=ROUND_HALF_UP)
