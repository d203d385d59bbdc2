"""Checking the checkers against a real coordinator (SQLite and PostgreSQL): canaries, audits whose answer
the coordinator already holds, catch a validator that answers without recomputing; its fees are held
until it passes one and forfeit when it is banned from validating; a canary never changes its source
report's pay; claims come in an order drawn under the run's key. See docs/verification.md."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from coordinator.verification import claim_rank
from peer.protocol.client import CoordinatorError
from peer.protocol.run_schemas import AuditResultBody, AuditTask, ReportBody, RunView
from tests.conftest import Databases
from tests.harness import CoordinatorProcess, query_db
from tests.test_runs_api import Market, Peer, market_on, peer_of, report, start, stop, wait_for_clock

#: every epoch carries a canary (a block of one epoch), so that each claim's content is known
CANARIES = {"rate": 0.03, "min_audits": 2, "ban_after": 2, "canary_rate": 1, "canary_window": 4}


@pytest.fixture
def server(tmp_path: Path, databases: Databases) -> Iterator[CoordinatorProcess]:
    process = start(tmp_path, databases.url())
    try:
        yield process
    finally:
        stop(process)


@pytest.fixture
async def market(server: CoordinatorProcess) -> AsyncIterator[Market]:
    async with market_on(server, "100") as market:
        yield market


def right(body: ReportBody, index: int) -> AuditResultBody:
    claim = body.micro_batches[index]
    return AuditResultBody(sketch=[x * (1 + 1e-6) for x in claim.sketch], loss=claim.loss)


def made_up(body: ReportBody, index: int) -> AuditResultBody:
    """What a validator that never recomputes sends when it cannot learn the claim."""
    return AuditResultBody(sketch=[1.0, -1.0] * 16, loss=0.5)


async def three_peer_run(market: Market, a: Peer, b: Peer, c: Peer) -> RunView:
    run = await market.launch(peers=(3, 3), target=100000, verification=CANARIES)
    await market.clear()
    for peer in (a, b, c):
        await peer.join(run.id)
    await wait_for_clock(time.time() + 0.3)  # reports are paid for compute time since the join
    return run


async def test_canaries_ban_a_validator_that_does_not_recompute_and_it_keeps_no_fee(market: Market) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c:
        run = await three_peer_run(market, a, b, c)
        bodies = {epoch: report(epoch, samples=6, seconds=0.2) for epoch in range(3)}
        await a.client.report(run.id, bodies[0])
        first = await c.client.claim_audits(run.id, 8)
        assert {t.epoch for t in first} == {0} and len(first) == 2  # nothing decided yet: no canary
        for t in first:
            assert (await c.client.submit_audit(run.id, t.id, right(bodies[0], t.index))).state == "passed"
        (paid,) = await a.client.reports(run.id)
        assert paid.pay_state == "paid"
        # a paid report that can still serve as a canary's source shows no claim
        assert {(m.sketch, m.loss) for m in paid.micro_batches} == {(None, None)}
        view = await market.run(run.id)
        assert peer_of(view, c.account).fees == 0 and peer_of(view, c.account).fees_held > 0  # held
        assert view.held == peer_of(view, c.account).fees_held

        faked: list[AuditTask] = []
        for epoch in (1, 2):
            await a.client.report(run.id, bodies[epoch])
            tasks = await b.client.claim_audits(run.id, 8)
            canaries = [t for t in tasks if t.epoch == 0]
            real = [t for t in tasks if t.epoch == epoch]
            assert len(canaries) == 1 and len(real) == 2 and len(tasks) == 3, tasks
            canary = canaries[0]
            # it reads like any audit: a task of a's report of epoch 0, not shown in the run's audit list
            assert canary.id.startswith("audit-") and canary.account == a.account
            assert canary.ids == bodies[0].micro_batches[canary.index].ids
            assert canary.param_sketch == bodies[0].param_sketch
            assert canary.id not in [x.id for x in await market.client.audits(run.id)]
            for t in real:  # the lazy validator learnt these claims (a leak): they pass
                await b.client.submit_audit(run.id, t.id, right(bodies[epoch], t.index))
            faked.extend(real)
            decided = await b.client.submit_audit(run.id, canary.id, made_up(bodies[0], canary.index))
            assert decided.state == "failed" and decided.reason.startswith("canary: gradient sketch is")
            assert decided.fee == 0 and decided.canary_of is not None
        view = await market.run(run.id)
        lazy = peer_of(view, b.account)
        assert (lazy.canaries_failed, lazy.canaries_passed) == (2, 0)
        assert lazy.validator_ban is not None and "2 canary audits answered wrongly" in lazy.validator_ban
        assert lazy.fees == 0 and lazy.fees_held == 0  # the fees of the audits it faked are forfeit
        assert lazy.state == "active"  # banned from validating only: it still trains and reports
        with pytest.raises(CoordinatorError) as caught:
            await b.client.claim_audits(run.id, 8)
        error = caught.value
        assert (error.status, error.code, error.field) == (403, "validator_banned", "run_id")
        assert "may no longer validate" in error.message and "ban after 2" in error.message
        assert (await b.client.report(run.id, report(0, samples=6))).pay_state == "held"  # b's own work
        # the canaries' source report kept its pay, and a's standing is what its real audits made it
        reports = {r.epoch: r for r in await a.client.reports(run.id) if r.account == a.account}
        assert reports[0].pay_state == "paid" and reports[0].paid == paid.paid
        assert (peer_of(view, a.account).audits_passed, peer_of(view, a.account).audits_failed) == (6, 0)
        audits = await market.client.audits(run.id)
        assert sum(1 for x in audits if x.canary_of) == 2  # decided canaries are listed
        assert all(x.validator == b.account for x in audits if x.id in {t.id for t in faked})
        audit = await market.client.audit()
        assert audit.conserved, audit


async def test_a_right_canary_pays_its_fee_and_the_held_ones_and_the_run_end_pays_the_rest(
    market: Market,
) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c:
        run = await three_peer_run(market, a, b, c)
        body0, body1 = report(0, samples=6, seconds=0.2), report(1, samples=6, seconds=0.2)
        await a.client.report(run.id, body0)
        for t in await c.client.claim_audits(run.id, 8):
            await c.client.submit_audit(run.id, t.id, right(body0, t.index))
        await a.client.report(run.id, body1)
        tasks = await b.client.claim_audits(run.id, 8)
        (canary,) = [t for t in tasks if t.epoch == 0]
        for t in tasks:
            if t is not canary:
                await b.client.submit_audit(run.id, t.id, right(body1, t.index))
        held = peer_of(await market.run(run.id), b.account).fees_held
        assert held > 0
        for epoch in range(2, 7):  # the run moves past the window (4): epoch 0 is no longer a source
            await a.client.report(run.id, report(epoch, samples=6, seconds=0.01))

        async def epoch_0() -> list[tuple[object, object]]:
            listed = [r for r in await c.client.reports(run.id) if (r.account, r.epoch) == (a.account, 0)]
            return [(m.sketch, m.loss) for m in listed[0].micro_batches]

        assert set(await epoch_0()) == {(None, None)}  # but b's canary of it is not answered yet
        decided = await b.client.submit_audit(run.id, canary.id, right(body0, canary.index))
        assert decided.state == "passed" and decided.fee > 0
        assert await epoch_0() == [(m.sketch, m.loss) for m in body0.micro_batches]  # shown now
        view = await market.run(run.id)
        honest = peer_of(view, b.account)
        assert honest.canaries_passed == 1 and honest.fees_held == 0 and honest.fees == held + decided.fee
        assert peer_of(view, a.account).audits_passed == 4  # the canary is not an audit of a's work
        # c was never given a canary: its fees stay held until the run ends, then they are paid
        kept = peer_of(view, c.account).fees_held
        assert kept > 0 and peer_of(view, c.account).fees == 0
        await market.client.cancel_run(run.id)
        ended = await market.until(run.id, "the run's end", lambda v: v.state == "cancelled")
        assert peer_of(ended, c.account).fees == kept and peer_of(ended, c.account).fees_held == 0
        assert ended.held == 0
        audit = await market.client.audit()
        assert audit.conserved, audit


async def test_claims_are_drawn_under_the_run_key_and_a_report_is_never_judged_by_its_own_account(
    market: Market,
) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c:
        run = await three_peer_run(market, a, b, c)
        bodies = [report(0, samples=24, seconds=0.2), report(0, samples=24, seconds=0.01)]
        await a.client.report(run.id, bodies[0].model_copy(update={"micro_batches": _split(bodies[0], 8)}))
        await c.client.report(run.id, bodies[1].model_copy(update={"micro_batches": _split(bodies[1], 8)}))
        ((key,),) = query_db(market.server.db_url, f"SELECT audit_key FROM runs WHERE id = '{run.id}'")
        tasks = await b.client.claim_audits(run.id, 3)
        pending = [x for x in await market.client.audits(run.id) if x.state == "pending"]
        assert len(pending) == 4 and len(tasks) == 3
        ranked = sorted(pending, key=lambda x: claim_rank(bytes.fromhex(key), b.account, x.id))
        assert [t.id for t in tasks] == [x.id for x in ranked[:3]]  # the key's order, not the oldest first
        # b fails one of a's micro-batches; the second opinion goes to c, never to a, the audited account
        of_a = next(t for t in tasks if t.account == a.account)  # a has two of the four: one is among three
        pending_view = await b.client.submit_audit(run.id, of_a.id, made_up(bodies[0], of_a.index))
        assert pending_view.state == "pending" and pending_view.first_failure is not None
        assert of_a.id not in [t.id for t in await a.client.claim_audits(run.id, 8)]
        assert of_a.id in [t.id for t in await c.client.claim_audits(run.id, 8)]


def _split(body: ReportBody, parts: int) -> list:
    """``body``'s samples in ``parts`` micro-batches (so that its report draws only ``min_audits``)."""
    ids = [i for b in body.micro_batches for i in b.ids]
    size = len(ids) // parts
    base = body.micro_batches[0]
    return [
        base.model_copy(update={"ids": ids[i * size : (i + 1) * size], "sketch": [float(i + 1), -1.0] * 16})
        for i in range(parts)
    ]
