"""Averaging rounds against gloo: ``python -m bench.averaging [--peers 2,4] [--sizes 10,100] [--json]``.

One all-reduce of ``--sizes`` MB of fp32 values among ``--peers`` peers on this machine's loopback, each
peer a process of its own (``bench/round_peer.py``), by these methods (``--methods``):

- ``gloo``: ``torch.distributed``'s gloo ``all_reduce`` of the same tensor (uncompressed): the baseline;
- ``fast``: hivemarket's fast path (:class:`peer.collective.FastPath`, issue #18), as a trainer uses it:
  a signed-commitment all-gather, the gloo all-reduce of the weighted values (fp32, or fp16 for the
  ``fp16`` compression) and the tamper check of the result, on a process group built through a real
  coordinator's rendezvous. The bench starts ``hivemarket coordinator serve`` (one for the whole bench,
  on a free port, leases that outlast the bench: its peers send no heartbeats, and clearing rounds only
  when the bench asks) and sets up, through the public API, a run of N matched peers for each row: the
  admin's deposit for a launcher, an offer from each of N new identities, the run, the admin's clearing
  round. Each peer then joins the run, checks in with its reach address until the group's version holds
  all N, makes that version's process group and runs the rounds (weight 1, the same epoch on all);
- ``fast-rebuild``: the fast path where each round must first rebuild the group: every peer checks in
  with the current version as failed (what the trainer's survivors do after a round that broke,
  ``FastPath.regroup``), the coordinator forms the next version (the same peers: everyone came back),
  and each peer makes its process group again (reach checks, the coordinator's rendezvous, gloo's
  connections) before the round. A replaced member costs the same rebuild (a new version, a new group);
  only the market's work of recruiting the newcomer is left out. The row's time is rebuild + round;
- ``hivemarket``: hivemarket's averaging path on hivemind, :class:`peer.averaging.RunAverager` over a DHT
  per peer with the target group size set to the number of peers and one epoch key per round;
- ``hivemind``: hivemind's ``DecentralizedAverager`` with its defaults (only the prefix and the target
  group size set) and hivemind's own codecs.

Compressions (``--compressions``): ``gloo`` is uncompressed only; ``fast`` and ``fast-rebuild`` send fp32
(``none``) or ``fp16``; ``hivemarket`` each of none, fp16, 8bit (hivemarket's own 8-bit codec,
``peer.codec``), ``hivemind`` the same with hivemind's own codecs.

Each row (peers, size, method, compression) starts its own peers, which run one warm-up round (first
connections and buffers) and then ``--rounds`` timed rounds back to back. A round's time runs from the
moment the last peer entered it (no all-reduce can finish before every peer is in) to the moment the
last peer left it: the maximum of the peers' end times minus the maximum of their start times (one
machine: one clock). The row's figure is the median of its timed rounds; its ratio is that over gloo's
median for the same peers and size.

A fast-path row gives each timed round's group version (``versions``): one version for ``fast``, a new
one every round for ``fast-rebuild``.

Each peer's values are its index, so the exact mean is known: a row is ok when every round of every peer
averaged with all the peers and every result is within 1e-3 of the mean (the values are constant per
peer, which fp16 and hivemarket's 8-bit codec encode exactly; any error is a wrong average). ``max_error`` is
the largest over all rounds. A row that is not ok has no figures, only a reason. hivemind 1.1.12's own
8-bit codec cannot decode on numpy 2 (``peer/codec.py``), and hivemind reports such a round as a
success with each peer keeping its own values for the parts that failed: the max error shows it.

The goals, printed per (peers, size), not asserted: issue #8's, hivemarket uncompressed within 2x
gloo's time, 8-bit within 1x; issue #18's, the fast path uncompressed within 1.2x gloo's time (4 peers x
100 MB), a round that must first rebuild the group within 1.5x. ``machine`` gives the CPUs, the platform
and the load average when the bench started: other processes on the machine slow every method, gloo too.

Every peer runs in a process group of its own; its processes, the DHT's p2pd daemon included, are
stopped when its row ends, fails or runs past ``--timeout`` seconds (start-up included). The coordinator
runs in a process group of its own too, stopped when the bench ends.

    python -m bench.averaging [--peers 2,4] [--sizes 10,100]
                              [--methods gloo,fast,fast-rebuild,hivemarket,hivemind]
                              [--compressions none,fp16,8bit] [--rounds 3] [--timeout S] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peer.demo import Child
from peer.protocol.client import CoordinatorClient
from peer.protocol.identity import Identity, save_identity
from peer.protocol.run_schemas import RunBody
from peer.protocol.schemas import HardwareSummary, OfferBody
from peer.settings import load_settings

ROUND_PEER = Path(__file__).resolve().parent / "round_peer.py"
#: gloo first: the other rows' ratios need its figure
METHODS = ("gloo", "fast", "fast-rebuild", "hivemarket", "hivemind")
FAST_METHODS = ("fast", "fast-rebuild")
COMPRESSIONS = ("none", "fp16", "8bit")
#: The compressions of the methods that do not have them all (the fast path sends fp32 or fp16).
METHOD_COMPRESSIONS = {"fast": ("none", "fp16"), "fast-rebuild": ("none", "fp16")}
#: Issues #8's and #18's goals: the most a round of these may take, in times gloo's round.
GOALS = {
    ("hivemarket", "none"): 2.0,
    ("hivemarket", "8bit"): 1.0,
    ("fast", "none"): 1.2,
    ("fast-rebuild", "none"): 1.5,
}
TOLERANCE = 1e-3
POLL_SECONDS = 0.2
#: The peers' environment unless this one sets them: hivemind's logs to errors only, and gloo's
#: connections on the loopback interface (else on the address this machine's hostname resolves to).
PEER_ENV = {"HIVEMIND_LOGLEVEL": "ERROR", "GLOO_SOCKET_IFNAME": "lo"}
#: The bench's coordinator: leases that outlast any bench (its peers send no heartbeats) and clearing
#: rounds only when the bench asks for one (once every offer of a row is posted).
COORDINATOR_ENV = {"HIVEMARKET_HEARTBEAT_INTERVAL": "86400", "HIVEMARKET_CLEARING_INTERVAL": "86400"}
#: What each fast-path peer offers: this machine's CPUs (the run does not train; the market only matches).
HARDWARE = HardwareSummary(gpu="cpu", gpu_count=0, vram_gb=0, tflops=1.0, ram_gb=1.0, cpu_cores=1)


@dataclass
class Row:
    peers: int
    mb: float
    method: str
    compression: str
    seconds: float | None = None  # the median timed round
    ratio: float | None = None  # seconds over gloo's for the same peers and size
    max_error: float | None = None
    ok: bool = False
    reason: str = ""
    round_seconds: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the fast path's group version of each timed round


def measure(row: Row, args: argparse.Namespace, folder: Path, market: Market) -> None:
    """Run ``row``'s peers to the end of their rounds (or the first failure, or ``args.timeout``) and
    fill in its figures; every process they started is gone when this returns. The fast-path methods'
    peers are matched to a run of their own on ``market``'s coordinator first."""
    rendezvous = folder / "rendezvous"  # round_peer.py's barrier files go next to the addresses
    rendezvous.mkdir(parents=True)
    rounds = args.rounds + 1  # the warm-up first
    children: list[Child] = []
    grace = load_settings().shutdown_timeout
    fast: list[str] = []  # the peers' arguments for the fast path ...
    keys: list[Path] = []  # ... and each one's key
    if row.method in FAST_METHODS:
        try:
            url, run_id, keys = market.matched_run(folder / "keys", row.peers, args.timeout)
        except Exception as e:  # the coordinator did not start, or refused the run
            row.reason = f"no run of {row.peers} matched peers: {e!r}"[:500]
            return
        fast = ["--coordinator", url, "--run", run_id]
    try:
        for i in range(row.peers):
            argv = [sys.executable, str(ROUND_PEER), "--method", row.method, "--compression", row.compression]
            argv += ["--index", str(i), "--peers", str(row.peers), "--size-mb", str(row.mb)]
            argv += ["--rounds", str(rounds), "--timeout", str(args.timeout)]
            argv += ["--listen", "/ip4/127.0.0.1/tcp/0", "--addrs", str(rendezvous / "addrs.json")]
            argv += [*fast, "--identity", str(keys[i])] if fast else []
            log = folder / f"peer-{i}.out"
            with log.open("w") as out, log.with_suffix(".err").open("w") as err:
                proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=err,
                    env=PEER_ENV | dict(os.environ),
                    start_new_session=True,  # its own process group: stopped with all it started
                )
            children.append(Child(f"peer {i}", proc, log))
        lines, reason = follow(children, row.peers, args.timeout)
    finally:
        for child in children:
            child.stop(grace)
    if lines:
        row.max_error = max(line["max_error"] for line in lines)
    by_round = [[line for line in lines if line["round"] == r] for r in range(rounds)]
    if not reason and any(len(mine) != row.peers for mine in by_round):
        reason = "a peer exited before its last round"
    if not reason and row.max_error is not None and row.max_error > TOLERANCE:
        reason = f"every round reported success, yet results are up to {row.max_error:g} off the exact mean"
    versions = [{line.get("version") for line in mine} for mine in by_round]
    if not reason and any(len(v) != 1 for v in versions):
        reason = f"the peers averaged a round on different group versions: {versions}"
    if reason:
        row.reason = reason
        return
    row.round_seconds = [max(x["end"] for x in mine) - max(x["start"] for x in mine) for mine in by_round[1:]]
    row.versions = [v for (v,) in versions[1:] if v is not None]
    row.seconds = statistics.median(row.round_seconds)
    row.ok = True


class Market:
    """The fast-path rows' coordinator (``hivemarket coordinator serve`` on a free port, in a process group
    of its own), started at the first row that needs it and stopped by :meth:`close`, and the runs it
    holds: one per row, with the row's peers matched to it through the public API."""

    def __init__(
        self, folder: Path, host: str = "127.0.0.1", command: Callable[[list[str]], list[str]] = list
    ):
        self.folder = folder
        self.host = host  # the address it listens on; ``command`` runs it where that is (a lab's host)
        self.command = command
        self.child: Child | None = None
        self.url = ""
        self.admin = Identity.generate()

    def start(self, timeout: float) -> str:
        if self.child is not None:
            return self.url
        self.folder.mkdir(parents=True)
        save_identity(self.admin, self.folder / "admin.pem")
        argv = [sys.executable, "-m", "peer", "coordinator", "serve", "--host", self.host, "--port", "0"]
        argv += [
            "--db",
            f"sqlite:///{self.folder / 'coordinator.db'}",
            "--admin-key",
            str(self.folder / "admin.pem"),
        ]
        env = dict(os.environ) | COORDINATOR_ENV | {"HIVEMARKET_HOME": str(self.folder)}
        log = self.folder / "coordinator.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                self.command(argv), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.child = Child("coordinator", proc, log)
        deadline = time.monotonic() + timeout
        while not (found := re.search(r"listening on (http://\S+)", log.read_text())):
            if proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {proc.returncode}: {last_line(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not listen within {timeout:g} s")
            time.sleep(0.05)
        self.url = found.group(1)
        return self.url

    def matched_run(self, keys: Path, peers: int, timeout: float) -> tuple[str, str, list[Path]]:
        """A new run with ``peers`` new identities matched to it: the coordinator's URL, the run's id and
        each peer's key file (in ``keys``), in the order of the peers' indexes."""
        url = self.start(timeout)
        keys.mkdir(parents=True)
        identities = [Identity.generate() for _ in range(peers)]
        paths = [keys / f"peer-{i}.pem" for i in range(peers)]
        for identity, path in zip(identities, paths, strict=True):
            save_identity(identity, path)
        run_id = asyncio.run(self._matched_run(url, identities))
        return url, run_id, paths

    async def _matched_run(self, url: str, identities: list[Identity]) -> str:
        launcher = Identity.generate()
        spec = {
            "name": "bench-averaging",
            "task": "digits-mlp",  # never trained: the peers average the bench's tensors
            "dataset": {"version": "0" * 64, "location": "coordinator"},
            "stop": {"samples": 1_000_000},
            "verification": {"rate": 0},
        }
        n = len(identities)
        async with (
            CoordinatorClient(url, self.admin) as admin,
            CoordinatorClient(url, launcher) as client,
        ):
            await admin.deposit(launcher.account, "100")
            for identity in identities:
                async with CoordinatorClient(url, identity) as peer:
                    await peer.post_offer(OfferBody(price_per_hour="0.10", hardware=HARDWARE))
            body = RunBody(spec=spec, max_price="1", peers_min=n, peers_max=n, budget="10")
            run = await client.create_run(body)
            await admin.clear_market()
            view = await client.run(run.id)
        matched = {p.account for p in view.peers if p.state == "active"}
        if matched != {i.account for i in identities}:
            raise RuntimeError(f"run {run.id} matched {len(matched)} of the {n} peers ({view.reason})")
        return run.id

    def close(self) -> None:
        if self.child is not None:
            self.child.stop(load_settings().shutdown_timeout)
            self.child = None


def follow(children: list[Child], peers: int, timeout: float) -> tuple[list[dict[str, Any]], str]:
    """The peers' round lines once all of them exited, and "", or, as soon as a round failed, a peer
    crashed or ``timeout`` seconds passed, the lines so far and what went wrong."""
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            # noted while they run: torch's shared-memory manager leaves the peer's process group, and
            # p2pd is re-parented once its DHT process dies; Child.stop reaps what is noted
            child.remember_tree()
        lines = [line for child in children for line in round_lines(child.log)]
        for line in lines:
            where = f"round {line['round']}, peer {line['index']}"
            if line["outcome"] != "averaged":
                return lines, f"{where}: {line['reason']}"
            if line["group"] != peers:
                return lines, f"{where}: averaged with {line['group']} of the {peers} peers"
        codes = [child.proc.poll() for child in children]
        for child, code in zip(children, codes, strict=True):
            if code:
                return lines, f"{child.name} exited with {code}: {last_line(child.log.with_suffix('.err'))}"
        if all(code == 0 for code in codes):
            return lines, ""
        if time.monotonic() > deadline:
            return lines, f"not done within {timeout:g} s"
        time.sleep(POLL_SECONDS)


def round_lines(log: Path) -> list[dict[str, Any]]:
    """The complete JSON lines a peer printed so far (the last one may still be being written)."""
    text = log.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.startswith("{")]


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def goals(rows: list[Row]) -> dict[str, list[dict[str, Any]]]:
    """Per goal, per (peers, size): the ratio and whether it is within the goal (None: no figure)."""
    return {
        f"{method} {compression} <= {limit:g}x gloo": [
            {
                "peers": r.peers,
                "mb": r.mb,
                "ratio": r.ratio,
                "met": None if r.ratio is None else r.ratio <= limit,
            }
            for r in rows
            if (r.method, r.compression) == (method, compression)
        ]
        for (method, compression), limit in GOALS.items()
    }


def compressions(method: str, wanted: list[str]) -> list[str]:
    """The rows of ``method`` among the ``--compressions`` asked for; gloo, the baseline, always has its
    one, uncompressed."""
    if method == "gloo":
        return ["none"]
    return [c for c in wanted if c in METHOD_COMPRESSIONS.get(method, COMPRESSIONS)]


def listed(text: str, known: tuple[str, ...] | None = None) -> list[str]:
    """A comma-separated flag's values (each one of ``known``, when given)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if known is not None and v not in known]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {known or 'numbers'}")
    return values


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=lambda t: [int(v) for v in listed(t)], default=[2, 4])
    parser.add_argument("--sizes", type=lambda t: [float(v) for v in listed(t)], default=[10.0, 100.0])
    parser.add_argument("--methods", type=lambda t: listed(t, METHODS), default=list(METHODS))
    parser.add_argument("--compressions", type=lambda t: listed(t, COMPRESSIONS), default=list(COMPRESSIONS))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per row, after a warm-up round")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one row may take in all")
    parser.add_argument("--keep", action="store_true", help="keep every peer's output")
    parser.add_argument("--json", action="store_true")
    return parser


HEADER = (
    f"{'PEERS':>5}{'MB':>7}  {'METHOD':<14}{'COMPRESSION':<13}{'MEDIAN s':>9}{'x GLOO':>8}{'MAX ERROR':>11}"
)


def format_row(row: Row) -> str:
    def figure(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    text = (
        f"{row.peers:>5}{row.mb:>7g}  {row.method:<14}{row.compression:<13}{figure(row.seconds, '.3f'):>9}"
        f"{figure(row.ratio, '.2f'):>8}{figure(row.max_error, '.3g'):>11}"
    )
    return text if row.ok else f"{text}  failed: {row.reason}"


def print_goals(found: dict[str, list[dict[str, Any]]]) -> None:
    print("\ngoals (issues #8 and #18; not asserted):")
    for name, entries in found.items():
        for e in entries:
            met = "met" if e["met"] else "not met"
            verdict = "no figure" if e["met"] is None else f"{e['ratio']:.2f}x, {met}"
            print(f"  {name:<30}{e['peers']:>3} peers {e['mb']:>5g} MB: {verdict}")


def main() -> int:
    args = parser().parse_args()
    # SIGTERM unwinds like Ctrl-C, so that the running row's peers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_at_start": os.getloadavg()[0]}
    methods = [m for m in METHODS if m in args.methods]
    root = Path(tempfile.mkdtemp(prefix="hivemarket-averaging-"))
    rows: list[Row] = []
    out = sys.stderr if args.json else sys.stdout
    print(HEADER, file=out, flush=True)
    market = Market(root / "coordinator")
    try:
        for peers in args.peers:
            for mb in args.sizes:
                baseline = None
                for method in methods:
                    for compression in compressions(method, args.compressions):
                        row = Row(peers, mb, method, compression)
                        measure(row, args, root / f"{peers}-{mb:g}-{method}-{compression}", market)
                        if method == "gloo":
                            baseline = row.seconds
                        if row.seconds is not None and baseline:
                            row.ratio = row.seconds / baseline
                        rows.append(row)
                        print(format_row(row), file=out, flush=True)
    finally:
        market.close()
        if args.keep:
            print(f"every peer's output: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    found = goals(rows)
    if args.json:
        result = {"machine": machine, "rows": [asdict(r) for r in rows], "goals": found}
        print(json.dumps(result, indent=1))
    else:
        print_goals(found)
        load = machine["load_at_start"]
        print(f"\n{machine['cpus']} CPUs, {machine['platform']}, load average {load:.1f} at the start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
