"""The coordinator client and the market CLI against the real coordinator, run as a subprocess.

Nothing here stubs the server: what the client signs, how money round-trips and how retries behave are
only worth testing against the code that verifies and applies them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

from peer.market_cli import serve_runs_in_background
from peer.protocol.client import (
    AlreadyApplied,
    ClientSettings,
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnreachable,
)
from peer.protocol.identity import Identity, load_identity, save_identity
from peer.protocol.schemas import HardwareSummary, OfferBody, OfferResponse, OfferView
from peer.settings import load_settings
from peer.worker import TrainerSupervisor
from tests.harness import CoordinatorProcess, cli_env, kill_group, query_db, run_cli, start_coordinator

T = TypeVar("T")
FAST_RETRIES = ClientSettings(retries=3, retry_backoff=0.05, retry_backoff_max=0.2, request_timeout=5)


def offer_body(price: str, gpu: str = "H100", vram_gb: float = 80.0) -> OfferBody:
    hardware = HardwareSummary(gpu=gpu, gpu_count=1, vram_gb=vram_gb, tflops=400.0, ram_gb=512, cpu_cores=32)
    return OfferBody(price_per_hour=price, hardware=hardware)


async def post_offer(url: str, price: str, **hardware: str | float) -> tuple[Identity, OfferResponse]:
    """A new account posts an offer; returns who and what the coordinator answered."""
    peer = Identity.generate()
    async with CoordinatorClient(url, peer) as client:
        return peer, await client.post_offer(offer_body(price, **hardware))  # type: ignore[arg-type]


def closed_port() -> int:
    """A port nothing listens on: bound once by us, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's failure output must be one `Error: ...` line, never a traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ accounts


def test_deposit_through_cli_shows_in_account(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", HIVEMARKET_COORDINATOR=coordinator.url)
    me = load_identity(tmp_path / "home" / "identity.pem").account
    admin_key = str(coordinator.home / "admin.pem")

    deposited = run_cli("deposit", me, "12.500001", "--admin-key", admin_key, env=env)
    assert deposited.returncode == 0, deposited.stderr
    assert "balance     12.500001" in deposited.stdout  # no rounding on the way: money is never a float

    mine = run_cli("account", "--json", env=env)  # no ID: the account of HIVEMARKET_HOME's identity
    assert mine.returncode == 0, mine.stderr
    view = json.loads(mine.stdout)
    assert (view["account"], view["balance"], view["escrow"]) == (me, "12.500001", "0.000000")


async def test_non_admin_deposit_is_refused(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", HIVEMARKET_COORDINATOR=coordinator.url)
    own_key = tmp_path / "home" / "identity.pem"  # a valid key, but not the coordinator's admin
    me = load_identity(own_key).account
    async with CoordinatorClient(coordinator.url, coordinator.admin) as admin:
        await admin.deposit(me, "5")

        refused = run_cli("deposit", me, "100", "--admin-key", str(own_key), env=env)
        assert refused.returncode == 2
        assert "403" in one_line_error(refused) and "admin" in refused.stderr.lower()
        assert (await admin.account(me)).balance == Decimal(5)

    admin_key = str(coordinator.home / "admin.pem")
    bad_amount = run_cli("deposit", me, "1e3", "--admin-key", admin_key, env=env)
    assert bad_amount.returncode == 2
    assert "AMOUNT" in one_line_error(bad_amount) and "1e3" in bad_amount.stderr


async def test_withdraw_and_transfer_through_cli(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", HIVEMARKET_COORDINATOR=coordinator.url)
    me = load_identity(tmp_path / "home" / "identity.pem").account
    friend = Identity.generate().account
    async with CoordinatorClient(coordinator.url, coordinator.admin) as admin:
        await admin.deposit(me, "5")

        withdrawn = run_cli("withdraw", "1.5", env=env)
        assert withdrawn.returncode == 0, withdrawn.stderr
        assert "withdrawn   1.50" in withdrawn.stdout and "paid out of the market to you" in withdrawn.stdout
        assert "balance     3.50" in withdrawn.stdout  # every figure says what it is
        sent = run_cli("transfer", friend, "2", "--json", env=env)
        assert sent.returncode == 0, sent.stderr
        view = json.loads(sent.stdout)
        assert (view["account"], view["balance"], view["withdrawn"]) == (me, "1.500000", "1.500000")
        assert (await admin.account(friend)).balance == Decimal(2)

        over = run_cli("withdraw", "2", env=env)  # more than the account holds: exit 2, nothing moved
        assert over.returncode == 2
        line = one_line_error(over)
        assert "409 insufficient_funds, field amount" in line and "1.500000 is available" in line, line
        to_self = run_cli("transfer", me, "1", env=env)
        assert to_self.returncode == 2 and "field to" in one_line_error(to_self)
        bad = run_cli("transfer", "not-an-account", "1", env=env)
        assert bad.returncode == 2 and "ACCOUNT" in one_line_error(bad) and "'not-an-account'" in bad.stderr
        zero = run_cli("withdraw", "0", env=env)
        assert zero.returncode == 2 and "AMOUNT" in one_line_error(zero)
        assert (await admin.account(me)).balance == Decimal("1.5")
        assert (await admin.audit()).conserved


# -------------------------------------------------------------------------------------- offers, market


async def test_offers_cli_lists_filters_and_sorts(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    cheap, _ = await post_offer(coordinator.url, "0.90", gpu="A100", vram_gb=40.0)
    mid, _ = await post_offer(coordinator.url, "1.50")
    dear, _ = await post_offer(coordinator.url, "2.75")
    env = cli_env(tmp_path / "home", HIVEMARKET_COORDINATOR=coordinator.url)

    listed = run_cli("offers", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    by_account = {o["account"]: o for o in json.loads(listed.stdout)}
    assert {a: (o["price_per_hour"], o["state"]) for a, o in by_account.items()} == {
        cheap.account: ("0.900000", "open"),
        mid.account: ("1.500000", "open"),
        dear.account: ("2.750000", "open"),
    }

    filtered = run_cli("offers", "price<=1.5 vram_gb>=80", "--json", env=env)
    assert [o["account"] for o in json.loads(filtered.stdout)] == [mid.account]
    descending = run_cli("offers", "--sort", "-price", "--json", env=env)
    assert [o["account"] for o in json.loads(descending.stdout)] == [dear.account, mid.account, cheap.account]

    table = run_cli("offers", "gpu=A100", env=env)
    assert table.returncode == 0 and cheap.account[:12] in table.stdout and "0.90" in table.stdout
    assert mid.account[:12] not in table.stdout


def test_bad_filter_is_exit_2_quoting_the_term(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", HIVEMARKET_COORDINATOR=coordinator.url)
    result = run_cli("offers", "price<=2 colour=red", env=env)
    assert result.returncode == 2
    assert "colour=red" in one_line_error(result)


async def test_market_json_has_the_documented_keys(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    await post_offer(coordinator.url, "1.00")
    async with CoordinatorClient(coordinator.url, coordinator.admin) as admin:
        cleared = await admin.clear_market()
    result = run_cli("market", "--json", "--coordinator", coordinator.url, env=cli_env(tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert set(view) >= {"clearing_price", "supply", "demand", "rounds"}
    assert view["supply"] == 1 and view["demand"] == 0
    assert {"at", "clearing_price", "trades", "supply", "demand", "reason"} <= set(view["rounds"][0])
    assert any(r["at"] == cleared.at for r in view["rounds"])


async def test_msgpack_and_json_clients_get_the_same_models(coordinator: CoordinatorProcess) -> None:
    peer, posted = await post_offer(coordinator.url, "1.25")
    async with (
        CoordinatorClient(coordinator.url, coordinator.admin) as as_json,
        CoordinatorClient(coordinator.url, coordinator.admin, use_msgpack=True) as as_msgpack,
    ):
        deposited = await as_msgpack.deposit(peer.account, Decimal("3.5"))  # a msgpack request body
        assert deposited.balance == Decimal("3.5")
        for name in ("account", "offers", "market", "audit"):
            args = (peer.account,) if name == "account" else ()
            from_json = await getattr(as_json, name)(*args)
            from_msgpack = await getattr(as_msgpack, name)(*args)
            if name == "audit":  # each audit checks the entries new since the last one: the first checked all
                from_msgpack = from_msgpack.model_copy(update={"entries_checked": from_json.entries_checked})
            assert from_json == from_msgpack, name
        assert (await as_msgpack.offers())[0] == posted.offer
        async with (
            aiohttp.ClientSession() as raw,
            raw.get(
                f"{coordinator.url}/v1/accounts/{peer.account}", headers={"Accept": "application/msgpack"}
            ) as resp,
        ):
            assert resp.content_type == "application/msgpack"  # msgpack really travelled


# ------------------------------------------------------------------------------------ retries, failures


class LoseFirstAnswer:
    """A TCP proxy in front of the coordinator that closes the first connection once the coordinator
    starts answering: the request was applied, its answer lost, exactly as on a flaky link."""

    def __init__(self, target: str):
        self.host, port = target.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.to_lose = 1
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(self.host, self.port)
        lose, self.to_lose = self.to_lose > 0, self.to_lose - 1
        forward = asyncio.create_task(self._pump(client_r, up_w))
        try:
            if lose:
                await up_r.read(1)
            else:
                await self._pump(up_r, client_w)
        finally:
            forward.cancel()
            for w in (client_w, up_w):
                w.close()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_retried_post_is_applied_once(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    proxy = LoseFirstAnswer(coordinator.url)
    url = await proxy.start()
    account = Identity.generate().account
    try:
        async with CoordinatorClient(url, coordinator.admin, settings=FAST_RETRIES) as client:
            with pytest.raises(AlreadyApplied) as raised:
                await client.deposit(account, "7.25")
            assert raised.value.status == 401 and raised.value.code == "nonce_replayed"
            assert (await client.account(account)).balance == Decimal("7.25")

        proxy.to_lose = 1  # the CLI treats "already applied" as success and shows the account
        env = cli_env(tmp_path / "home", HIVEMARKET_RETRY_BACKOFF="0.05")
        admin = str(coordinator.home / "admin.pem")
        result = await asyncio.to_thread(
            run_cli, "deposit", account, "1", "--admin-key", admin, "--coordinator", url, "--json", env=env
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["balance"] == "8.250000"
        async with CoordinatorClient(coordinator.url) as direct:
            assert (await direct.account(account)).balance == Decimal("8.25")
            assert (await direct.audit()).conserved
    finally:
        await proxy.close()


async def test_unreachable_within_bounded_time(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    async with CoordinatorClient(url, Identity.generate(), settings=FAST_RETRIES) as client:
        with pytest.raises(CoordinatorUnreachable, match="after 4 attempts"):
            await client.post_offer(offer_body("1"))
    assert time.monotonic() - started < 3  # 3 backoffs of at most 0.2 s, refused connections are instant

    env = cli_env(tmp_path / "home", HIVEMARKET_RETRIES="1", HIVEMARKET_RETRY_BACKOFF="0.05")
    result = run_cli("offers", "--coordinator", url, env=env)
    assert result.returncode == 1 and url in one_line_error(result)


async def test_post_without_identity_is_refused_before_sending() -> None:
    async with CoordinatorClient(f"http://127.0.0.1:{closed_port()}") as client:
        with pytest.raises(ValueError, match="must be signed"):
            await client.post_offer(offer_body("1"))


def test_error_is_one_helpful_line() -> None:
    error = CoordinatorError(400, "bad_request", "amount: '1e3' is not\na decimal", "amount")
    assert str(error) == "amount: '1e3' is not a decimal (400 bad_request, field amount)"


# ---------------------------------------------------------------------------------------------- rent


@pytest.fixture
def fast_leases(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    """A coordinator whose leases lapse after 1.5 s without a heartbeat."""
    home = tmp_path / "coordinator"
    env = cli_env(home, HIVEMARKET_HEARTBEAT_INTERVAL="0.5", HIVEMARKET_SWEEP_INTERVAL="0.2")
    server = start_coordinator(home, Identity.generate(), env=env)
    try:
        yield server
    finally:
        server.stop()


async def test_rent_holds_its_lease_and_renews_a_lapsed_one(
    fast_leases: CoordinatorProcess, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = cli_env(home, HIVEMARKET_RETRY_BACKOFF="0.05")
    me = load_identity(home / "identity.pem").account
    log = tmp_path / "rent.log"
    rent = _start_rent(fast_leases.url, "1.2", env, log)
    try:
        async with CoordinatorClient(fast_leases.url) as client:

            async def my_offer() -> OfferView | None:
                return next((o for o in await client.offers() if o.account == me), None)

            first = await _wait_for(my_offer, 60, "the rented offer to be listed", rent, log)
            assert (first.price_per_hour, first.state) == (Decimal("1.2"), "open")
            await asyncio.sleep(4)  # 8 heartbeat intervals, more than twice the lease's 1.5 s life
            later = await my_offer()
            assert later is not None and (later.state, later.lease_id) == ("open", first.lease_id)
            assert f"lease    {first.lease_id} active" in log.read_text()
            assert "posting the offer again" not in log.read_text()

            rent.send_signal(signal.SIGSTOP)  # miss heartbeats until the lease lapses
            try:
                await _wait_for(
                    lambda: _offer_state_is(client, me, "offline"), 20, "the lease to lapse", rent, log
                )
            finally:
                rent.send_signal(signal.SIGCONT)
            await _wait_for(
                lambda: _offer_state_is(client, me, "open"), 20, "rent to post its offer again", rent, log
            )
            assert "posting the offer again" in log.read_text()

        rent.send_signal(signal.SIGTERM)
        assert rent.wait(timeout=20) == 0, log.read_text()
        assert "stopped" in log.read_text()
    finally:
        kill_group(rent.pid)


async def test_ctrl_c_of_rent_withdraws_the_offer_and_records_no_lapse(
    fast_leases: CoordinatorProcess, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    me = load_identity(home / "identity.pem").account
    log = tmp_path / "rent.log"
    rent = _start_rent(fast_leases.url, "0", env, log)
    try:
        async with CoordinatorClient(fast_leases.url) as client:
            await _wait_for(lambda: _offer_state_is(client, me, "open"), 60, "the offer", rent, log)
            await asyncio.sleep(1)  # a couple of heartbeats
            rent.send_signal(signal.SIGINT)
            assert rent.wait(timeout=30) == 0, log.read_text()
            (offer,) = [o for o in await client.offers() if o.account == me]
            assert offer.state == "withdrawn", log.read_text()
            assert f"offer withdrawn: lease {offer.lease_id} released" in log.read_text()
            await asyncio.sleep(3)  # twice the lease's 1.5 s life, swept every 0.2 s: it would have lapsed
            (later,) = [o for o in await client.offers() if o.account == me]
            assert (later.state, later.reliability) == ("withdrawn", offer.reliability)
        lapses = query_db(fast_leases.db_url, f"SELECT lapses FROM peers WHERE account = '{me}'")
        assert lapses == [(0,)]
    finally:
        kill_group(rent.pid)


async def test_a_volunteer_that_stops_withdraws_its_offer(
    fast_leases: CoordinatorProcess, tmp_path: Path
) -> None:
    """``peer start --coordinator`` stops through serve_runs_in_background's stop: the same leaving."""
    peer = Identity.generate()
    save_identity(peer, tmp_path / "peer.pem")
    client = CoordinatorClient(fast_leases.url, peer, settings=FAST_RETRIES)
    supervisor = TrainerSupervisor(client.coordinator, tmp_path / "peer.pem", load_settings(), [])
    stop = serve_runs_in_background(client, offer_body("0"), supervisor, [])
    try:
        async with CoordinatorClient(fast_leases.url) as reader:
            deadline = time.monotonic() + 20
            while not await _offer_state_is(reader, peer.account, "open"):
                assert time.monotonic() < deadline, "the volunteer's offer was not posted"
                await asyncio.sleep(0.1)
            await asyncio.to_thread(stop, 5)
            assert await _offer_state_is(reader, peer.account, "withdrawn")
    finally:
        stop(0)


async def _offer_state_is(client: CoordinatorClient, account: str, state: str) -> bool:
    return any(o.account == account and o.state == state for o in await client.offers())


async def _wait_for(
    check: Callable[[], Awaitable[T]], timeout: float, what: str, proc: subprocess.Popen, log: Path
) -> T:
    """Await ``check()`` until truthy, failing early (with the log) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert proc.poll() is None, f"rent exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s for {what}:\n{log.read_text()}"
        await asyncio.sleep(0.2)
    return value


async def test_rent_keeps_retrying_while_unreachable(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", HIVEMARKET_RETRIES="0", HIVEMARKET_RETRY_BACKOFF="0.05")
    url = f"http://127.0.0.1:{closed_port()}"
    rent = subprocess.Popen(
        [sys.executable, "-m", "peer", "rent", "--coordinator", url, "--price-per-hour", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        lines: list[str] = []
        assert rent.stdout is not None
        while sum("retrying in" in line for line in lines) < 3:
            line = await asyncio.wait_for(asyncio.to_thread(rent.stdout.readline), 60)
            assert line, "rent exited:\n" + "".join(lines)
            lines.append(line)
        rent.send_signal(signal.SIGINT)
        assert rent.wait(timeout=20) == 0, "".join(lines)
    finally:
        kill_group(rent.pid)


def _start_rent(url: str, price: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`hivemarket rent` at ``price`` in a process group of its own, its output in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "peer", "rent", "--coordinator", url, "--price-per-hour", price],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
