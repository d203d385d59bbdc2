"""The ``hivemarket`` command line: identity, peer and swarm commands here; the market's, the launcher's,
the data and the coordinator's commands come in through entry points (:class:`LazyGroup`). Exit codes are
those of :mod:`peer.console`.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable
from importlib.metadata import EntryPoint, distribution
from pathlib import Path
from typing import Any

import click

from peer.console import (
    echo_json,
    identity_path,
    load_cli_identity,
    metrics_port_option,
    node_key,
    print_table,
    stop_on_signals,
    write_json_atomically,
)
from peer.p2p_key import P2PKeyError, p2p_key_path, peer_id_of, write_p2p_key
from peer.protocol import __version__
from peer.protocol.commands import InputError
from peer.protocol.identity import Identity, IdentityError, save_identity
from peer.settings import PeerSettings, load_settings

#: The entry-point group of the commands that live in other modules (pyproject.toml lists them).
COMMANDS_GROUP = "hivemarket.commands"


class LazyGroup(click.Group):
    """A group that adds the commands this package declares under the ``hivemarket.commands`` entry
    points, each imported only when used or listed by --help.

    Why entry points: the coordinator's commands (``hivemarket coordinator serve``) belong to the other
    wing, which this module must not import; the package's metadata names them instead. Why lazily: the
    coordinator, market and data commands pull in aiohttp, pydantic and numpy, and `identity show` or
    `peer start` should not pay for them at every start.
    """

    @functools.cached_property
    def lazy(self) -> dict[str, EntryPoint]:
        # This package's own metadata only: scanning every installed package's took 110 ms a start here.
        return {ep.name: ep for ep in distribution("hivemarket").entry_points.select(group=COMMANDS_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            return self.lazy[cmd_name].load()
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="hivemarket")
def main() -> None:
    """hivemarket: rent out a GPU, run a peer node, launch a collaborative training run.

    \b
    Example:
      hivemarket identity new
      hivemarket peer start --listen /ip4/0.0.0.0/tcp/31337
    """


# ---------------------------------------------------------------------------------------------- identity


@main.group()
def identity() -> None:
    """Create and show the Ed25519 key that is your account.

    \b
    Example:
      hivemarket identity new && hivemarket identity show
    """


@identity.command("new")
@click.option(
    "--path", type=click.Path(dir_okay=False), help="Key file [default: $HIVEMARKET_HOME/identity.pem]."
)
@click.option("--force", is_flag=True, help="Replace an existing key file (the old account is lost).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object: account and path.")
def identity_new(path: str | None, force: bool, as_json: bool) -> None:
    """Write a new private key (PKCS8 PEM, mode 0600) and print its account id.

    \b
    Example:
      hivemarket identity new --path ./alice.pem
      hivemarket identity new --path ./bob.pem --json
    """
    resolved = identity_path(path, load_settings())
    new = Identity.generate()
    try:
        save_identity(new, resolved, force=force)
        write_p2p_key(p2p_key_path(resolved), replace=True)  # a new account, a new node
    except IdentityError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise InputError(f"cannot write identity file {resolved}: {e.strerror}") from None
    if as_json:
        echo_json({"account": new.account, "path": str(resolved), **_node_id(resolved)})
    else:
        click.echo(new.account)


@identity.command("show")
@click.option(
    "--path", type=click.Path(dir_okay=False), help="Key file [default: $HIVEMARKET_HOME/identity.pem]."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def identity_show(path: str | None, as_json: bool) -> None:
    """Print the account id (64 hex characters) of a key file, and the peer id of the node key beside it.

    The account goes to stdout (so that `$(hivemarket identity show)` is the account), the peer id to
    stderr; `--json` prints both. The peer id is what `peer start` runs as at every start.

    \b
    Example:
      hivemarket identity show --json
    """
    settings = load_settings()
    loaded = load_cli_identity(path, settings)
    resolved = identity_path(path, settings)
    node = _node_id(resolved)
    if as_json:
        echo_json({"account": loaded.account, "path": str(resolved), **node})
    else:
        click.echo(loaded.account)
        click.echo(f"peer id  {node['peer_id'] or 'none yet (made by the first peer start)'}", err=True)


def _node_id(identity_file: Path) -> dict[str, str | None]:
    """The peer id of the node key beside ``identity_file`` (None before it exists) and its path."""
    key = p2p_key_path(identity_file)
    try:
        return {"peer_id": peer_id_of(key) if key.exists() else None, "p2p_key": str(key)}
    except P2PKeyError as e:
        raise InputError(str(e)) from None


# -------------------------------------------------------------------------------------------------- peer


@main.group()
def peer() -> None:
    """Run a peer node and probe this machine.

    \b
    Example:
      hivemarket peer probe
    """


@peer.command("probe")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def peer_probe(as_json: bool) -> None:
    """Report CPU, RAM, GPUs and a short benchmark (fp32/bf16 TFLOP/s, memory bandwidth).

    \b
    Example:
      hivemarket peer probe --json
    """
    from peer.hardware import probe

    result = probe(benchmark_seconds=load_settings().probe_seconds)
    if as_json:
        echo_json(result)
        return
    bench = result["benchmark"]
    click.echo(f"cpu      {result['cpu']['model']} ({result['cpu']['logical_cores']} threads)")
    click.echo(f"ram      {result['ram_gb']:.1f} GiB")
    for gpu in result["gpus"]:
        click.echo(
            f"gpu {gpu['index']}    {gpu['name']}, {gpu['vram_gb']:.1f} GiB, sm {gpu['compute_capability']}"
        )
    if not result["gpus"]:
        click.echo("gpu      none")
    bf16 = f", bf16 {bench['bf16_tflops']:.2f} TFLOP/s" if bench.get("bf16_tflops") else ""
    click.echo(
        f"bench    {bench['device']}: fp32 {bench['fp32_tflops']:.3f} TFLOP/s{bf16}, "
        f"memory {bench['memory_bandwidth_gbps']:.1f} GB/s ({bench['seconds']:.1f} s)"
    )


def _maddrs(values: tuple[str, ...], option: str) -> list[str]:
    from peer.node import NodeError, parse_maddrs

    try:
        return parse_maddrs(values, option, peer_id=option == "--initial-peers")
    except NodeError as e:
        raise InputError(str(e)) from None


@peer.command("start")
@click.option(
    "--listen", multiple=True, metavar="MADDR", help="Address to listen on [default: /ip4/0.0.0.0/tcp/0]."
)
@click.option(
    "--announce", multiple=True, metavar="MADDR", help="Public address others should dial (behind NAT)."
)
@click.option(
    "--initial-peers", multiple=True, metavar="MADDR", help="A running peer to join; repeat for more."
)
@click.option(
    "--client-mode",
    is_flag=True,
    help="Behind a NAT or firewall: dial out only, be dialed through the --initial-peers as relays.",
)
@click.option(
    "--identity", "identity_path", type=click.Path(dir_okay=False), help="Key file of your account."
)
@click.option(
    "--role", "roles", multiple=True, type=click.Choice(["trainer", "validator"]), help="[default: trainer]"
)
@click.option(
    "--status-file", type=click.Path(dir_okay=False), help="Keep a JSON status object up to date here."
)
@click.option(
    "--coordinator",
    metavar="URL[,...]",
    help="Also volunteer for runs at this coordinator: an offer at price 0 whose matched runs this node "
    "trains (several comma-separated URLs are replicas, tried in turn).",
)
@metrics_port_option
def peer_start(
    listen: tuple[str, ...],
    announce: tuple[str, ...],
    initial_peers: tuple[str, ...],
    client_mode: bool,
    identity_path: str | None,
    roles: tuple[str, ...],
    status_file: str | None,
    coordinator: str | None,
    metrics_port: int | None,
) -> None:
    """Start a DHT peer node that publishes its signed capability record; stop it with Ctrl-C.

    The node's peer id comes from the node key beside your account key, so it and the printed maddrs
    (with a fixed --listen port) stay the same across restarts. With --coordinator the node first asks
    the coordinator to dial it back: a node nobody can dial (behind a home router, say) says so and runs
    as with --client-mode. It then prints only addresses others can dial: relayed through its initial
    peers, never its private ones. Behind a NAT with a forwarded port, --announce the public address.

    \b
    Example:
      hivemarket peer start --listen /ip4/0.0.0.0/tcp/31337
      hivemarket peer start --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/Qm...
      hivemarket peer start --coordinator http://10.0.0.2:8470 --metrics-port 9102
      hivemarket peer start --client-mode --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmRelay...
    """
    from peer.metrics import start_peer_metrics
    from peer.node import DEFAULT_LISTEN, NodeError, PeerNode, start_dht, stop_dht

    settings = load_settings()
    listen_maddrs = _maddrs(listen, "--listen") or list(DEFAULT_LISTEN)
    announce_maddrs = _maddrs(announce, "--announce")
    bootstrap = _maddrs(initial_peers, "--initial-peers")
    if client_mode and not bootstrap:
        raise InputError(
            "--client-mode needs --initial-peers: reachable peers it joins and is dialed through"
        )
    loaded = load_cli_identity(identity_path, settings, create_default=True)

    from peer.hardware import probe, summary

    probed = probe(benchmark_seconds=settings.probe_seconds)
    hardware, gpus = summary(probed), [gpu["uuid"] for gpu in probed["gpus"]]
    try:
        key = node_key(identity_path, settings)
        peer_id_of(key)  # a damaged key file fails here, naming it, rather than inside p2pd
    except (P2PKeyError, OSError) as e:
        raise InputError(str(e)) from None
    reachable = _reachable(coordinator, loaded, settings, listen_maddrs, announce_maddrs, client_mode)
    with stop_on_signals() as stop:
        try:
            dht, rsa = start_dht(
                settings,
                initial_peers=bootstrap,
                listen=listen_maddrs,
                announce=announce_maddrs,
                key=key,
                reachable=reachable,
            )
        except NodeError as e:
            raise InputError(str(e)) from None
        relays = bootstrap if reachable is False else None
        node = PeerNode(dht, rsa, loaded, settings, hardware, sorted(set(roles or ("trainer",))), relays)
        stop_volunteering = _volunteer(
            coordinator, loaded, identity_path, settings, hardware, gpus, node.roles, listen_maddrs
        )
        metrics = None
        try:
            metrics = start_peer_metrics(metrics_port, settings, gpus)
            node.publish()
            click.echo(f"peer id  {node.peer_id}")
            click.echo(f"account  {loaded.account}")
            maddrs = node.maddrs()  # a DHT request: asked once
            for maddr in maddrs:
                click.echo(f"maddr    {maddr}")
            if not maddrs:  # behind a NAT with nobody to relay for it: it still volunteers
                click.echo(
                    "maddr    none others can dial (give --initial-peers: reachable peers relay for it)"
                )
            sys.stdout.flush()
            next_status = 0.0
            while not stop.is_set():
                if node.publish_due():
                    node.publish()
                if status_file and time.monotonic() >= next_status:
                    write_json_atomically(Path(status_file), node.status())
                    next_status = time.monotonic() + settings.status_interval
                stop.wait(min(settings.status_interval, settings.record_refresh))
        finally:
            if metrics is not None:
                metrics.stop()
            # the trainer's grace, then the kill of its process tree, with room to spare
            stop_volunteering(settings.trainer_stop_timeout + 2 * settings.shutdown_timeout)
            stop_dht(dht, settings)
    click.echo("stopped", err=True)


def _reachable(
    coordinator: str | None,
    loaded: Identity,
    settings: PeerSettings,
    listen: list[str],
    announce: list[str],
    client_mode: bool,
) -> bool | None:
    """Whether others can dial this node: --client-mode says not, --announce says so, else the
    coordinator's dial-back when there is one (None: unknown, p2pd's AutoNAT decides). Printed."""
    if client_mode or announce:
        return not client_mode
    if coordinator is None:
        click.echo("reach    not checked (no --coordinator): behind a NAT, start with --client-mode")
        return None
    from peer.market_cli import call, client_for
    from peer.reachability import check

    found = call(client_for(coordinator, loaded), lambda c: check(c, listen, settings.reachability))
    if found is not None:
        verdict = "others can dial this node" if found.reachable else "others cannot dial this node"
        click.echo(f"reach    {verdict} ({found.reason})")
    return None if found is None else found.reachable


def _volunteer(
    coordinator: str | None,
    loaded: Identity,
    path: str | None,
    settings: PeerSettings,
    hardware: dict[str, Any],
    gpus: list[str],
    roles: list[str],
    listen: list[str],
) -> Callable[[float], None]:
    """With a coordinator, offer this node's capacity at price 0 and train the runs it is matched to."""
    if coordinator is None:
        return lambda _timeout: None
    from peer.market_cli import client_for, serve_runs_in_background
    from peer.protocol.schemas import HardwareSummary, OfferBody
    from peer.worker import TrainerSupervisor

    client = client_for(coordinator, loaded)
    body = OfferBody(price_per_hour="0", hardware=HardwareSummary(**hardware), roles=roles)
    # The run's DHT listens on the node's hosts, on ports of its own (the node holds the given ones).
    run_listen = [re.sub(r"/(tcp|udp)/\d+", r"/\1/0", maddr) for maddr in listen]
    supervisor = TrainerSupervisor(client.coordinator, identity_path(path, settings), settings, run_listen)
    return serve_runs_in_background(client, body, supervisor, gpus)


# ------------------------------------------------------------------------------------------------- peers


@main.command("peers")
@click.option("--initial-peers", multiple=True, required=True, metavar="MADDR", help="A running peer to ask.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of records.")
def peers(initial_peers: tuple[str, ...], as_json: bool) -> None:
    """List the live capability records of the swarm, then exit.

    \b
    Example:
      hivemarket peers --initial-peers /ip4/127.0.0.1/tcp/31337/p2p/Qm... --json
    """
    from peer.node import NodeError, fetch_records, start_dht, stop_dht

    settings = load_settings()
    bootstrap = _maddrs(initial_peers, "--initial-peers")
    try:
        dht, _ = start_dht(settings, initial_peers=bootstrap, client_mode=True)
    except NodeError as e:
        raise InputError(str(e)) from None
    try:
        records = fetch_records(dht)
    finally:
        stop_dht(dht, settings)
    if as_json:
        echo_json(records)
    else:
        _print_records(records)


def _print_records(records: list[dict[str, Any]]) -> None:
    if not records:
        click.echo("no live peers found")
        return
    now = time.time()
    print_table(
        ["ACCOUNT", "PEER ID", "GPU", "TFLOP/S", "ROLES", "EXPIRES"],
        [
            [
                r["account"][:12],
                r["peer_id"],
                r["hardware"].get("gpu", "?"),
                f"{r['hardware'].get('tflops', 0):.2f}",
                ",".join(r["roles"]),
                f"{r['expires_at'] - now:.0f} s",
            ]
            for r in records
        ],
        right=["TFLOP/S", "EXPIRES"],
    )


# -------------------------------------------------------------------------------------------------- demo


@main.command("demo")
@click.option(
    "--peers", "n_peers", default=3, show_default=True, type=click.IntRange(2, 8), help="Local peers."
)
@click.option("--no-drop", is_flag=True, help="Do not kill a peer mid-run.")
@click.option("--timeout", default=600.0, show_default=True, help="Give up after this many seconds.")
@click.option("--keep", is_flag=True, help="Keep the temporary folder (database, dataset, model, logs).")
@click.option(
    "--stay",
    is_flag=True,
    help="After the result, keep the coordinator, dashboard and peers running until Ctrl-C.",
)
@click.option(
    "--adversaries",
    default="",
    metavar="KINDS",
    help="Add cheating peers, comma-separated: free-rider, random-gradient, inflated-samples, replay.",
)
@click.option(
    "--example",
    default="digits",
    show_default=True,
    type=click.Choice(["digits", "bytes_lm", "adapt_minilm", "llama_tiny"]),
    help="The run: examples/EXAMPLE.toml on the example dataset it names (adapt_minilm and llama_tiny "
    "need pip install 'hivemarket[hf]').",
)
@click.option(
    "--samples",
    type=click.IntRange(1),
    default=None,
    help="Train this many samples instead of the spec's stop.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def demo(
    n_peers: int,
    no_drop: bool,
    timeout: float,
    keep: bool,
    stay: bool,
    adversaries: str,
    example: str,
    samples: int | None,
    as_json: bool,
) -> None:
    """Run the whole market on this machine: a coordinator, N renting peers and a training run (digits
    unless --example says otherwise) in which one peer is killed mid-run; print the held-out loss and
    accuracy before and after, and the settled ledger. With --adversaries, cheating peers join too: the
    audits catch them and they are not paid.

    \b
    Example:
      hivemarket demo
      hivemarket demo --peers 4 --json
      hivemarket demo --adversaries free-rider,random-gradient,inflated-samples,replay
      hivemarket demo --example adapt_minilm --samples 1024
      hivemarket demo --stay
    """
    from peer.demo import parse_adversaries, print_result, run_demo

    try:
        cheats = parse_adversaries(adversaries)
    except ValueError as e:
        raise InputError(f"--adversaries: {e}") from None
    if n_peers < 3 and not no_drop:
        raise InputError(
            f"--peers {n_peers}: a demo that kills a peer needs at least 3 (audits need two peers left); "
            "add --no-drop to run with 2"
        )
    run_demo(
        n_peers,
        not no_drop,
        as_json,
        timeout,
        keep,
        cheats,
        spec=f"{example}.toml",
        samples=samples,
        show=echo_json if as_json else print_result,
        stay=stay,
    )
