"""Benchmark: N simulated peers sending signed heartbeats and offer updates to a real coordinator.

The goal (issue 3): >= 3,000 signed heartbeats/s with p99 <= 50 ms at 2,000 peers on a 2-core machine.

    python bench/coordinator_load.py [--peers N] [--duration S] [--warmup S] [--concurrency C]
        [--workers W] [--update-fraction F] [--sqlite-synchronous FULL|NORMAL] [--profile OUT] [--json]

What runs, in order, against one coordinator subprocess (its own session and process group, a temporary
HIVEMARKET_HOME and SQLite file, port 0; killed at the end, also on Ctrl-C or SIGTERM, and on Linux
even when the bench itself is SIGKILLed, which leaves only the temporary folder behind):

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
  server's own interval H, as real peers would, so that no lease lapses (TTL 3H) before the phase.
- the generator runs in W separate processes (default 2) so that one event loop's delays do not
  become everyone's latency.

``--profile OUT`` runs ``py-spy record --pid SERVER --nonblocking`` over the measured window of the
signed phase (py-spy must be on PATH; ``.svg`` gives a flame graph, ``.txt`` collapsed stacks,
``.json`` speedscope).
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
SIGNATURE_WINDOW_BUDGET_S = 240.0  # warm-up + duration; the server accepts timestamps within 300 s
SERVER_START_TIMEOUT_S = 180.0

HEALTHZ, HEARTBEAT, OFFER = "healthz", "heartbeat", "offer update"
KINDS = (HEALTHZ, HEARTBEAT, OFFER)
DISCONNECTED = "disconnected"  # the server closed a connection with a request in flight
CONNECT_FAILED = "connect failed"  # counted as an error, not as a request

# (model, TFLOP/s, VRAM GB): enough variety that offer updates are not all identical rows.
GPUS = (("H100", 750.0, 80.0), ("A100", 310.0, 80.0), ("L40S", 360.0, 48.0), ("RTX4090", 165.0, 24.0))

_CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)


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


def start_server(home: Path, synchronous: str) -> Server:
    """Start ``hivemarket coordinator serve`` on port 0 and wait for its ``listening on`` line."""
    admin_key = home / "admin.pem"
    save_identity(Identity.generate(), admin_key)
    log = home / "coordinator.log"
    env = {**os.environ, "HIVEMARKET_HOME": str(home)}
    command = [
        sys.executable,
        "-m",
        "peer",
        "coordinator",
        "serve",
        "--port",
        "0",
        "--db",
        f"sqlite:///{home / 'coordinator.db'}",
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
        self._peers = [(peer.protocol.identity(), peer.lease_id) for peer in peers]
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
    host: str
    port: int
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

    def __init__(self, phase: _Phase):
        self.phase = phase
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
            self._reconnect()
        elif not any(c.busy for c in self.connections):
            self.idle.set()

    def _reconnect(self) -> None:
        task = asyncio.get_running_loop().create_task(self.connect())
        self.reconnects.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self.reconnects.discard)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        self.connections.add(conn)
        try:
            await loop.create_connection(lambda: conn, self.spec.host, self.spec.port)
        except OSError as e:
            self.connections.discard(conn)
            if self.window[0] <= time.perf_counter() < self.window[1]:
                kind = HEALTHZ if self.spec.scenario == "healthz" else HEARTBEAT
                self.statuses[kind][f"{CONNECT_FAILED}: {e.strerror or type(e).__name__}"] += 1
            if not self.stopping:
                await asyncio.sleep(0.1)
                self._reconnect()

    async def run(self) -> tuple[float, int]:
        """Run warm-up and window; return (CPU seconds in the window, requests in flight at its end)."""
        start = time.perf_counter()
        self.window = (start + self.spec.warmup, start + self.spec.warmup + self.spec.duration)
        await asyncio.gather(*(self.connect() for _ in range(self.spec.connections)))
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
    host = f"{spec.host}:{spec.port}"
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


@dataclass
class Window:
    """One measured window: its rows and where the CPU went."""

    results: list[WorkerResult]
    server_cores: float
    server_written: int  # bytes the server caused to be written to storage (WAL, checkpoints)
    machine_busy: float  # fraction of all cores
    profile: str | None = None

    def generator_cores(self, duration: float) -> float:
        return sum(r.cpu_seconds for r in self.results) / duration

    def cpu(self, duration: float, rate: float) -> dict[str, float | None]:
        return {
            "server": self.server_cores,
            "generator": self.generator_cores(duration),
            "machine_busy_cores": self.machine_busy * (os.cpu_count() or 1),
            # Server CPU time per request: 1e6 / it is what one core would sustain if nothing else limited.
            "server_us_per_request": self.server_cores / rate * 1e6 if rate else None,
            "server_disk_kib_per_request": self.server_written / 1024 / (rate * duration) if rate else None,
        }


async def run_phase(
    specs: Sequence[WorkerSpec],
    server: Server,
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
        server_proc = psutil.Process(server.proc.pid)
        await asyncio.sleep(spec.warmup)
        profiler = _start_profiler(profile, server.proc.pid, spec.duration)
        server_cpu0, machine0 = _process_cpu(server_proc), psutil.cpu_times()
        written0 = server_proc.io_counters().write_bytes
        await asyncio.sleep(max(0.0, began + spec.warmup + spec.duration - time.monotonic()))
        server_cpu = (_process_cpu(server_proc) - server_cpu0) / spec.duration
        written = server_proc.io_counters().write_bytes - written0
        busy = _busy(machine0, psutil.cpu_times())
        collected = [await loop.run_in_executor(None, _get, results, procs, 120.0) for _ in procs]
        profile_note = _finish_profiler(profiler, profile)
        for proc in procs:
            proc.join(timeout=10)
        return Window(collected, server_cpu, written, busy, profile_note)
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


def _process_cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


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
        "--nonblocking",
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
    url: str, identities: Sequence[Identity], concurrency: int
) -> tuple[list[Peer], float, float]:
    """Post every peer's first offer (signed); return the peers with their leases, H, and the seconds."""
    rng = random.Random(0)
    bodies = [offer_body(rng) for _ in identities]
    began = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def post(identity: Identity, body: bytes) -> dict[str, Any]:
            headers = {
                **sign_request(identity, "POST", "/v1/offers", body),
                "Content-Type": "application/json",
            }
            async with gate, session.post(f"{url}/v1/offers", data=body, headers=headers) as response:
                payload = await response.json(content_type=None)
                if response.status != 200:
                    raise RuntimeError(f"POST /v1/offers answered {response.status}: {payload}")
                return payload["lease"]

        leases = await asyncio.gather(*(post(i, b) for i, b in zip(identities, bodies, strict=True)))
    peers = [
        Peer(i.private_key.private_bytes_raw(), lease["id"])
        for i, lease in zip(identities, leases, strict=True)
    ]
    return peers, float(leases[0]["heartbeat_interval"]), time.perf_counter() - began


async def keep_leases_alive(
    url: str, peers: Sequence[Peer], interval: float, concurrency: int, stop: asyncio.Event
) -> None:
    """Heartbeat every lease once per ``interval`` (as real peers do) until ``stop``; untimed."""
    identities = [(peer.protocol.identity(), peer.lease_id) for peer in peers]
    tick = 0.25
    per_tick = max(1, math.ceil(len(identities) * tick / interval))
    gate = asyncio.Semaphore(concurrency)
    failures: Counter[int] = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def beat(identity: Identity, lease_id: str) -> None:
            path = f"/v1/leases/{lease_id}/heartbeat"
            async with (
                gate,
                session.post(url + path, headers=sign_request(identity, "POST", path)) as response,
            ):
                await response.read()
                if response.status != 200:
                    failures[response.status] += 1

        cursor = 0
        while not stop.is_set():
            batch = [identities[(cursor + k) % len(identities)] for k in range(per_tick)]
            cursor += per_tick
            await asyncio.gather(*(beat(identity, lease_id) for identity, lease_id in batch))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
    if failures:
        print(f"warning: keep-alive heartbeats failed while pre-signing: {dict(failures)}", file=sys.stderr)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


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
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    for line in (header, *lines):
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
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
        "--profile", type=Path, help="py-spy the server over the signed window into this file"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
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
    args.workers = min(args.workers, args.concurrency, args.peers)
    return args


async def healthz_window(args: argparse.Namespace, server: Server, connections: Sequence[int]) -> Window:
    specs = [
        WorkerSpec("healthz", server.host, server.port, c, args.warmup, args.duration) for c in connections
    ]
    return await run_phase(specs, server)


async def bench(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """healthz, setup, signed, healthz again; the two healthz windows bracket the signed one so that a
    machine whose speed drifts during the run (seen here: 2x within minutes) shows as their spread."""
    connections = [len(part) for part in split(range(args.concurrency), args.workers)]
    say = (lambda *_: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    phase_time = f"{args.warmup:g}+{args.duration:g} s"

    say(f"healthz baseline: {args.concurrency} connections, {phase_time}")
    before = await healthz_window(args, server, connections)
    healthz = summarize(HEALTHZ, 0, before.results, args.duration)

    say(f"setup: {args.peers} identities post their offers")
    identities = [Identity.generate() for _ in range(args.peers)]
    peers, interval, setup_seconds = await setup_peers(server.url, identities, args.concurrency)

    # The healthz rate bounds the signed rate; 30 % headroom, and what runs out is signed late (reported).
    stock = math.ceil(healthz.req_per_s * (args.warmup + args.duration) * 1.3 / args.workers) + 1000
    say(f"signed: pre-signing {stock:,} requests in each of {args.workers} processes, then {phase_time}")
    signed_specs = [
        WorkerSpec(
            "signed",
            server.host,
            server.port,
            c,
            args.warmup,
            args.duration,
            stock,
            part,
            args.update_fraction,
            seed,
        )
        for seed, (c, part) in enumerate(zip(connections, split(peers, args.workers), strict=True))
    ]
    signed = await run_phase(
        signed_specs,
        server,
        while_waiting=lambda stop: keep_leases_alive(server.url, peers, interval, args.concurrency, stop),
        profile=args.profile,
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
    say(f"healthz baseline again: {phase_time}")
    after = await healthz_window(args, server, connections)
    healthz_after = summarize(HEALTHZ, 0, after.results, args.duration)
    healthz_after.scenario = "healthz after"
    baseline = (healthz.req_per_s + healthz_after.req_per_s) / 2

    return {
        "rows": [healthz, heartbeat, offer, total, healthz_after],
        "loop": "closed",
        "concurrency": args.concurrency,
        "workers": args.workers,
        "peers": args.peers,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "update_fraction": args.update_fraction,
        "sqlite_synchronous": args.sqlite_synchronous,
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
            "signed": signed.cpu(args.duration, total.req_per_s),
            "healthz after": after.cpu(args.duration, healthz_after.req_per_s),
        },
        "profile": signed.profile,
    }


def report(outcome: dict[str, Any], as_json: bool) -> None:
    rows: list[Row] = outcome.pop("rows")
    if as_json:
        outcome["scenarios"] = [dataclasses.asdict(row) for row in rows]
        print(json.dumps(outcome, indent=2))
        return
    print_table(rows)
    o = outcome
    print(
        f"\nclosed loop: {o['concurrency']} connections, one request in flight each, over "
        f"{o['workers']} generator processes; {o['warmup_s']:g} s warm-up, {o['duration_s']:g} s measured "
        f"per scenario; synchronous={o['sqlite_synchronous']}; offer updates {o['update_fraction']:.0%}"
    )
    print(
        f"heartbeats/s vs healthz/s (mean of before and after, {_fmt(o['healthz_per_s'], 0)}/s): "
        f"{_fmt(o['heartbeats_per_healthz'], 3)}"
    )
    spread = o["healthz_spread"]
    if spread is not None and spread > 0.15:
        print(f"warning: healthz before and after differ by {spread:.0%}: the machine's speed drifted")
    print(
        f"goal >= {GOAL_HEARTBEATS_PER_S:,.0f} heartbeats/s with p99 <= {GOAL_P99_MS:g} ms and no errors: "
        f"{'met' if o['goal_met'] else 'NOT met'}"
    )
    for name, c in o["cpu_in_window"].items():
        print(
            f"cores in the {name} window: server {c['server']:.2f} ({_fmt(c['server_us_per_request'], 0)} us "
            f"CPU, {_fmt(c['server_disk_kib_per_request'])} KiB written a request), generator "
            f"{c['generator']:.2f}, whole machine {c['machine_busy_cores']:.2f} of {os.cpu_count()}"
        )
    print(
        f"setup {o['setup_offers_per_s']:,.0f} offers/s; pre-signed {o['presigned']:,} requests in "
        f"{o['presign_s']:.1f} s; signed during the timed phase: {o['signed_during_timed_phase']:,}"
    )
    if o["profile"]:
        print(o["profile"])


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same path as Ctrl-C, so the server is reaped either way."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="hivemarket-load-") as tmp:
        server: Server | None = None
        try:
            server = start_server(Path(tmp), args.sqlite_synchronous)
            if not args.json:
                print(f"coordinator pid {server.proc.pid} at {server.url}", file=sys.stderr)
            outcome = asyncio.run(bench(args, server))
        except KeyboardInterrupt:
            print("interrupted; stopping the coordinator", file=sys.stderr)
            return 130
        finally:
            if server is not None:
                server.stop()
        errors = sum(row.errors for row in outcome["rows"] if row.scenario != "signed total")
        if errors or server.proc.returncode not in (0, -signal.SIGTERM):
            # The log lives in the temporary home, which goes with this block: show it while it exists.
            print(
                f"coordinator exit status {server.proc.returncode}, {errors} failed requests; its log ends:\n"
                f"{_tail(server.log)}",
                file=sys.stderr,
            )
    report(outcome, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
