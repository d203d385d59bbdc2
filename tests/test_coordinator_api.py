"""The coordinator's HTTP API against a real server process and a real SQLite file: every route and error."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from coordinator.routes import ROUTES
from peer.protocol.envelope import NONCE_HEADER, sign_request
from peer.protocol.identity import Identity, save_identity
from peer.protocol.schemas import TIME_HEADER
from tests.conftest import Databases
from tests.harness import CoordinatorProcess, cli_env, minimal_spec, run_cli, start_coordinator, wait_until

HEARTBEAT = 0.5
H100 = {"gpu": "H100", "gpu_count": 1, "vram_gb": 80.0, "tflops": 400.0, "ram_gb": 256.0, "cpu_cores": 32}
A10 = {"gpu": "A10", "gpu_count": 1, "vram_gb": 24.0, "tflops": 60.0, "ram_gb": 64.0, "cpu_cores": 8}


def _start(home: Path, db_url: str | None) -> CoordinatorProcess:
    """Fast leases, small limits, no automatic clearing (tests clear on demand)."""
    env = cli_env(
        home,
        HIVEMARKET_HEARTBEAT_INTERVAL=str(HEARTBEAT),
        HIVEMARKET_SWEEP_INTERVAL="0.1",
        HIVEMARKET_CLEARING_INTERVAL="3600",
        HIVEMARKET_RATE_LIMIT_BURST="30",
        HIVEMARKET_RATE_LIMIT_PER_SECOND="5",
        HIVEMARKET_MAX_BODY_BYTES="4096",
    )
    return start_coordinator(home, Identity.generate(), env=env, db_url=db_url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, databases: Databases) -> Iterator[CoordinatorProcess]:
    """One server for most of the module's tests (each test uses fresh accounts)."""
    process = _start(tmp_path_factory.mktemp("coordinator"), databases.url())
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def api(server: CoordinatorProcess) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(server, session)


@pytest.fixture
async def own_api(tmp_path: Path, databases: Databases) -> AsyncIterator[Api]:
    """A server of the test's own, for tests that need the whole market to themselves."""
    process = _start(tmp_path, databases.url())
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(process, session)
    finally:
        process.stop()


class Api:
    """Raw HTTP as a client in any language would speak it: bytes, headers, the envelope."""

    def __init__(self, server: CoordinatorProcess, session: aiohttp.ClientSession):
        self.server, self.session, self.admin = server, session, server.admin

    async def call(
        self,
        method: str,
        path: str,
        signer: Identity | None = None,
        body: Any = None,
        *,
        raw: bytes | None = None,
        use_msgpack: bool = False,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        if raw is None:
            raw = b"" if body is None else (msgpack.packb(body) if use_msgpack else json.dumps(body).encode())
        sent = {"Content-Type": "application/msgpack" if use_msgpack else "application/json"}
        if use_msgpack:
            sent["Accept"] = "application/msgpack"
        if signer is not None:
            sent.update(sign_request(signer, method, path, raw))
        sent.update(headers or {})
        async with self.session.request(method, self.server.url + path, data=raw, headers=sent) as response:
            data = await response.read()
            if response.content_type == "application/msgpack":
                return response.status, msgpack.unpackb(data)
            if response.content_type == "application/json":
                return response.status, json.loads(data)
            return response.status, data.decode()

    async def ok(
        self, method: str, path: str, signer: Identity | None = None, body: Any = None, **kw: Any
    ) -> Any:
        status, data = await self.call(method, path, signer, body, **kw)
        assert 200 <= status < 300, (status, data)
        return data

    async def error(
        self, status: int, method: str, path: str, signer: Identity | None = None, body: Any = None, **kw: Any
    ) -> dict[str, Any]:
        got, data = await self.call(method, path, signer, body, **kw)
        assert got == status, (got, data)
        assert set(data["error"]) == {"code", "message", "field"}, data
        return data["error"]

    async def fund(self, account: str, amount: str) -> dict[str, Any]:
        return await self.ok("POST", f"/v1/accounts/{account}/deposit", self.admin, {"amount": amount})

    async def offer(self, peer: Identity, price: str, hardware: dict = H100, **extra: Any) -> dict[str, Any]:
        return await self.ok(
            "POST", "/v1/offers", peer, {"price_per_hour": price, "hardware": hardware, **extra}
        )

    async def audit(self) -> dict[str, Any]:
        return await self.ok("GET", "/v1/ledger/audit")


def _run_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "spec": minimal_spec("tiny-lm"),
        "max_price": "0.01",
        "peers_min": 1,
        "peers_max": 1,
        "budget": "10",
    }
    return {**body, **overrides}


# ------------------------------------------------------------------------------------------ discovery


async def test_healthz_openapi_and_unknown_routes(api: Api) -> None:
    assert await api.ok("GET", "/healthz") == {"status": "ok"}
    spec = await api.ok("GET", "/openapi.json")
    assert spec["openapi"].startswith("3.")
    for route in ROUTES:
        operation = spec["paths"][route.path][route.method.lower()]
        if route.body is not None:
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"]
    error = await api.error(404, "GET", "/v1/nothing-here")
    assert error["code"] == "not_found"
    error = await api.error(405, "DELETE", "/v1/offers")
    assert error["code"] == "method_not_allowed"


async def test_every_answer_carries_the_coordinator_s_clock(api: Api) -> None:
    for path in ("/healthz", "/v1/nothing-here"):
        before = time.time()
        async with api.session.get(api.server.url + path) as response:
            stamped = float(response.headers[TIME_HEADER])
        assert before - 1 <= stamped <= time.time() + 1


# -------------------------------------------------------------------------------------------- accounts


async def test_deposit_account_and_audit(api: Api) -> None:
    alice = Identity.generate()
    before = await api.audit()
    account = await api.fund(alice.account, "12.50")
    assert account == {
        "account": alice.account,
        "balance": "12.500000",
        "escrow": "0.000000",
        "earned": "0.000000",
        "withdrawn": "0.000000",
        "reputation": account["reputation"],
    }
    assert 0 < account["reputation"] <= 1
    assert (await api.ok("GET", f"/v1/accounts/{alice.account}"))["balance"] == "12.500000"
    after = await api.audit()
    assert after["conserved"] is True
    assert float(after["deposits"]) - float(before["deposits"]) == pytest.approx(12.5)


@pytest.mark.parametrize(
    ("amount", "reason"),
    [
        (12.5, "decimal string"),
        ("-1", "non-negative decimal"),
        ("1.1234567", "6 decimal places"),
        ("0", "greater than 0"),
        ("1e3", "non-negative decimal"),
        (None, "decimal string"),
    ],
)
async def test_deposit_rejects_bad_amounts_naming_the_field(api: Api, amount: Any, reason: str) -> None:
    alice = Identity.generate()
    error = await api.error(
        400, "POST", f"/v1/accounts/{alice.account}/deposit", api.admin, {"amount": amount}
    )
    assert error["field"] == "amount" and reason in error["message"], error
    assert (await api.ok("GET", f"/v1/accounts/{alice.account}"))["balance"] == "0.000000"


async def test_withdraw_and_transfer_move_money_and_keep_the_ledger_conserved(api: Api) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    before = await api.audit()
    await api.fund(alice.account, "10")
    path = f"/v1/accounts/{alice.account}/withdraw"
    body = json.dumps({"amount": "3"}).encode()
    headers = sign_request(alice, "POST", path, body)
    status, mine = await api.call("POST", path, raw=body, headers=headers)
    assert status == 200, mine
    assert (mine["balance"], mine["earned"], mine["withdrawn"]) == ("7.000000", "0.000000", "3.000000")
    error = await api.error(401, "POST", path, raw=body, headers=headers)  # a replay pays out nothing more
    assert error["code"] == "nonce_replayed"

    sent = await api.ok(
        "POST", f"/v1/accounts/{alice.account}/transfer", alice, {"to": bob.account, "amount": "2.5"}
    )
    assert (sent["balance"], sent["withdrawn"]) == ("4.500000", "3.000000")
    bobs = await api.ok("POST", f"/v1/accounts/{bob.account}/withdraw", bob, {"amount": "0.5"})
    assert (bobs["balance"], bobs["withdrawn"]) == ("2.000000", "0.500000")

    after = await api.audit()  # what was withdrawn stays counted among the holdings, against the deposits
    assert after["conserved"] is True, after
    assert Decimal(after["deposits"]) - Decimal(before["deposits"]) == 10
    assert Decimal(after["holdings"]) - Decimal(before["holdings"]) == 10


@pytest.mark.parametrize("route", ["withdraw", "transfer"])
async def test_withdraw_and_transfer_refuse_what_the_account_does_not_hold(api: Api, route: str) -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    await api.fund(alice.account, "5")
    path = f"/v1/accounts/{alice.account}/{route}"
    to = {"to": bob.account} if route == "transfer" else {}

    error = await api.error(409, "POST", path, alice, {**to, "amount": "5.000001"})
    assert (error["code"], error["field"]) == ("insufficient_funds", "amount"), error
    assert "amount 5.000001" in error["message"] and "5.000000 is available" in error["message"], error
    for amount, reason in (("0", "greater than 0"), ("-1", "'-1' is not a non-negative decimal")):
        error = await api.error(400, "POST", path, alice, {**to, "amount": amount})
        assert error["field"] == "amount" and reason in error["message"], error
    error = await api.error(403, "POST", path, mallory, {**to, "amount": "1"})  # only the owner moves it
    assert error["field"] == "account" and mallory.account[:12] in error["message"], error
    if route == "transfer":
        error = await api.error(400, "POST", path, alice, {"to": alice.account, "amount": "1"})
        assert error["field"] == "to" and "itself" in error["message"], error
        error = await api.error(400, "POST", path, alice, {"to": "not-an-account", "amount": "1"})
        assert error["field"] == "to" and "not-an-account" in error["message"], error

    for who, balance in ((alice, "5.000000"), (bob, "0.000000")):  # nothing was written
        view = await api.ok("GET", f"/v1/accounts/{who.account}")
        assert (view["balance"], view["withdrawn"]) == (balance, "0.000000"), view
    assert (await api.audit())["conserved"] is True


async def test_body_errors_name_the_problem(api: Api) -> None:
    path = f"/v1/accounts/{Identity.generate().account}/deposit"
    error = await api.error(400, "POST", path, api.admin, raw=b"{not json")
    assert error["code"] == "malformed_body" and "JSON" in error["message"]
    error = await api.error(400, "POST", path, api.admin, {"amount": "1", "amuont": "2"})
    assert error["field"] == "amuont" and "Extra inputs" in error["message"]
    error = await api.error(400, "POST", path, api.admin, {})
    assert error["field"] == "amount" and "required" in error["message"].lower()
    error = await api.error(400, "POST", "/v1/accounts/not-hex/deposit", api.admin, {"amount": "1"})
    assert error["field"] == "account" and "'not-hex'" in error["message"]


async def test_only_the_admin_deposits(api: Api) -> None:
    mallory = Identity.generate()
    error = await api.error(403, "POST", f"/v1/accounts/{mallory.account}/deposit", mallory, {"amount": "5"})
    assert "admin" in error["message"]
    assert (await api.ok("GET", f"/v1/accounts/{mallory.account}"))["balance"] == "0.000000"


async def test_signature_errors_are_401_and_change_nothing(api: Api) -> None:
    alice = Identity.generate()
    path = f"/v1/accounts/{alice.account}/deposit"
    body = json.dumps({"amount": "3"}).encode()
    assert (await api.error(401, "POST", path, None, raw=body))["field"] == "X-Hivemarket-Key"
    forged = sign_request(api.admin, "POST", path, b'{"amount": "300"}')  # signed for another body
    assert (await api.error(401, "POST", path, raw=body, headers=forged))["code"] == "bad_signature"
    stale = sign_request(api.admin, "POST", path, body, timestamp=int(time.time()) - 3600)
    error = await api.error(401, "POST", path, raw=body, headers=stale)
    assert error["field"] == "X-Hivemarket-Timestamp" and "server's clock" in error["message"]
    assert (await api.ok("GET", f"/v1/accounts/{alice.account}"))["balance"] == "0.000000"


async def test_a_replayed_nonce_is_refused_and_never_applies_twice(api: Api) -> None:
    alice = Identity.generate()
    path = f"/v1/accounts/{alice.account}/deposit"
    body = json.dumps({"amount": "7"}).encode()
    headers = sign_request(api.admin, "POST", path, body)
    assert (await api.call("POST", path, raw=body, headers=headers))[0] == 200
    for _ in range(3):
        error = await api.error(401, "POST", path, raw=body, headers=headers)
        assert error["code"] == "nonce_replayed" and error["field"] == NONCE_HEADER
    assert (await api.ok("GET", f"/v1/accounts/{alice.account}"))["balance"] == "7.000000"


async def test_msgpack_requests_and_responses(api: Api) -> None:
    alice = Identity.generate()
    account = await api.ok(
        "POST", f"/v1/accounts/{alice.account}/deposit", api.admin, {"amount": "2.25"}, use_msgpack=True
    )
    assert account["balance"] == "2.250000"  # money stays a decimal string in msgpack too
    error = await api.error(
        400, "POST", f"/v1/accounts/{alice.account}/deposit", api.admin, raw=b"\xc1", use_msgpack=True
    )
    assert "msgpack" in error["message"]


async def test_oversized_body_is_413(api: Api) -> None:
    huge = json.dumps({"amount": "1", "pad": "x" * 5000}).encode()
    error = await api.error(
        413, "POST", f"/v1/accounts/{Identity.generate().account}/deposit", api.admin, raw=huge
    )
    assert error["code"] == "body_too_large" and "4096" in error["message"]


async def test_rate_limit_is_per_account_429(api: Api) -> None:
    chatty, quiet = Identity.generate(), Identity.generate()
    offer = await api.offer(chatty, "1.0")
    lease = offer["lease"]["id"]
    results = await asyncio.gather(
        *(api.call("POST", f"/v1/leases/{lease}/heartbeat", chatty) for _ in range(60))
    )
    statuses = [status for status, _ in results]
    assert statuses.count(429) > 0 and statuses.count(200) >= 25, statuses
    limited = next(data for status, data in results if status == 429)
    assert limited["error"]["code"] == "rate_limited"
    assert (await api.offer(quiet, "1.0"))["lease"]["state"] == "active"  # other accounts are unaffected


# ---------------------------------------------------------------------------------------- offers, leases


async def test_offers_leases_and_the_filter_language(api: Api) -> None:
    big, small = Identity.generate(), Identity.generate()
    first = await api.offer(
        big, "2.40", H100, roles=["trainer", "validator"], peer_id="12D3KooWx", maddrs=["/ip4/1.2.3.4/tcp/5"]
    )
    assert first["offer"]["state"] == "open" and first["lease"]["state"] == "active"
    assert first["lease"]["heartbeat_interval"] == HEARTBEAT
    updated = await api.offer(big, "2.00", H100)
    assert updated["lease"]["id"] == first["lease"]["id"]  # updating an offer keeps its lease
    assert updated["offer"]["price_per_hour"] == "2.000000"
    await api.offer(small, "0.50", A10)

    ours = f"account in [{big.account},{small.account}]"  # the module's server holds other tests' offers too
    listed = (await api.ok("GET", f"/v1/offers?q={ours} vram_gb>=40 price<=2.5&sort=-price"))["offers"]
    assert [o["account"] for o in listed] == [big.account]
    cheap_first = (await api.ok("GET", f"/v1/offers?q={ours} gpu in [H100,A10]&sort=price"))["offers"]
    assert [o["account"] for o in cheap_first] == [small.account, big.account]
    dear_first = (await api.ok("GET", f"/v1/offers?q={ours}&sort=-price"))["offers"]
    assert [o["account"] for o in dear_first] == [big.account, small.account]

    error = await api.error(400, "GET", "/v1/offers?q=gpu=H100 vram>=40")
    assert error["field"] == "q" and "'vram>=40'" in error["message"]
    error = await api.error(400, "GET", "/v1/offers?sort=colour")
    assert error["field"] == "sort" and "colour" in error["message"]
    error = await api.error(
        400, "POST", "/v1/offers", big, {"price_per_hour": "1", "hardware": {**H100, "tflops": -1}}
    )
    assert error["field"] == "hardware.tflops"


async def test_heartbeats_renew_and_a_silent_lease_lapses(api: Api) -> None:
    peer, other = Identity.generate(), Identity.generate()
    lease = (await api.offer(peer, "1.0", A10))["lease"]
    renewed = await api.ok("POST", f"/v1/leases/{lease['id']}/heartbeat", peer)
    assert renewed["expires_at"] > lease["expires_at"]
    error = await api.error(403, "POST", f"/v1/leases/{lease['id']}/heartbeat", other)
    assert error["field"] == "lease_id"
    assert (await api.error(404, "POST", "/v1/leases/doesnotexist/heartbeat", peer))["code"] == "not_found"

    async def state() -> str:
        return (await api.ok("GET", f"/v1/offers?q=account={peer.account}"))["offers"][0]["state"]

    deadline = time.monotonic() + 10
    while await state() != "offline":
        assert time.monotonic() < deadline, "the lease did not lapse"
        await asyncio.sleep(0.1)
    error = await api.error(409, "POST", f"/v1/leases/{lease['id']}/heartbeat", peer)
    assert error["code"] == "lease_lapsed"
    before = lease["expires_at"]
    again = await api.offer(peer, "1.0", A10)
    assert again["lease"]["id"] != lease["id"] and again["lease"]["expires_at"] > before
    assert again["offer"]["reliability"] < lease_reliability_of_a_new_peer(
        await api.offer(Identity.generate(), "1", A10)
    )


async def test_a_withdrawn_offer_ends_released_and_costs_no_reliability(api: Api) -> None:
    leaving, vanishing, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    lease = (await api.offer(leaving, "1.0", A10))["lease"]
    silent = await api.offer(vanishing, "1.0", A10)
    withdraw = f"/v1/leases/{lease['id']}/withdraw"
    error = await api.error(403, "POST", withdraw, stranger)  # another account cannot withdraw it
    assert error["field"] == "lease_id"
    assert (await api.error(404, "POST", "/v1/leases/doesnotexist/withdraw", leaving))["code"] == "not_found"

    withdrawn = await api.ok("POST", withdraw, leaving)
    assert (withdrawn["lease"]["id"], withdrawn["lease"]["state"]) == (lease["id"], "released")
    assert withdrawn["offer"]["state"] == "withdrawn"
    error = await api.error(409, "POST", withdraw, leaving)  # a second withdrawal: the lease has ended
    assert (error["code"], error["field"]) == ("lease_released", "lease_id") and "withdrawn" in error[
        "message"
    ]
    assert (await api.error(409, "POST", f"/v1/leases/{lease['id']}/heartbeat", leaving))["code"] == (
        "lease_released"
    )

    async def ours() -> dict[str, dict[str, Any]]:
        listed = await api.ok("GET", f"/v1/offers?q=account in [{leaving.account},{vanishing.account}]")
        return {o["account"]: o for o in listed["offers"]}

    deadline = time.monotonic() + 10
    while (await ours())[vanishing.account]["state"] != "offline":  # the other peer's lease lapses
        assert time.monotonic() < deadline, "the silent lease did not lapse"
        await asyncio.sleep(0.1)
    offers = await ours()
    assert offers[leaving.account]["state"] == "withdrawn"  # never lapses: no lapse is counted
    assert offers[leaving.account]["reliability"] == withdrawn["offer"]["reliability"]
    assert offers[vanishing.account]["reliability"] < silent["offer"]["reliability"]  # a lapse costs

    again = await api.offer(leaving, "1.0", A10)  # offering again opens a new lease
    assert again["lease"]["id"] != lease["id"] and again["offer"]["state"] == "open"


async def test_heartbeat_telemetry_reaches_peers_and_the_dashboard(api: Api) -> None:
    peer = Identity.generate()
    lease = (await api.offer(peer, "1.0", H100))["lease"]
    mine = f"/v1/peers?account={peer.account}"

    async def listed() -> dict[str, Any]:
        (found,) = [p for p in (await api.ok("GET", mine))["peers"] if p["account"] == peer.account]
        return found

    assert (await listed())["telemetry"] is None  # a heartbeat without a body renews the lease alone
    reading = {"power_w": 251.0, "temperature_c": 67.0, "utilization_pct": 93.5}
    await api.ok("POST", f"/v1/leases/{lease['id']}/heartbeat", peer, {"telemetry": reading})
    shown = await listed()
    # throttling is kept on the offer (coordinator.capacity), not in the peer list's last reading
    shown_reading = reading | {"throttled": None, "clock_ratio": None}
    assert shown["telemetry"] == shown_reading and shown["telemetry_at"] is not None
    assert shown["state"] == "open" and shown["samples"] == 0 and shown["earned"] == "0.000000"

    error = await api.error(
        400, "POST", f"/v1/leases/{lease['id']}/heartbeat", peer, {"telemetry": {"utilization_pct": 150}}
    )
    assert error["field"] == "telemetry.utilization_pct" and "150" in error["message"]
    assert (await listed())["telemetry"] == shown_reading  # the refused reading changed nothing

    status, page = await api.call("GET", f"/?q=account={peer.account}")
    assert status == 200 and "251 W" in page and "67 °C" in page and peer.account[:12] in page
    status, page = await api.call("GET", "/?q=vram>=40")
    assert status == 200 and "bad filter term &#x27;vram&gt;=40&#x27;" in page  # named on the page
    assert (await api.error(404, "GET", "/v1/runs/run-nosuchrun/loss"))["field"] == "run_id"


def lease_reliability_of_a_new_peer(offer: dict[str, Any]) -> float:
    return offer["offer"]["reliability"]


# ------------------------------------------------------------------------------------------------ runs


async def test_runs_escrow_cancel_and_refund(api: Api) -> None:
    launcher, stranger = Identity.generate(), Identity.generate()
    await api.fund(launcher.account, "25")
    error = await api.error(402, "POST", "/v1/runs", launcher, _run_body(budget="26"))
    assert error["code"] == "insufficient_funds"
    run = await api.ok("POST", "/v1/runs", launcher, _run_body(budget="20"))
    assert run["state"] == "recruiting" and run["escrow"] == "20.000000" and run["owner"] == launcher.account
    account = await api.ok("GET", f"/v1/accounts/{launcher.account}")
    assert (account["balance"], account["escrow"]) == ("5.000000", "20.000000")
    assert (await api.ok("GET", f"/v1/runs/{run['id']}"))["id"] == run["id"]
    assert run["id"] in [r["id"] for r in (await api.ok("GET", "/v1/runs"))["runs"]]

    assert (await api.error(403, "POST", f"/v1/runs/{run['id']}/cancel", stranger))["field"] == "run_id"
    cancelled = await api.ok("POST", f"/v1/runs/{run['id']}/cancel", launcher)
    assert cancelled["state"] == "cancelled" and cancelled["escrow"] == "0.000000"
    account = await api.ok("GET", f"/v1/accounts/{launcher.account}")
    assert (account["balance"], account["escrow"]) == ("25.000000", "0.000000")
    assert (await api.error(409, "POST", f"/v1/runs/{run['id']}/cancel", launcher))["code"] == "run_ended"
    assert (await api.error(404, "GET", "/v1/runs/run-nope"))["code"] == "not_found"
    error = await api.error(400, "POST", "/v1/runs", launcher, _run_body(peers_min=3, peers_max=2))
    assert error["field"] == "peers_max"
    assert (await api.audit())["conserved"] is True


# ---------------------------------------------------------------------------------------------- market


async def test_clearing_matches_peers_to_runs_at_one_price(own_api: Api) -> None:
    api = own_api
    launcher = Identity.generate()
    await api.fund(launcher.account, "100")
    peers = [Identity.generate() for _ in range(3)]
    for peer, price in zip(peers, ("0.80", "1.00", "9.00"), strict=True):
        await api.offer(peer, price, H100)  # 9.00/h for 400 TFLOPs is above the run's 0.01 per TFLOP-h
    run = await api.ok("POST", "/v1/runs", launcher, _run_body(peers_min=2, peers_max=2, min_vram_gb=40))
    assert (await api.error(403, "POST", "/v1/market/clear", launcher))["code"] == "forbidden"
    cleared = await api.ok("POST", "/v1/market/clear", api.admin)
    assert cleared["trades"] >= 2, cleared

    run = await api.ok("GET", f"/v1/runs/{run['id']}")
    matched = {p["account"] for p in run["peers"]}
    assert matched == {peers[0].account, peers[1].account}, (run, cleared)
    assert run["state"] == "running"
    for peer_view in run["peers"]:
        asked = {peers[0].account: 0.80, peers[1].account: 1.00}[peer_view["account"]]
        assert float(peer_view["price_per_hour"]) >= asked  # nobody trades below their ask
    offers = {o["account"]: o for o in (await api.ok("GET", "/v1/offers"))["offers"]}
    assert offers[peers[0].account]["state"] == "matched" and offers[peers[2].account]["state"] == "open"
    market = await api.ok("GET", "/v1/market")
    assert market["clearing_price"] is not None and market["rounds"][0]["trades"] == cleared["trades"]
    assert float(market["clearing_price"]) <= 0.01  # nobody trades above their bid

    await api.ok("POST", f"/v1/runs/{run['id']}/cancel", launcher)
    offers = {o["account"]: o for o in (await api.ok("GET", "/v1/offers"))["offers"]}
    assert offers[peers[0].account]["state"] == "open"  # cancelling releases the peers to the market


async def test_metrics_show_the_named_series(api: Api) -> None:
    await api.ok("GET", "/healthz")
    text = await api.ok("GET", "/metrics")
    for name in (
        'hivemarket_http_requests_total{method="GET",route="/healthz",status="200"}',
        "hivemarket_http_request_seconds_bucket",
        "hivemarket_live_peers ",
        "hivemarket_lapsed_leases_total ",
        "hivemarket_clearing_price ",
        'hivemarket_runs{state="running"}',
        "hivemarket_ledger_conserved 1.0",
    ):
        assert name in text, name


def test_restart_keeps_everything_acknowledged(tmp_path: Path, databases: Databases) -> None:
    """A clean restart on the same database: accounts, offers and leases are all still there."""
    server = start_coordinator(
        tmp_path,
        Identity.generate(),
        env=cli_env(tmp_path, HIVEMARKET_HEARTBEAT_INTERVAL="5"),
        db_url=databases.url(),
    )
    peer, alice = Identity.generate(), Identity.generate()

    async def before() -> str:
        async with aiohttp.ClientSession() as session:
            api = Api(server, session)
            await api.fund(alice.account, "3")
            return (await api.offer(peer, "1.5", A10))["lease"]["id"]

    lease_id = asyncio.run(before())
    assert server.stop() == 0
    restarted = server.restart()
    try:

        async def after() -> None:
            async with aiohttp.ClientSession() as session:
                api = Api(restarted, session)
                assert (await api.ok("GET", f"/v1/accounts/{alice.account}"))["balance"] == "3.000000"
                assert (await api.ok("POST", f"/v1/leases/{lease_id}/heartbeat", peer))["state"] == "active"

        asyncio.run(after())
    finally:
        restarted.stop()
    wait_until(lambda: restarted.proc.poll() is not None, 10, "the server to exit")


async def test_a_refused_request_cannot_be_replayed_once_it_would_succeed(api: Api) -> None:
    """A captured request refused for lack of funds must not apply later, when the funds are there."""
    launcher = Identity.generate()
    body = json.dumps(_run_body(budget="5")).encode()
    headers = sign_request(launcher, "POST", "/v1/runs", body)
    error = await api.error(402, "POST", "/v1/runs", raw=body, headers=headers)
    assert "is needed" in error["message"] and "balance:" not in error["message"]
    await api.fund(launcher.account, "50")
    error = await api.error(401, "POST", "/v1/runs", raw=body, headers=headers)
    assert error["code"] == "nonce_reused" and "402 insufficient_funds" in error["message"]
    account = await api.ok("GET", f"/v1/accounts/{launcher.account}")
    assert (account["balance"], account["escrow"]) == ("50.000000", "0.000000")


async def test_a_book_never_exceeds_what_the_store_can_hold(api: Api) -> None:
    whale = Identity.generate()
    largest = "999999999999.999999"  # the largest amount the API accepts
    for _ in range(9):  # 9 of them fit in a 64-bit book of micro-units
        await api.fund(whale.account, largest)
    error = await api.error(
        409, "POST", f"/v1/accounts/{whale.account}/deposit", api.admin, {"amount": largest}
    )
    assert error["code"] == "limit_exceeded" and error["field"] == "amount"
    assert (await api.ok("GET", f"/v1/accounts/{whale.account}"))["balance"] == "8999999999999.999991"
    assert (await api.audit())["conserved"] is True


def test_serve_refuses_bad_input_with_one_line(tmp_path: Path) -> None:
    admin_key = tmp_path / "admin.pem"
    save_identity(Identity.generate(), admin_key)
    env = cli_env(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            f"--port {port} on 127.0.0.1 is already in use": ["--port", str(port)],
            "use sqlite:///PATH or postgresql://USER@HOST/DATABASE": ["--port", "0", "--db", "mysql://db/m"],
            f"cannot connect to the database postgresql://me:***@127.0.0.1:{port}/m": [
                "--port",
                "0",
                "--db",
                f"postgresql://me:secret@127.0.0.1:{port}/m?connect_timeout=2",
            ],
            "does not exist": ["--port", "0", "--admin-key", str(tmp_path / "nope.pem")],
            "cannot open the database /proc/nope/m.db": ["--port", "0", "--db", "sqlite:////proc/nope/m.db"],
        }
        for message, args in cases.items():
            base = ["--admin-key", str(admin_key), "--db", f"sqlite:///{tmp_path / 'm.db'}"]
            result = run_cli("coordinator", "serve", *base, *args, env=env)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_total_deposits_never_exceed_what_the_store_can_hold(own_api: Api) -> None:
    api, largest = own_api, "999999999999.999999"
    statuses = [
        (
            await api.call(
                "POST", f"/v1/accounts/{Identity.generate().account}/deposit", api.admin, {"amount": largest}
            )
        )[0]
        for _ in range(10)
    ]
    assert statuses == [200] * 9 + [409]  # the tenth would take the deposits' book past 64 bits
    assert (await api.audit())["conserved"] is True


async def test_scheduled_rounds_match_without_being_asked(tmp_path: Path) -> None:
    env = cli_env(tmp_path, HIVEMARKET_CLEARING_INTERVAL="0.2")
    server = start_coordinator(tmp_path, Identity.generate(), env=env)
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(server, session)
            assert (await api.ok("GET", "/v1/market"))["rounds"] == []  # empty books are not rounds
            peer, launcher = Identity.generate(), Identity.generate()
            await api.offer(peer, "1.00", H100)
            await api.fund(launcher.account, "10")
            run = await api.ok("POST", "/v1/runs", launcher, _run_body())
            deadline = time.monotonic() + 15
            while not (await api.ok("GET", f"/v1/runs/{run['id']}"))["peers"]:
                assert time.monotonic() < deadline, "no scheduled round matched the peer"
                await asyncio.sleep(0.1)
            assert (await api.ok("GET", "/v1/market"))["rounds"][0]["trades"] == 1
    finally:
        server.stop()
