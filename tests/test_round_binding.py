"""The coordinator's check of fast-path round commitments against each member's own report
(coordinator.round_store, peer.protocol.commitment), through the signed API on SQLite and PostgreSQL: a
member that reports honestly but sent, and committed to, another update into the round fails the epoch
like a cheat caught by an audit, whoever forwards its commitment and whichever arrives first; an honest
member is never failed; a forged or misdated commitment is refused with the report that carries it.
The market, its peers and fast leases are tests/test_runs_api.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peer.protocol.commitment import Commitment, binding, claim_digest
from peer.protocol.run_schemas import BlameBody, ReportBody, RoundCommitment
from peer.protocol.sketch import SKETCH_DIMS
from tests.conftest import Databases
from tests.test_groups_api import checkin, running
from tests.test_runs_api import AUDITED, Market, Peer, own_market, peer_of, refused, report

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def market(tmp_path: Path, databases: Databases) -> AsyncIterator[Market]:
    async with own_market(tmp_path, databases, "100") as market:
        yield market


def committed(run_id: str, peer: Peer, body: ReportBody, *, scale: float = 1.0) -> RoundCommitment:
    """``peer``'s signed commitment to ``scale`` times the update its report ``body`` adds up to (1: what
    an honest member sends; -4: peer.adversary's poisoned-round)."""
    total = sum(len(m.ids) for m in body.micro_batches)
    mean = [sum(len(m.ids) * m.sketch[d] for m in body.micro_batches) / total for d in range(SKETCH_DIMS)]
    claim = claim_digest([(m.ids, m.sketch) for m in body.micro_batches])
    update = tuple(scale * x for x in mean)
    c = Commitment(1, body.epoch, 0, float(total), update, tuple(body.param_sketch), claim)
    return RoundCommitment(account=peer.account, commitment=c.signed(run_id, peer.identity).encode().hex())


def with_round(body: ReportBody, *commitments: RoundCommitment) -> ReportBody:
    return body.model_copy(update={"round": list(commitments)})


def test_binding_accepts_rounding_and_refuses_another_update() -> None:
    micro = [(3, [0.5, -0.25] * 16), (1, [0.125, 1.0] * 16)]
    mean = [(3 * a + b) / 4 for a, b in zip(micro[0][1], micro[1][1], strict=True)]
    assert binding(mean, micro) == (True, 0.0)
    assert binding([x * (1 + 1e-6) for x in mean], micro)[0]
    ok, distance = binding([x * 1.05 for x in mean], micro)
    assert not ok and 0.01 < distance < 0.05  # relative to the parts, which are larger than the mean
    assert binding([-4 * x for x in mean], micro)[0] is False
    assert binding(mean[:-1], micro) == (False, float("inf"))  # a sketch of another length
    # gradients that cancel: rounding is judged against the parts, not the near-zero mean
    cancel = [(1, [1.0] * 32), (1, [-1.0] * 32)]
    assert binding([1e-6] * 32, cancel)[0] and not binding([0.1] * 32, cancel)[0]


async def test_a_member_that_sent_another_update_fails_the_epoch_and_is_banned_at_once(
    market: Market,
) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c, Peer(url) as d:  # c: a validator left
        run = await market.launch(peers=(4, 4), target=1000, verification=AUDITED)
        await market.clear()
        for p in (a, b, c, d):
            await p.join(run.id)
        bodies = {p.account: report(0, samples=6, seconds=0.2) for p in (a, b, d)}
        poisoned = {p.account: committed(run.id, p, bodies[p.account], scale=-4.0) for p in (a, d)}
        honest = committed(run.id, b, bodies[b.account])
        # a's commitment reaches the coordinator first, forwarded with the honest member's report
        await b.client.report(run.id, with_round(bodies[b.account], poisoned[a.account], honest))
        await a.client.report(run.id, with_round(bodies[a.account], poisoned[a.account], honest))
        # d's own report comes first and forwards its own commitment
        await d.client.report(run.id, with_round(bodies[d.account], poisoned[d.account], honest))
        audits = await a.client.audits(run.id)
        rounds = sorted((x.account, x.epoch, x.state) for x in audits if x.index == -1)
        assert rounds == sorted([(a.account, 0, "failed"), (d.account, 0, "failed")])
        assert all(
            "round commitment" in x.reason and x.distance and x.distance > 1 for x in audits if x.index == -1
        )
        reports = {r.account: r for r in await a.client.reports(run.id)}
        assert reports[a.account].pay_state == reports[d.account].pay_state == "voided"
        assert reports[b.account].pay_state == "held"  # its audits are pending, nothing held against it
        view = await market.run(run.id)
        assert [peer_of(view, p.account).state for p in (a, b, c, d)] == [
            "banned",
            "active",
            "active",
            "banned",
        ]
        assert peer_of(view, a.account).audits_failed == 1 and peer_of(view, b.account).audits_failed == 0
        await refused(a.client.report(run.id, report(1, samples=6)), 403, "not_in_run", "run_id")
        await market.conserved()


async def test_forged_or_misdated_commitments_are_refused_with_their_report(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await market.launch(peers=(2, 2), target=1000, verification=AUDITED)
        await market.clear()
        await a.join(run.id)
        await b.join(run.id)
        body = report(0, samples=6, seconds=0.2)
        forged = committed(run.id, a, body).model_copy(update={"account": b.account})  # signed by a
        await refused(
            a.client.report(run.id, with_round(body, forged)), 400, "bad_request", "round[0].commitment"
        )
        misdated = committed(run.id, b, report(1, samples=6))
        twice = with_round(body, committed(run.id, a, body), committed(run.id, a, body))
        await refused(a.client.report(run.id, twice), 400, "bad_request", "round")
        await refused(
            a.client.report(run.id, with_round(body, committed(run.id, a, body), misdated)),
            400,
            "bad_request",
            "round[1].commitment",
        )
        assert await a.client.reports(run.id) == []  # nothing of either refused report was kept
        with pytest.raises(ValueError, match="commitment"):
            RoundCommitment(account=a.account, commitment="ab" * 10)
        await a.client.report(run.id, with_round(body, committed(run.id, a, body)))
        assert [x.index for x in await a.client.audits(run.id)] == [0, 1]  # an honest one adds no failure
        await market.conserved()


async def test_a_commitment_made_for_a_redone_attempt_of_the_epoch_frames_nobody(market: Market) -> None:
    """An honest member that redid an epoch (a refused round, other samples) signed a commitment for a
    claim it never reported; another member forwarding that one does not get it failed: only a commitment
    naming the member's very report (its claim digest) is held against it."""
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await market.launch(peers=(2, 2), target=1000, verification=AUDITED)
        await market.clear()
        await a.join(run.id)
        await b.join(run.id)
        first, redone = report(0, samples=6, seconds=0.2), report(0, samples=4, seconds=0.2)
        redone = redone.model_copy(
            update={
                "micro_batches": [
                    m.model_copy(update={"ids": [100 + i for i in m.ids]}) for m in redone.micro_batches
                ]
            }
        )
        stale = committed(run.id, a, first)  # a's first attempt: 6 samples, ids 0-5
        await b.client.report(run.id, with_round(report(0, samples=6, seconds=0.2), stale))
        await a.client.report(run.id, with_round(redone, committed(run.id, a, redone)))
        assert not [x for x in await a.client.audits(run.id) if x.index == -1]
        assert peer_of(await market.run(run.id), a.account).state == "active"
        await market.conserved()


async def test_blames_fail_a_member_only_on_most_of_the_others_word_and_never_on_one(market: Market) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c:
        run = await running(market, a, b, c, verification=AUDITED)
        for p in (a, b, c):
            group = await checkin(p, run.id)
        assert len(group.members) == 3, group
        version = group.version
        body = BlameBody(epoch=0, version=version, accused=[c.account], reason="revealed noise")
        assert (await a.client.blame(run.id, body)).failed == []  # one word is not enough
        await refused(
            a.client.blame(run.id, body.model_copy(update={"epoch": 7})), 400, "bad_request", "epoch"
        )
        stranger = body.model_copy(update={"accused": ["ab" * 32]})
        await refused(a.client.blame(run.id, stranger), 400, "bad_request", "accused")
        assert (await b.client.blame(run.id, body)).failed == [c.account]  # two of the two others
        audits = [x for x in await a.client.audits(run.id) if x.index == -1]
        assert [(x.account, x.state) for x in audits] == [(c.account, "failed")]
        assert "not what it committed to" in audits[0].reason
        view = await market.run(run.id)
        assert [peer_of(view, p.account).state for p in (a, b, c)] == ["active", "active", "banned"]
        await refused(a.client.blame(run.id, body), 409, "stale_version", "version")  # the group moved on
        await market.conserved()


async def test_in_a_round_of_two_a_blame_bans_nobody(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await running(market, a, b, verification=AUDITED)
        for p in (a, b):
            group = await checkin(p, run.id)
        body = BlameBody(epoch=0, version=group.version, accused=[b.account])
        assert (await a.client.blame(run.id, body)).failed == []
        assert peer_of(await market.run(run.id), b.account).state == "active"
        assert not [x for x in await a.client.audits(run.id) if x.index == -1]
