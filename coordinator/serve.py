"""``hivemarket coordinator serve``: run the coordinator service until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from pathlib import Path

import click
import uvloop

from coordinator.app import Coordinator, serving
from coordinator.settings import ServerSettings
from coordinator.store import LeaseConfig, open_store
from peer.console import InputError, load_cli_identity


@click.group("coordinator")
def coordinator_group() -> None:
    """Run the coordinator: the market, the ledger and the runs.

    \b
    Example:
      hivemarket coordinator serve --port 8470 --admin-key ~/.hivemarket/admin.pem
    """


@coordinator_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8470, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port."
)
@click.option("--db", "db_url", help="sqlite:///PATH [default: sqlite:///$HIVEMARKET_HOME/coordinator.db].")
@click.option(
    "--admin-key",
    type=click.Path(dir_okay=False),
    help="Identity file whose account may deposit funds [default: $HIVEMARKET_HOME/identity.pem].",
)
@click.option(
    "--sqlite-synchronous",
    type=click.Choice(["FULL", "NORMAL"]),
    default="FULL",
    show_default=True,
    help="FULL survives power loss; NORMAL survives process crashes and is faster.",
)
def serve(host: str, port: int, db_url: str | None, admin_key: str | None, sqlite_synchronous: str) -> None:
    """Serve the coordinator's HTTP API; prints `listening on http://HOST:PORT` once it accepts requests.

    \b
    Example:
      hivemarket identity new --path admin.pem
      hivemarket coordinator serve --admin-key admin.pem --db sqlite:///./market.db
    """
    settings = ServerSettings()
    admin = load_cli_identity(admin_key, settings).account  # type: ignore[arg-type]
    db_url = db_url or f"sqlite:///{Path(settings.home) / 'coordinator.db'}"
    try:
        store = open_store(
            db_url,
            LeaseConfig(settings.heartbeat_interval, settings.lease_ttl),
            synchronous=sqlite_synchronous,
            batch_max=settings.write_batch_max,
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    _check_port(host, port)
    uvloop.run(_serve(Coordinator(settings, store, admin), host, port))  # measured cheaper per request
    click.echo("stopped", err=True)


def _check_port(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror}"
            raise InputError(f"--port {port} on {host} {reason}") from None


async def _serve(coordinator: Coordinator, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serving(coordinator, host, port) as url:
        click.echo(f"listening on {url}")
        await stop.wait()
