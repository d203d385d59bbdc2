"""Running an aiohttp application from the command line: one way, for the coordinator and dataset servers."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

from peer.console import bind_error, http_url


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
