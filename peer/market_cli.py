"""Market commands of the ``hivemarket`` CLI: rent, offers, market, account, deposit, withdraw, transfer.

They talk to a coordinator through :class:`peer.protocol.client.CoordinatorClient`; ``peer/cli.py`` imports
them lazily, when one is used. Exit status follows the rest of the CLI: 0 ok, 1 a
failure (coordinator unreachable, a server error), 2 bad input, including a request the coordinator
refused as invalid, unpaid, forbidden, unknown or conflicting: one ``Error: ...`` line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, TypeVar

import click

from peer.console import echo_json, json_option, load_cli_identity, metrics_port_option, print_table
from peer.protocol.client import (
    AlreadyApplied,
    ClientSettings,
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnreachable,
)
from peer.protocol.commands import InputError
from peer.protocol.identity import ACCOUNT_RE, Identity, IdentityError, load_identity
from peer.protocol.money import fmt_money, parse_money
from peer.protocol.schemas import AccountView, HardwareSummary, LeaseView, OfferBody, OfferResponse, Telemetry
from peer.settings import load_settings

if TYPE_CHECKING:
    from peer.worker import TrainerSupervisor

T = TypeVar("T")
#: Refusals caused by what the user asked for; anything else from the coordinator is a failure (exit 1).
INPUT_STATUSES = frozenset({400, 402, 403, 404, 409})

coordinator_option = click.option(
    "--coordinator",
    metavar="URL[,...]",
    default=lambda: ClientSettings().coordinator,
    help="Coordinator to talk to; several comma-separated URLs are replicas, tried in turn when one does "
    "not answer [default: $HIVEMARKET_COORDINATOR, else http://127.0.0.1:8470].",
)


def client_for(url: str, identity: Identity | None = None) -> CoordinatorClient:
    """A client of ``--coordinator`` (one URL or several, comma-separated); a bad one is exit 2."""
    try:
        return CoordinatorClient(url, identity)
    except ValueError as e:
        raise InputError(f"--coordinator: {e}") from None


def call(client: CoordinatorClient, op: Callable[[CoordinatorClient], Awaitable[T]]) -> T:
    """Run one request to completion, turning the client's failures into the CLI's exit codes."""

    async def go() -> T:
        async with client:
            return await op(client)

    try:
        return asyncio.run(go())
    except CoordinatorUnreachable as e:
        raise click.ClickException(str(e)) from None
    except CoordinatorError as e:
        if e.status in INPUT_STATUSES:
            raise InputError(str(e)) from None
        raise click.ClickException(str(e)) from None


def money_option(value: str, name: str, *, positive: bool = False) -> Decimal:
    """Validate money on the command line, so a typo is exit 2 naming the option and the value."""
    try:
        amount = parse_money(value)
    except ValueError as e:
        raise InputError(f"invalid {name}: {e}") from None
    if positive and amount <= 0:
        raise InputError(f"invalid {name}: {value!r} must be greater than 0")
    return amount


def _gpus(model: str, count: int) -> str:
    return f"{model} x{count}" if count > 1 else model


def _print_account(view: AccountView) -> None:
    """The account's money, each figure with what it means: a renter's balance of 0 is not "no pay"."""
    click.echo(f"account     {view.account}")
    for name, value, meaning in (
        ("balance", fmt_money(view.balance), "deposits, transfers in and refunds, less runs launched"),
        ("escrow", fmt_money(view.escrow), "held for the runs you launched"),
        ("earned", fmt_money(view.earned), "pay for verified work and audit fees, not yet taken out"),
        ("withdrawn", fmt_money(view.withdrawn), "paid out of the market to you"),
        ("reputation", f"{view.reputation:.3f}", "0..1, from uptime, lapses and audits"),
    ):
        click.echo(f"{name:<11} {value:<12} {meaning}")
    click.echo("withdraw or transfer draws on earned first, then balance")


# -------------------------------------------------------------------------------------------------- rent


@click.command("rent")
@coordinator_option
@click.option("--price-per-hour", required=True, metavar="X", help="Your ask per GPU-hour, e.g. 1.20.")
@click.option(
    "--identity", "identity_path", type=click.Path(dir_okay=False), help="Key file of your account."
)
@click.option(
    "--role", "roles", multiple=True, type=click.Choice(["trainer", "validator"]), help="[default: trainer]"
)
@click.option(
    "--min-lease-seconds", type=click.IntRange(min=0), default=0, help="Shortest lease you take [default: 0]."
)
@click.option(
    "--listen",
    multiple=True,
    metavar="MADDR",
    help="Address the run's DHT listens on [default: /ip4/0.0.0.0/tcp/0]; 127.0.0.1 for one machine.",
)
@click.option(
    "--announce",
    multiple=True,
    metavar="MADDR",
    help="Public address of the run's DHT, for a port your router forwards to --listen's (behind NAT).",
)
@metrics_port_option
def rent(
    coordinator: str,
    price_per_hour: str,
    identity_path: str | None,
    roles: tuple[str, ...],
    min_lease_seconds: int,
    listen: tuple[str, ...],
    announce: tuple[str, ...],
    metrics_port: int | None,
) -> None:
    """Benchmark this machine, post a signed offer, keep its lease alive and train the runs it is matched
    to, until Ctrl-C, which stops the trainer and withdraws the offer (no lapse: your reliability is
    kept). A price of 0 volunteers the machine.

    Prints the offer and the lease, then a line whenever the lease changes state or is assigned to a
    run. When assigned, a trainer process joins the run (its log follows); it stops when the match ends.
    A lapsed lease is renewed by posting the offer again; while the coordinator is unreachable it keeps
    retrying.

    \b
    Behind a home router, the trainer finds out at start that nobody can dial it (the coordinator dials
    it back), trains in client mode and is dialed through the run's reachable peers; with a port your
    router forwards, --listen on it and --announce the public address instead.

    \b
    Example:
      hivemarket rent --coordinator http://10.0.0.2:8470 --price-per-hour 1.20
      hivemarket rent --price-per-hour 0 --metrics-port 9102
      hivemarket rent --price-per-hour 1 --listen /ip4/0.0.0.0/tcp/4001 \\
        --announce /ip4/203.0.113.7/tcp/4001
    """
    from peer.console import identity_path as resolve_identity
    from peer.metrics import start_peer_metrics
    from peer.node import DEFAULT_LISTEN, NodeError, parse_maddrs
    from peer.worker import TrainerSupervisor

    price = money_option(price_per_hour, "--price-per-hour")
    settings = load_settings()
    client = client_for(coordinator, load_cli_identity(identity_path, settings, create_default=True))
    try:
        listen_maddrs = parse_maddrs(listen, "--listen") or list(DEFAULT_LISTEN)
        announce_maddrs = parse_maddrs(announce, "--announce")
    except NodeError as e:
        raise InputError(str(e)) from None
    identity_file = resolve_identity(identity_path, settings)
    supervisor = TrainerSupervisor(
        client.coordinator, identity_file, settings, listen_maddrs, announce_maddrs
    )
    from peer.hardware import probe, summary

    probed = probe(benchmark_seconds=settings.probe_seconds)
    gpus = [gpu["uuid"] for gpu in probed["gpus"]]
    hardware = summary(probed)
    if settings.adversary == "capacity-liar":  # demonstrations: claim more than the probe measured
        hardware["tflops"] *= settings.capacity_lie
    body = OfferBody(
        price_per_hour=f"{price:f}",
        hardware=HardwareSummary(**hardware),
        roles=sorted(set(roles or ("trainer",))),
        min_lease_seconds=min_lease_seconds,
    )
    metrics = start_peer_metrics(metrics_port, settings, gpus)
    try:
        call(client, functools.partial(_rent_until_signal, body=body, supervisor=supervisor, gpus=gpus))
    finally:
        if metrics is not None:
            metrics.stop()
    click.echo("stopped", err=True)


async def _rent_until_signal(
    client: CoordinatorClient, body: OfferBody, supervisor: TrainerSupervisor, gpus: Sequence[str]
) -> None:
    """Hold the lease until SIGINT/SIGTERM, which cancel this task: :func:`_hold_lease` then leaves
    cleanly (stops the trainer, withdraws the offer) and the session closes."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await _hold_lease(client, body, supervisor, gpus)


def serve_runs_in_background(
    client: CoordinatorClient, body: OfferBody, supervisor: TrainerSupervisor, gpus: Sequence[str]
) -> Callable[[float], None]:
    """Hold the offer's lease and train its runs on an event loop in a thread (``peer start
    --coordinator``); returns the function that stops it all, leaving as ``rent`` does on Ctrl-C, within
    the given number of seconds plus the request timeout the withdrawal of the offer may take."""
    loop = asyncio.new_event_loop()

    async def main() -> None:
        async with client:
            await _hold_lease(client, body, supervisor, gpus)

    task = loop.create_task(main())

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    thread = threading.Thread(target=run, name="lease", daemon=True)
    thread.start()

    def stop(timeout: float) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout + client.settings.request_timeout)

    return stop


async def _hold_lease(
    client: CoordinatorClient, body: OfferBody, supervisor: TrainerSupervisor, gpus: Sequence[str]
) -> None:
    """Heartbeat every lease interval, with the telemetry of the GPUs ``gpus`` (their UUIDs) when they
    report any; post the offer again when the lease lapsed or is unknown; keep the trainer in step with
    the match the lease holds. However it ends (cancelled by Ctrl-C or the node stopping, or failing), it
    leaves cleanly: it stops the trainer, then withdraws the offer (:func:`_withdraw_offer`), so that the
    lease ends released rather than lapsing later at the cost of the peer's reliability, and the run goes
    on with its other peers at once.

    The trainer is followed in a task of its own: stopping one may take ``trainer_stop_timeout``, and
    heartbeats must go on meanwhile (measured: a lease re-posted after a partition lapsed again while
    the worker waited for the old trainer to stop)."""
    following: asyncio.Task[None] | None = None

    def follow(lease: LeaseView) -> None:
        nonlocal following
        if following is not None and not following.done():
            return  # the next heartbeat follows the lease again
        if following is not None:
            following.result()  # a failure of the supervisor is the worker's failure
        following = asyncio.create_task(supervisor.follow(lease.id, lease.run_id, client))

    lease = await _post_offer(client, body)
    try:
        follow(lease)
        while True:
            await asyncio.sleep(lease.heartbeat_interval)
            telemetry = await asyncio.to_thread(read_telemetry, gpus) if gpus else None
            try:
                renewed = await _persist(
                    client.settings, functools.partial(client.heartbeat, lease.id, telemetry)
                )
            except AlreadyApplied:
                continue  # the retried heartbeat's first attempt renewed the lease
            except CoordinatorError as e:
                if e.code != "lease_lapsed" and e.status != 404:
                    raise
                click.echo(f"lease {lease.id} lost ({e.code}: {e.message}); posting the offer again")
                lease = await _post_offer(client, body)
                follow(lease)
                continue
            if (renewed.state, renewed.run_id) != (lease.state, lease.run_id):
                click.echo(_lease_change(lease, renewed))
            lease = renewed
            follow(lease)
    finally:
        if following is not None:
            following.cancel()
        await supervisor.stop()
        await _withdraw_offer(client, lease)


async def _withdraw_offer(client: CoordinatorClient, lease: LeaseView) -> None:
    """Withdraw the offer whose lease is ``lease``, within one request timeout (no retries past it: a
    peer that is stopping must not hang on a coordinator that is gone); when that fails, say so and go:
    the lease then lapses as it would have."""
    try:
        with contextlib.suppress(AlreadyApplied):  # a retry found the first attempt applied: withdrawn
            await asyncio.wait_for(client.withdraw_offer(lease.id), client.settings.request_timeout)
    except (CoordinatorError, CoordinatorUnreachable, TimeoutError) as e:
        what = f"timed out after {client.settings.request_timeout:g} s" if isinstance(e, TimeoutError) else e
        click.echo(f"could not withdraw the offer ({what}); its lease {lease.id} will lapse")
        return
    click.echo(f"offer withdrawn: lease {lease.id} released")


def read_telemetry(gpus: Sequence[str]) -> Telemetry | None:
    """The GPUs' power, temperature and utilisation now, as one reading; None when NVML tells nothing."""
    from peer.hardware import combined, read_nvml

    reading = combined(read_nvml(gpus))
    return Telemetry(**reading) if any(value is not None for value in reading.values()) else None


async def _post_offer(client: CoordinatorClient, body: OfferBody) -> LeaseView:
    """Post until an answer comes; re-posting is safe because an account has one offer, updated in place."""
    while True:
        try:
            response = await _persist(client.settings, functools.partial(client.post_offer, body))
        except AlreadyApplied:
            continue  # posted, but the answer with the lease was lost: post again to get it
        _print_offer(response)
        return response.lease


async def _persist(settings: ClientSettings, op: Callable[[], Awaitable[T]]) -> T:
    """Retry ``op`` with backoff while the coordinator is unreachable, rate-limiting or failing (5xx)."""
    failures = 0
    while True:
        try:
            result = await op()
        except (CoordinatorUnreachable, CoordinatorError) as e:
            if isinstance(e, CoordinatorError) and not e.for_load:
                raise
            delay = min(settings.retry_backoff * 2**failures, settings.retry_backoff_max)
            failures += 1
            click.echo(f"coordinator unavailable ({e}); retrying in {delay:g} s")
            await asyncio.sleep(delay)
            continue
        if failures:
            click.echo("coordinator reachable again")
        return result


def _print_offer(response: OfferResponse) -> None:
    offer, lease = response.offer, response.lease
    click.echo(f"account  {offer.account}")
    click.echo(
        f"offer    {fmt_money(offer.price_per_hour)}/h, {_gpus(offer.gpu, offer.gpu_count)}, "
        f"{offer.vram_gb:.1f} GB VRAM, {offer.tflops:.2f} TFLOP/s, roles {','.join(offer.roles)}, "
        f"state {offer.state}"
    )
    click.echo(
        f"lease    {lease.id} {lease.state}, expires in {lease.expires_at - time.time():.1f} s, "
        f"heartbeat every {lease.heartbeat_interval:g} s"
    )


def _lease_change(old: LeaseView, new: LeaseView) -> str:
    changes = []
    if new.state != old.state:
        changes.append(f"{old.state} -> {new.state}")
    if new.run_id != old.run_id:
        changes.append(
            f"assigned to run {new.run_id} at {fmt_money(new.price_per_hour)}/h"
            if new.run_id
            else f"released from run {old.run_id}"
        )
    return f"lease {new.id}: {', '.join(changes)}"


# ------------------------------------------------------------------------------------- offers and market


@click.command("offers")
@click.argument("filter_expr", metavar="[FILTER]", default="")
@click.option("--sort", metavar="FIELD", help="Order by FIELD; -FIELD for descending (e.g. -price).")
@coordinator_option
@json_option
def offers(filter_expr: str, sort: str | None, coordinator: str, as_json: bool) -> None:
    """List the market's offers, optionally filtered: FIELD OP VALUE terms, OP one of = != < <= > >= in.

    \b
    Example:
      hivemarket offers 'gpu=H100 vram_gb>=40 price<=2.5' --sort price
      hivemarket offers 'reliability>0.9' --sort -tflops --json
    """
    found = call(client_for(coordinator), lambda c: c.offers(filter_expr, sort))
    if as_json:
        echo_json([o.model_dump(mode="json") for o in found])
        return
    if not found:
        click.echo("no offers match")
        return
    print_table(
        ["ACCOUNT", "GPU", "VRAM GB", "TFLOP/S", "PRICE/H", "RELIABILITY", "STATE"],
        [
            [
                o.account[:12],
                _gpus(o.gpu, o.gpu_count),
                f"{o.vram_gb:.1f}",
                f"{o.tflops:.2f}",
                fmt_money(o.price_per_hour),
                f"{o.reliability:.3f}",
                o.state,
            ]
            for o in found
        ],
        right=["VRAM GB", "TFLOP/S", "PRICE/H", "RELIABILITY"],
    )


@click.command("market")
@coordinator_option
@json_option
def market(coordinator: str, as_json: bool) -> None:
    """Show the clearing price, supply, demand and the recent clearing rounds.

    \b
    Example:
      hivemarket market --json
    """
    view = call(client_for(coordinator), lambda c: c.market())
    if as_json:
        echo_json(view.model_dump(mode="json"))
        return
    click.echo(f"clearing price  {fmt_money(view.clearing_price)} per effective TFLOP-hour")
    click.echo(f"supply          {view.supply} open offers")
    click.echo(f"demand          {view.demand} peers wanted")
    if view.rounds:
        print_table(
            ["AT", "PRICE", "TRADES", "SUPPLY", "DEMAND", "REASON"],
            [
                [
                    time.strftime("%H:%M:%S", time.localtime(r.at)),
                    fmt_money(r.clearing_price),
                    r.trades,
                    r.supply,
                    r.demand,
                    r.reason,
                ]
                for r in view.rounds
            ],
            right=["PRICE", "TRADES", "SUPPLY", "DEMAND"],
        )


# ---------------------------------------------------------------------------------------------- accounts


@click.command("account")
@click.argument("account_id", metavar="[ID]", required=False)
@coordinator_option
@click.option(
    "--identity", "identity_path", type=click.Path(dir_okay=False), help="Key file whose account to show."
)
@json_option
def account(account_id: str | None, coordinator: str, identity_path: str | None, as_json: bool) -> None:
    """Show an account's money (balance, escrow, earned, withdrawn: each explained) and reputation (your
    own by default).

    \b
    Example:
      hivemarket account
      hivemarket account 170d094c3df1f0c6b3e7f8b6f8f4c1d6e8a0a4c2b9d7e5f3a1c9b7d5e3f1a2b4 --json
    """
    account_id = account_id or load_cli_identity(identity_path, load_settings()).account
    _show_account(call(client_for(coordinator), lambda c: c.account(account_id)), as_json)


@click.command("deposit")
@click.argument("account_id", metavar="ACCOUNT")
@click.argument("amount")
@click.option(
    "--admin-key", required=True, type=click.Path(dir_okay=False), help="The coordinator's admin key file."
)
@coordinator_option
@json_option
def deposit(account_id: str, amount: str, admin_key: str, coordinator: str, as_json: bool) -> None:
    """Credit AMOUNT to ACCOUNT; only the coordinator's admin key may.

    A deposit whose answer was lost is retried with the same nonce, so it is applied exactly once.

    \b
    Example:
      hivemarket deposit 170d094c3df1...a2b4 12.50 --admin-key ./admin.pem
    """
    value = money_option(amount, "AMOUNT", positive=True)
    try:
        admin = load_identity(admin_key)
    except IdentityError as e:
        raise InputError(f"--admin-key: {e}") from None
    client = client_for(coordinator, admin)
    view = call(client, lambda c: _applied_once(c, lambda: c.deposit(account_id, value), account_id))
    _show_account(view, as_json)


async def _applied_once(
    client: CoordinatorClient, request: Callable[[], Awaitable[AccountView]], account: str
) -> AccountView:
    """Send a request that moves money and answers ``account``; when a retry learns the first attempt was
    applied, read the account instead (the request is never sent twice)."""
    try:
        return await request()
    except AlreadyApplied:
        return await client.account(account)


def _show_account(view: AccountView, as_json: bool) -> None:
    if as_json:
        echo_json(view.model_dump(mode="json"))
    else:
        _print_account(view)


identity_option = click.option(
    "--identity", "identity_path", type=click.Path(dir_okay=False), help="Key file of your account."
)


@click.command("withdraw")
@click.argument("amount")
@coordinator_option
@identity_option
@json_option
def withdraw(amount: str, coordinator: str, identity_path: str | None, as_json: bool) -> None:
    """Pay AMOUNT out of the market to your account: from what you earned first, then your balance.

    The withdrawal is a recorded payout in the coordinator's ledger (shown as `withdrawn` by `hivemarket
    account`); more than earned and balance hold together is refused, naming what is available. A
    withdrawal whose answer was lost is retried with the same nonce, so it is applied exactly once.

    \b
    Example:
      hivemarket withdraw 0.05
      hivemarket withdraw 1.25 --identity ./renter.pem --json
    """
    value = money_option(amount, "AMOUNT", positive=True)
    me = load_cli_identity(identity_path, load_settings())
    view = call(
        client_for(coordinator, me), lambda c: _applied_once(c, lambda: c.withdraw(value), me.account)
    )
    _show_account(view, as_json)


@click.command("transfer")
@click.argument("to", metavar="ACCOUNT")
@click.argument("amount")
@coordinator_option
@identity_option
@json_option
def transfer(to: str, amount: str, coordinator: str, identity_path: str | None, as_json: bool) -> None:
    """Move AMOUNT from your account to ACCOUNT's balance: from what you earned first, then your balance.

    ACCOUNT can launch runs with it, transfer it on or withdraw it. Shows your account afterwards; a
    transfer whose answer was lost is retried with the same nonce, so it is applied exactly once.

    \b
    Example:
      hivemarket transfer 170d094c3df1f0c6b3e7f8b6f8f4c1d6e8a0a4c2b9d7e5f3a1c9b7d5e3f1a2b4 2.50
    """
    if not ACCOUNT_RE.fullmatch(to):
        raise InputError(f"invalid ACCOUNT: {to!r} is not an account id (64 lowercase hex characters)")
    value = money_option(amount, "AMOUNT", positive=True)
    me = load_cli_identity(identity_path, load_settings())
    view = call(
        client_for(coordinator, me), lambda c: _applied_once(c, lambda: c.transfer(to, value), me.account)
    )
    _show_account(view, as_json)
