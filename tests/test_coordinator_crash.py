"""Crash safety of the coordinator: SIGKILL in the middle of a burst of signed money requests, 20+ times.

Each cycle pre-signs a burst of concurrent requests (admin deposits into three accounts, launcher escrows
into new runs, and a payer's withdrawals and transfers to the three accounts), fires it at the real
server, SIGKILLs the server while requests are in flight, restarts it on the same database (a SQLite
file; a PostgreSQL database) and checks that:

- every acknowledged (2xx) request is there: deposits and transfers are in the balances, withdrawals in
  the payer's ``withdrawn``, acknowledged runs exist;
- nothing is there twice, and replaying every pre-signed request of the cycle (byte for byte, same
  headers) answers 401 ``nonce_replayed`` exactly for the requests that had been applied and a normal
  success for the others, which are then applied exactly once; a second replay changes nothing;
- afterwards the balances equal the totals of every request applied once, and the ledger is conserved
  (what was withdrawn still counted among its holdings).

Deposit and transfer amounts to one account within a cycle are distinct powers of two (times a scale), so
the balance a restarted server reports tells exactly which of the cycle's deposits and transfers it
applied; the payer's withdrawals are distinct powers of two too, so its ``withdrawn`` tells which of them
it applied, and its balance that it paid each out at most once. Runs carry
unique names, so ``GET /v1/runs`` tells exactly which escrows were applied (and whether any twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import signal
import statistics
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peer.protocol.envelope import sign_request
from peer.protocol.identity import Identity
from peer.protocol.money import UNIT, format_units
from tests.conftest import Databases
from tests.harness import (
    CoordinatorProcess,
    cli_env,
    group_members,
    kill_group,
    minimal_spec,
    start_coordinator,
)

CYCLES = 20
RUNS_PER_CYCLE = 12
DEPOSITS_PER_ACCOUNT = 6  # three accounts: 18 deposits + 12 runs + 6 transfers + 4 withdrawals = 40 requests
DEPOSIT_SCALE = UNIT // 1000  # the k-th deposit to an account in a cycle is 2**k * 0.001
TRANSFERS_PER_ACCOUNT = 2  # the k-th transfer to an account is 2**(DEPOSITS_PER_ACCOUNT + k) * 0.001
WITHDRAWALS = 4  # the payer's k-th withdrawal in a cycle is 2**k * 0.001
LAUNCHER_FUNDING = 100_000 * UNIT  # far above what the runs of all cycles escrow: no 402
PAYER_FUNDING = 1_000 * UNIT  # far above what all cycles withdraw and transfer: no 409
BURST_SPREAD = 0.03  # seconds over which a burst's requests start: some are always in flight
NO_RATE_LIMIT = {"HIVEMARKET_RATE_LIMIT_PER_SECOND": "1000000", "HIVEMARKET_RATE_LIMIT_BURST": "1000000"}


@dataclass(frozen=True)
class Signed:
    """One pre-signed request, kept byte for byte so that it can be replayed exactly."""

    kind: str  # "deposit", "run", "transfer" or "withdraw"
    path: str
    body: bytes
    headers: dict[str, str]
    units: int  # the deposit's, transfer's or withdrawal's amount, or the run's budget
    account: str = ""  # the deposit's or transfer's beneficiary
    name: str = ""  # the run's unique name


@dataclass
class Outcome:
    status: int | None  # None: no response (connection refused or cut by the kill)
    body: Any = None


def _signed_post(identity: Identity, path: str, payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **sign_request(identity, "POST", path, body)}
    return body, headers


def _presign_payouts(payer: Identity, accounts: list[str]) -> list[Signed]:
    """A cycle's transfers from ``payer`` to each of ``accounts`` and its withdrawals."""
    requests = []
    for account in accounts:
        for k in range(TRANSFERS_PER_ACCOUNT):
            units = 2 ** (DEPOSITS_PER_ACCOUNT + k) * DEPOSIT_SCALE
            path = f"/v1/accounts/{payer.account}/transfer"
            body, headers = _signed_post(payer, path, {"to": account, "amount": format_units(units)})
            requests.append(Signed("transfer", path, body, headers, units, account=account))
    for k in range(WITHDRAWALS):
        units = (2**k) * DEPOSIT_SCALE
        path = f"/v1/accounts/{payer.account}/withdraw"
        body, headers = _signed_post(payer, path, {"amount": format_units(units)})
        requests.append(Signed("withdraw", path, body, headers, units))
    return requests


def _presign_cycle(cycle: int, admin: Identity, launcher: Identity, accounts: list[str]) -> list[Signed]:
    requests = []
    for account in accounts:
        for k in range(DEPOSITS_PER_ACCOUNT):
            units = (2**k) * DEPOSIT_SCALE
            path = f"/v1/accounts/{account}/deposit"
            body, headers = _signed_post(admin, path, {"amount": format_units(units)})
            requests.append(Signed("deposit", path, body, headers, units, account=account))
    for i in range(RUNS_PER_CYCLE):
        name = f"crash-c{cycle:02d}-r{i:02d}"
        budget = UNIT + (cycle * RUNS_PER_CYCLE + i) * 12_500  # 1.0125, 1.025, ...: distinct budgets
        payload = {
            "spec": minimal_spec(name),
            "max_price": "0.5",
            "peers_min": 1,
            "peers_max": 2,
            "budget": format_units(budget),
        }
        body, headers = _signed_post(launcher, "/v1/runs", payload)
        requests.append(Signed("run", "/v1/runs", body, headers, budget, name=name))
    random.shuffle(requests)
    return requests


async def _send_all(
    url: str | Sequence[str],
    requests: list[Signed],
    kill: tuple[int, int, float] | None = None,
    spread: float = 0.0,
) -> list[Outcome]:
    """POST every request concurrently, each starting at a random moment within ``spread`` seconds; with
    several URLs (coordinator replicas), the i-th request goes to the (i mod n)-th.

    With ``kill=(pid, after_acks, delay)``, SIGKILL ``pid`` once ``after_acks`` requests were
    acknowledged (0: right away) and ``delay`` more seconds passed.
    """
    urls = [url] if isinstance(url, str) else list(url)
    acknowledged = asyncio.Event()
    acks = 0
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(request: Signed, url: str) -> Outcome:
            nonlocal acks
            outcome = Outcome(None)
            if spread:
                await asyncio.sleep(random.uniform(0, spread))
            try:
                post = session.post(url + request.path, data=request.body, headers=request.headers)
                async with post as resp:
                    outcome.status = resp.status  # the status line alone is the acknowledgement
                    outcome.body = json.loads(await resp.read())
            except (TimeoutError, aiohttp.ClientError):
                pass  # refused, or cut by the kill (after the status line, the body is then None)
            if outcome.status is not None and 200 <= outcome.status < 300:
                acks += 1
                if kill is not None and acks >= kill[1]:
                    acknowledged.set()
            return outcome

        async def killer(pid: int, after_acks: int, delay: float) -> None:
            if after_acks > 0:
                # Every request may fail before enough are acknowledged only if the server is broken;
                # the assertions on the outcomes say so then, the kill must still happen.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(acknowledged.wait(), timeout=20)
            await asyncio.sleep(delay)
            os.kill(pid, signal.SIGKILL)

        sends = [asyncio.create_task(send(r, urls[i % len(urls)])) for i, r in enumerate(requests)]
        if kill is not None:
            await killer(*kill)
        return list(await asyncio.gather(*sends))


def _get(url: str, path: str) -> tuple[int, Any]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _get_ok(url: str, path: str) -> Any:
    status, body = _get(url, path)
    assert status == 200, f"GET {path}: {status} {body}"
    return body


def _holdings(url: str, account: str) -> tuple[int, int]:
    """(balance, escrow) of an account, in units."""
    view = _get_ok(url, f"/v1/accounts/{account}")
    return _units(view["balance"]), _units(view["escrow"])


def _withdrawn(url: str, account: str) -> int:
    """What an account withdrew, in units."""
    return _units(_get_ok(url, f"/v1/accounts/{account}")["withdrawn"])


def _run_names(url: str, owner: str) -> Counter[str]:
    return Counter(run["name"] for run in _get_ok(url, "/v1/runs")["runs"] if run["owner"] == owner)


def _units(money: str) -> int:
    whole, _, frac = money.partition(".")
    return int(whole) * UNIT + int(frac.ljust(6, "0"))


def _sigkill_and_reap(server: CoordinatorProcess) -> None:
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    kill_group(server.proc.pid)
    assert not group_members(server.proc.pid), "the killed coordinator left processes behind"


@pytest.mark.timeout(240)
def test_sigkill_during_concurrent_money_requests_loses_nothing_acknowledged(
    tmp_path: Path, databases: Databases
) -> None:
    rng_seed = int(os.environ.get("HIVEMARKET_CRASH_SEED", time.time_ns() % 2**32))
    random.seed(rng_seed)
    admin, launcher, payer = Identity.generate(), Identity.generate(), Identity.generate()
    others = [Identity.generate().account for _ in range(2)]
    accounts = [launcher.account, *others]
    home = tmp_path / "coordinator"
    server = start_coordinator(home, admin, env=cli_env(home, **NO_RATE_LIMIT), db_url=databases.url())

    # What every account holds once each cycle is settled (all its requests applied exactly once).
    held = dict.fromkeys(accounts, 0)
    deposits = LAUNCHER_FUNDING + PAYER_FUNDING
    payer_balance, withdrawn = PAYER_FUNDING, 0
    escrowed = 0
    run_names: list[str] = []
    figures: list[tuple[int, int, int]] = []  # per cycle: acknowledged, applied unacknowledged, not applied
    restart_seconds: list[float] = []
    try:
        fundings = []
        for account, units in ((launcher.account, LAUNCHER_FUNDING), (payer.account, PAYER_FUNDING)):
            path = f"/v1/accounts/{account}/deposit"
            body, headers = _signed_post(admin, path, {"amount": format_units(units)})
            fundings.append(Signed("deposit", path, body, headers, units, account=account))
        outcomes = asyncio.run(_send_all(server.url, fundings))
        assert all(outcome.status == 200 for outcome in outcomes), outcomes
        held[launcher.account] += LAUNCHER_FUNDING

        for cycle in range(CYCLES):
            requests = _presign_cycle(cycle, admin, launcher, accounts) + _presign_payouts(payer, accounts)
            random.shuffle(requests)
            kill = (server.proc.pid, random.randrange(1, 8), random.uniform(0, 0.01))
            outcomes = asyncio.run(_send_all(server.url, requests, kill, spread=BURST_SPREAD))
            _sigkill_and_reap(server)
            where = f"cycle {cycle} (seed {rng_seed}, kill after {kill[1]} acks + {kill[2] * 1000:.1f} ms)"

            # A response is either an acknowledgement or nothing at all (the kill cut it): never a refusal.
            refused = [
                (r.kind, o.status, o.body)
                for r, o in zip(requests, outcomes, strict=True)
                if o.status is not None and not 200 <= o.status < 300
            ]
            assert not refused, f"{where}: requests refused during the burst: {refused}"
            acked = [o.status is not None for o in outcomes]

            started = time.monotonic()
            server = server.restart()
            restart_seconds.append(time.monotonic() - started)

            # Which of the cycle's requests did the restarted server apply?
            applied = [False] * len(requests)
            for account in accounts:
                balance, escrow = _holdings(server.url, account)
                delta = balance + escrow - held[account]
                bits, rest = divmod(delta, DEPOSIT_SCALE)
                assert (
                    delta >= 0 and rest == 0 and bits < 2 ** (DEPOSITS_PER_ACCOUNT + TRANSFERS_PER_ACCOUNT)
                ), (
                    f"{where}: {account[:12]} holds {format_units(balance + escrow)}, not its settled "
                    f"{format_units(held[account])} plus a subset of this cycle's deposits and transfers"
                )
                for i, r in enumerate(requests):
                    if r.kind in ("deposit", "transfer") and r.account == account:
                        applied[i] = bool(bits & (r.units // DEPOSIT_SCALE))
            paid_balance = _holdings(server.url, payer.account)[0]
            paid_out = _withdrawn(server.url, payer.account)
            bits, rest = divmod(paid_out - withdrawn, DEPOSIT_SCALE)
            assert paid_out >= withdrawn and rest == 0 and bits < 2**WITHDRAWALS, (
                f"{where}: the payer withdrew {format_units(paid_out)}, not its settled "
                f"{format_units(withdrawn)} plus a subset of this cycle's withdrawals"
            )
            for i, r in enumerate(requests):
                if r.kind == "withdraw":
                    applied[i] = bool(bits & (r.units // DEPOSIT_SCALE))
            moved = sum(
                r.units
                for r, a in zip(requests, applied, strict=True)
                if a and r.kind in ("transfer", "withdraw")
            )
            assert paid_balance == payer_balance - moved, (
                f"{where}: the payer holds {format_units(paid_balance)}, not its settled "
                f"{format_units(payer_balance)} less the {format_units(moved)} its applied requests moved"
            )
            names = _run_names(server.url, launcher.account)
            twice = {name: n for name, n in names.items() if n > 1}
            assert not twice, f"{where}: runs created more than once: {twice}"
            assert set(run_names) <= set(names), f"{where}: runs of earlier cycles vanished"
            for i, r in enumerate(requests):
                if r.kind == "run":
                    applied[i] = r.name in names
            _, launcher_escrow = _holdings(server.url, launcher.account)
            budgets = sum(r.units for r, a in zip(requests, applied, strict=True) if a and r.kind == "run")
            assert launcher_escrow == escrowed + budgets, (
                f"{where}: the launcher's escrow {format_units(launcher_escrow)} is not the budgets of its "
                f"runs {format_units(escrowed + budgets)}"
            )

            # Every acknowledged request survived the kill.
            lost = [
                (r.kind, r.account[:12] or r.name or payer.account[:12], format_units(r.units))
                for r, a, ok in zip(requests, applied, acked, strict=True)
                if ok and not a
            ]
            assert not lost, f"{where}: acknowledged requests lost after the restart: {lost}"
            for r, o in zip(requests, outcomes, strict=True):
                if r.kind == "run" and o.body is not None:
                    run = _get_ok(server.url, f"/v1/runs/{o.body['id']}")
                    assert (run["name"], run["owner"], _units(run["budget"]), _units(run["escrow"])) == (
                        r.name,
                        launcher.account,
                        r.units,
                        r.units,
                    ), f"{where}: run {o.body['id']} is not what was acknowledged: {run}"

            # Replaying every request: the applied ones are refused as replays, the others apply now.
            replies = asyncio.run(_send_all(server.url, requests))
            for r, a, reply in zip(requests, applied, replies, strict=True):
                what = f"{where}: replay of {'an applied' if a else 'an unapplied'}"
                what += f" {r.kind} {r.name or r.units}"
                if a:
                    assert reply.status == 401, f"{what} answered {reply.status} {reply.body}"
                    assert reply.body["error"]["code"] == "nonce_replayed", f"{what} answered {reply.body}"
                else:
                    assert reply.status == (201 if r.kind == "run" else 200), (
                        f"{what} answered {reply.status} {reply.body}"
                    )
            # ... and replaying once more changes nothing.
            again = asyncio.run(_send_all(server.url, requests))
            assert all(o.status == 401 and o.body["error"]["code"] == "nonce_replayed" for o in again), (
                f"{where}: a second replay was not refused: {[(o.status, o.body) for o in again]}"
            )

            # Now every request of the cycle is applied exactly once.
            for r in requests:
                if r.kind == "run":
                    escrowed += r.units
                    run_names.append(r.name)
                elif r.kind == "withdraw":
                    payer_balance -= r.units
                    withdrawn += r.units
                else:
                    held[r.account] += r.units
                    if r.kind == "deposit":
                        deposits += r.units
                    else:
                        payer_balance -= r.units
            for account in accounts:
                balance, escrow = _holdings(server.url, account)
                assert balance + escrow == held[account], f"{where}: {account[:12]} holds a wrong total"
                assert escrow == (escrowed if account == launcher.account else 0), f"{where}: wrong escrow"
            paid = (*_holdings(server.url, payer.account), _withdrawn(server.url, payer.account))
            assert paid == (payer_balance, 0, withdrawn), f"{where}: the payer holds {paid}"
            assert _run_names(server.url, launcher.account) == Counter(run_names), f"{where}: runs differ"
            audit = _get_ok(server.url, "/v1/ledger/audit")
            assert audit["conserved"] is True, f"{where}: {audit}"
            assert _units(audit["deposits"]) == deposits, f"{where}: {audit}"
            assert _units(audit["holdings"]) == deposits, f"{where}: {audit}"

            n_acked = sum(acked)
            n_applied = sum(applied)
            figures.append((n_acked, n_applied - n_acked, len(requests) - n_applied))
    finally:
        server.stop()
        assert not group_members(server.proc.pid), "the coordinator left processes behind"

    acked_avg = statistics.mean(f[0] for f in figures)
    print(
        f"\n{CYCLES} SIGKILL cycles of {len(requests)} requests (seed {rng_seed}): per cycle on average "
        f"{acked_avg:.1f} acknowledged, {statistics.mean(f[1] for f in figures):.1f} applied but not "
        f"acknowledged, {statistics.mean(f[2] for f in figures):.1f} not applied (replayed later); "
        f"cycles with requests still in flight at the kill: {sum(f[0] < len(requests) for f in figures)}; "
        f"restarts took {sum(restart_seconds):.1f} s in all"
    )
    # The kill must really have landed mid-burst, or the test proves nothing.
    in_flight = sum(f[0] < len(requests) for f in figures)
    assert in_flight >= CYCLES // 2, f"only {in_flight} of {CYCLES} kills landed with requests in flight"
