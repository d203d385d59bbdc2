"""Delivered capacity (coordinator.capacity) through the signed API, on SQLite and PostgreSQL: a peer whose
offer claims four times the TFLOP/s of the peers beside it, reporting the same work in the same compute
time, is flagged ``short`` within 3 reports, re-rated, paid no more per sample than they are and loses
reputation, while they are never flagged; honest peers of 1x, 2x and 3x, each reporting its compute time,
are neither cut nor flagged, nor is anyone when one peer reports a tiny ``seconds``; a peer whose
heartbeats report throttling with a clock ratio that explains its shortfall is re-rated and flagged
``throttled`` without losing reputation, one that reports throttling without a clock ratio is ``short``.
The market, its peers and fast leases are tests/test_runs_api.py's.

Every report is sent once the wall clock has passed its ``seconds`` since the peer's previous report (or
its join), so that each is billed exactly its ``seconds`` and the peers' measured rates differ by what they
claim and deliver alone, not by the timing of the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from coordinator import verification
from peer.launch import print_run
from peer.protocol.run_schemas import RunPeerView, RunView
from peer.protocol.schemas import HardwareSummary, OfferBody, OfferView, Telemetry
from tests.conftest import Databases
from tests.test_runs_api import (
    AUDITED,
    H100,
    HEARTBEAT,
    Market,
    Peer,
    _answer,
    own_market,
    peer_of,
    report,
    wait_for_clock,
)

pytestmark = pytest.mark.timeout(120)

LIE = 4.0  # how many times an honest H100's TFLOP/s the liar claims
SAMPLES = 8  # per report of a peer that delivers what it claims
SECONDS = 0.3  # the compute time a report of a share on an honest H100 claims
EPOCHS = 6  # enough for the later reports to make up for a first one paid before any comparison


@pytest.fixture
async def market(tmp_path: Path, databases: Databases) -> AsyncIterator[Market]:
    async with own_market(tmp_path, databases, "100") as market:
        yield market


class RatedPeer(Peer):
    """A :class:`tests.test_runs_api.Peer` whose offer claims ``tflops`` and whose heartbeats carry
    ``telemetry`` once :meth:`throttle` is called, as ``hivemarket rent`` sends NVML's readings."""

    def __init__(self, url: str, tflops: float = H100.tflops, price: str = "1.00"):
        super().__init__(url, price)
        self.hardware: HardwareSummary = H100.model_copy(update={"tflops": tflops})
        self.telemetry: Telemetry | None = None
        self.throttling_reported = asyncio.Event()  # a heartbeat sent with throttling has been answered

    async def __aenter__(self) -> RatedPeer:
        await self.client.__aenter__()
        offer = await self.client.post_offer(OfferBody(price_per_hour=self.price, hardware=self.hardware))
        self.lease_id = offer.lease.id
        self._beats = asyncio.create_task(self._heartbeat())
        return self

    async def _heartbeat(self) -> None:
        while True:
            telemetry = self.telemetry
            await self.client.heartbeat(self.lease_id, telemetry)
            if telemetry is not None and telemetry.throttled:
                self.throttling_reported.set()
            await asyncio.sleep(HEARTBEAT / 4)

    async def throttle(self, clock_ratio: float | None, timeout: float = 10.0) -> None:
        """Report throttling from now on (at ``clock_ratio``, or None: without one) and wait until the
        coordinator has taken a heartbeat saying so."""
        self.telemetry = Telemetry(power_w=300.0, throttled=True, clock_ratio=clock_ratio)
        await asyncio.wait_for(self.throttling_reported.wait(), timeout)


class Pace:
    """Sends each peer's reports one epoch after another, each billed exactly ``SECONDS``."""

    def __init__(self, market: Market, run_id: str):
        self.market, self.run_id = market, run_id
        self.since: dict[str, float] = {}  # account -> its previous report's acceptance, or its join

    async def join(self, *peers: Peer) -> None:
        for p in peers:
            joined = peer_of(await p.join(self.run_id), p.account).joined_at
            assert joined is not None
            self.since[p.account] = joined

    async def report(
        self, peer: Peer, epoch: int, samples: int = SAMPLES, seconds: float = SECONDS
    ) -> RunView:
        """``peer``'s report of ``epoch``, claiming ``seconds`` of compute; the run's view after it."""
        await wait_for_clock(self.since[peer.account] + seconds)  # billed: min(seconds, wall clock) = seconds
        accepted = await peer.client.report(self.run_id, report(epoch, samples, seconds=seconds))
        self.since[peer.account] = accepted.accepted_at
        return await self.market.run(self.run_id)


async def offers_of(market: Market) -> dict[str, OfferView]:
    return {o.account: o for o in await market.client.offers()}


def per_sample(p: RunPeerView) -> Decimal:
    """What a match was paid per sample of its paid reports (every report: the run is not audited)."""
    assert p.samples > 0, p
    return p.paid / p.samples


async def test_a_peer_claiming_4x_is_flagged_short_rerated_and_paid_for_what_it_delivers(
    market: Market, capsys: pytest.CaptureFixture[str]
) -> None:
    url = market.server.url
    async with RatedPeer(url) as a, RatedPeer(url) as b, RatedPeer(url, H100.tflops * LIE) as liar:
        run = await market.launch(peers=(3, 3), target=1000)
        await market.clear()
        view = await market.run(run.id)
        assert {p.account: p.tflops for p in view.peers} == {
            a.account: H100.tflops,
            b.account: H100.tflops,
            liar.account: H100.tflops * LIE,
        }  # each match is priced on what its offer claimed
        assert peer_of(view, liar.account).price_per_hour > 3 * peer_of(view, a.account).price_per_hour
        before = await offers_of(market)
        pace = Pace(market, run.id)
        await pace.join(a, b, liar)

        flagged_at = None  # the liar's report count when it was first flagged
        for epoch in range(EPOCHS):
            for p in (liar, a, b):  # the liar reports first, its very first report before any comparison
                view = await pace.report(p, epoch)
                for honest in (a, b):
                    assert peer_of(view, honest.account).capacity_flag is None, view
                if p is liar and flagged_at is None and peer_of(view, liar.account).capacity_flag:
                    flagged_at = epoch + 1
        assert flagged_at is not None and flagged_at <= 3, flagged_at

        mine, theirs = peer_of(view, liar.account), [peer_of(view, p.account) for p in (a, b)]
        assert mine.capacity_flag == "short" and mine.capacity_ratio == pytest.approx(1 / LIE)
        assert mine.capacity_reason is not None and "without throttling" in mine.capacity_reason
        assert all(p.capacity_ratio == pytest.approx(1.0) for p in theirs), theirs
        assert mine.samples == theirs[0].samples == EPOCHS * SAMPLES
        # claimed 4x, matched at 4x the hourly price: paid per sample what an honest peer is, not 4x
        honest = min(per_sample(p) for p in theirs)
        assert per_sample(mine) <= Decimal("1.1") * honest, (per_sample(mine), honest)

        # re-rated at what it delivered, its claim kept; the honest offers untouched
        after = await offers_of(market)
        rerated = after[liar.account]
        assert rerated.capacity_flag == "short" and rerated.claimed_tflops == H100.tflops * LIE
        assert rerated.tflops == pytest.approx(H100.tflops)
        assert rerated.capacity_reason is not None and rerated.capacity_reason.startswith(f"run {run.id}:")
        for p in (a, b):
            assert after[p.account].capacity_flag is None and after[p.account].claimed_tflops is None
            assert after[p.account].tflops == H100.tflops
            assert after[p.account].reliability >= before[p.account].reliability  # uptime only grows
        # a shortfall weighs as one failed audit, once for the match however many reports follow it
        drop = rerated.reliability / before[liar.account].reliability
        one_failure = verification.reputation(0, 1)
        assert one_failure <= drop < one_failure * 1.05, drop
        assert {p.account: p.capacity_flag for p in await market.client.peers()}[liar.account] == "short"

        # `runs show` prints the flag and the measurement behind it
        print_run(view)
        shown = capsys.readouterr().out
        assert f"short {1 / LIE:.2f}x" in shown and f"{liar.account[:12]} short: delivered 25%" in shown

        # posting its claim again does not take it back: a short offer keeps its measured capacity and flag
        again = await liar.client.post_offer(OfferBody(price_per_hour=liar.price, hardware=liar.hardware))
        assert again.offer.tflops == pytest.approx(H100.tflops)
        assert (again.offer.claimed_tflops, again.offer.capacity_flag) == (H100.tflops * LIE, "short")
        assert (await offers_of(market))[liar.account].capacity_reason == rerated.capacity_reason
        await market.conserved()


async def test_a_peer_reporting_throttling_is_rerated_and_flagged_throttled_without_penalty(
    market: Market,
) -> None:
    url = market.server.url
    async with RatedPeer(url) as a, RatedPeer(url) as b, RatedPeer(url) as hot:
        run = await market.launch(peers=(3, 3), target=1000)
        await market.clear()
        before = await offers_of(market)
        await hot.throttle(clock_ratio=0.25)  # it heats up once matched: its clocks are held down
        pace = Pace(market, run.id)
        await pace.join(a, b, hot)
        for epoch in range(3):
            for p in (a, b, hot):  # the throttled GPU gets through a quarter of the samples in the time
                view = await pace.report(p, epoch, SAMPLES // 4 if p is hot else SAMPLES)
        mine = peer_of(view, hot.account)
        assert mine.capacity_flag == "throttled" and mine.capacity_ratio == pytest.approx(0.25)
        assert mine.capacity_reason is not None and "reported throttling" in mine.capacity_reason
        assert all(peer_of(view, p.account).capacity_flag is None for p in (a, b)), view
        # paid for the capacity it delivered (with the tolerance's slack), not for the one it claimed
        honest = min(per_sample(peer_of(view, p.account)) for p in (a, b))
        assert per_sample(mine) <= Decimal("1.1") * honest, (per_sample(mine), honest)

        after = await offers_of(market)
        rerated = after[hot.account]
        assert rerated.capacity_flag == "throttled" and rerated.claimed_tflops == H100.tflops
        assert rerated.tflops == pytest.approx(H100.tflops / 4)
        # explained by throttling: no shortfall, its reputation is whole (uptime only grows)
        assert rerated.reliability >= before[hot.account].reliability
        await market.conserved()


async def test_throttling_reported_without_a_clock_ratio_explains_nothing(market: Market) -> None:
    """An over-claimer whose heartbeats say "throttled" but give no clock ratio is flagged ``short``, loses
    reputation, and posting its claim again does not take the re-rating back."""
    url = market.server.url
    async with RatedPeer(url) as a, RatedPeer(url) as b, RatedPeer(url, H100.tflops * LIE) as liar:
        run = await market.launch(peers=(3, 3), target=1000)
        await market.clear()
        before = await offers_of(market)
        await liar.throttle(clock_ratio=None)
        pace = Pace(market, run.id)
        await pace.join(a, b, liar)
        for epoch in range(3):
            for p in (a, b, liar):
                view = await pace.report(p, epoch)
        mine = peer_of(view, liar.account)
        assert mine.capacity_flag == "short" and mine.capacity_ratio == pytest.approx(1 / LIE)
        assert mine.capacity_reason is not None and "without a clock ratio" in mine.capacity_reason
        rerated = (await offers_of(market))[liar.account]
        assert rerated.reliability < before[liar.account].reliability  # a shortfall, held against it
        again = await liar.client.post_offer(OfferBody(price_per_hour=liar.price, hardware=liar.hardware))
        assert again.offer.tflops == pytest.approx(H100.tflops) and again.offer.capacity_flag == "short"
        await market.conserved()


async def test_a_peer_reporting_a_tiny_seconds_cuts_no_one_and_peers_of_every_size_are_paid_alike(
    market: Market,
) -> None:
    """Honest peers of 1x, 2x and 3x an H100 train the same share in their compute times (``SECONDS``,
    ``SECONDS / 2``, ``SECONDS / 3``) beside one that reports a hundredth of its compute time: no one is
    flagged or cut, and the three honest ones are paid alike per sample (the 3x for a third of the time at
    three times the price)."""
    url = market.server.url
    sizes = (1, 2, 3)
    async with (
        RatedPeer(url, H100.tflops) as x1,
        RatedPeer(url, H100.tflops * 2) as x2,
        RatedPeer(url, H100.tflops * 3) as x3,
        RatedPeer(url) as tiny,
    ):
        honest = dict(zip((x1, x2, x3), sizes, strict=True))
        run = await market.launch(peers=(4, 4), target=1000)
        await market.clear()
        pace = Pace(market, run.id)
        await pace.join(x1, x2, x3, tiny)
        for epoch in range(3):
            for p in (tiny, x1, x2, x3):  # the tiny one first: every later report is measured beside it
                seconds = SECONDS / 100 if p is tiny else SECONDS / honest[p]
                view = await pace.report(p, epoch, seconds=seconds)
                for q in (x1, x2, x3):
                    mine = peer_of(view, q.account)
                    assert mine.capacity_flag is None and mine.capacity_ratio in (None, 1.0), view
        peers = [peer_of(view, p.account) for p in (x1, x2, x3)]
        assert all(p.capacity_ratio == 1.0 for p in peers), peers
        assert peer_of(view, tiny.account).capacity_flag is None
        paid = [per_sample(p) for p in peers]
        assert max(paid) / min(paid) < Decimal("1.05"), paid  # the old rule for each: no cut
        await market.conserved()


async def test_peers_whose_work_failed_an_audit_set_no_reference(market: Market) -> None:
    """Two free-riders beside two honest peers: they compute nothing, so their ``seconds`` are next to
    nothing and they would be the majority of an honest peer's others, its reference a hundred times its
    rate. Once an audit of their work failed (one failed epoch: not banned yet), they no longer count, and
    the honest peers are neither flagged nor cut."""
    url = market.server.url
    async with RatedPeer(url) as a, RatedPeer(url) as b, RatedPeer(url) as f1, RatedPeer(url) as f2:
        run = await market.launch(peers=(4, 4), target=1000, verification=AUDITED)
        await market.clear()
        pace = Pace(market, run.id)
        await pace.join(a, b, f1, f2)
        bodies = {}
        for f in (f1, f2):
            await pace.report(f, 0, seconds=SECONDS / 100)
            bodies[f.account] = report(0, SAMPLES, seconds=SECONDS / 100)
        for validator in (a, b):  # their epoch 0 was made up: a finds it, b confirms it
            for task in await validator.client.claim_audits(run.id, 8):
                answer = _answer(bodies[task.account], task.index, wrong=True)
                await validator.client.submit_audit(run.id, task.id, answer)
        view = await market.run(run.id)
        for f in (f1, f2):
            assert peer_of(view, f.account).state == "active" and peer_of(view, f.account).audits_failed, view
        for epoch in range(3):
            for p in (a, b):
                view = await pace.report(p, epoch)
                mine = peer_of(view, p.account)
                assert mine.capacity_flag is None and mine.capacity_ratio is None, view
        await market.conserved()


async def rerate_throttled(market: Market, a: RatedPeer, b: RatedPeer, hot: RatedPeer) -> None:
    """A run of the three, ``hot`` throttled to a quarter of its clocks (and still reporting it) delivering
    a quarter of their samples until it is re-rated ``throttled``; then cancelled: its peers are back in
    the book."""
    run = await market.launch(peers=(3, 3), target=1000)
    await market.clear()
    await hot.throttle(clock_ratio=0.25)
    pace = Pace(market, run.id)
    await pace.join(a, b, hot)
    for epoch in range(3):
        for p in (a, b, hot):
            view = await pace.report(p, epoch, SAMPLES // 4 if p is hot else SAMPLES)
    assert peer_of(view, hot.account).capacity_flag == "throttled", view
    await market.client.cancel_run(run.id)
    rerated = (await offers_of(market))[hot.account]
    assert (rerated.capacity_flag, rerated.claimed_tflops) == ("throttled", H100.tflops)
    assert rerated.tflops == pytest.approx(H100.tflops / 4)  # what it delivered at a quarter of its clocks


async def test_a_rerated_throttled_offer_is_not_weighed_by_its_clock_ratio_again(market: Market) -> None:
    url = market.server.url
    # the throttled peer asks little, so that the next run takes it whatever capacity it is priced on
    async with RatedPeer(url) as a, RatedPeer(url) as b, RatedPeer(url, price="0.10") as hot:
        await rerate_throttled(market, a, b, hot)
        run = await market.launch(peers=(3, 3), target=1000)
        await market.clear()  # its heartbeats still say clock ratio 0.25
        view = await market.run(run.id)
        mine, honest = peer_of(view, hot.account), peer_of(view, a.account)
        # priced on what it delivered throttled (a quarter of an H100), not on a quarter of that again
        assert mine.tflops == pytest.approx(H100.tflops / 4) and honest.tflops == H100.tflops, view
        ratio = mine.price_per_hour / honest.price_per_hour  # one unit price; their standings are alike
        assert Decimal("0.2") < ratio <= Decimal("0.3"), ratio
        await market.conserved()


async def test_a_throttled_peer_posting_a_fresh_probe_is_rated_on_it_and_its_flag_cleared(
    market: Market,
) -> None:
    url = market.server.url
    async with RatedPeer(url) as a, RatedPeer(url) as b, RatedPeer(url) as hot:
        await rerate_throttled(market, a, b, hot)
        before = (await offers_of(market))[hot.account]
        # cooled down, it probes again and posts its offer, as `rent` does when it starts again
        hot.telemetry = Telemetry(power_w=300.0, throttled=False, clock_ratio=1.0)
        probe = H100.tflops * 0.9
        hardware = H100.model_copy(update={"tflops": probe})
        posted = await hot.client.post_offer(OfferBody(price_per_hour=hot.price, hardware=hardware))
        for offer in (posted.offer, (await offers_of(market))[hot.account]):
            assert offer.tflops == probe, offer
            assert (offer.claimed_tflops, offer.capacity_flag, offer.capacity_reason) == (None, None, None)
            assert offer.reliability >= before.reliability  # never held against it
        assert {p.account: p.capacity_flag for p in await market.client.peers()}[hot.account] is None
        await market.conserved()
