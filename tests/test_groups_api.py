"""The training group and its rendezvous store against a real coordinator process: check-ins form versions
with ranks, members write their own keys and read the others' (a long poll), a failure regroups without the
member that went silent, an unreachable member moves the group to hivemind, and a leave, a drop or a ban
gives a new version. The market, its peers and fast leases are tests/test_runs_api.py's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from peer.launch import print_run
from peer.protocol.run_schemas import CheckinBody, GroupView, RendezvousGetBody, RendezvousSetBody, RunView
from tests.conftest import Databases
from tests.harness import query_db
from tests.test_runs_api import AUDITED, Market, Peer, _answer, own_market, refused, report

REGROUP = 0.3  # seconds the survivors of a failed version wait for a silent member


@pytest.fixture
async def market(tmp_path: Path, databases: Databases) -> AsyncIterator[Market]:
    async with own_market(
        tmp_path, databases, "100", HIVEMARKET_GROUP_REGROUP_SECONDS=str(REGROUP)
    ) as market:
        yield market


def address(peer: Peer) -> str:
    return f"127.0.0.1:{peer.port}"


async def checkin(peer: Peer, run_id: str, **fields: object) -> GroupView:
    fields.setdefault("address", address(peer))
    return await peer.client.group_checkin(run_id, CheckinBody.model_validate(fields))


async def running(market: Market, *peers: Peer, verification: dict | None = None) -> RunView:
    """A run with ``peers`` matched and joined (none checked in yet)."""
    run = await market.launch(peers=(1 if verification is None else 2, len(peers)), verification=verification)
    await market.clear()
    for peer in peers:
        await peer.join(run.id)
    return run


def ranked(*peers: Peer) -> list[Peer]:
    """By rank: they were matched in one clearing round, so by account."""
    return sorted(peers, key=lambda p: p.account)


async def until_version(peer: Peer, run_id: str, target: int, **fields: object) -> GroupView:
    """Check in with ``fields`` (as a survivor polls) until the group reaches version ``target``; fail after
    5 s."""
    deadline = time.monotonic() + 5.0
    while True:
        group = await checkin(peer, run_id, **fields)
        if group.version >= target:
            return group
        assert time.monotonic() < deadline, f"timed out waiting for version {target}: {group}"
        await asyncio.sleep(0.02)


def accounts(group: GroupView) -> list[str]:
    assert [m.rank for m in group.members] == list(range(len(group.members)))
    return [m.account for m in group.members]


# ------------------------------------------------------------------------------------ check-ins, versions


async def test_checkins_form_versions_by_rank(market: Market) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as stranger:
        run = await market.launch(peers=(1, 2))
        await market.clear()  # two of the three offers are matched
        view = await market.run(run.id)
        matched = {p.account for p in view.peers}
        first, second = [p for p in (a, b, stranger) if p.account in matched]
        outsider = next(p for p in (a, b, stranger) if p.account not in matched)
        assert view.group is None  # nobody checked in yet

        await refused(checkin(outsider, run.id), 403, "not_in_run", "run_id")
        await refused(checkin(first, run.id), 409, "not_joined", "run_id")  # matched, not joined yet
        await first.join(run.id)
        v1 = await checkin(first, run.id)
        assert (v1.version, v1.path, accounts(v1)) == (1, "fast", [first.account])
        assert v1.members[0].address == address(first) and first.account[:8] in v1.reason

        await second.join(run.id)
        assert await checkin(first, run.id, version=1) == v1  # nothing changed: the same version
        v2 = await checkin(second, run.id)
        assert (v2.version, accounts(v2)) == (2, [p.account for p in ranked(first, second)])
        assert v2.reason == f"{second.account[:8]}... joined" and v2.formed_at > v1.formed_at
        assert (await market.run(run.id)).group == v2
        assert next(r for r in await market.client.runs() if r.id == run.id).group == v2

        # the launcher is not a peer of its run
        await refused(market.client.group_checkin(run.id, CheckinBody()), 403, "not_in_run", "run_id")
        await refused(checkin(first, "run-nope"), 404, "not_found", "run_id")


async def test_checkin_bodies_are_checked_field_by_field(market: Market) -> None:
    async with Peer(market.server.url) as a:
        run = await running(market, a)
        for fields, field in (
            ({"address": "127.0.0.1"}, "address"),
            ({"address": "127.0.0.1:0"}, "address"),
            ({"address": "::1:80"}, "address"),
            ({"address": "h" * 300 + ":1"}, "address"),
            ({"version": 0}, "version"),
            ({"failed_version": -1}, "failed_version"),
            ({"unreachable": ["not an account"]}, "unreachable.0"),
            ({"unreachable": [a.account] * 1025}, "unreachable"),
            ({"wait_ms": 5001}, "wait_ms"),
        ):
            body = CheckinBody.model_construct(**fields)  # as a client that does not validate would send
            await refused(a.client.group_checkin(run.id, body), 400, "bad_request", field)
        group = await checkin(a, run.id, address="[::1]:4567")
        assert group.members[0].address == "[::1]:4567"


# ---------------------------------------------------------------------------------------------- rendezvous


async def test_members_write_their_own_keys_and_read_the_others(market: Market) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c:
        run = await running(market, a, b, c)
        async with Peer(url) as stranger:  # offered after the clearing round: never matched
            await checkin(a, run.id)
            group = await checkin(b, run.id)  # c joined but has not checked in: not a member
            first, second = ranked(a, b)
            assert (group.version, accounts(group)) == (2, [first.account, second.account])

            # a read that waits for a key written 100 ms later answers as soon as it is there
            started = time.monotonic()
            waiting = asyncio.create_task(second.client.rendezvous_get(run.id, 2, ["pg/0", "pg/1"], 4000))
            await second.client.rendezvous_set(run.id, 2, "pg/1", b"second's address")
            await asyncio.sleep(0.1)
            assert not waiting.done()  # pg/0 is missing yet
            await first.client.rendezvous_set(run.id, 2, "pg/0", b"\x00first's address\xff")
            values = await waiting
            assert values == {"pg/0": b"\x00first's address\xff", "pg/1": b"second's address"}
            assert time.monotonic() - started < 2.0  # well before wait_ms
            # without waiting: the keys that are there, the missing ones left out
            assert await first.client.rendezvous_get(run.id, 2, ["pg/1", "pg/9"], 0) == {
                "pg/1": b"second's address"
            }
            started = time.monotonic()
            assert await first.client.rendezvous_get(run.id, 2, ["missing"], 200) == {}
            assert time.monotonic() - started >= 0.2

            # each rank writes only its own keys; the first writer of any other key owns it
            await refused(second.client.rendezvous_set(run.id, 2, "pg/0", b"x"), 403, "key_not_yours", "key")
            await refused(
                second.client.rendezvous_set(run.id, 2, "other/00", b"x"), 403, "key_not_yours", "key"
            )
            await first.client.rendezvous_set(run.id, 2, "shared", b"mine")
            await refused(
                second.client.rendezvous_set(run.id, 2, "shared", b"theirs"), 403, "key_not_yours", "key"
            )
            await first.client.rendezvous_set(run.id, 2, "shared", b"mine again")  # its own key: rewritten
            await first.client.rendezvous_set(run.id, 2, "pg/0", b"moved")
            assert await second.client.rendezvous_get(run.id, 2, ["shared", "pg/0"], 0) == {
                "shared": b"mine again",
                "pg/0": b"moved",
            }

            # only members of the current version, of a live run
            for outsider in (c, stranger):
                await refused(
                    outsider.client.rendezvous_set(run.id, 2, "x", b"x"), 403, "not_in_group", "version"
                )
                await refused(
                    outsider.client.rendezvous_get(run.id, 2, ["pg/0"], 0), 403, "not_in_group", "version"
                )
            await refused(first.client.rendezvous_set(run.id, 1, "x", b"x"), 409, "stale_version", "version")
            await refused(
                first.client.rendezvous_get(run.id, 3, ["pg/0"], 0), 409, "stale_version", "version"
            )
            await refused(first.client.rendezvous_get("run-nope", 2, ["pg/0"], 0), 404, "not_found", "run_id")

            # a new version: the old version's keys are gone, and a read waiting on it is refused at once
            waiting = asyncio.create_task(first.client.rendezvous_get(run.id, 2, ["never"], 4000))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            assert (await checkin(c, run.id)).version == 3
            await refused(waiting, 409, "stale_version", "version")
            assert time.monotonic() - started < 1.0
            assert await first.client.rendezvous_get(run.id, 3, ["shared", "pg/0", "pg/1"], 0) == {}
            assert query_db(market.server.db_url, "SELECT version FROM rendezvous_keys") == []


async def test_rendezvous_bodies_are_checked_field_by_field(market: Market) -> None:
    async with Peer(market.server.url) as a:
        run = await running(market, a)
        await checkin(a, run.id)
        for body, field in (
            (RendezvousSetBody.model_construct(version=1, key="", value=""), "key"),
            (RendezvousSetBody.model_construct(version=1, key="a\nb", value=""), "key"),
            (RendezvousSetBody.model_construct(version=1, key="k" * 201, value=""), "key"),
            (RendezvousSetBody.model_construct(version=1, key="k", value="not base64!"), "value"),
            (RendezvousSetBody.model_construct(version=1, key="k", value="A" * 87_384), "value"),  # 65,538 B
            (RendezvousSetBody.model_construct(version=0, key="k", value=""), "version"),
        ):
            route = f"/v1/runs/{run.id}/rendezvous/set"
            await refused(a.client._request(GroupView, "POST", route, body), 400, "bad_request", field)
        for body, field in (
            (RendezvousGetBody.model_construct(version=1, keys=[], wait_ms=0), "keys"),
            (RendezvousGetBody.model_construct(version=1, keys=["k"] * 65, wait_ms=0), "keys"),
            (RendezvousGetBody.model_construct(version=1, keys=["\x00"], wait_ms=0), "keys.0"),
            (RendezvousGetBody.model_construct(version=1, keys=["k"], wait_ms=5001), "wait_ms"),
        ):
            route = f"/v1/runs/{run.id}/rendezvous/get"
            await refused(a.client._request(GroupView, "POST", route, body), 400, "bad_request", field)
        value = bytes(range(256)) * 256  # 64 KiB, the most a key holds
        await a.client.rendezvous_set(run.id, 1, "big", value)
        assert await a.client.rendezvous_get(run.id, 1, ["big"], 0) == {"big": value}


# ------------------------------------------------------------------------------- failures, paths, leaving


async def test_a_failure_regroups_without_the_member_that_went_silent(market: Market) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c, Peer(url) as d:
        run = await running(market, a, b, c, d)
        for peer in (a, b, c):
            v3 = await checkin(peer, run.id)
        assert v3.version == 3
        # c dies mid all-reduce; a and b see the collective fail and ask for a new group
        reported = time.monotonic()
        assert (await checkin(a, run.id, version=3, failed_version=3)).version == 3  # c may still return
        assert (await checkin(b, run.id, version=3, failed_version=3)).version == 3
        # d checks in meanwhile: it gets the current group, which it is not in, and is in the next one
        assert d.account not in accounts(await checkin(d, run.id))
        v4 = await until_version(a, run.id, 4, version=3, failed_version=3)
        assert time.monotonic() - reported >= REGROUP
        assert accounts(v4) == [p.account for p in ranked(a, b, d)] and v4.path == "fast"
        assert v4.reason == (
            f"version 3 failed (reported by {a.account[:8]}...); {c.account[:8]}... did not return within "
            f"{REGROUP:g} s; {d.account[:8]}... joined"
        )
        assert (await market.run(run.id)).group == v4
        # c is still matched (its lease is alive) and comes back: a new version with it
        v5 = await checkin(c, run.id, version=3)
        assert (v5.version, accounts(v5)) == (5, [p.account for p in ranked(a, b, c, d)])
        # a failure everyone returns from regroups at once
        for peer in (a, b, c):
            await checkin(peer, run.id, version=5, failed_version=5)
        started = time.monotonic()
        v6 = await checkin(d, run.id, version=5, failed_version=5)
        assert v6.version == 6 and time.monotonic() - started < REGROUP
        assert v6.reason == f"version 5 failed (reported by {a.account[:8]}...); every member returned"


async def test_survivors_waiting_in_a_long_poll_learn_of_the_next_version_when_it_forms(
    market: Market,
) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c:
        run = await running(market, a, b, c)
        for peer in (a, b, c):
            v3 = await checkin(peer, run.id)
        assert v3.version == 3
        # a long poll on a version nobody failed waits its whole time and answers the same version
        started = time.monotonic()
        assert (await checkin(a, run.id, version=3, wait_ms=300)).version == 3
        assert time.monotonic() - started >= 0.3
        # a and b wait for the version after the one that broke; c's return forms it and answers them
        waits = [
            asyncio.create_task(checkin(p, run.id, version=3, failed_version=3, wait_ms=5000)) for p in (a, b)
        ]
        deadline = time.monotonic() + 5.0
        while not query_db(market.server.db_url, "SELECT 1 FROM run_groups WHERE failed_at IS NOT NULL"):
            assert time.monotonic() < deadline, "the failure was never recorded"
            await asyncio.sleep(0.01)
        formed = time.monotonic()
        v4 = await checkin(c, run.id, version=3, failed_version=3)
        assert v4.version == 4 and v4.reason.endswith("every member returned")
        assert [(await w).version for w in waits] == [4, 4]
        assert time.monotonic() - formed < 2.5  # answered when it formed, not at the end of the 5 s wait
        # c goes silent in version 4: the survivors' long polls are answered once the regroup is due,
        # and their next check-in forms version 5 without c
        started = time.monotonic()
        waited = await checkin(a, run.id, version=4, failed_version=4, wait_ms=5000)
        assert waited.version == 4 and REGROUP <= time.monotonic() - started < 2.5
        v5 = await checkin(a, run.id, version=4, failed_version=4)
        assert v5.version == 5 and c.account not in accounts(v5)


async def test_an_unreachable_member_that_returns_moves_the_group_to_hivemind(
    market: Market, capsys: pytest.CaptureFixture[str]
) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c:
        run = await running(market, a, b, c)
        await checkin(a, run.id)
        v2 = await checkin(b, run.id)
        assert v2.path == "fast"
        # b may have died: the version fails, and the regroup waits for it as for a broken round
        assert (await checkin(a, run.id, version=2, unreachable=[b.account])).version == 2
        v3 = await checkin(b, run.id, version=2, failed_version=2)  # it is alive, at the same address
        assert (v3.version, v3.path, accounts(v3)) == (3, "hivemind", accounts(v2))
        assert v3.reason == (
            f"version 2 failed (reported by {a.account[:8]}...); every member returned; "
            f"{b.account[:8]}... at {address(b)} could not be reached before: hivemind's averager"
        )
        view = await market.run(run.id)
        assert view.group == v3
        print_run(view)  # runs show
        first, second = ranked(a, b)
        assert (
            f"group     version 3 on the hivemind path, by rank: 0 {first.account[:12]}, "
            f"1 {second.account[:12]} ({v3.reason})"
        ) in capsys.readouterr().out
        async with aiohttp.ClientSession() as http, http.get(f"{market.server.url}/?run={run.id}") as page:
            assert "group <b>v3</b> on the <b>hivemind</b> path, 2 members" in await page.text()
        # b's address stays off the fast path; at a new one (a restarted trainer) it is tried again
        v4 = await checkin(c, run.id)
        assert (v4.version, v4.path) == (4, "hivemind")
        v4 = await checkin(b, run.id, version=4, address="127.0.0.1:9")
        assert (v4.version, v4.path) == (5, "fast")
        # a peer without an address keeps the group off it
        v5 = await checkin(c, run.id, address=None, version=5)
        assert (v5.version, v5.path) == (6, "hivemind")
        assert (
            "cannot be reached directly" in v5.reason
            and v5.members[accounts(v5).index(c.account)].address is None
        )


async def test_a_leave_a_drop_and_a_ban_give_new_versions(market: Market) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b, Peer(url) as c, Peer(url) as d:
        run = await running(market, a, b, c, d, verification=AUDITED)
        for peer in (a, b, c, d):
            v4 = await checkin(peer, run.id)
        assert v4.version == 4

        await d.client.leave(run.id)  # no check-in needed: leaving is a change
        v5 = (await market.run(run.id)).group
        assert v5 is not None and v5.version == 5 and d.account not in accounts(v5)
        assert v5.reason == f"{d.account[:8]}... left"

        await c.go_silent()  # its lease lapses (1.5 s): the sweep drops it
        v6 = await market.until(run.id, "c to be dropped", lambda v: v.group.version == 6, timeout=10.0)
        assert v6.group is not None and accounts(v6.group) == [p.account for p in ranked(a, b)]

        bodies = [report(epoch, samples=6, seconds=0.2) for epoch in range(2)]
        for body in bodies:
            await a.client.report(run.id, body)
        tasks = await b.client.claim_audits(run.id, 8)
        for t in tasks[:3]:  # a's reports fail twice: banned (ban_after 2)
            await b.client.submit_audit(run.id, t.id, _answer(bodies[t.epoch], t.index, wrong=True))
        view = await market.run(run.id)
        assert next(p.state for p in view.peers if p.account == a.account) == "banned"
        assert view.group is not None and (view.group.version, accounts(view.group)) == (7, [b.account])
        await refused(checkin(a, run.id), 403, "not_in_run", "run_id")
        await market.conserved()
