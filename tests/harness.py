"""Real peer processes for tests: each in its own process group, always reaped (p2pd included)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
import psycopg

from peer.protocol.identity import Identity, save_identity
from peer.protocol.run_schemas import RunPeerView, RunView

if TYPE_CHECKING:
    from peer.demo import Demo

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent

# Short intervals so that tests exercise expiry and refresh in seconds, not minutes.
FAST_ENV = {
    "HIVEMARKET_PROBE_SECONDS": "0.2",
    "HIVEMARKET_RECORD_TTL": "6",
    "HIVEMARKET_RECORD_REFRESH": "1",
    "HIVEMARKET_STATUS_INTERVAL": "0.5",
    "HIVEMARKET_BOOTSTRAP_TIMEOUT": "20",
    "HIVEMIND_LOGLEVEL": "WARNING",
}


def minimal_spec(name: str, **sections: Any) -> dict[str, Any]:
    """A small valid run spec (``peer.protocol.spec.RunSpec``) the coordinator accepts, also with one peer: it
    audits nothing (``verification.rate = 0``) unless ``sections`` say otherwise. ``sections`` replace or
    add top-level keys, e.g. ``minimal_spec("x", stop={"samples": 10}, verification={})``."""
    spec: dict[str, Any] = {
        "name": name,
        "task": "digits-mlp",
        "dataset": {"version": "0" * 64, "location": "coordinator"},
        "stop": {"samples": 1000},
        "verification": {"rate": 0},
    }
    return {**spec, **sections}


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI run whose HIVEMARKET_HOME is ``home`` (with an identity in it)."""
    key_file = home / "identity.pem"
    if not key_file.exists():
        save_identity(Identity.generate(), key_file)
    return {**os.environ, **FAST_ENV, "HIVEMARKET_HOME": str(home), **extra}


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run ``hivemarket ARGS`` to completion in its own process group, reaping the group afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def kill_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM the group, then SIGKILL whatever is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not group_members(pgid):
            return


@dataclass
class PeerProcess:
    """A running ``hivemarket peer start`` with a status file."""

    proc: subprocess.Popen
    status_file: Path
    log: Path

    def status(self) -> dict[str, Any]:
        return json.loads(self.status_file.read_text())

    @property
    def maddrs(self) -> list[str]:
        return self.status()["maddrs"]

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


class PeerSwarm:
    """Starts peer processes and reaps every one of them (and their p2pd) at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.peers: list[PeerProcess] = []

    def start(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60, home: Path | None = None
    ) -> PeerProcess:
        """A new peer in a home of its own, or in ``home`` (a restart of the peer that used it)."""
        n = len(self.peers)
        if home is None:
            home = self.root / f"peer{n}"
            home.mkdir(parents=True)
        status_file, log = home / "status.json", home / "peer.log"
        status_file.unlink(missing_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "peer",
                    "peer",
                    "start",
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--status-file",
                    str(status_file),
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or cli_env(home),
                start_new_session=True,
            )
        peer = PeerProcess(proc, status_file, log)
        self.peers.append(peer)
        wait_until(
            lambda: status_file.exists() or proc.poll() is not None, timeout, f"peer {n} to write its status"
        )
        if proc.poll() is not None:
            raise AssertionError(f"peer {n} exited with {proc.returncode}:\n{log.read_text()}")
        return peer

    def close(self) -> list[psutil.Process]:
        """Reap every peer's process group; return what survived (tests assert it is empty)."""
        survivors = []
        for peer in self.peers:
            kill_group(peer.proc.pid)
            if peer.proc.poll() is None:
                peer.proc.wait(timeout=10)
            survivors += group_members(peer.proc.pid)
        return survivors


class DemoProcess:
    """``hivemarket demo ARGS`` in its own process group, its output collected line by line as it comes."""

    def __init__(self, home: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peer", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=cli_env(home),
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def printed(self, pattern: str) -> list[str]:
        if self.proc.poll() is not None and self.proc.returncode != 0:
            raise AssertionError(f"the demo exited with {self.proc.returncode}:\n{''.join(self.lines)}")
        return re.findall(pattern, "".join(self.lines), re.MULTILINE)


@dataclass
class CoordinatorProcess:
    """A running ``hivemarket coordinator serve`` on a free port with its own database: a SQLite file
    (``db_path``), or the PostgreSQL database ``db_url`` names."""

    proc: subprocess.Popen
    url: str
    db_path: Path
    db_url: str
    admin: Identity
    home: Path
    log: Path
    env: dict[str, str]

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        kill_group(self.proc.pid)
        return code

    def restart(self, timeout: float = 60) -> CoordinatorProcess:
        """Start a new server process on the same database (the previous one must be stopped)."""
        return start_coordinator(self.home, self.admin, db_url=self.db_url, env=self.env, timeout=timeout)


def start_coordinator(
    home: Path,
    admin: Identity,
    *,
    db_url: str | None = None,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    timeout: float = 60,
) -> CoordinatorProcess:
    """Start the coordinator as a subprocess (own process group) and wait until it accepts requests; its
    database is ``db_url``, by default a SQLite file in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    admin_key = home / "admin.pem"
    if not admin_key.exists():
        save_identity(admin, admin_key)
    db_path = home / "coordinator.db"
    db_url = db_url or f"sqlite:///{db_path}"
    run_env = env if env is not None else cli_env(home)
    log = home / f"coordinator-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peer",
                "coordinator",
                "serve",
                "--port",
                "0",
                "--db",
                db_url,
                "--admin-key",
                str(admin_key),
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=run_env,
            start_new_session=True,
        )

    def listening() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"coordinator exited with {proc.returncode}:\n{log.read_text()}")
        found = re.search(r"listening on (http://\S+)", log.read_text())
        return found.group(1) if found else None

    try:
        url = wait_until(listening, timeout, "the coordinator to listen", interval=0.05)
    except BaseException:
        kill_group(proc.pid)
        raise
    return CoordinatorProcess(proc, url, db_path, db_url, admin, home, log, run_env)


def query_db(url: str, query: str) -> list[tuple[Any, ...]]:
    """The rows of ``query`` on a coordinator's database (``sqlite:///PATH`` or ``postgresql://...``), for a
    test that checks what was stored."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            return db.execute(query).fetchall()
    with psycopg.connect(url) as db:
        return [tuple(row) for row in db.execute(query).fetchall()]


def peer_view(account: str, state: str = "active", matched_at: float = 1.0, **changes: Any) -> RunPeerView:
    """A run's peer as the coordinator shows it, for tests of what peers and the CLI do with one."""
    fields: dict[str, Any] = dict(
        account=account,
        lease_id=f"lease-{account[:4]}-{matched_at}",
        price_per_hour="1.00",
        state=state,
        matched_at=matched_at,
        joined=True,
        joined_at=matched_at,
        peer_id=None,
        maddrs=[],
        samples=0,
        paid="0",
        last_report_at=None,
    )
    return RunPeerView(**(fields | changes))


def run_view(peers: list[RunPeerView], **changes: Any) -> RunView:
    """A running run with ``peers``; ``changes`` override any field."""
    fields: dict[str, Any] = dict(
        id="run-0123456789ab",
        owner="ab" * 32,
        name="digits",
        state="running",
        reason="training",
        state_since=0.0,
        spec={},
        max_price="1",
        peers_min=1,
        peers_max=4,
        min_vram_gb=0.0,
        budget="5",
        escrow="5",
        spent="0",
        refunded="0",
        target_samples=1000,
        samples=0,
        epoch=0,
        loss=None,
        peers=peers,
        model=None,
        created_at=0.0,
    )
    return RunView(**(fields | changes))


def prometheus_series(text: str) -> dict[str, float]:
    """A Prometheus text exposition as {series with its labels: value}."""
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def marked(mark: str, value: str) -> list[str]:
    """Live processes whose environment carries ``mark=value`` (a test sets it on the bench it starts, and
    every process the bench starts inherits it, p2pd included): found even when re-parented to init,
    unlike a walk down from the bench, and never another run's processes, unlike a diff of all pids."""
    found = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.environ().get(mark) == value and p.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{p.info['name']} ({p.info['pid']})")
        except psutil.Error:  # another user's process, or one that just ended
            continue
    return found


@contextlib.contextmanager
def local_market(
    folder: Path, peers: int, timeout: float, **peer_env: str
) -> Iterator[tuple[Demo, list[str]]]:
    """A coordinator, a funded launcher and ``peers`` renting peers (their accounts; ``peer_env`` added
    to their environment), all stopped after; the test fails if any process of theirs survives."""
    from peer.demo import Demo  # torch and hivemind: only for the tests that train

    demo = Demo(peers=peers, drop=False, echo=print, timeout=timeout, folder=folder)
    try:
        demo.start_coordinator()
        demo.fund_launcher()
        accounts = [demo.add_peer(**peer_env) for _ in range(peers)]
        demo.wait_offers(peers)
        yield demo, accounts
    finally:
        survivors = demo.close()
        assert not survivors, f"processes left behind: {survivors}"


class Strangers:
    """A host outside the run: connects to every port the given processes listen on, again and again,
    and sends garbage and handshake-shaped bytes (gloo's pair handshake starts with a sequence number)."""

    PAYLOADS = (
        b"\x00" * 8,
        struct.pack("<Q", 1) + b"\xff" * 64,
        struct.pack("<QQ", 0, 2**40),
        b"GET / HTTP/1.0\r\n\r\n",
    )

    def __init__(self, pids: Callable[[], list[int]]):
        self.pids = pids
        self.connections = 0
        self.ports: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Strangers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids():
                try:
                    listening = [
                        c.laddr for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"
                    ]
                except psutil.Error:
                    continue
                for addr in listening:
                    self.ports.add(addr.port)
                    for payload in (*self.PAYLOADS, os.urandom(256)):
                        try:
                            with socket.create_connection((addr.ip, addr.port), timeout=0.2) as s:
                                s.sendall(payload)
                            self.connections += 1
                        except OSError:
                            pass
            self._stop.wait(0.05)
