"""What every ``hivemarket`` command shares, whichever wing it belongs to. Not wire protocol.

Why it is shared, and why here: the peer's commands and the coordinator's ``coordinator serve`` are one
command line, so they must fail the same way (bad input is one ``Error: ...`` line and exit status 2,
:class:`InputError`) and run their servers the same way (bind a port, 0 for any free one, print the URL
they accept requests on, stop on SIGINT/SIGTERM). The coordinator may import nothing of ``peer/`` but
:mod:`peer.protocol`, so this small module lives beside the protocol rather than in one wing.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import click
from aiohttp import web


class InputError(click.ClickException):
    """Bad input from the user: printed as one line, exit status 2."""

    exit_code = 2


def bind_error(option: str, port: int, host: str, error: OSError) -> InputError:
    """A server port that could not be bound, named by its option (found by binding, not by probing first,
    which would race with whoever takes the port in between)."""
    reason = "is already in use" if error.errno == errno.EADDRINUSE else f"cannot be bound: {error.strerror}"
    return InputError(f"{option} {port} on {host} {reason}")


def http_url(host: str, port: int) -> str:
    """The base URL of a server bound to ``host:port`` (an IPv6 host in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


@asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[str]:
    """Run ``app`` on ``host:port`` (0 picks a free port); yields the base URL it accepts requests on.

    A port that is taken raises InputError, found by binding itself rather than by probing first, which
    would race with whoever takes the port in between.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise bind_error("--port", port, host, e) from None
        bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]  # the real port for 0
        yield http_url(host, bound[1])
    finally:
        await runner.cleanup()


async def serve_until_signal(
    app: web.Application, host: str, port: int, ready: Callable[[str], None]
) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; ``ready(url)`` is called once requests are accepted."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serving(app, host, port) as url:
        ready(url)
        await stop.wait()
