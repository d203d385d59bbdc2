"""Collaborative runs against a real coordinator process: joins, reports and pay, drops, pauses, the model.

Every test gets its own server (a clearing round matches every open offer, so tests must not share a
market) with fast leases: a peer that stops heartbeating lapses within 1.5 s. Peers keep their leases
alive with a background heartbeat task, as ``hivemarket rent`` does; rounds are cleared on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from coordinator.db import SQLiteDatabase
from coordinator.leases import LeaseConfig
from coordinator.runs import RunPolicy
from coordinator.schema import sqlite_migrations
from coordinator.store import open_store
from peer.protocol.client import ClientSettings, CoordinatorClient, CoordinatorError
from peer.protocol.envelope import sign_request
from peer.protocol.identity import Identity
from peer.protocol.money import UNIT, from_units, to_units
from peer.protocol.run_schemas import (
    AuditResultBody,
    AuditTask,
    MicroBatch,
    ReportBody,
    RunBody,
    RunPeerView,
    RunView,
)
from peer.protocol.schemas import SHA256_HEADER, HardwareSummary, OfferBody
from peer.run_link import RunLink
from tests.conftest import Databases
from tests.harness import (
    CoordinatorProcess,
    cli_env,
    group_members,
    minimal_spec,
    query_db,
    start_coordinator,
    wait_until,
)

HEARTBEAT = 0.5  # lease TTL 1.5 s
MAX_MODEL = 4096
SERVER_ENV = {
    "HIVEMARKET_HEARTBEAT_INTERVAL": str(HEARTBEAT),
    "HIVEMARKET_SWEEP_INTERVAL": "0.1",
    "HIVEMARKET_CLEARING_INTERVAL": "3600",  # rounds on demand: each test decides when peers are matched
    "HIVEMARKET_MAX_MODEL_BYTES": str(MAX_MODEL),
    "HIVEMARKET_RATE_LIMIT_PER_SECOND": "1000",
    "HIVEMARKET_RATE_LIMIT_BURST": "1000",
}
FAST = ClientSettings(retries=2, retry_backoff=0.05, retry_backoff_max=0.2, request_timeout=10)
H100 = HardwareSummary(gpu="H100", gpu_count=1, vram_gb=80.0, tflops=400.0, ram_gb=256.0, cpu_cores=32)


def start(tmp_path: Path, db_url: str | None, **env: str) -> CoordinatorProcess:
    home = tmp_path / "coordinator"
    return start_coordinator(
        home, Identity.generate(), env=cli_env(home, **{**SERVER_ENV, **env}), db_url=db_url
    )


def stop(server: CoordinatorProcess) -> None:
    server.stop()
    assert not group_members(server.proc.pid), "the coordinator left processes behind"
    assert "Unhandled error" not in server.output(), server.output()[-3000:]


@pytest.fixture
def server(tmp_path: Path, databases: Databases) -> Iterator[CoordinatorProcess]:
    process = start(tmp_path, databases.url())
    try:
        yield process
    finally:
        stop(process)


class Peer:
    """A GPU owner's side: an offer, a lease kept alive in the background, joins and reports."""

    def __init__(self, url: str, price: str = "1.00"):
        self.identity = Identity.generate()
        self.account = self.identity.account
        self.client = CoordinatorClient(url, self.identity, settings=FAST)
        self.price = price
        self.lease_id = ""
        self._beats: asyncio.Task | None = None

    async def __aenter__(self) -> Peer:
        await self.client.__aenter__()
        offer = await self.client.post_offer(OfferBody(price_per_hour=self.price, hardware=H100))
        self.lease_id = offer.lease.id
        self._beats = asyncio.create_task(self._heartbeat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.go_silent()
        await self.client.__aexit__(None, None, None)

    async def _heartbeat(self) -> None:
        while True:  # the renewal cadence of a live peer, well inside the 1.5 s TTL
            await self.client.heartbeat(self.lease_id)
            await asyncio.sleep(HEARTBEAT / 4)

    async def go_silent(self) -> None:
        """Stop heartbeating, as a peer that crashed or lost its network: its lease will lapse."""
        if self._beats is not None:
            self._beats.cancel()
            with contextlib.suppress(asyncio.CancelledError, CoordinatorError):
                await self._beats
            self._beats = None

    async def join(self, run_id: str) -> RunView:
        return await self.client.join(
            run_id, f"12D3KooW{self.account[:12]}", [f"/ip4/127.0.0.1/tcp/{self.port}"]
        )

    @property
    def port(self) -> int:
        return 4000 + int(self.account[:3], 16)


def report(epoch: int, samples: int = 4, *, seconds: float = 0.25, loss: float = 1.5) -> ReportBody:
    ids = list(range(epoch * samples, (epoch + 1) * samples))
    half = samples // 2 or 1
    batches = [MicroBatch(ids=ids[:half], loss=loss, sketch=[0.5, -0.25] * 16)]
    if ids[half:]:
        batches.append(MicroBatch(ids=ids[half:], loss=loss, sketch=[0.125, 1.0] * 16))
    return ReportBody(
        epoch=epoch,
        samples=samples,
        loss=loss,
        seconds=seconds,
        group_size=2,
        param_sketch=[1.0, 2.0, 3.0, 4.0] * 8,
        micro_batches=batches,
    )


class Market:
    """The launcher's and the admin's side of one server."""

    def __init__(self, server: CoordinatorProcess, client: CoordinatorClient, admin: CoordinatorClient):
        self.server, self.client, self.admin = server, client, admin
        self.launcher = client.identity
        assert self.launcher is not None

    async def launch(
        self,
        *,
        peers: tuple[int, int] = (1, 1),
        target: int = 1000,
        wait: float = 30.0,
        budget: str = "10",
        verification: dict[str, Any] | None = None,
    ) -> RunView:
        """A run; unaudited (reports paid at once) unless ``verification`` says otherwise."""
        spec = minimal_spec(
            "test-run",
            stop={"samples": target},
            peers={"min": peers[0], "wait_seconds": wait},
            verification=verification or {"rate": 0},
        )
        body = RunBody(spec=spec, max_price="0.01", peers_min=peers[0], peers_max=peers[1], budget=budget)
        return await self.client.create_run(body)

    async def clear(self) -> None:
        await self.admin.clear_market()

    async def run(self, run_id: str) -> RunView:
        return await self.client.run(run_id)

    async def until(self, run_id: str, what: str, check: Any, timeout: float = 10.0) -> RunView:
        """Poll the run until ``check(view)`` holds; fail naming ``what`` at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            view = await self.run(run_id)
            if check(view):
                return view
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {view}"
            await asyncio.sleep(0.05)

    async def conserved(self) -> None:
        audit = await self.client.audit()
        assert audit.conserved, audit


@contextlib.asynccontextmanager
async def market_on(server: CoordinatorProcess, funds: str) -> AsyncIterator[Market]:
    """A launcher funded with ``funds`` and the admin, on ``server``."""
    launcher = Identity.generate()
    async with (
        CoordinatorClient(server.url, launcher, settings=FAST) as client,
        CoordinatorClient(server.url, server.admin, settings=FAST) as admin,
    ):
        await admin.deposit(launcher.account, funds)
        yield Market(server, client, admin)


@contextlib.asynccontextmanager
async def own_market(tmp_path: Path, databases: Databases, funds: str, **env: str) -> AsyncIterator[Market]:
    """A market on a server of its own, started with ``env`` (shorter timeouts, say), stopped after."""
    server = start(tmp_path, databases.url(), **env)
    try:
        async with market_on(server, funds) as market:
            yield market
    finally:
        stop(server)


@pytest.fixture
async def market(server: CoordinatorProcess) -> AsyncIterator[Market]:
    async with market_on(server, "100") as market:
        yield market


async def wait_for_clock(moment: float) -> None:
    """Wait until the wall clock has passed ``moment`` (the server and the tests share the clock)."""
    while time.time() <= moment:
        await asyncio.sleep(0.02)


def expected_pay(price: Decimal, seconds: float, accepted_at: float, since: float) -> Decimal:
    billable = min(Fraction(seconds), Fraction(accepted_at) - Fraction(since))
    return from_units(math.floor(Fraction(to_units(price)) * billable / 3600))


def peer_of(view: RunView, account: str) -> RunPeerView:
    """The account's active match in the run, else its latest one."""
    matches = [p for p in view.peers if p.account == account]
    return next((p for p in matches if p.state == "active"), matches[-1])


# ------------------------------------------------------------------------------------- join, report, pay


async def test_join_report_pay_exactly_and_conserve(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await market.launch(peers=(2, 2), target=1000)
        assert (
            run.state == "recruiting" and run.target_samples == 1000 and run.epoch == 0 and run.loss is None
        )
        await market.clear()
        run = await market.run(run.id)
        assert run.state == "running" and run.reason == "2 of min 2 peers live", run

        joined = await a.join(run.id)
        mine = peer_of(joined, a.account)
        assert mine.joined and mine.peer_id == f"12D3KooW{a.account[:12]}" and mine.maddrs
        first_join = mine.joined_at
        again = await a.client.join(run.id, "12D3KooWnew", ["/ip4/10.0.0.1/tcp/1"])  # a re-join
        mine = peer_of(again, a.account)
        assert (mine.peer_id, mine.maddrs, mine.joined_at) == (
            "12D3KooWnew",
            ["/ip4/10.0.0.1/tcp/1"],
            first_join,
        )
        await b.join(run.id)
        price = mine.price_per_hour

        # Compute time shorter than the wall clock since joining: paid for the compute time.
        await wait_for_clock(first_join + 0.3)
        r0 = await a.client.report(run.id, report(0, seconds=0.25, loss=2.0))
        assert r0.paid == expected_pay(price, 0.25, r0.accepted_at, first_join) > 0
        assert r0.paid == from_units(math.floor(Fraction(to_units(price)) * Fraction(0.25) / 3600))
        # Claimed compute time longer than the wall clock since the last report: capped by the clock.
        r1 = await a.client.report(run.id, report(1, seconds=86400.0, loss=1.0))
        assert r1.paid == expected_pay(price, 86400.0, r1.accepted_at, r0.accepted_at)
        assert r1.paid < from_units(to_units(price) * 10 // 3600)  # far less than a day's pay
        b_join = peer_of(await market.run(run.id), b.account).joined_at
        rb = await b.client.report(run.id, report(1, seconds=0.001, loss=3.0))
        assert rb.paid == expected_pay(price, 0.001, rb.accepted_at, b_join)

        view = await market.run(run.id)
        assert (view.samples, view.epoch, view.loss) == (12, 2, 2.0)  # latest epoch: mean of 1.0 and 3.0
        paid = r0.paid + r1.paid + rb.paid
        assert view.spent == paid and view.escrow == Decimal("10") - paid and view.refunded == 0
        assert peer_of(view, a.account).paid == r0.paid + r1.paid and peer_of(view, a.account).samples == 8
        assert peer_of(view, a.account).last_report_at == r1.accepted_at
        assert (await a.client.account(a.account)).earned == r0.paid + r1.paid
        launcher = await market.client.account(market.launcher.account)
        assert (launcher.balance, launcher.escrow) == (Decimal("90"), view.escrow)

        listed = await market.client.reports(run.id)
        assert [(r.epoch, r.account) for r in listed] == sorted(
            [(0, a.account), (1, a.account), (1, b.account)]
        )
        assert listed[0] == r0
        assert [b.model_dump() for b in listed[0].micro_batches] == [
            b.model_dump() for b in report(0, loss=2.0).micro_batches
        ]  # an unaudited report shows what it claimed
        assert listed[0].param_sketch == [1.0, 2.0, 3.0, 4.0] * 8 and listed[0].group_size == 2
        assert paid_samples(market, run.id) == sum(r.samples for r in listed)  # unaudited: paid at once
        await market.conserved()


async def refused(call: Any, status: int, code: str, field: str | None) -> CoordinatorError:
    """Await ``call``; it must fail with this status, code and field."""
    with pytest.raises(CoordinatorError) as caught:
        await call
    error = caught.value
    assert (error.status, error.code, error.field) == (status, code, field), error
    return error


async def test_report_and_join_refusals_name_the_code_and_field(market: Market) -> None:
    url = market.server.url
    async with Peer(url) as a, CoordinatorClient(url, Identity.generate(), settings=FAST) as stranger:
        run = await market.launch(peers=(1, 1))
        await market.clear()
        await refused(a.client.report("run-nope", report(0)), 404, "not_found", "run_id")
        error = await refused(stranger.report(run.id, report(0)), 403, "not_in_run", "run_id")
        assert "never matched" in error.message
        await refused(stranger.join(run.id, "12D3KooWx", ["/ip4/1.2.3.4/tcp/1"]), 403, "not_in_run", "run_id")
        await refused(a.client.report(run.id, report(0)), 409, "not_joined", "run_id")
        await a.join(run.id)
        await a.client.report(run.id, report(0))
        error = await refused(a.client.report(run.id, report(0)), 409, "report_exists", "epoch")
        assert "epoch 0" in error.message

        # Bodies the schema refuses: the field and the bad value are named, nothing is applied.
        raw = report(5).model_dump(mode="json")
        cases = [
            ({**raw, "samples": 5}, "samples", "must equal the number of micro-batch ids (4)"),
            ({**raw, "loss": float("nan")}, "loss", "finite"),
            ({**raw, "seconds": 86401}, "seconds", "86400"),
            ({**raw, "seconds": 0}, "seconds", "greater than 0"),
            ({**raw, "param_sketch": []}, "param_sketch", "at least 32"),
            ({**raw, "group_size": 0}, "group_size", "greater than or equal to 1"),
            (
                {**raw, "micro_batches": [{"ids": [-1], "loss": 1, "sketch": [1]}]},
                "micro_batches.0.ids.0",
                "-1",
            ),
            ({**raw, "micro_batches": []}, "micro_batches", "at least 1"),
            ({**raw, "epoch": -1}, "epoch", "-1"),
        ]
        joins = [
            ({"peer_id": "", "maddrs": ["/ip4/1.2.3.4/tcp/1"]}, "peer_id"),
            ({"peer_id": "x", "maddrs": ["/ip4/1.2.3.4/tcp/1"] * 17}, "maddrs"),
            ({"peer_id": "x", "maddrs": ["a" * 301]}, "maddrs.0"),
        ]
        async with aiohttp.ClientSession() as session:
            for body, field, words in cases:
                status, data = await _post(session, url, a.identity, f"/v1/runs/{run.id}/reports", body)
                error = data["error"]
                assert (status, error["field"]) == (400, field) and words in error["message"], (body, data)
            for body, field in joins:
                status, data = await _post(session, url, a.identity, f"/v1/runs/{run.id}/join", body)
                assert (status, data["error"]["field"]) == (400, field), data

            # A retried POST (same nonce) is applied once: the retry is refused and nothing is paid twice.
            path, body = f"/v1/runs/{run.id}/reports", json.dumps(report(7).model_dump(mode="json")).encode()
            headers = {"Content-Type": "application/json", **sign_request(a.identity, "POST", path, body)}
            async with session.post(url + path, data=body, headers=headers) as resp:
                assert resp.status == 201
            async with session.post(url + path, data=body, headers=headers) as resp:
                assert resp.status == 401 and (await resp.json())["error"]["code"] == "nonce_replayed"
        assert [r.epoch for r in await market.client.reports(run.id)] == [0, 7]

        # Joins and reports stop when the run ends.
        await market.client.cancel_run(run.id)
        await refused(a.client.report(run.id, report(8)), 409, "run_ended", "run_id")
        error = await refused(a.join(run.id), 409, "run_ended", "run_id")
        assert "cancelled" in error.message

        # Reports wait for the run to start: one of two peers is matched, the run still recruits.
        waiting = await market.launch(peers=(2, 2))
        await market.clear()  # a is back on the market, and the only open offer
        view = await a.join(waiting.id)
        assert view.state == "recruiting"
        await refused(a.client.report(waiting.id, report(0)), 409, "run_not_started", "run_id")
        await market.conserved()


async def _post(
    session: aiohttp.ClientSession, url: str, signer: Identity, path: str, body: Any
) -> tuple[int, Any]:
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **sign_request(signer, "POST", path, raw)}
    async with session.post(url + path, data=raw, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_specs_are_validated_with_dotted_fields(market: Market) -> None:
    async with aiohttp.ClientSession() as session:
        cases = [
            (minimal_spec("x", batch={"target": 0}), "spec.batch.target", "greater than or equal to 1"),
            (minimal_spec("x", stop={"epochs": 2}), "spec.stop.samples", "converts stop.epochs into samples"),
            (
                minimal_spec("x", dataset={"location": "coordinator", "name": "digits"}),
                "spec.dataset.version",
                "fills it in from the location",
            ),
            (minimal_spec("x", batch={"target": 70000}), "spec.batch.target", "less than or equal to 65536"),
            ({"name": "x"}, "spec.task", "required"),
            (minimal_spec("bad name!"), "spec.name", "bad name!"),
            (minimal_spec("x", peers={"wait_seconds": -1}), "spec.peers.wait_seconds", "greater than 0"),
        ]
        for spec, field, words in cases:
            payload = {"spec": spec, "max_price": "0.01", "peers_min": 1, "peers_max": 1, "budget": "1"}
            status, data = await _post(session, market.server.url, market.launcher, "/v1/runs", payload)
            assert status == 400 and data["error"]["field"] == field and words in data["error"]["message"], (
                data
            )
    with pytest.raises(ValueError, match=r"spec\.stop\.samples"):
        RunBody(
            spec=minimal_spec("x", stop={"epochs": 2}), max_price="0.01", peers_min=1, peers_max=1, budget="1"
        )
    stored = (await market.launch()).spec
    assert stored == minimal_spec(
        "test-run", stop={"samples": 1000}, peers={"min": 1, "wait_seconds": 30.0}, verification={"rate": 0}
    )


# --------------------------------------------------------------------------------------- drops and pauses


async def test_a_dropped_peer_is_refused_and_its_pay_stops(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run, paid = await _both_joined_and_b_paid(market, a, b)
        await b.go_silent()
        view = await market.until(
            run.id, "b's match to drop", lambda v: peer_of(v, b.account).state == "dropped"
        )
        assert view.state == "running"  # a alone still meets the minimum of 1
        with pytest.raises(CoordinatorError) as caught:
            await b.client.report(run.id, report(1, seconds=10.0))
        assert (caught.value.status, caught.value.code) == (
            403,
            "not_in_run",
        ) and "dropped" in caught.value.message
        await a.client.report(run.id, report(1, seconds=0.001))
        view = await market.run(run.id)
        assert peer_of(view, b.account).paid == paid and peer_of(view, b.account).samples == 4
        assert (await b.client.account(b.account)).earned == paid
        assert [r.account for r in await market.client.reports(run.id)].count(b.account) == 1
        await market.conserved()


async def test_a_withdrawn_offer_leaves_the_run_which_goes_on_without_a_lapse(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run, paid = await _both_joined_and_b_paid(market, a, b)
        await b.go_silent()  # as `rent` does on Ctrl-C: stop renewing, then withdraw
        withdrawn = await b.client.withdraw_offer(b.lease_id)
        assert (withdrawn.lease.state, withdrawn.offer.state) == ("released", "withdrawn")
        view = await market.run(run.id)
        assert peer_of(view, b.account).state == "withdrawn" and view.state == "running", view
        await refused(b.client.report(run.id, report(1, seconds=10.0)), 403, "not_in_run", "run_id")
        await a.client.report(run.id, report(1, seconds=0.001))  # the run goes on with a
        assert (await market.run(run.id)).samples == 8

        await asyncio.sleep(4 * HEARTBEAT)  # past the lease's life: it never lapses
        view = await market.run(run.id)
        assert peer_of(view, b.account).state == "withdrawn" and peer_of(view, b.account).paid == paid
        (offer,) = [o for o in await market.client.offers() if o.account == b.account]
        assert (offer.state, offer.reliability) == ("withdrawn", withdrawn.offer.reliability)
        assert query_db(market.server.db_url, f"SELECT lapses FROM peers WHERE account = '{b.account}'") == [
            (0,)
        ]
        await market.conserved()


async def test_withdrawals_and_transfers_draw_on_earnings_first(market: Market) -> None:
    async with Peer(market.server.url) as a:
        run = await market.launch(peers=(1, 1))
        await market.clear()
        joined_at = peer_of(await a.join(run.id), a.account).joined_at
        await wait_for_clock(joined_at + 0.3)
        earned = (await a.client.report(run.id, report(0, seconds=0.25))).paid
        assert earned > 0
        await market.admin.deposit(a.account, "1")

        out = await a.client.withdraw(earned + Decimal("0.5"))  # all the earnings, then half the balance
        assert (out.earned, out.balance, out.withdrawn) == (0, Decimal("0.5"), earned + Decimal("0.5"))
        launcher_before = (await market.client.account(market.launcher.account)).balance
        sent = await a.client.transfer(market.launcher.account, Decimal("0.25"))
        assert (sent.balance, sent.withdrawn) == (Decimal("0.25"), earned + Decimal("0.5"))
        launcher = await market.client.account(market.launcher.account)
        assert launcher.balance == launcher_before + Decimal("0.25")
        error = await refused(a.client.withdraw(Decimal("1")), 409, "insufficient_funds", "amount")
        assert "0.250000 is available (earned 0.000000 + balance 0.250000)" in error.message, error
        assert (await a.client.account(a.account)).balance == Decimal("0.25")  # the refusal wrote nothing
        await market.conserved()


async def test_pause_below_the_minimum_and_resume_with_a_replacement(market: Market) -> None:
    url = market.server.url
    async with Peer(url) as a, Peer(url) as b:
        run = await market.launch(peers=(2, 2), wait=30.0)
        await market.clear()
        await a.join(run.id)
        await b.join(run.id)
        await a.go_silent()
        view = await market.until(run.id, "the run to pause", lambda v: v.state == "paused")
        assert view.reason == "1 of min 2 peers live; waiting up to 30 s for replacements", view.reason
        assert (
            await b.client.report(run.id, report(0, seconds=0.001))
        ).epoch == 0  # paused runs take reports
        async with Peer(url) as c:
            await market.clear()
            view = await market.until(run.id, "the run to resume", lambda v: v.state == "running")
            assert view.reason == "2 of min 2 peers live"
            assert {p.account for p in view.peers if p.state == "active"} == {b.account, c.account}
            assert [p.state for p in view.peers if p.account == a.account] == ["dropped"]
            await c.join(run.id)
            await c.client.report(run.id, report(1, seconds=0.001))
        await market.conserved()


async def test_a_pause_without_replacements_fails_and_refunds_the_rest(market: Market) -> None:
    async with Peer(market.server.url) as a:
        run = await market.launch(peers=(1, 1), wait=1.0, budget="10")
        await market.clear()
        await a.join(run.id)
        await wait_for_clock(time.time() + 0.1)
        paid = (await a.client.report(run.id, report(0, seconds=0.05))).paid
        assert paid > 0
        await a.go_silent()
        await market.until(run.id, "the run to pause", lambda v: v.state == "paused")
        view = await market.until(run.id, "the run to fail", lambda v: v.state == "failed")
        assert view.reason == "paused 1 s without replacements (0 of min 1 peers live)", view.reason
        assert view.escrow == 0 and view.spent == paid and view.refunded == Decimal("10") - paid
        launcher = await market.client.account(market.launcher.account)
        assert (launcher.balance, launcher.escrow) == (Decimal("100") - paid, 0)
        assert all(p.state != "active" for p in view.peers)
        await market.conserved()


async def test_an_empty_escrow_settles_the_run(market: Market) -> None:
    async with Peer(market.server.url) as a:
        run = await market.launch(budget="0.0001")  # 100 units: under a second of a 1.00/h peer
        await market.clear()
        joined_at = peer_of(await a.join(run.id), a.account).joined_at
        await wait_for_clock(joined_at + 0.5)
        r0 = await a.client.report(run.id, report(0, seconds=1.0))
        assert r0.paid == Decimal("0.0001")  # capped by what the escrow held
        view = await market.run(run.id)
        assert (view.state, view.reason, view.escrow) == ("settling", "budget exhausted", 0)
        r1 = await a.client.report(run.id, report(1, seconds=1.0))  # settling runs take reports, unpaid
        assert r1.paid == 0
        assert (await a.client.account(a.account)).earned == Decimal("0.0001")
        await market.conserved()


# --------------------------------------------------------------------------------------- settle, the model


async def test_target_settles_then_the_model_finishes_the_run(market: Market, tmp_path: Path) -> None:
    url = market.server.url
    models = market.server.home / "models"
    async with Peer(url) as a, CoordinatorClient(url, Identity.generate()) as stranger:
        run = await market.launch(target=8, budget="10")
        await market.clear()
        await wait_for_clock(peer_of(await a.join(run.id), a.account).joined_at + 0.2)
        assert (await a.client.report(run.id, report(0, seconds=0.2))).paid > 0
        assert (await market.run(run.id)).state == "running"
        await a.client.report(run.id, report(1, seconds=0.001))
        view = await market.run(run.id)
        assert (view.state, view.reason) == ("settling", "target of 8 samples reached (8)")
        await a.client.report(run.id, report(2, seconds=0.001))  # work done before it settled is still taken

        with pytest.raises(CoordinatorError) as caught:
            await market.client.download_model(run.id, tmp_path / "none.bin")
        assert (caught.value.status, caught.value.code) == (404, "no_model")

        model = tmp_path / "model.bin"
        model.write_bytes(bytes(range(256)) * 10)  # 2560 bytes, under the 4096-byte limit
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        target = f"/v1/runs/{run.id}/model"
        async with aiohttp.ClientSession() as session:

            def signed(body: bytes, declared: bytes | None = None) -> dict[str, str]:
                """Signed over ``body``, declaring the digest of ``declared`` (default: the same bytes)."""
                digest = hashlib.sha256(body if declared is None else declared).hexdigest()
                return {**sign_request(a.identity, "PUT", target, body), SHA256_HEADER: digest}

            # Signed over other bytes than the declared digest: 401 before a byte is read.
            headers = signed(b"another model", declared=model.read_bytes())
            async with session.put(url + target, data=model.read_bytes(), headers=headers) as resp:
                assert resp.status == 401 and (await resp.json())["error"]["code"] == "bad_signature"
            # Signed and declared, but the body is other bytes: refused after hashing it.
            headers = signed(model.read_bytes())
            async with session.put(url + target, data=b"tampered" * 10, headers=headers) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "hash_mismatch"
            # No declared digest at all: 400 naming the header.
            headers = sign_request(a.identity, "PUT", target, model.read_bytes())
            async with session.put(url + target, data=model.read_bytes(), headers=headers) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["field"] == SHA256_HEADER
            async with session.put(url + target, data=b"", headers=signed(b"")) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "empty_model"
            # Too large, declared or streamed without a length: 413.
            big = b"x" * (MAX_MODEL + 1)
            async with session.put(url + target, data=big, headers=signed(big)) as resp:
                assert resp.status == 413 and (await resp.json())["error"]["code"] == "body_too_large"

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(MAX_MODEL // 1024 + 1):
                    yield b"y" * 1024

            headers = signed(b"y" * (MAX_MODEL // 1024 + 1) * 1024)
            async with session.put(url + target, data=chunks(), headers=headers) as resp:
                assert resp.status == 413, await resp.text()
        view = await market.run(run.id)
        assert view.state == "settling" and view.model is None
        assert not models.exists() or list(models.iterdir()) == []  # no partial upload is left

        with pytest.raises(CoordinatorError) as caught:
            await stranger.upload_model(run.id, model)
        assert (caught.value.status, caught.value.code) == (403, "not_in_run")
        finished = await a.client.upload_model(run.id, model)
        assert (finished.state, finished.model.sha256, finished.model.bytes) == ("finished", digest, 2560)
        assert finished.model.uploaded_by == a.account and finished.escrow == 0
        assert finished.refunded == Decimal("10") - finished.spent and finished.spent > 0
        assert finished.reason == "final model uploaded; every audit decided"
        assert all(p.state == "released" for p in finished.peers)
        offers = {o.account: o for o in await market.client.offers()}
        assert offers[a.account].state == "open"  # the peer is back on the market
        launcher = await market.client.account(market.launcher.account)
        assert launcher.balance == Decimal("100") - finished.spent
        assert [p.name for p in models.iterdir()] == [f"{run.id}.model"]

        out = tmp_path / "downloaded.bin"
        assert await market.client.download_model(run.id, out) == digest
        assert out.read_bytes() == model.read_bytes()
        with pytest.raises(CoordinatorError) as caught:
            await a.client.upload_model(run.id, model)  # a second upload: the run no longer settles
        assert (caught.value.status, caught.value.code) == (409, "run_not_settling")
        assert out.read_bytes() == model.read_bytes()

        # A model file damaged on the server's disk is refused by the client, and `out` is left alone.
        (models / f"{run.id}.model").write_bytes(b"rotten")
        with pytest.raises(CoordinatorError) as caught:
            await market.client.download_model(run.id, out)
        assert caught.value.code == "hash_mismatch"
        assert out.read_bytes() == model.read_bytes() and list(tmp_path.glob(".downloaded*")) == []
        await market.conserved()


async def test_settle_timeout_finishes_without_a_model(tmp_path: Path, databases: Databases) -> None:
    async with (
        own_market(tmp_path, databases, "10", HIVEMARKET_SETTLE_TIMEOUT="1") as market,
        Peer(market.server.url) as a,
    ):
        run = await market.launch(target=4, budget="10")
        await market.clear()
        await a.join(run.id)
        await a.client.report(run.id, report(0, seconds=0.001))
        assert (await market.run(run.id)).state == "settling"
        view = await market.until(run.id, "the settle timeout", lambda v: v.state == "finished")
        assert (view.reason, view.model) == ("no model uploaded within 1 s of settling", None)
        assert view.escrow == 0 and view.refunded == Decimal("10") - view.spent
        assert all(p.state == "released" for p in view.peers)
        await market.conserved()


async def test_an_existing_database_migrates(tmp_path: Path) -> None:
    """A database made by the first schema opens with the second: old runs get no target and a state date."""
    path = tmp_path / "old.db"
    old = SQLiteDatabase(path, sqlite_migrations()[:1], synchronous="NORMAL", batch_max=8)
    await old.open()
    spec = json.dumps({"name": "legacy"})
    await old.write(
        lambda conn: conn.execute(
            "INSERT INTO runs (id, owner, name, state, spec, max_price_units, peers_min, peers_max,"
            " min_vram_gb, budget_units, created_at)"
            " VALUES ('run-old', ?, 'legacy', 'running', ?, 1, 1, 1, 0, ?, 123.0)",
            ("a" * 64, spec, UNIT),
        )
    )
    await old.write(
        lambda conn: conn.execute(
            "INSERT INTO books (name, units) VALUES ('external', ?), ('escrow:run-old', ?)", (-UNIT, UNIT)
        )
    )
    await old.close()
    store = open_store(
        f"sqlite:///{path}", LeaseConfig(1.0, 3.0), synchronous="NORMAL", batch_max=8, run_policy=RunPolicy()
    )
    await store.open()
    try:
        view = await store.run("run-old")
        assert (view.target_samples, view.state_since, view.reason, view.samples, view.model) == (
            0,
            123.0,
            "",
            0,
            None,
        )
        assert await store.sweep(10**9, nonce_horizon=600) == []
        assert (await store.run("run-old")).state == "paused"  # no live peer: it waits for replacements
    finally:
        await store.close()


async def test_openapi_documents_the_run_routes(server: CoordinatorProcess) -> None:
    async with aiohttp.ClientSession() as session, session.get(server.url + "/openapi.json") as resp:
        paths = (await resp.json())["paths"]
    assert paths["/v1/runs/{run_id}/model"]["put"]["requestBody"]["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    assert (
        "application/octet-stream" in paths["/v1/runs/{run_id}/model"]["get"]["responses"]["200"]["content"]
    )
    for path in ("/v1/runs/{run_id}/join", "/v1/runs/{run_id}/reports"):
        assert "requestBody" in paths[path]["post"]
    assert "201" in paths["/v1/runs/{run_id}/reports"]["post"]["responses"]


async def test_a_peer_that_leaves_is_not_matched_to_the_run_again(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await market.launch(peers=(1, 1))
        await market.clear()
        view = await market.run(run.id)
        (matched,) = [p for p in view.peers if p.state == "active"]
        leaver = a if matched.account == a.account else b
        other = b if leaver is a else a
        with pytest.raises(CoordinatorError) as refused:
            await other.client.leave(run.id)  # never matched to it
        assert (refused.value.status, refused.value.code) == (403, "not_in_run")

        left = await leaver.client.leave(run.id)
        assert peer_of(left, leaver.account).state == "left" and left.state == "paused", left
        assert (await leaver.client.heartbeat(leaver.lease_id)).run_id is None  # back on the market
        with pytest.raises(CoordinatorError) as again:
            await leaver.client.leave(run.id)
        assert (again.value.status, again.value.code) == (403, "not_in_run")

        await market.clear()  # the other peer takes the place; the leaver is never paired with it again
        await market.clear()
        view = await market.run(run.id)
        assert [(p.account, p.state) for p in view.peers if p.state == "active"] == [
            (other.account, "active")
        ]
        assert [p.state for p in view.peers if p.account == leaver.account] == ["left"]
        await market.conserved()


async def test_a_report_cannot_claim_more_than_a_step_or_a_sample_twice(market: Market) -> None:
    async with Peer(market.server.url) as a:
        run = await market.launch(peers=(1, 1))
        await market.clear()
        await a.join(run.id)
        with pytest.raises(CoordinatorError) as too_many:
            await a.client.report(run.id, report(0, samples=257))  # batch.target is 256
        assert (too_many.value.status, too_many.value.field) == (400, "samples")
        twice = report(0).model_copy(
            update={"micro_batches": [MicroBatch(ids=[7, 7], loss=1.0, sketch=[0.0] * 32)], "samples": 2}
        )
        with pytest.raises(CoordinatorError) as duplicated:  # model_copy skips the check, as a hostile client
            await a.client.report(run.id, twice)
        assert (duplicated.value.status, duplicated.value.field) == (400, "micro_batches")
        view = await market.run(run.id)
        assert view.samples == 0 and view.spent == 0


# ------------------------------------------------------------------------------------------------ audits

# without canaries (tests/test_canaries.py has them): fees are paid at once and claims hold only real audits
AUDITED = {"rate": 0.03, "min_audits": 2, "tolerance": 0.2, "ban_after": 2, "canary_rate": 0}


async def _audited_run(market: Market, a: Peer, b: Peer) -> RunView:
    run = await market.launch(peers=(2, 2), target=1000, verification=AUDITED)
    await market.clear()
    await a.join(run.id)
    await b.join(run.id)
    return run


def paid_samples(market: Market, run_id: str) -> int:
    """The run's paid samples as the coordinator keeps them (the status its transitions read); every
    tally its view reads (per run, per match, per account) is checked against the sums over the run's
    reports and audits that it stands for."""
    url, run = market.server.db_url, f"'{run_id}'"
    ((kept, summed, last, loss_sum, count, epoch, losses, reported),) = query_db(
        url,
        "SELECT r.paid_samples, (SELECT COALESCE(SUM(p.samples), 0) FROM reports p"
        "  WHERE p.run_id = r.id AND p.pay_state = 'paid'),"
        " r.last_epoch, r.last_loss_sum, r.last_loss_count, (SELECT MAX(p.epoch) FROM reports p"
        "  WHERE p.run_id = r.id),"
        " (SELECT COALESCE(SUM(p.loss), 0) FROM reports p WHERE p.run_id = r.id AND p.epoch = r.last_epoch),"
        " (SELECT COUNT(*) FROM reports p WHERE p.run_id = r.id AND p.epoch = r.last_epoch)"
        f" FROM runs r WHERE r.id = {run}",
    )
    assert (kept, last, count) == (summed, epoch, reported) and loss_sum == pytest.approx(losses)
    matches = query_db(
        url,
        "SELECT m.paid_samples, m.paid_units, m.last_epoch,"
        " (SELECT COALESCE(SUM(p.samples), 0) FROM reports p WHERE p.run_id = m.run_id"
        "  AND p.lease_id = m.lease_id AND p.pay_state = 'paid'),"
        " (SELECT COALESCE(SUM(p.paid_units), 0) FROM reports p WHERE p.run_id = m.run_id"
        "  AND p.lease_id = m.lease_id AND p.pay_state = 'paid'),"
        " (SELECT MAX(p.epoch) FROM reports p WHERE p.run_id = m.run_id AND p.lease_id = m.lease_id)"
        f" FROM matches m WHERE m.run_id = {run}",
    )
    assert matches and all(row[:3] == row[3:] for row in matches), matches
    accounts = query_db(
        url,
        "SELECT t.audits_passed, t.audits_failed, t.fee_units,"
        " (SELECT COUNT(*) FROM audits a WHERE a.run_id = t.run_id AND a.account = t.account"
        "  AND a.state = 'passed'),"
        " (SELECT COUNT(*) FROM audits a WHERE a.run_id = t.run_id AND a.account = t.account"
        "  AND a.state = 'failed'),"
        " (SELECT COALESCE(SUM(e.units), 0) FROM entries e WHERE e.kind = 'audit_fee'"
        "  AND e.debit = 'escrow:' || t.run_id AND e.credit = 'earned:' || t.account)"
        f" FROM run_accounts t WHERE t.run_id = {run}",
    )
    assert all(row[:3] == row[3:] for row in accounts), accounts
    ((decided,),) = query_db(
        url, f"SELECT COUNT(*) FROM audits WHERE run_id = {run} AND state IN ('passed', 'failed')"
    )
    assert sum(row[0] + row[1] for row in accounts) == decided  # no decided audit left uncounted
    return kept


def _answer(report: ReportBody, index: int, *, wrong: bool = False) -> AuditResultBody:
    claim = report.micro_batches[index]
    sketch = [-x for x in claim.sketch] if wrong else [x * (1 + 1e-6) for x in claim.sketch]
    return AuditResultBody(sketch=sketch, loss=claim.loss)


async def test_a_validator_leaves_out_the_audits_it_answered_when_a_claim_brings_them_back(
    market: Market,
) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await _audited_run(market, a, b)
        body = report(0, samples=6, seconds=0.2)
        await wait_for_clock(time.time() + 0.3)
        await a.client.report(run.id, body)
        with RunLink(market.server.url, b.identity, run.id) as link:

            def claimed(limit: int = 8) -> tuple[list[AuditTask], bool]:
                """The audits of the next claim that comes back (the first call only starts one), and
                whether it came back full."""
                deadline = time.monotonic() + 10
                while not (got := link.claimed_audits(limit))[0]:
                    assert time.monotonic() < deadline, "no audits were claimed"
                    time.sleep(0.01)
                return got

            first, full = await asyncio.to_thread(claimed)  # and the next claim starts at once
            assert sorted(t.index for t in first) == [0, 1] and not full  # room to spare: not behind
            # that claim comes back holding both again (b holds them, unanswered) before b answers one
            assert link._claiming is not None
            await asyncio.wrap_future(link._claiming)
            answered, other = first
            link.answer_audit(answered.id, _answer(body, answered.index))
            assert [t.id for t in (await asyncio.to_thread(claimed))[0]] == [other.id]
            await asyncio.to_thread(wait_until, lambda: link._answering == 0, 10, "the answer to land", 0.01)
            await asyncio.to_thread(claimed, 1)  # the claim of 8 in flight comes back; a claim of 1 starts
            # awaited, a claim is never empty for being early; a claim of 1 comes back full (more may wait)
            tasks, full = await asyncio.to_thread(link.claimed_audits, 1, True)
            assert [t.id for t in tasks] == [other.id] and full


async def test_audits_hold_pay_until_a_validator_confirms_and_pay_the_validator(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await _audited_run(market, a, b)
        body = report(0, samples=6, seconds=0.2)
        await wait_for_clock(time.time() + 0.3)  # 0.2 s of compute fit since the join: paid for all of it
        accepted = await a.client.report(run.id, body)
        assert accepted.pay_state == "held" and accepted.paid > 0, accepted
        assert "held for 2 audits" in accepted.pay_reason
        view = await market.run(run.id)
        assert peer_of(view, a.account).paid == 0 and view.spent == 0  # nothing reached a peer yet
        assert view.samples == 0 and view.held == accepted.paid  # unverified work is not progress
        assert await a.client.claim_audits(run.id, 8) == []  # nobody audits its own report
        tasks = await b.client.claim_audits(run.id, 8)
        assert sorted(t.index for t in tasks) == [0, 1]  # two micro-batches: both are audited
        for t in tasks:
            assert (t.account, t.epoch, t.ids) == (a.account, 0, body.micro_batches[t.index].ids)
            assert t.param_sketch == body.param_sketch
        assert [t.id for t in await b.client.claim_audits(run.id, 8)] == [t.id for t in tasks]  # still b's
        first = await b.client.submit_audit(run.id, tasks[0].id, _answer(body, tasks[0].index))
        assert first.state == "passed" and first.distance < 1e-5 and first.validator == b.account
        assert (await a.client.reports(run.id))[0].pay_state == "held"  # one audit to go
        await b.client.submit_audit(run.id, tasks[1].id, _answer(body, tasks[1].index))
        (paid,) = await a.client.reports(run.id)
        assert (paid.pay_state, paid.pay_reason) == ("paid", "2 audits passed")
        view = await market.run(run.id)
        mine, theirs = peer_of(view, a.account), peer_of(view, b.account)
        assert mine.paid == accepted.paid and (mine.audits_passed, mine.audits_failed) == (2, 0)
        assert view.samples == mine.samples == 6 == paid_samples(market, run.id) and view.held == 0
        audits = await market.client.audits(run.id)
        assert theirs.fees == sum((x.fee for x in audits), Decimal(0)) > 0  # paid for the recomputation
        assert view.spent == mine.paid + theirs.fees
        with pytest.raises(CoordinatorError) as caught:
            await b.client.submit_audit(run.id, tasks[0].id, _answer(body, tasks[0].index))
        assert (caught.value.status, caught.value.code) == (409, "audit_decided")
        await market.conserved()


async def test_failed_audits_void_the_pay_and_ban_the_cheat(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await _audited_run(market, a, b)
        before = {o.account: o.reliability for o in await market.client.offers()}
        bodies = [report(epoch, samples=6, seconds=0.2) for epoch in range(3)]
        for body in bodies:
            await a.client.report(run.id, body)
        tasks = await b.client.claim_audits(run.id, 8)
        assert [t.epoch for t in tasks] == [0, 0, 1, 1, 2, 2]
        for t in tasks[:3]:  # epoch 0 fails twice, then the first audit of epoch 1 is the second failed epoch
            verdict = await b.client.submit_audit(run.id, t.id, _answer(bodies[t.epoch], t.index, wrong=True))
            assert verdict.state == "failed" and verdict.reason.startswith("gradient sketch is 2 from")
        with pytest.raises(CoordinatorError) as caught:  # banned: its other audits ended with the ban
            await b.client.submit_audit(run.id, tasks[4].id, _answer(bodies[2], tasks[4].index))
        assert caught.value.code == "audit_decided"
        view = await market.run(run.id)
        reports = await a.client.reports(run.id)
        assert [(r.pay_state, r.pay_reason) for r in reports] == [
            ("voided", "an audit failed"),
            ("voided", "an audit failed"),
            ("voided", "forfeit: banned from the run"),  # not audited yet, and never paid
        ]
        assert view.samples == 0  # voided samples do not count toward the target
        assert peer_of(view, a.account).state == "banned" and peer_of(view, a.account).paid == 0
        assert view.spent == peer_of(view, b.account).fees  # only the validator was paid
        assert peer_of(view, a.account).audits_failed == 3 and paid_samples(market, run.id) == 0
        with pytest.raises(CoordinatorError) as caught:
            await a.client.report(run.id, report(2, samples=6))
        assert caught.value.code == "not_in_run" and "banned" in caught.value.message
        after = {o.account: o.reliability for o in await market.client.offers()}
        assert after[a.account] < before[a.account] / 2 and after[b.account] >= before[b.account]
        await market.clear()  # the banned peer is free again, but not for this run
        assert [p.state for p in (await market.run(run.id)).peers if p.account == a.account] == ["banned"]
        await market.conserved()


async def test_audits_nobody_can_do_expire_and_the_report_stays_unpaid(
    tmp_path: Path, databases: Databases
) -> None:
    env = {"HIVEMARKET_AUDIT_TIMEOUT": "1", "HIVEMARKET_AUDIT_CLAIM_TIMEOUT": "0.5"}
    async with (
        own_market(tmp_path, databases, "10", **env) as market,
        Peer(market.server.url) as a,
        Peer(market.server.url) as b,
        Peer(market.server.url) as c,
    ):
        run = await market.launch(peers=(3, 3), target=1000, verification=AUDITED)
        await market.clear()
        for peer in (a, b, c):
            await peer.join(run.id)
        body = report(0, samples=6)
        await a.client.report(run.id, body)
        first, second = await b.client.claim_audits(run.id, 8)
        # a declined audit goes to another validator; when every other peer declined, it expires
        await b.client.submit_audit(run.id, first.id, AuditResultBody(declined="not my epoch"))
        assert first.id not in [t.id for t in await b.client.claim_audits(run.id, 8)]
        assert first.id in [t.id for t in await c.client.claim_audits(run.id, 8)]
        declined = await c.client.submit_audit(run.id, first.id, AuditResultBody(declined="nor mine"))
        assert declined.state == "expired" and "every other peer declined" in declined.reason
        # b holds the second audit and never answers: after its claim lapses, c may take it;
        # nobody answers, and at the deadline it expires
        with pytest.raises(CoordinatorError) as caught:
            await c.client.submit_audit(run.id, second.id, _answer(body, second.index))
        assert (caught.value.status, caught.value.code) == (409, "audit_not_held")
        deadline = time.monotonic() + 10
        while second.id not in [t.id for t in await c.client.claim_audits(run.id, 8)]:
            assert time.monotonic() < deadline, "b's claim never lapsed"
            await asyncio.sleep(0.1)
        while (await a.client.reports(run.id))[0].pay_state == "held":
            assert time.monotonic() < deadline, "the audit never expired"
            await asyncio.sleep(0.1)
        (unpaid,) = await a.client.reports(run.id)
        assert unpaid.pay_state == "voided" and "expired" in unpaid.pay_reason
        view = await market.run(run.id)
        assert view.spent == 0 and view.escrow == Decimal("10")  # the held pay went back
        audit = await market.client.audit()
        assert audit.conserved, audit


async def test_a_validator_answer_is_checked(market: Market) -> None:
    outsider = Peer(market.server.url, price="9.00")  # above the run's bid: never matched
    async with Peer(market.server.url) as a, Peer(market.server.url) as b, outsider as c:
        run = await _audited_run(market, a, b)
        body = report(0, samples=6)
        await a.client.report(run.id, body)
        (task, _) = await b.client.claim_audits(run.id, 8)
        async with aiohttp.ClientSession() as session:
            path = f"/v1/runs/{run.id}/audits/{task.id}"
            status, error = await _post(
                session, market.server.url, b.identity, path, {"sketch": [1.0], "loss": 1.0}
            )
        assert (status, error["error"]["field"]) == (400, "sketch") and "at least 32" in error["error"][
            "message"
        ]
        held = (await market.client.reports(run.id))[0]
        assert {(b.loss, b.sketch) for b in held.micro_batches} == {(None, None)}  # nothing to copy from
        with pytest.raises(ValueError, match="send sketch and loss, or declined"):
            AuditResultBody(sketch=[1.0] * 32)
        with pytest.raises(CoordinatorError) as caught:
            await c.client.claim_audits(run.id, 8)  # not in the run
        assert caught.value.code == "not_in_run"
        with pytest.raises(CoordinatorError) as caught:
            await b.client.submit_audit(run.id, "audit-nothere", _answer(body, 0))
        assert caught.value.status == 404
        await market.conserved()


async def test_an_audited_run_needs_two_peers_and_a_peer_left_alone_is_not_audited(market: Market) -> None:
    with pytest.raises(
        ValueError, match=r"peers_min \(1\) must be at least 2 when spec.verification.rate > 0"
    ):
        await market.launch(peers=(1, 1), verification=AUDITED)
    async with Peer(market.server.url) as a, Peer(market.server.url) as b:
        run = await _audited_run(market, a, b)
        await b.go_silent()  # b's lease lapses: a is alone, and nobody holds its parameters to audit it
        await market.until(run.id, "b's drop", lambda v: peer_of(v, b.account).state == "dropped")
        alone = await a.client.report(run.id, report(0, samples=6))  # work done before the pause
        assert (alone.pay_state, alone.paid > 0) == ("voided", True)  # decided at once, not at a deadline
        audits = await market.client.audits(run.id)
        assert {(x.state, x.reason) for x in audits} == {
            ("expired", "no other peer of the run can recompute it")
        }
        view = await market.run(run.id)
        assert view.spent == 0 and view.samples == 0
        await market.conserved()


async def test_a_failure_needs_a_second_validator_and_a_false_one_costs_its_validator(market: Market) -> None:
    async with Peer(market.server.url) as a, Peer(market.server.url) as b, Peer(market.server.url) as c:
        run = await market.launch(peers=(3, 3), target=1000, verification=AUDITED)
        await market.clear()
        for peer in (a, b, c):
            await peer.join(run.id)
        before = {o.account: o.reliability for o in await market.client.offers()}
        await wait_for_clock(time.time() + 0.3)
        honest = report(0, samples=6, seconds=0.2)
        await a.client.report(run.id, honest)
        lied, truthful = await b.client.claim_audits(run.id, 8)
        pending = await b.client.submit_audit(run.id, lied.id, _answer(honest, lied.index, wrong=True))
        assert pending.state == "pending" and pending.first_failure["validator"] == b.account  # not final
        assert lied.id not in [
            t.id for t in await b.client.claim_audits(run.id, 8)
        ]  # b cannot confirm itself
        await b.client.submit_audit(run.id, truthful.id, _answer(honest, truthful.index))
        (second,) = await c.client.claim_audits(run.id, 8)
        overturned = await c.client.submit_audit(run.id, second.id, _answer(honest, second.index))
        assert overturned.state == "passed" and "overturns the failure reported by" in overturned.reason
        (paid,) = await a.client.reports(run.id)
        assert paid.pay_state == "paid"  # the honest peer lost nothing to the lie
        after = {o.account: o.reliability for o in await market.client.offers()}
        assert after[b.account] < before[b.account] and after[a.account] >= before[a.account]
        view = await market.run(run.id)
        assert peer_of(view, c.account).fees > 0 and peer_of(view, a.account).audits_failed == 0

        cheat = report(1, samples=6, seconds=0.2)
        await a.client.report(run.id, cheat)
        first, other = await c.client.claim_audits(run.id, 8)
        assert (
            await c.client.submit_audit(run.id, first.id, _answer(cheat, first.index, wrong=True))
        ).state == ("pending")
        await c.client.submit_audit(run.id, other.id, _answer(cheat, other.index))
        (confirming,) = [t for t in await b.client.claim_audits(run.id, 8) if t.id == first.id]
        confirmed = await b.client.submit_audit(
            run.id, confirming.id, _answer(cheat, confirming.index, wrong=True)
        )
        assert confirmed.state == "failed" and "confirms the failure reported by" in confirmed.reason
        first_report, _ = await a.client.reports(run.id)
        assert [r.pay_state for r in await a.client.reports(run.id)] == ["paid", "voided"]
        assert paid_samples(market, run.id) == first_report.samples  # the voided one is not counted
        await market.conserved()


async def _both_joined_and_b_paid(market: Market, a: Peer, b: Peer) -> tuple[RunView, Decimal]:
    """A run of 1 to 2 peers that ``a`` and ``b`` joined, and what ``b``'s report of epoch 0 is paid."""
    run = await market.launch(peers=(1, 2))
    await market.clear()
    await a.join(run.id)
    await b.join(run.id)
    return run, (await b.client.report(run.id, report(0, seconds=0.001))).paid
