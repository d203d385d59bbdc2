"""Benchmark: N simulated peers sending signed heartbeats and offer updates to a real coordinator.

The goals: >= 3,000 signed heartbeats/s with p99 <= 50 ms at 2,000 peers on a 2-core machine (issue 3);
on PostgreSQL, one replica >= 0.8x one on SQLite and two replicas >= 1.3x one, p99 <= 50 ms in every row
(issue 21, item 4).

    python bench/coordinator_load.py [--stores sqlite,postgresql,postgresql-2] [--trials T] [--peers N]
        [--duration S] [--warmup S] [--concurrency C] [--workers W] [--update-fraction F]
        [--sqlite-synchronous FULL|NORMAL] [--postgres-via socket|tcp]
        [--profile OUT] [--json]

Rows (``--stores``, default all three, measured one after the other in one run, so that their ratios
come from the same machine at about the same time; ``--trials T`` measures them T times, the rows
alternating, and judges each goal on the median of the T trials' ratios: this machine's speed drifts by
a third between rows minutes apart, SQLite's row alone spanning 2,116-2,967 heartbeats/s in one run):

- ``sqlite``: one coordinator on a SQLite file (``--sqlite-synchronous``, FULL by default: every commit
  is fsynced).
- ``postgresql``: one coordinator on a database of a throwaway PostgreSQL server
  (``tests/postgres.py``, started once for the run) that is durable: fsync and synchronous_commit on, as
  SQLite FULL is, so that the comparison is of engines that both survive a power cut. Its replicas
  connect over TCP loopback (``--postgres-via``, default ``tcp``), as a replica on another host must;
  ``socket`` connects through the server's Unix socket, as a replica on the database's host may
  (libpq's default without a host).
- ``postgresql-2``: two replicas (each its own ``coordinator serve`` process, same admin key, same new
  database; the second starts once the first has migrated it) with the generator's connections, the
  setup's offers and the lease keep-alive split evenly over the two URLs.

Each row gets a fresh database and fresh peers. The machine's cores are shared by everything: the
database server, the replicas and the generator. So beside rates and p99 the bench reports where the
CPU went in each signed window (replica processes and the PostgreSQL server's processes via psutil, the
generator's own rusage, and what the rest of the machine took), the heartbeats per replica-CPU-second
that follow, and from them a projection for replicas on hosts of their own: what one replica would do
with one core (it is one event loop; its database driver threads add little), and what the database
would need to serve two of them. The projection is linear in CPU and assumes the database's serialised
writes (one advisory lock, group commit) keep up; the measured rows are what the goals are judged on.

What runs, in order, for each row against its coordinator subprocesses (each in its own session and
process group, a temporary HIVEMARKET_HOME, port 0; killed at the end, also on Ctrl-C or SIGTERM, and on
Linux even when the bench itself is SIGKILLed, which leaves only the temporary folder behind, and a
PostgreSQL server if one was running):

1. ``healthz`` baseline: unsigned ``GET /healthz`` at the same concurrency, the server's raw HTTP ceiling
   on this machine under this generator. Machines here are noisy, so heartbeats/s as a ratio to it is
   the figure to compare between runs; the absolute figures are what the goal is judged on.
2. Setup (not timed): every peer gets its own Ed25519 identity and posts a signed offer
   (``POST /v1/offers``) that returns its lease.
3. ``signed`` phase: signed heartbeats (``POST /v1/leases/{id}/heartbeat``, empty body) round-robin
   over the peers, with ``--update-fraction`` of the requests replaced by signed offer updates.
4. ``healthz after``: the baseline again. The speed of the machines here drifts (healthz alone went from
   16,800/s to 7,400/s within ten minutes with nothing else running), so the ratio divides by the
   mean of the two baselines that bracket the signed window, and their spread is reported.

The baseline runs per row, not once: it brackets each row's own signed window, so the drift of the
machine between rows shows (the sqlite and postgresql rows run the same HTTP stack in one process, so
their healthz rates should agree; when they do not, the machine changed speed between the rows and
their ratio is suspect), and for two replicas it is what two processes can answer, the ceiling that row
could reach at best.

Load model: closed loop. C keep-alive connections (split over W generator processes), each with exactly
one request in flight; the next request goes out as soon as the previous response is in. Latency is
send-to-last-byte as the generator sees it (so it includes the generator's own scheduling delay), and
a closed loop does not count the requests that would have queued behind a stall (coordinated
omission), so p99 here is a lower bound of what an open-loop client at the same rate would see.

Why the generator is built the way it is: the generator shares the two cores with the server, and
every microsecond it spends is taken from the server. So

- every request is signed (with :func:`peer.protocol.envelope.sign_request`, the protocol's own code) and
  encoded to its exact HTTP/1.1 bytes before the timed phase; the timed loop only writes bytes and
  parses a status line and a Content-Length. Signing costs about 80 us a request here, a fifth of what
  the server spends on one signed request (about 400 us). The bench sizes the pre-signed
  stock from the healthz rate (an upper bound of the signed rate) and reports any request it had to
  sign during the timed phase. Signed timestamps stay well inside the server's 300 s window because
  warm-up plus duration is capped at 240 s.
- the timed loop is a minimal asyncio.Protocol client over keep-alive connections rather than an
  aiohttp ClientSession: measured on this machine against GET /healthz, aiohttp's client spent about
  70 us of CPU a request, this one about 20 us, and the server itself about 65 us; with aiohttp the
  generator would take as much of the two cores as the server's whole HTTP stack. (aiohttp still
  does the untimed setup, where its convenience costs nothing that is measured.)
- while the generator processes pre-sign (seconds), the main process heartbeats every lease at the
  server's own interval H, as real peers would, so that no lease lapses (TTL 3H) before the phase; it
  already does while the setup posts the offers. The coordinators run with H = 30 s (unless
  HIVEMARKET_HEARTBEAT_INTERVAL is set): at the default 5 s, keeping 2,000 leases alive took 400
  heartbeats/s, most of what one PostgreSQL replica managed here, and leases lapsed.
- the generator runs in W separate processes (default 2) so that one event loop's delays do not
  become everyone's latency.

``--profile OUT`` runs ``py-spy record --pid SERVER --subprocesses --nonblocking --idle --threads`` over the
measured window of each row's signed phase (of its first replica and its PostgreSQL writer process; the row's
name is added to the file's stem when several rows run; py-spy must be on PATH; ``.svg`` gives a flame graph,
``.txt`` collapsed stacks, ``.json`` speedscope). Idle samples are kept, per thread: a writer bound by waiting
(on the database, or for the event loop to hand it the next batch) shows it.

``--json`` prints one object: ``rows`` (one per store: heartbeats/s, p50/p99, errors, healthz/s, the
cores of the replicas, the database server, the generator and the rest, heartbeats per replica-CPU-second),
``comparison`` (the ratios against their goals, computed from ``rows``; p99 in every row; the
projection), ``machine``, ``postgresql`` (its version and durability settings) and ``runs`` (each row's
full report: its ``scenarios`` table and CPU per window, as one run printed before there were rows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import math
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.protocol.envelope import sign_request
from peer.protocol.identity import Identity, save_identity
from peer.protocol.schemas import HardwareSummary, OfferBody

GOAL_HEARTBEATS_PER_S = 3000.0
GOAL_P99_MS = 50.0
GOAL_POSTGRESQL_VS_SQLITE = 0.8  # heartbeats/s, one replica on PostgreSQL over one on SQLite
GOAL_TWO_REPLICAS_VS_ONE = 1.3  # heartbeats/s, two replicas on one PostgreSQL database over one
CORES = os.cpu_count() or 1
SIGNATURE_WINDOW_BUDGET_S = 240.0  # warm-up + duration; the server accepts timestamps within 300 s
SERVER_START_TIMEOUT_S = 180.0

HEALTHZ, HEARTBEAT, OFFER = "healthz", "heartbeat", "offer update"
KINDS = (HEALTHZ, HEARTBEAT, OFFER)
DISCONNECTED = "disconnected"  # the server closed a connection with a request in flight
CONNECT_FAILED = "connect failed"  # counted as an error, not as a request

# (model, TFLOP/s, VRAM GB): enough variety that offer updates are not all identical rows.
GPUS = (("H100", 750.0, 80.0), ("A100", 310.0, 80.0), ("L40S", 360.0, 48.0), ("RTX4090", 165.0, 24.0))

_CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Store:
    """One row of the report: where the coordinator keeps its state and how many replicas serve it."""

    name: str  # as --stores spells it
    engine: str  # "sqlite" or "postgresql"
    replicas: int
    label: str


STORES = {
    store.name: store
    for store in (
        Store("sqlite", "sqlite", 1, "1 replica, SQLite"),
        Store("postgresql", "postgresql", 1, "1 replica, PostgreSQL"),
        Store("postgresql-2", "postgresql", 2, "2 replicas, PostgreSQL"),
    )
}


# ------------------------------------------------------------------------------------------ the server


@dataclass
class Server:
    """A coordinator subprocess in its own session, so that it can be reaped as a group."""

    proc: subprocess.Popen[bytes]
    url: str
    host: str
    port: int
    log: Path

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after 10 s; safe to call twice."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait)
                with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader
                    os.killpg(self.proc.pid, signal.SIGKILL)
                return


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the bench dies, even by SIGKILL (its finally never runs then)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_server(home: Path, db_url: str, admin_key: Path, synchronous: str, name: str) -> Server:
    """Start ``hivemarket coordinator serve --db DB_URL`` on port 0 and wait for its ``listening on`` line."""
    log = home / f"coordinator-{name}.log"
    # H = 30 s unless set: keeping 2,000 leases alive between the phases then costs 67 heartbeats/s, not the
    # 400/s of the default H = 5 s, which on PostgreSQL here was most of what the server could do, so that
    # leases lapsed during the setup and the pre-signing. What a heartbeat costs does not depend on H.
    # The per-account rate limit is lifted: with few simulated peers (the CI's tiny setting: 20) each sends
    # 100+ requests/s, far above a real peer's one heartbeat per H, and the limiter's 429s would be counted
    # as the store's errors. The bench measures the store, not the limiter.
    env = {
        "HIVEMARKET_HEARTBEAT_INTERVAL": "30",
        **os.environ,
        "HIVEMARKET_HOME": str(home),
        "HIVEMARKET_RATE_LIMIT_PER_SECOND": "1000000",
        "HIVEMARKET_RATE_LIMIT_BURST": "1000000",
    }
    command = [
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
        "--sqlite-synchronous",
        synchronous,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    server = Server(proc, "", "", 0, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            found = re.search(r"listening on (http://(\S+):([0-9]+))", log.read_text(errors="replace"))
            if found:
                server.url, server.host, server.port = found[1], found[2], int(found[3])
                return server
            if proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"coordinator did not listen within {SERVER_START_TIMEOUT_S:g} s:\n{_tail(log)}"
                )
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Peer:
    """What a generator process needs to act as one peer: its private key and its lease."""

    private_key: bytes  # raw 32 bytes, so that it pickles cheaply to a spawned process
    lease_id: str

    def identity(self) -> Identity:
        return Identity(Ed25519PrivateKey.from_private_bytes(self.private_key))


def offer_body(rng: random.Random) -> bytes:
    """A valid offer, built through the API's own schema so that it cannot drift from it."""
    gpu, tflops, vram = rng.choice(GPUS)
    body = OfferBody(
        price_per_hour=f"{rng.uniform(0.2, 3.0):.2f}",  # type: ignore[arg-type]  # Money parses strings
        hardware=HardwareSummary(
            gpu=gpu,
            gpu_count=1,
            vram_gb=vram,
            tflops=tflops * rng.uniform(0.8, 1.05),
            ram_gb=64.0,
            cpu_cores=16,
        ),
    )
    return body.model_dump_json().encode()


def encode_request(
    host: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """The exact HTTP/1.1 bytes of one keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    if body:
        lines.append("Content-Type: application/json")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class SignedRequests:
    """Signed heartbeats round-robin over the peers, a seeded fraction of them offer updates instead."""

    def __init__(self, peers: Sequence[Peer], host: str, update_fraction: float, seed: int):
        self._peers = [(peer.identity(), peer.lease_id) for peer in peers]
        self._host = host
        self._fraction = update_fraction
        self._rng = random.Random(seed)
        self._next = 0

    def make(self) -> tuple[str, bytes]:
        identity, lease_id = self._peers[self._next % len(self._peers)]
        self._next += 1
        if self._rng.random() < self._fraction:
            body = offer_body(self._rng)
            headers = sign_request(identity, "POST", "/v1/offers", body)
            return OFFER, encode_request(self._host, "POST", "/v1/offers", body, headers)
        path = f"/v1/leases/{lease_id}/heartbeat"
        return HEARTBEAT, encode_request(self._host, "POST", path, b"", sign_request(identity, "POST", path))


# ---------------------------------------------------------------------------- the timed loop (a worker)


@dataclass
class WorkerSpec:
    scenario: str  # "healthz" or "signed"
    targets: list[tuple[str, int]]  # the replicas (host, port); connection k goes to (first + k) % len
    first: int  # the index of this worker's first connection among all the workers'
    connections: int
    warmup: float
    duration: float
    presign: int = 0
    peers: list[Peer] = field(default_factory=list)
    update_fraction: float = 0.0
    seed: int = 0


@dataclass
class WorkerResult:
    latencies: dict[str, array]  # seconds, of the responses completed in the measured window
    statuses: dict[str, Counter[str]]
    presigned: int
    signed_late: int  # requests the worker had to sign inside the timed phase
    presign_seconds: float
    cpu_seconds: float  # this process's CPU time in the measured window
    in_flight_at_end: int


class _Connection(asyncio.Protocol):
    """One keep-alive connection with one request in flight (closed loop); parses only what it needs."""

    def __init__(self, phase: _Phase, target: tuple[str, int]):
        self.phase = phase
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # bytes of the whole response once its head is parsed
        self.status = ""
        self.kind = ""
        self.sent = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.phase.send_next(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            length = _CONTENT_LENGTH_RE.search(head)
            if length is None:  # aiohttp's web.Response always sends one; without it the framing is lost
                self.phase.failed(self, "no-content-length")
                return
            self.status = head[9:12].decode()
            self.need = end + 4 + int(length[1])
        if len(self.buffer) >= self.need:
            del self.buffer[: self.need]
            self.need = -1
            self.phase.completed(self, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase.lost(self)


class _Phase:
    """One worker's timed loop: warm-up, then a measured window, then stop."""

    def __init__(self, spec: WorkerSpec, next_request: Callable[[], tuple[str, bytes]]):
        self.spec = spec
        self.next_request = next_request
        self.latencies = {kind: array("d") for kind in KINDS}
        self.statuses: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
        self.window = (math.inf, math.inf)
        self.stopping = False
        self.connections: set[_Connection] = set()
        self.idle = asyncio.Event()
        self.reconnects: set[asyncio.Task[None]] = set()

    def send_next(self, conn: _Connection) -> None:
        if self.stopping or conn.transport is None:
            conn.busy = False
            if self.stopping and not any(c.busy for c in self.connections):
                self.idle.set()
            return
        conn.kind, data = self.next_request()
        conn.busy = True
        conn.sent = time.perf_counter()
        conn.transport.write(data)

    def completed(self, conn: _Connection, status: str) -> None:
        now = time.perf_counter()
        if self.window[0] <= now < self.window[1]:
            self.latencies[conn.kind].append(now - conn.sent)
            self.statuses[conn.kind][status] += 1
        self.send_next(conn)

    def failed(self, conn: _Connection, status: str) -> None:
        """Count a response that cannot be framed and drop its connection (a fresh one replaces it)."""
        if self.window[0] <= time.perf_counter() < self.window[1]:
            self.statuses[conn.kind][status] += 1
        conn.busy = False
        if conn.transport is not None:
            conn.transport.close()

    def lost(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        now = time.perf_counter()
        if conn.busy and self.window[0] <= now < self.window[1]:
            self.statuses[conn.kind][DISCONNECTED] += 1
        conn.busy = False
        if not self.stopping:  # the server dropped us: keep the concurrency, count the error
            self._reconnect(conn.target)
        elif not any(c.busy for c in self.connections):
            self.idle.set()

    def _reconnect(self, target: tuple[str, int]) -> None:
        task = asyncio.get_running_loop().create_task(self.connect(target))
        self.reconnects.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self.reconnects.discard)

    async def connect(self, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, target)
        self.connections.add(conn)
        try:
            await loop.create_connection(lambda: conn, *target)
        except OSError as e:
            self.connections.discard(conn)
            if self.window[0] <= time.perf_counter() < self.window[1]:
                kind = HEALTHZ if self.spec.scenario == "healthz" else HEARTBEAT
                self.statuses[kind][f"{CONNECT_FAILED}: {e.strerror or type(e).__name__}"] += 1
            if not self.stopping:
                await asyncio.sleep(0.1)
                self._reconnect(target)

    async def run(self) -> tuple[float, int]:
        """Run warm-up and window; return (CPU seconds in the window, requests in flight at its end)."""
        start = time.perf_counter()
        self.window = (start + self.spec.warmup, start + self.spec.warmup + self.spec.duration)
        targets = self.spec.targets
        await asyncio.gather(
            *(
                self.connect(targets[(self.spec.first + k) % len(targets)])
                for k in range(self.spec.connections)
            )
        )
        await asyncio.sleep(max(0.0, self.window[0] - time.perf_counter()))
        cpu_start = _cpu_seconds()
        await asyncio.sleep(max(0.0, self.window[1] - time.perf_counter()))
        cpu = _cpu_seconds() - cpu_start
        in_flight = sum(conn.busy for conn in self.connections)
        self.stopping = True
        if in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), 5.0)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        return cpu, in_flight


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_main(spec: WorkerSpec, ready: Any, start: Any, results: Any) -> None:
    """A generator process: pre-sign, say ready, wait for the common start, run, send results back."""
    if sys.platform == "linux":
        _die_with_parent()  # a SIGKILLed parent would otherwise leave us waiting on ``start`` forever
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        return
    began = time.perf_counter()
    host = "{}:{}".format(
        *spec.targets[0]
    )  # the server does not check Host (nor does the signature cover it)
    late = 0
    if spec.scenario == "healthz":
        healthz = encode_request(host, "GET", "/healthz")
        stock: list[tuple[str, bytes]] = []

        def next_request() -> tuple[str, bytes]:
            return HEALTHZ, healthz
    else:
        maker = SignedRequests(spec.peers, host, spec.update_fraction, spec.seed)
        stock = [maker.make() for _ in range(spec.presign)]
        stock.reverse()  # pop() from the end is O(1) and frees memory as it goes

        def next_request() -> tuple[str, bytes]:
            nonlocal late
            if stock:
                return stock.pop()
            late += 1
            return maker.make()

    presigned = len(stock)
    presign_seconds = time.perf_counter() - began
    ready.put(os.getpid())
    start.wait()

    async def main() -> WorkerResult:
        phase = _Phase(spec, next_request)
        cpu, in_flight = await phase.run()
        return WorkerResult(phase.latencies, phase.statuses, presigned, late, presign_seconds, cpu, in_flight)

    results.put(asyncio.run(main()))


# ------------------------------------------------------------------------------------- the main process


@dataclass
class Row:
    """One line of the report."""

    scenario: str
    peers: int
    requests: int
    req_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    errors_by_status: dict[str, int]
    goal_met: bool | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: p99 is a latency some request really had)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))]


def summarize(kind: str, peers: int, results: Sequence[WorkerResult], duration: float) -> Row:
    latencies = sorted(value for result in results for value in result.latencies[kind])
    statuses: Counter[str] = Counter()
    for result in results:
        statuses.update(result.statuses[kind])
    requests = sum(count for status, count in statuses.items() if not status.startswith(CONNECT_FAILED))
    errors = {status: count for status, count in sorted(statuses.items()) if not status.startswith("2")}
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return Row(
        scenario=kind,
        peers=peers,
        requests=requests,
        req_per_s=requests / duration,
        p50_ms=None if p50 is None else p50 * 1000,
        p99_ms=None if p99 is None else p99 * 1000,
        errors=sum(errors.values()),
        errors_by_status=errors,
    )


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    return [list(items[i::parts]) for i in range(parts)]


class ProcessTree:
    """CPU time and bytes written of a process and its children (a replica; the PostgreSQL server: its
    postmaster, backends, WAL writer and checkpointer). A child that starts during a window counts from
    zero; one that exits during it loses its share (the bench's connections stay open, so none should)."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)

    def sample(self) -> dict[int, tuple[float, int]]:
        out: dict[int, tuple[float, int]] = {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return out
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times, io = proc.cpu_times(), proc.io_counters()
                out[proc.pid] = (times.user + times.system, io.write_bytes)
        return out

    @staticmethod
    def delta(before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]]) -> tuple[float, int]:
        """(CPU seconds, bytes written) between two samples."""
        cpu, written = 0.0, 0
        for pid, (seconds, wrote) in after.items():
            seconds0, wrote0 = before.get(pid, (0.0, 0))
            cpu += seconds - seconds0
            written += wrote - wrote0
        return cpu, written


@dataclass
class Window:
    """One measured window: its rows and where the CPU went."""

    results: list[WorkerResult]
    replica_cores: list[float]  # each replica process
    server_written: int  # bytes the replicas caused to be written to storage (SQLite's WAL, checkpoints)
    database_cores: float | None  # the PostgreSQL server's processes; None for SQLite (in the replica)
    database_written: int | None
    machine_busy: float  # fraction of all cores
    profile: str | None = None

    def generator_cores(self, duration: float) -> float:
        return sum(r.cpu_seconds for r in self.results) / duration

    def cpu(self, duration: float, rate: float) -> dict[str, Any]:
        server = sum(self.replica_cores)
        generator = self.generator_cores(duration)
        machine = self.machine_busy * CORES
        database = self.database_cores
        requests = rate * duration
        return {
            "server": server,  # all replicas together
            "replicas": self.replica_cores,
            "database": database,
            "generator": generator,
            "machine_busy_cores": machine,
            # What else ran: other users' processes, this bench's main process, the kernel's own threads.
            "other": max(0.0, machine - server - (database or 0.0) - generator),
            # Server CPU time per request: 1e6 / it is what one core would sustain if nothing else limited.
            "server_us_per_request": server / rate * 1e6 if rate else None,
            "database_us_per_request": database / rate * 1e6 if rate and database is not None else None,
            "server_disk_kib_per_request": self.server_written / 1024 / requests if rate else None,
            "database_disk_kib_per_request": (
                self.database_written / 1024 / requests
                if rate and self.database_written is not None
                else None
            ),
        }


async def run_phase(
    specs: Sequence[WorkerSpec],
    servers: Sequence[Server],
    database: ProcessTree | None = None,
    *,
    while_waiting: Callable[[asyncio.Event], Any] | None = None,
    profile: Path | None = None,
) -> Window:
    """Spawn the generator processes, wait until all are ready, start them together and collect.

    ``while_waiting(stop)`` runs (e.g. keeping leases alive) until every worker is ready.
    """
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited event loop, session or sockets
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=worker_main, args=(spec, ready, start, results), daemon=True) for spec in specs
    ]
    loop = asyncio.get_running_loop()
    stop_keeper = asyncio.Event()
    keeper = asyncio.create_task(while_waiting(stop_keeper)) if while_waiting else None
    try:
        # A spawned interpreter inherits an ignored SIGINT through exec, so a Ctrl-C while it is still
        # importing does not print its traceback; the parent alone decides when workers stop.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in procs:
                proc.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        for _ in procs:
            await loop.run_in_executor(None, _get, ready, procs, 600.0)
        stop_keeper.set()
        if keeper is not None:
            await keeper
        spec = specs[0]
        start.set()
        began = time.monotonic()
        replicas = [ProcessTree(server.proc.pid) for server in servers]
        await asyncio.sleep(spec.warmup)
        profiler = _start_profiler(profile, servers[0].proc.pid, spec.duration)
        replicas0 = [tree.sample() for tree in replicas]
        database0 = database.sample() if database else {}
        machine0 = psutil.cpu_times()
        await asyncio.sleep(max(0.0, began + spec.warmup + spec.duration - time.monotonic()))
        replica_deltas = [
            ProcessTree.delta(s0, tree.sample()) for s0, tree in zip(replicas0, replicas, strict=True)
        ]
        database_delta = ProcessTree.delta(database0, database.sample()) if database else None
        busy = _busy(machine0, psutil.cpu_times())
        collected = [await loop.run_in_executor(None, _get, results, procs, 120.0) for _ in procs]
        profile_note = _finish_profiler(profiler, profile)
        for proc in procs:
            proc.join(timeout=10)
        return Window(
            collected,
            [cpu / spec.duration for cpu, _ in replica_deltas],
            sum(written for _, written in replica_deltas),
            None if database_delta is None else database_delta[0] / spec.duration,
            None if database_delta is None else database_delta[1],
            busy,
            profile_note,
        )
    finally:
        stop_keeper.set()
        if keeper is not None and not keeper.done():
            keeper.cancel()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


def _get(queue: Any, procs: Sequence[Any], timeout: float) -> Any:
    """queue.get that notices a generator process that died instead of waiting the whole timeout."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            return queue.get(timeout=0.5)
        dead = [proc for proc in procs if proc.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"generator process {dead[0].pid} exited with {dead[0].exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the generator processes within {timeout:g} s")


def _busy(before: Any, after: Any) -> float:
    total = sum(after) - sum(before)
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    return 0.0 if total <= 0 else 1.0 - idle / total


def _start_profiler(profile: Path | None, pid: int, duration: float) -> subprocess.Popen[bytes] | None:
    if profile is None:
        return None
    exe = shutil.which("py-spy")
    if exe is None:
        print("--profile: py-spy is not on PATH (pip install py-spy); not profiling", file=sys.stderr)
        return None
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(profile.suffix, "raw")
    command = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--nonblocking",
        "--idle",
        "--threads",
        "--duration",
        str(max(1, int(duration))),
        "--format",
        fmt,
        "--output",
        str(profile),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish_profiler(profiler: subprocess.Popen[bytes] | None, profile: Path | None) -> str | None:
    if profiler is None:
        return None
    try:
        _, err = profiler.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        profiler.kill()
        return "py-spy did not finish"
    if profiler.returncode != 0:
        return f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}"
    return f"server profile of the measured window: {profile}"


async def setup_peers(
    urls: Sequence[str], identities: Sequence[Identity], concurrency: int
) -> tuple[list[Peer], float, float]:
    """Post every peer's first offer (signed), round-robin over the replicas' ``urls``; return the peers
    with their leases, H, and the seconds.

    The first offer goes alone, to learn H; while the others go, the leases obtained so far are kept alive
    (on a loaded machine 2,000 offers took longer than a lease's TTL of 3H, and the first leases lapsed).
    """
    rng = random.Random(0)
    bodies = [offer_body(rng) for _ in identities]
    began = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)
    peers: list[Peer] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def post(url: str, identity: Identity, body: bytes) -> dict[str, Any]:
            headers = {
                **sign_request(identity, "POST", "/v1/offers", body),
                "Content-Type": "application/json",
            }
            async with gate, session.post(f"{url}/v1/offers", data=body, headers=headers) as response:
                payload = await response.json(content_type=None)
                if response.status != 200:
                    raise RuntimeError(f"POST /v1/offers answered {response.status}: {payload}")
            peers.append(Peer(identity.private_key.private_bytes_raw(), payload["lease"]["id"]))
            return payload["lease"]

        first = await post(urls[0], identities[0], bodies[0])
        interval = float(first["heartbeat_interval"])
        stop = asyncio.Event()
        keeper = asyncio.create_task(
            keep_leases_alive(urls, peers, interval, concurrency, stop, "setting up")
        )
        try:
            await asyncio.gather(
                *(
                    post(urls[k % len(urls)], identity, body)
                    for k, (identity, body) in enumerate(zip(identities, bodies, strict=True))
                    if k
                )
            )
        finally:
            stop.set()
            await keeper
    return peers, interval, time.perf_counter() - began


async def keep_leases_alive(
    urls: Sequence[str],
    peers: Sequence[Peer],
    interval: float,
    concurrency: int,
    stop: asyncio.Event,
    doing: str = "pre-signing",
) -> None:
    """Heartbeat every lease once per ``interval`` (as real peers do) until ``stop``, round-robin over the
    replicas' ``urls``; untimed. ``peers`` may grow meanwhile (during the setup)."""
    identities: list[tuple[Identity, str]] = []
    tick = 0.25
    gate = asyncio.Semaphore(concurrency)
    failures: Counter[int] = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def beat(url: str, identity: Identity, lease_id: str) -> None:
            path = f"/v1/leases/{lease_id}/heartbeat"
            async with (
                gate,
                session.post(url + path, headers=sign_request(identity, "POST", path)) as response,
            ):
                await response.read()
                if response.status != 200:
                    failures[response.status] += 1

        cursor = 0
        deadline = time.monotonic()
        while not stop.is_set():
            identities.extend((peer.identity(), peer.lease_id) for peer in peers[len(identities) :])
            if identities:
                per_tick = max(1, math.ceil(len(identities) * tick / interval))
                batch = [(cursor + k) % len(identities) for k in range(per_tick)]
                cursor += per_tick
                await asyncio.gather(*(beat(urls[k % len(urls)], *identities[k]) for k in batch))
            deadline += tick  # a batch that took long shortens the wait, so each lease still beats every H
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, deadline - time.monotonic()))
    if failures:
        print(f"warning: keep-alive heartbeats failed while {doing}: {dict(failures)}", file=sys.stderr)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _print_grid(header: Sequence[str], lines: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    for line in (header, *lines):
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )


def print_table(rows: Sequence[Row]) -> None:
    header = ("scenario", "peers", "requests", "req/s", "p50 ms", "p99 ms", "errors", "goal met")
    lines = [
        (
            row.scenario,
            str(row.peers) if row.peers else "-",
            f"{row.requests:,}",
            _fmt(row.req_per_s, 0),
            _fmt(row.p50_ms, 2),
            _fmt(row.p99_ms, 2),
            str(row.errors) + (f" {row.errors_by_status}" if row.errors else ""),
            "-" if row.goal_met is None else ("yes" if row.goal_met else "NO"),
        )
        for row in rows
    ]
    _print_grid(header, lines)


def parse_stores(text: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in STORES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown store {', '.join(unknown) or '(none given)'}; choose from {','.join(STORES)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--stores",
        type=parse_stores,
        default=list(STORES),
        help=f"comma-separated rows to measure, in this order, from {','.join(STORES)}",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=1,
        help="times to measure every row, the rows alternating; the ratios judged are the trials' medians",
    )
    parser.add_argument("--peers", type=int, default=2000, help="simulated peers, each its own identity")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each window")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (closed loop)")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--update-fraction", type=float, default=0.05, help="share of offer updates")
    parser.add_argument(
        "--sqlite-synchronous",
        choices=("FULL", "NORMAL"),
        default="FULL",
        help="the server's --sqlite-synchronous",
    )
    parser.add_argument(
        "--postgres-via",
        choices=("socket", "tcp"),
        default="tcp",
        help="how the replicas reach the PostgreSQL server: TCP loopback, or its Unix socket",
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy the (first) server over each row's signed window into this file"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    if args.peers < 1 or args.concurrency < 1 or args.workers < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--peers, --concurrency and --workers must be >= 1, --duration > 0, --warmup >= 0")
    if not 0.0 <= args.update_fraction <= 1.0:
        parser.error("--update-fraction must be between 0 and 1")
    if args.warmup + args.duration > SIGNATURE_WINDOW_BUDGET_S:
        parser.error(
            f"--warmup + --duration must stay <= {SIGNATURE_WINDOW_BUDGET_S:g} s: requests are signed before "
            "the timed phase and the server accepts timestamps only within 300 s"
        )
    if args.concurrency < max(STORES[name].replicas for name in args.stores):
        parser.error("--concurrency must be at least the number of replicas (2 for postgresql-2)")
    args.workers = min(args.workers, args.concurrency, args.peers)
    return args


def _targets(servers: Sequence[Server]) -> list[tuple[str, int]]:
    return [(server.host, server.port) for server in servers]


def _firsts(connections: Sequence[int]) -> list[int]:
    """The index of each worker's first connection among all (so the replicas' shares stay even)."""
    return [sum(connections[:i]) for i in range(len(connections))]


async def healthz_window(
    args: argparse.Namespace,
    servers: Sequence[Server],
    database: ProcessTree | None,
    connections: Sequence[int],
) -> Window:
    specs = [
        WorkerSpec("healthz", _targets(servers), first, c, args.warmup, args.duration)
        for first, c in zip(_firsts(connections), connections, strict=True)
    ]
    return await run_phase(specs, servers, database)


async def bench(
    args: argparse.Namespace,
    store: Store,
    servers: Sequence[Server],
    database: ProcessTree | None,
    say: Callable[[str], None],
    profile: Path | None,
) -> dict[str, Any]:
    """One row: healthz, setup, signed, healthz again; the two healthz windows bracket the signed one so
    that a machine whose speed drifts during the run (seen here: 2x within minutes) shows as their
    spread."""
    connections = [len(part) for part in split(range(args.concurrency), args.workers)]
    urls = [server.url for server in servers]
    phase_time = f"{args.warmup:g}+{args.duration:g} s"

    say(f"{store.name}: healthz baseline: {args.concurrency} connections, {phase_time}")
    before = await healthz_window(args, servers, database, connections)
    healthz = summarize(HEALTHZ, 0, before.results, args.duration)

    say(f"{store.name}: setup: {args.peers} identities post their offers")
    identities = [Identity.generate() for _ in range(args.peers)]
    peers, interval, setup_seconds = await setup_peers(urls, identities, args.concurrency)

    # The healthz rate bounds the signed rate; 30 % headroom, and what runs out is signed late (reported).
    stock = math.ceil(healthz.req_per_s * (args.warmup + args.duration) * 1.3 / args.workers) + 1000
    say(
        f"{store.name}: signed: pre-signing {stock:,} requests in each of {args.workers} processes, "
        f"then {phase_time}"
    )
    signed_specs = [
        WorkerSpec(
            "signed",
            _targets(servers),
            first,
            c,
            args.warmup,
            args.duration,
            stock,
            part,
            args.update_fraction,
            seed,
        )
        for seed, (first, c, part) in enumerate(
            zip(_firsts(connections), connections, split(peers, args.workers), strict=True)
        )
    ]
    signed = await run_phase(
        signed_specs,
        servers,
        database,
        while_waiting=lambda stop: keep_leases_alive(urls, peers, interval, args.concurrency, stop),
        profile=profile,
    )
    heartbeat = summarize(HEARTBEAT, args.peers, signed.results, args.duration)
    offer = summarize(OFFER, args.peers, signed.results, args.duration)
    heartbeat.goal_met = (
        heartbeat.req_per_s >= GOAL_HEARTBEATS_PER_S
        and heartbeat.p99_ms is not None
        and heartbeat.p99_ms <= GOAL_P99_MS
        and heartbeat.errors == 0
    )
    total = Row(
        scenario="signed total",
        peers=args.peers,
        requests=heartbeat.requests + offer.requests,
        req_per_s=heartbeat.req_per_s + offer.req_per_s,
        p50_ms=None,
        p99_ms=None,
        errors=heartbeat.errors + offer.errors,
        errors_by_status=dict(Counter(heartbeat.errors_by_status) + Counter(offer.errors_by_status)),
    )
    latencies = sorted(v for r in signed.results for kind in (HEARTBEAT, OFFER) for v in r.latencies[kind])
    if latencies:
        total.p50_ms, total.p99_ms = (percentile(latencies, q) * 1000 for q in (50, 99))  # type: ignore[operator]

    # The leases lapse during this window (nobody heartbeats them any more): one sweep transaction.
    say(f"{store.name}: healthz baseline again: {phase_time}")
    after = await healthz_window(args, servers, database, connections)
    healthz_after = summarize(HEALTHZ, 0, after.results, args.duration)
    healthz_after.scenario = "healthz after"
    baseline = (healthz.req_per_s + healthz_after.req_per_s) / 2
    cpu = signed.cpu(args.duration, total.req_per_s)

    summary = {
        "store": store.name,
        "label": store.label,
        "engine": store.engine,
        "replicas": store.replicas,
        "heartbeats_per_s": heartbeat.req_per_s,
        "signed_per_s": total.req_per_s,
        "p50_ms": heartbeat.p50_ms,
        "p99_ms": heartbeat.p99_ms,
        "errors": total.errors,
        "healthz_per_s": baseline,
        "heartbeats_per_healthz": heartbeat.req_per_s / baseline if baseline else None,
        "replica_cores": cpu["server"],
        "database_cores": cpu["database"],
        "generator_cores": cpu["generator"],
        "other_cores": cpu["other"],
        # What one replica does with one core of its own (linear in CPU; the mix includes the offer updates).
        "heartbeats_per_replica_cpu_s": heartbeat.req_per_s / cpu["server"] if cpu["server"] else None,
        # The PostgreSQL server's CPU seconds per 1,000 heartbeats (with their share of offer updates).
        "database_cpu_s_per_1000_heartbeats": (
            cpu["database"] / heartbeat.req_per_s * 1000
            if cpu["database"] is not None and heartbeat.req_per_s
            else None
        ),
    }
    summary["p99_goal_met"] = (
        heartbeat.p99_ms is not None and heartbeat.p99_ms <= GOAL_P99_MS and total.errors == 0
    )
    return {
        "store": store.name,
        "label": store.label,
        "replicas": store.replicas,
        "urls": urls,
        "summary": summary,
        "rows": [healthz, heartbeat, offer, total, healthz_after],
        "healthz_per_s": baseline,
        "healthz_spread": abs(healthz.req_per_s - healthz_after.req_per_s) / baseline if baseline else None,
        "heartbeats_per_healthz": heartbeat.req_per_s / baseline if baseline else None,
        "goal": {"heartbeats_per_s": GOAL_HEARTBEATS_PER_S, "p99_ms": GOAL_P99_MS},
        "goal_met": heartbeat.goal_met,
        "setup_offers_per_s": args.peers / setup_seconds,
        "presigned": sum(r.presigned for r in signed.results),
        "presign_s": max(r.presign_seconds for r in signed.results),
        "signed_during_timed_phase": sum(r.signed_late for r in signed.results),
        "cpu_in_window": {
            "healthz": before.cpu(args.duration, healthz.req_per_s),
            "signed": cpu,
            "healthz after": after.cpu(args.duration, healthz_after.req_per_s),
        },
        "profile": signed.profile,
    }


def _ratio(runs: dict[str, dict[str, Any]], over: str, under: str) -> tuple[float, float | None] | None:
    """Heartbeats/s of row ``over`` over row ``under`` of one trial, and the same per healthz."""
    if over not in runs or under not in runs:
        return None
    a, b = runs[over]["summary"], runs[under]["summary"]
    if not b["heartbeats_per_s"]:
        return None
    a_hz, b_hz = a["heartbeats_per_healthz"], b["heartbeats_per_healthz"]
    # Each row's heartbeats per healthz over the other's: the same comparison with each row's own HTTP
    # ceiling divided out (the machine's drift between rows, and for 2 replicas their 2 processes).
    return a["heartbeats_per_s"] / b["heartbeats_per_s"], a_hz / b_hz if a_hz and b_hz else None


RATIOS = {  # name: (over, under, goal)
    "postgresql_vs_sqlite": ("postgresql", "sqlite", GOAL_POSTGRESQL_VS_SQLITE),
    "two_replicas_vs_one": ("postgresql-2", "postgresql", GOAL_TWO_REPLICAS_VS_ONE),
}


def compare(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The goals of issue 21 item 4, as ratios between the rows of each trial; with several trials the
    median of the trials' ratios is the one judged (the machine's speed drifts between rows and between
    trials: a ratio of rows measured minutes apart says little on its own)."""
    trials = [
        {run["store"]: run for run in runs if run["trial"] == trial}
        for trial in sorted({run["trial"] for run in runs})
    ]
    ratios = {}
    for name, (over, under, goal) in RATIOS.items():
        found = [r for trial in trials if (r := _ratio(trial, over, under)) is not None]
        if not found:
            continue
        value = statistics.median(v for v, _ in found)
        per_healthz = [h for _, h in found if h is not None]
        ratios[name] = {
            "over": over,
            "under": under,
            "value": value,
            "goal": goal,
            "met": value >= goal,
            "trials": [v for v, _ in found],
            "per_healthz": statistics.median(per_healthz) if per_healthz else None,
        }
    by_store = trials[-1]
    p99_met = all(run["summary"]["p99_goal_met"] for run in runs)
    projection = None
    basis = by_store.get("postgresql-2") or by_store.get("postgresql")
    if basis is not None:
        row = basis["summary"]
        per_replica = row["heartbeats_per_replica_cpu_s"]
        db_per_1000 = row["database_cpu_s_per_1000_heartbeats"]
        two = 2 * per_replica if per_replica else None
        projection = {
            "basis": basis["store"],
            # A replica is one event loop: more cores of its own add little, so one core is its capacity.
            "heartbeats_per_s_per_replica_core": per_replica,
            "two_replicas_on_own_hosts_heartbeats_per_s": two,
            "database_cores_needed_for_two": two * db_per_1000 / 1000
            if two and db_per_1000 is not None
            else None,
        }
    return {
        "ratios": ratios,
        "p99_goal_met_every_row": p99_met,
        "goals_met": p99_met and all(ratio["met"] for ratio in ratios.values()),
        "projection": projection,
    }


def machine() -> dict[str, Any]:
    """This machine's limits, and how busy it was when the run began (others share it)."""
    cgroup_cpu_max = None
    with contextlib.suppress(OSError):
        cgroup_cpu_max = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    return {
        "cores": CORES,
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else CORES,
        "cgroup_cpu_max": cgroup_cpu_max,
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "load_average_at_start": list(os.getloadavg()),
        "shared_by": "the database server, the replicas and the load generator (and whatever else runs)",
    }


def start_postgres() -> tuple[Any, dict[str, Any]]:
    """A durable throwaway PostgreSQL server (fsync on, as SQLite FULL syncs) and its settings."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.postgres
    import psycopg  # imported here: only the PostgreSQL rows need psycopg and a PostgreSQL install

    from tests.postgres import PostgresServer

    server = PostgresServer(durable=True)
    try:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            settings = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                for name in (
                    "server_version",
                    "fsync",
                    "synchronous_commit",
                    "full_page_writes",
                    "wal_sync_method",
                )
            }
        pid = int((server.root / "data" / "postmaster.pid").read_text().split()[0])
    except BaseException:
        server.stop()
        raise
    settings["durable"] = settings["fsync"] == "on" and settings["synchronous_commit"] == "on"
    settings["postmaster_pid"] = pid
    settings["readers_per_replica"] = int(os.environ.get("HIVEMARKET_DB_READERS", "4"))
    return server, settings


def run_store(
    args: argparse.Namespace,
    store: Store,
    trial: int,
    root: Path,
    admin_key: Path,
    postgres: tuple[Any, dict[str, Any]] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Start the row's replicas on a fresh database, measure, stop them; show their logs on failures."""
    home = root / f"{store.name}-{trial}"
    home.mkdir()
    database = None
    if store.engine == "postgresql":
        assert postgres is not None
        name = f"{store.name.replace('-', '_')}_{trial}"
        db_url = postgres[0].database(name, socket=args.postgres_via == "socket")
        database = ProcessTree(postgres[1]["postmaster_pid"])
    else:
        db_url = f"sqlite:///{home / 'coordinator.db'}"
    profile = args.profile
    if profile is not None and (len(args.stores) > 1 or args.trials > 1):
        suffix = f"-{trial}" if args.trials > 1 else ""
        profile = profile.with_name(f"{profile.stem}-{store.name}{suffix}{profile.suffix}")
    servers: list[Server] = []
    try:
        # One after the other: the first migrates the new database, the second finds it migrated.
        for i in range(store.replicas):
            servers.append(start_server(home, db_url, admin_key, args.sqlite_synchronous, f"replica-{i + 1}"))
            say(f"{store.name}: coordinator pid {servers[-1].proc.pid} at {servers[-1].url}")
        outcome = asyncio.run(bench(args, store, servers, database, say, profile))
        outcome["trial"] = outcome["summary"]["trial"] = trial
    finally:
        for server in servers:
            server.stop()
    errors = sum(row.errors for row in outcome["rows"] if row.scenario != "signed total")
    for server in servers:
        if errors or server.proc.returncode not in (0, -signal.SIGTERM):
            # The log lives in the temporary home, which goes with the run: show it while it exists.
            print(
                f"{store.name}: coordinator exit status {server.proc.returncode}, {errors} failed requests; "
                f"its log ends:\n{_tail(server.log)}",
                file=sys.stderr,
            )
    return outcome


def report(outcome: dict[str, Any], as_json: bool) -> None:
    for run in outcome["runs"]:
        run["scenarios"] = [dataclasses.asdict(row) for row in run.pop("rows")]
    if as_json:
        print(json.dumps(outcome, indent=2))
        return
    o = outcome
    for run in o["runs"]:
        print(f"== {run['label']} ({run['store']}, trial {run['trial']}) ==")
        print_table([Row(**row) for row in run["scenarios"]])
        print(
            f"heartbeats/s vs healthz/s (mean of before and after, {_fmt(run['healthz_per_s'], 0)}/s): "
            f"{_fmt(run['heartbeats_per_healthz'], 3)}"
        )
        spread = run["healthz_spread"]
        if spread is not None and spread > 0.15:
            print(f"warning: healthz before and after differ by {spread:.0%}: the machine's speed drifted")
        print(
            f"goal of issue 3, >= {GOAL_HEARTBEATS_PER_S:,.0f} heartbeats/s with p99 <= {GOAL_P99_MS:g} ms "
            f"and no errors: {'met' if run['goal_met'] else 'NOT met'}"
        )
        for name, c in run["cpu_in_window"].items():
            database = (
                ""
                if c["database"] is None
                else f"PostgreSQL {c['database']:.2f} ({_fmt(c['database_us_per_request'], 0)} us, "
                f"{_fmt(c['database_disk_kib_per_request'])} KiB), "
            )
            print(
                f"cores in the {name} window: replicas {c['server']:.2f} "
                f"({' + '.join(f'{r:.2f}' for r in c['replicas'])}; "
                f"{_fmt(c['server_us_per_request'], 0)} us CPU, "
                f"{_fmt(c['server_disk_kib_per_request'])} KiB written a request), {database}"
                f"generator {c['generator']:.2f}, other {c['other']:.2f}; "
                f"whole machine {c['machine_busy_cores']:.2f} of {CORES}"
            )
        print(
            f"setup {run['setup_offers_per_s']:,.0f} offers/s; pre-signed {run['presigned']:,} requests in "
            f"{run['presign_s']:.1f} s; signed during the timed phase: {run['signed_during_timed_phase']:,}"
        )
        if run["profile"]:
            print(run["profile"])
        print()

    print(
        f"== summary: one run, {o['trials']} trial(s), {o['machine']['cores']} cores shared by the database "
        "server, the replicas and the load generator =="
    )
    header = (
        "row",
        "trial",
        "heartbeats/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "healthz/s",
        "hb/healthz",
        "replica cores",
        "db cores",
        "generator",
        "other",
        "hb per replica-CPU-s",
        f"p99 <= {GOAL_P99_MS:g} ms",
    )
    lines = [
        (
            r["label"],
            str(r["trial"]),
            _fmt(r["heartbeats_per_s"], 0),
            _fmt(r["p50_ms"], 2),
            _fmt(r["p99_ms"], 2),
            str(r["errors"]),
            _fmt(r["healthz_per_s"], 0),
            _fmt(r["heartbeats_per_healthz"], 3),
            _fmt(r["replica_cores"], 2),
            _fmt(r["database_cores"], 2),
            _fmt(r["generator_cores"], 2),
            _fmt(r["other_cores"], 2),
            _fmt(r["heartbeats_per_replica_cpu_s"], 0),
            "yes" if r["p99_goal_met"] else "NO",
        )
        for r in o["rows"]
    ]
    _print_grid(header, lines)
    c = o["comparison"]
    names = {
        "postgresql_vs_sqlite": "1 replica on PostgreSQL vs 1 on SQLite",
        "two_replicas_vs_one": "2 replicas on PostgreSQL vs 1",
    }
    for name, ratio in c["ratios"].items():
        trials = ", ".join(_fmt(v, 2) for v in ratio["trials"])
        print(
            f"{names[name]}: {_fmt(ratio['value'], 2)}x heartbeats/s, the median of trials {trials} (goal >= "
            f"{ratio['goal']:g}x: {'met' if ratio['met'] else 'NOT met'}); per healthz "
            f"{_fmt(ratio['per_healthz'], 2)}x"
        )
    print(f"p99 <= {GOAL_P99_MS:g} ms in every row: {'met' if c['p99_goal_met_every_row'] else 'NOT met'}")
    m = o["machine"]
    print(
        f"machine: {m['cores']} logical cores ({m['physical_cores']} physical, {m['usable_cores']} usable, "
        f"cgroup cpu.max {m['cgroup_cpu_max'] or '-'}), {m['memory_gib']:.0f} GiB; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}; "
        "'other' is what the rest of the machine took"
    )
    pg = o["postgresql"]
    if pg:
        via = "Unix socket" if o["postgres_via"] == "socket" else "TCP loopback"
        print(
            f"PostgreSQL {pg['server_version']} on this machine, durable: fsync={pg['fsync']}, "
            f"synchronous_commit={pg['synchronous_commit']}, full_page_writes={pg['full_page_writes']} "
            f"(SQLite synchronous={o['sqlite_synchronous']}); {pg['readers_per_replica']} reader connections "
            f"and one writer per replica, through its {via}"
        )
    p = c["projection"]
    if p and p["heartbeats_per_s_per_replica_core"]:
        needed = p["database_cores_needed_for_two"]
        print(
            f"projection from the {p['basis']} row (linear in CPU): one replica with a core of its own "
            f"~{p['heartbeats_per_s_per_replica_core']:,.0f} heartbeats/s (it is one event loop: more cores "
            f"add little); two on hosts of their own "
            f"~{p['two_replicas_on_own_hosts_heartbeats_per_s']:,.0f}/s, "
            f"the PostgreSQL server then needing ~{_fmt(needed, 2)} cores, if its serialised writes keep up"
        )
    print(
        f"closed loop: {o['concurrency']} connections, one request in flight each, over {o['workers']} "
        f"generator processes (split evenly over a row's replicas); {o['warmup_s']:g} s warm-up, "
        f"{o['duration_s']:g} s measured per window; {o['peers']:,} peers; "
        f"offer updates {o['update_fraction']:.0%}"
    )


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same path as Ctrl-C, so the servers are reaped either way."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    say = (lambda _: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    limits = machine()
    runs: list[dict[str, Any]] = []
    postgres: tuple[Any, dict[str, Any]] | None = None
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="hivemarket-load-") as tmp:
        try:
            if any(STORES[name].engine == "postgresql" for name in args.stores):
                say("starting a durable PostgreSQL server (fsync on)")
                postgres = start_postgres()
            admin_key = Path(tmp) / "admin.pem"  # one admin key for every replica
            save_identity(Identity.generate(), admin_key)
            for trial in range(1, args.trials + 1):  # the rows alternate, so that drift hits each alike
                for name in args.stores:
                    runs.append(run_store(args, STORES[name], trial, Path(tmp), admin_key, postgres, say))
        except KeyboardInterrupt:
            print("interrupted; stopping the coordinators", file=sys.stderr)
            return 130
        finally:
            if postgres is not None:
                postgres[0].stop()
    outcome = {
        "rows": [run["summary"] for run in runs],
        "comparison": compare(runs),
        "goals": {
            "p99_ms": GOAL_P99_MS,
            "postgresql_vs_sqlite": GOAL_POSTGRESQL_VS_SQLITE,
            "two_replicas_vs_one": GOAL_TWO_REPLICAS_VS_ONE,
            "heartbeats_per_s": GOAL_HEARTBEATS_PER_S,
        },
        "machine": limits,
        "postgresql": None if postgres is None else postgres[1],
        "trials": args.trials,
        "loop": "closed",
        "concurrency": args.concurrency,
        "workers": args.workers,
        "peers": args.peers,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "update_fraction": args.update_fraction,
        "sqlite_synchronous": args.sqlite_synchronous,
        "postgres_via": args.postgres_via,
        "runs": runs,
    }
    report(outcome, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
