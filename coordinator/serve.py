"""``hivemarket coordinator serve``: run the coordinator service until SIGINT/SIGTERM."""

from __future__ import annotations

from pathlib import Path

import click
import uvloop

from coordinator.app import Coordinator
from coordinator.capacity import CapacityPolicy
from coordinator.db import StoreUnavailable
from coordinator.groups import GroupConfig
from coordinator.leases import LeaseConfig
from coordinator.routes import create_app
from coordinator.runs import RunPolicy
from coordinator.settings import ServerSettings
from coordinator.store import open_store
from peer.protocol.commands import InputError, serve_until_signal
from peer.protocol.dataset import DatasetError
from peer.protocol.dataset_server import dataset_routes, open_datasets
from peer.protocol.identity import IdentityError, default_identity_path, load_identity


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
@click.option(
    "--db",
    "db_url",
    help="sqlite:///RELATIVE or sqlite:////ABSOLUTE path, or postgresql://USER@HOST[:PORT]/DATABASE "
    "(replicas may share it) [default: sqlite:///$HIVEMARKET_HOME/coordinator.db].",
)
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
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A dataset folder to serve at /datasets/VERSION/ for the runs that name it; repeat for more.",
)
def serve(
    host: str,
    port: int,
    db_url: str | None,
    admin_key: str | None,
    sqlite_synchronous: str,
    datasets: tuple[Path, ...],
) -> None:
    """Serve the coordinator's HTTP API; prints `listening on http://HOST:PORT` once it accepts requests.

    \b
    Example:
      hivemarket identity new --path admin.pem
      hivemarket coordinator serve --admin-key admin.pem --db sqlite:///market.db --dataset ./digits
    """
    settings = ServerSettings()
    try:
        admin = load_identity(Path(admin_key) if admin_key else default_identity_path(settings.home)).account
    except IdentityError as e:
        raise InputError(f"--admin-key (the key that may deposit funds): {e}") from None
    db_url = db_url or f"sqlite:///{(Path(settings.home) / 'coordinator.db').absolute()}"
    try:
        store = open_store(
            db_url,
            LeaseConfig(settings.heartbeat_interval, settings.lease_ttl),
            synchronous=sqlite_synchronous,
            batch_max=settings.write_batch_max,
            readers=settings.db_readers,
            run_policy=RunPolicy(
                settle_timeout=settings.settle_timeout,
                stall_timeout=settings.stall_timeout,
                audit_timeout=settings.audit_timeout,
                audit_claim_timeout=settings.audit_claim_timeout,
                group=GroupConfig(regroup_seconds=settings.group_regroup_seconds),
                capacity=CapacityPolicy(
                    tolerance=settings.capacity_tolerance,
                    flag_ratio=settings.capacity_flag_ratio,
                    min_reports=settings.capacity_min_reports,
                ),
            ),
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    app = create_app(Coordinator(settings, store, admin))
    try:
        app.add_routes(dataset_routes(open_datasets(datasets)))
    except DatasetError as e:
        raise InputError(f"--dataset: {e}") from None
    ready = lambda url: click.echo(f"listening on {url}")  # noqa: E731
    try:
        uvloop.run(serve_until_signal(app, host, port, ready))  # uvloop: measured cheaper per request
    except StoreUnavailable as e:
        raise InputError(f"--db: {e}") from None
    click.echo("stopped", err=True)
