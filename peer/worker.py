"""The worker side of renting: run the trainer for the run this peer's lease is matched to.

``hivemarket rent`` holds the lease; after every heartbeat it tells :class:`TrainerSupervisor` which run
(if any) the lease is matched to. The supervisor starts ``python -m peer.trainer`` for a new match, stops
it when the match ends, and starts it again (a bounded number of times) when it failed for a reason that
may pass. The trainer runs in the worker's process group, so a signal to the group (Ctrl-C, or the demo
killing a peer) reaches it too.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from peer.node import terminate_tree
from peer.protocol.client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable
from peer.settings import PeerSettings
from peer.trainer_exit import EXIT_REFUSED


class TrainerSupervisor:
    def __init__(
        self,
        coordinator: str,
        identity: Path,
        settings: PeerSettings,
        listen: list[str],
        announce: Sequence[str] = (),
    ):
        self.coordinator = coordinator  # every URL of --coordinator: the trainer fails over too
        self.identity = identity
        self.settings = settings
        self.listen = listen
        self.announce = announce  # what the run's DHT publishes instead of its own addresses
        self.match: tuple[str, str] | None = None  # (lease id, run id): a new lease is a new match
        self.run_id: str | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.done = False  # the trainer finished (or refused) this run: do not start it again

    async def follow(self, lease_id: str, run_id: str | None, client: CoordinatorClient) -> None:
        """Make the trainer match the lease: none, or one for ``run_id``. A run the trainer refused (a task
        this peer lacks) or kept failing on is given back to the coordinator, which recruits another peer.
        A new lease matched to the same run (after a lapse) is a new match: its trainer starts afresh.
        """
        match = (lease_id, run_id) if run_id is not None else None
        if match != self.match:
            await self.stop()
            self.match, self.run_id, self.starts, self.done = match, run_id, 0, False
        if self.run_id is None or self.done:
            return
        if self.proc is not None and self.proc.returncode is None:
            return
        if self.proc is not None:
            code = self.proc.returncode
            self.proc = None
            if code == 0 or code == EXIT_REFUSED or self.starts > self.settings.trainer_restarts:
                self.done = True
                click.echo(f"trainer for {self.run_id} exited with {code}; not starting it again")
                if code != 0:
                    await self._leave(client)
                return
            click.echo(f"trainer for {self.run_id} exited with {code}; starting it again")
        self.starts += 1
        listen = [arg for maddr in self.listen for arg in ("--listen", maddr)]
        listen += [arg for maddr in self.announce for arg in ("--announce", maddr)]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "peer.trainer",
            self.run_id,
            "--coordinator",
            self.coordinator,
            "--identity",
            str(self.identity),
            *listen,
        )
        click.echo(f"trainer for {self.run_id} started (pid {self.proc.pid})")

    async def _leave(self, client: CoordinatorClient) -> None:
        assert self.run_id is not None
        try:
            await client.leave(self.run_id)
            click.echo(f"gave run {self.run_id} back to the coordinator")
        except (CoordinatorError, CoordinatorUnreachable) as e:  # the lease lapses if it cannot be told
            click.echo(f"could not give run {self.run_id} back: {e}")

    async def stop(self) -> None:
        """Ask the trainer to stop (SIGTERM); kill it and its children if it has not after the timeout."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), self.settings.trainer_stop_timeout)
        except TimeoutError:
            await asyncio.to_thread(terminate_tree, proc.pid, self.settings.shutdown_timeout)
            await proc.wait()
