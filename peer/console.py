"""Helpers the peer's ``hivemarket`` commands share: tables, JSON output, identities, signals.

Exit codes: 0 ok, 1 a failure while running, 2 usage or bad input (a one-line ``Error: ...`` naming the
problem, never a traceback; :class:`peer.protocol.commands.InputError`, which the coordinator's command
raises too).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from peer.p2p_key import p2p_key_path, write_p2p_key
from peer.protocol.commands import InputError
from peer.protocol.identity import (
    Identity,
    IdentityError,
    default_identity_path,
    load_identity,
    save_identity,
)
from peer.settings import PeerSettings

metrics_port_option = click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Serve Prometheus metrics on PORT (0: any free port; the URL is printed) at "
    "$HIVEMARKET_METRICS_HOST [default: 127.0.0.1].",
)


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Iterable[str] = (), note: str = ""
) -> None:
    """Print rows under headers as a table (rich); columns named in ``right`` (numbers) align right.

    On a terminal it fits the terminal; piped, it is as wide as its rows need, never cut or wrapped,
    so that ``grep`` finds a whole account prefix (scripts should use --json all the same).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, header_style="bold")
    aligned = set(right)
    for header in headers:
        table.add_column(header, justify="right" if header in aligned else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console = Console(width=None if sys.stdout.isatty() else 1000, highlight=False)
    console.print(table, soft_wrap=True)
    if note:
        click.echo(note)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def identity_path(path: str | None, settings: PeerSettings) -> Path:
    return Path(path) if path else default_identity_path(settings.home)


def node_key(path: str | None, settings: PeerSettings) -> Path:
    """The node key beside the account key (:mod:`peer.p2p_key`), made now for a home that predates it
    (quietly: `peer start` prints the peer id it gives)."""
    key = p2p_key_path(identity_path(path, settings))
    write_p2p_key(key, replace=False)
    return key


def load_cli_identity(path: str | None, settings: PeerSettings, *, create_default: bool = False) -> Identity:
    """Load the identity; the default file is created on first use when ``create_default``."""
    resolved = identity_path(path, settings)
    if path is None and create_default and not resolved.exists():
        identity = Identity.generate()
        save_identity(identity, resolved)
        write_p2p_key(p2p_key_path(resolved), replace=True)  # its node key, made with it
        click.echo(f"created a new identity at {resolved}", err=True)
        return identity
    try:
        return load_identity(resolved)
    except IdentityError as e:
        raise InputError(str(e)) from None


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM in this process.

    The handlers are installed before hivemind forks its DHT process; a forked child that inherits them
    restores the default action and re-raises, so that signalling the child still stops it.
    """
    stop = threading.Event()
    owner = os.getpid()

    def handle(signum: int, _frame: Any) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_json_atomically(path: Path, value: Any) -> None:
    """Readers never see a half-written file: write a sibling, then rename over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
