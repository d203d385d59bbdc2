"""Clients that fail over: ``--coordinator`` (and HIVEMARKET_COORDINATOR) may list several replicas.

The live replica is the real coordinator process; the dead ones are a port that refuses connections, a
server that accepts and never answers, one that answers 503, and a proxy that forwards a request to the
real coordinator and drops the connection instead of returning its answer (applied, answer lost). A
signed request goes to the next URL with the very same bytes, so it is applied at most once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp import web

from peer.protocol.client import (
    AlreadyApplied,
    ClientSettings,
    CoordinatorClient,
    CoordinatorUnreachable,
)
from peer.protocol.identity import Identity, load_identity
from peer.protocol.schemas import HardwareSummary, OfferBody
from tests.harness import CoordinatorProcess, cli_env, run_cli

# Long enough for the real coordinator on a loaded 2-core machine, short enough for the hanging replica.
FAST = ClientSettings(retries=1, retry_backoff=0.05, retry_backoff_max=0.1, request_timeout=2)


def refused_url() -> str:
    """The URL of a port nothing listens on: bound once by us, then released (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Replica:
    """A TCP stand-in for a coordinator replica: ``hang`` accepts and reads but never answers; ``lose``
    forwards each request to ``target`` and closes the connection as soon as the answer starts (the
    request was applied, its answer lost); ``forward`` is a transparent proxy. ``sent`` holds the bytes
    each connection carried towards ``target``."""

    def __init__(self, mode: str, target: str | None = None):
        self.mode = mode
        self.target = target.removeprefix("http://").rsplit(":", 1) if target else None
        self.connections = 0
        self.lost = 0
        self.sent: list[bytearray] = []
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Replica:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self.server is not None
        self.server.close()
        await asyncio.wait_for(self.server.wait_closed(), 10)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            if self.mode == "hang":
                while await reader.read(65536):
                    pass
                return
            assert self.target is not None
            up_r, up_w = await asyncio.open_connection(self.target[0], int(self.target[1]))
            self._writers.append(up_w)
            sent = bytearray()
            self.sent.append(sent)
            forward = asyncio.create_task(self._pump(reader, up_w, sent))
            try:
                if self.mode == "lose":
                    if await up_r.read(1):  # the coordinator answers: it has applied the request
                        self.lost += 1
                else:
                    await self._pump(up_r, writer)
            finally:
                forward.cancel()
                up_w.close()
        except ConnectionError:
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bytearray | None = None
    ) -> None:
        while data := await src.read(65536):
            if log is not None:
                log += data
            dst.write(data)
            await dst.drain()


class Unavailable:
    """An HTTP server that answers every request 503, as a replica that cannot serve now would."""

    def __init__(self) -> None:
        self.hits = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Unavailable:
        async def refuse(request: web.Request) -> web.Response:
            self.hits += 1
            await request.read()
            return web.Response(status=503, text="replica is draining")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", refuse)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def first_request(raw: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """The request line, headers (Host left out: it names the replica) and body of the first request."""
    head, _, rest = bytes(raw).partition(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
    length = int(headers.get("content-length", "0"))
    headers.pop("host", None)
    return line.encode(), headers, rest[:length]


def offer_body(price: str) -> OfferBody:
    hardware = HardwareSummary(gpu="H100", gpu_count=1, vram_gb=80.0, tflops=400.0, ram_gb=512, cpu_cores=32)
    return OfferBody(price_per_hour=price, hardware=hardware)


async def balance_and_audit(coordinator: CoordinatorProcess, account: str) -> Decimal:
    async with CoordinatorClient(coordinator.url) as direct:
        assert (await direct.audit()).conserved
        return (await direct.account(account)).balance


# ------------------------------------------------------------------------------------------ fail-over


async def test_refused_first_url_fails_over_and_applies_once(coordinator: CoordinatorProcess) -> None:
    dead = refused_url()
    account, peer = Identity.generate().account, Identity.generate()
    async with CoordinatorClient(f"{dead},{coordinator.url}", coordinator.admin, settings=FAST) as client:
        assert client.base_url == dead and client.coordinator == f"{dead},{coordinator.url}"
        assert (await client.deposit(account, "5.5")).balance == Decimal("5.5")
        assert client.base_url == coordinator.url  # the next request starts at the URL that answered
    assert await balance_and_audit(coordinator, account) == Decimal("5.5")

    async with CoordinatorClient([dead, coordinator.url], peer, settings=FAST) as client:
        await client.post_offer(offer_body("1.25"))
        mine = [o for o in await client.offers() if o.account == peer.account]
        assert len(mine) == 1 and mine[0].price_per_hour == Decimal("1.25")


async def test_hanging_first_url_times_out_once_then_sticks(coordinator: CoordinatorProcess) -> None:
    account = Identity.generate().account
    async with (
        Replica("hang") as hang,
        CoordinatorClient([hang.url, coordinator.url], coordinator.admin, settings=FAST) as c,
    ):
        assert (await c.deposit(account, "2")).balance == Decimal("2")
        assert hang.connections == 1
        assert (await c.deposit(account, "3")).balance == Decimal("5")
        assert (await c.account(account)).balance == Decimal("5")
        assert hang.connections == 1  # the dead replica is not asked again while the live one answers
    assert await balance_and_audit(coordinator, account) == Decimal("5")


async def test_lost_answer_is_retried_on_the_next_url_with_the_same_bytes(
    coordinator: CoordinatorProcess,
) -> None:
    account = Identity.generate().account
    async with Replica("lose", coordinator.url) as lose, Replica("forward", coordinator.url) as live:
        async with CoordinatorClient([lose.url, live.url], coordinator.admin, settings=FAST) as client:
            with pytest.raises(AlreadyApplied) as raised:
                await client.deposit(account, "7.25")
            assert raised.value.status == 401 and raised.value.code == "nonce_replayed"
        assert lose.lost == 1 and len(lose.sent) == 1 and len(live.sent) == 1
        line, headers, body = first_request(lose.sent[0])
        assert line.startswith(b"POST ") and "x-hivemarket-nonce" in headers and body
        assert first_request(live.sent[0]) == (line, headers, body)  # nonce, timestamp, signature, body
    assert await balance_and_audit(coordinator, account) == Decimal("7.25")


async def test_lost_answer_of_an_offer_is_never_applied_twice(coordinator: CoordinatorProcess) -> None:
    peer = Identity.generate()
    async with (
        Replica("lose", coordinator.url) as lose,
        CoordinatorClient([lose.url, coordinator.url], peer, settings=FAST) as client,
    ):
        with pytest.raises(AlreadyApplied):
            await client.post_offer(offer_body("0.75"))
        assert lose.lost == 1
        mine = [o.price_per_hour for o in await client.offers() if o.account == peer.account]
        assert mine == [Decimal("0.75")]


async def test_503_replica_is_skipped(coordinator: CoordinatorProcess) -> None:
    account = Identity.generate().account
    async with (
        Unavailable() as draining,
        CoordinatorClient([draining.url, coordinator.url], coordinator.admin, settings=FAST) as c,
    ):
        assert (await c.deposit(account, "1.5")).balance == Decimal("1.5")
        assert draining.hits == 1 and c.base_url == coordinator.url
    assert await balance_and_audit(coordinator, account) == Decimal("1.5")


async def test_unreachable_names_every_url_and_its_last_error() -> None:
    dead = refused_url()
    async with Replica("hang") as hang, Unavailable() as draining:
        urls = [dead, hang.url, draining.url]
        async with CoordinatorClient(",".join(urls), Identity.generate(), settings=FAST) as client:
            with pytest.raises(CoordinatorUnreachable) as raised:
                await client.post_offer(offer_body("1"))
        message = str(raised.value)
        assert "any of its 3 URLs after 2 attempts each" in message
        said = dict(part.split(": ", 1) for part in message.split("each: ", 1)[1].split("; "))
        assert list(said) == urls
        assert "Cannot connect" in said[dead]
        assert said[hang.url] == "timed out waiting for an answer"
        assert said[draining.url] == "HTTP 503 replica is draining"
        assert hang.connections == 2 and draining.hits == 2  # one attempt per URL per round


@pytest.mark.parametrize(
    ("urls", "refusal"),
    [
        ("http://127.0.0.1:8470,ftp://127.0.0.1:8471", "'ftp://127.0.0.1:8471' is not of the form"),
        ("http://127.0.0.1:8470,127.0.0.1:8471", "'127.0.0.1:8471' is not of the form"),
        ("http://127.0.0.1:8470,,http://127.0.0.1:8471", "has an empty entry"),
        ("http://127.0.0.1:8470,http://127.0.0.1:8470/", "'http://127.0.0.1:8470' is listed twice"),
        ("http://a:1/api,http://b:1/v2", "'http://a:1/api' and 'http://b:1/v2' have different paths"),
        ("", "has an empty entry"),
    ],
)
def test_a_bad_url_in_the_list_is_refused_naming_it(urls: str, refusal: str) -> None:
    with pytest.raises(ValueError, match="coordinator URL") as raised:
        CoordinatorClient(urls)
    assert refusal in str(raised.value)


def test_urls_with_the_same_path_prefix_are_accepted() -> None:
    client = CoordinatorClient(" http://a:1/api/ , https://b:2/api")
    assert client.urls == ("http://a:1/api", "https://b:2/api") and client._prefix == "/api"


# ---------------------------------------------------------------------------------------------- CLI


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_cli_fails_over(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    dead, other_dead = refused_url(), refused_url()
    urls = f"{dead},{coordinator.url}"
    env = cli_env(tmp_path / "home", HIVEMARKET_RETRY_BACKOFF="0.05", HIVEMARKET_RETRIES="1")
    me = load_identity(tmp_path / "home" / "identity.pem").account
    admin = str(coordinator.home / "admin.pem")

    deposited = run_cli("deposit", me, "3", "--admin-key", admin, "--coordinator", urls, "--json", env=env)
    assert deposited.returncode == 0, deposited.stderr
    assert json.loads(deposited.stdout)["balance"] == "3.000000"
    mine = run_cli("account", "--json", env={**env, "HIVEMARKET_COORDINATOR": urls})
    assert mine.returncode == 0, mine.stderr
    assert json.loads(mine.stdout)["balance"] == "3.000000"

    bad = run_cli("account", "--coordinator", f"{coordinator.url},not-a-url", env=env)
    assert bad.returncode == 2 and "'not-a-url'" in one_line_error(bad)

    down = run_cli("offers", "--coordinator", f"{dead},{other_dead}", env=env)
    error = one_line_error(down)
    assert down.returncode == 1 and f"{dead}: " in error and f"{other_dead}: " in error
