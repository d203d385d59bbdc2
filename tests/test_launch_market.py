"""What a launcher learns from the market before and while it waits: why its run is not matched, and
the recruiting deadline that ends a run nobody serves, with its escrow refunded in full.

A real coordinator (a subprocess) with offers posted by real accounts through the signed API; the
launcher is the ``hivemarket`` command, as a user runs it.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest

from peer.protocol.client import CoordinatorClient
from peer.protocol.identity import Identity
from peer.protocol.schemas import HardwareSummary, OfferBody
from tests.harness import CoordinatorProcess, cli_env, run_cli, start_coordinator, wait_until

REPO = Path(__file__).resolve().parent.parent
# Clearing every second; leases that live a minute without heartbeats, so posted offers stay open.
MARKET = {"HIVEMARKET_CLEARING_INTERVAL": "1", "HIVEMARKET_HEARTBEAT_INTERVAL": "20"}
NO_VRAM = "no offer has the 48 GB of VRAM the run needs (2 open offers, with at most 24 GB)"


@pytest.fixture
def market(tmp_path: Path) -> CoordinatorProcess:
    digits = tmp_path / "digits"
    assert run_cli("data", "example", "digits", str(digits), env=cli_env(tmp_path / "x")).returncode == 0
    server = start_coordinator(
        tmp_path / "coordinator",
        Identity.generate(),
        env=cli_env(tmp_path / "coordinator", **MARKET),
        args=["--dataset", str(digits)],
    )
    asyncio.run(_post_offers(server.url, ["0.50", "0.80"]))
    yield server
    server.stop()


async def _post_offers(url: str, prices: list[str]) -> None:
    hardware = HardwareSummary(gpu="RTX 4090", gpu_count=1, vram_gb=24, tflops=80.0, ram_gb=64, cpu_cores=16)
    for price in prices:
        async with CoordinatorClient(url, Identity.generate()) as client:
            await client.post_offer(OfferBody(price_per_hour=price, hardware=hardware))


def _launcher(market: CoordinatorProcess, tmp_path: Path, budget: str) -> dict[str, str]:
    env = cli_env(tmp_path / "launcher", HIVEMARKET_COORDINATOR=market.url, **MARKET)
    me = run_cli("identity", "show", env=env).stdout.strip()
    admin_key = str(market.home / "admin.pem")
    assert run_cli("deposit", me, budget, "--admin-key", admin_key, env=env).returncode == 0
    return env


def _spec(tmp_path: Path, recruit_seconds: float) -> Path:
    text = (REPO / "examples" / "digits.toml").read_text()
    text = text.replace("recruit_seconds = 600", f"recruit_seconds = {recruit_seconds}")
    assert f"recruit_seconds = {recruit_seconds}" in text
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def _ledger(url: str) -> dict:
    async def audit() -> dict:
        async with CoordinatorClient(url) as client:
            return (await client.audit()).model_dump(mode="json")

    return asyncio.run(audit())


@pytest.mark.timeout(120)
def test_a_run_nobody_can_serve_says_why_then_fails_at_its_deadline_refunded(
    market: CoordinatorProcess, tmp_path: Path
) -> None:
    env = _launcher(market, tmp_path, "10")
    args = ["launch", str(_spec(tmp_path, 8)), "--budget", "3", "--peers", "2:2", "--min-vram-gb", "48"]
    created = run_cli(*args, "--detach", "--json", env=env)
    assert created.returncode == 0, created.stderr
    run_id = json.loads(created.stdout)["id"]

    def shown() -> dict:
        return json.loads(run_cli("runs", "show", run_id, "--json", env=env).stdout)

    # The next clearing round (1 s apart) records why nobody serves it; the API shows it at once.
    def reason() -> dict | None:
        async def get() -> dict:
            async with CoordinatorClient(market.url) as client:
                return (await client.run(run_id)).model_dump(mode="json")

        view = asyncio.run(get())
        return view if view["market_reason"] else None

    view = wait_until(reason, 3, "the market's reason within a clearing round", interval=0.1)
    assert view["state"] == "recruiting" and view["market_reason"] == NO_VRAM
    text = run_cli("runs", "show", run_id, env=env).stdout
    assert f"market    not matched: {NO_VRAM}" in text
    with urllib.request.urlopen(f"{market.url}/?run={run_id}", timeout=10) as page:  # the dashboard
        assert f"not matched: {NO_VRAM}" in page.read().decode()

    # At its deadline it fails with that reason, and the whole escrow comes back.
    view = wait_until(lambda: (v := shown())["state"] == "failed" and v, 20, "the recruiting deadline")
    assert view["reason"] == f"recruited 0 of min 2 peers live in 8 s: {NO_VRAM}"
    assert Decimal(view["refunded"]) == Decimal("3") and Decimal(view["spent"]) == 0
    assert Decimal(view["escrow"]) == 0
    ledger = _ledger(market.url)
    assert ledger["conserved"], ledger

    # Followed by `launch`, the same run ends the command with a non-zero status and the reason.
    followed = run_cli(
        *("launch", str(_spec(tmp_path, 8)), "--budget", "3"), "--max-price", "0.000001", env=env, timeout=60
    )
    assert followed.returncode == 1, followed.stderr
    assert "state     failed" in followed.stdout
    assert (
        "2 offers with the VRAM, 0 asking at most the bid's 0.000001 per effective TFLOP-hour"
        in followed.stdout
    )
    assert "not matched:" in followed.stderr  # the progress line said so while it waited
    account = json.loads(run_cli("account", "--json", env=env).stdout)
    assert Decimal(account["balance"]) == Decimal("10") and Decimal(account["escrow"]) == 0


@pytest.mark.timeout(120)
def test_dry_run_prints_the_market_speed_time_and_cost_and_creates_nothing(
    market: CoordinatorProcess, tmp_path: Path
) -> None:
    env = cli_env(tmp_path / "launcher", HIVEMARKET_COORDINATOR=market.url)
    spec = str(REPO / "examples" / "digits.toml")
    shown = run_cli("launch", spec, "--dry-run", "--peers", "2:3", env=env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "dry run   nothing created: what the market would give this run now"
    assert lines[1] == (
        "offers    2 open, 2 with the 0 GB of VRAM it needs, 2 asking at most its 1000.00 per effective"
        " TFLOP-hour"
    )
    assert lines[2].startswith("peers     2 of 2-3, at ")
    assert lines[3].startswith(
        "market    not matched: matched 2 of 3 more peers wanted; 2 offers with the VRAM"
    )
    assert lines[4].startswith("speed     ") and "the probe's figure" in lines[4]
    assert lines[5].startswith("time      ") and "11504 samples in 45 steps" in lines[5]
    assert lines[6].startswith("cost      ") and "audit fees" in lines[6]
    # 80 TFLOP/s offers in a thin market clear far above the spec's budget of 5: the launcher is told.
    assert lines[7].startswith("budget    5.00 runs out ") and "short of its samples" in lines[7]

    quote = json.loads(run_cli("launch", spec, "--dry-run", "--json", env=env, timeout=60).stdout)
    assert (quote["peers"], quote["basis"], quote["steps"]) == (2, "probe", 45)
    low, mid, high = (Decimal(c) for c in quote["cost"])
    assert 0 < low < mid < high
    # The pay rule: the peers' hourly prices for the wall clock, plus the audited share paid again as fees.
    expected = (
        Decimal(quote["price_per_hour"])
        * Decimal(quote["seconds"][1])
        / 3600
        * Decimal(1 + quote["audit_share"])
    )
    assert abs(mid - expected) <= Decimal("0.000001")
    assert json.loads(run_cli("runs", "--json", env=env).stdout) == []  # nothing was created
