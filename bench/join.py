"""Time to join: ``python -m bench.join [--mb 100] [--trials 3] [--timers product|local] [--json]``.

How long a volunteer takes from ``hivemarket peer start --coordinator URL`` to its first counted
contribution: its first report the coordinator acknowledged (``report_accepted`` in its event log),
joining a swarm that is already training a model of ``--mb`` MB (10^6 bytes of fp32 parameters).

The whole product on this machine (:mod:`bench.local_market`): a coordinator, 2 renting peers training
a run of examples/bytes_lm.toml whose ``dim`` is chosen (``--layers`` layers, 4 heads) so that the
parameters come closest to ``--mb`` MB, on a small batch (``--target`` samples a step in micro-batches
of ``--per-peer``: a sample of this 100 MB model is about 0.5 s of one core here), and ``peers_max`` 3
so that the volunteer is matched into the run under way. Each trial starts one volunteer with a new
identity, waits for its first acknowledged report, then stops it and waits until the run has let it go
(its lease lapses), so that the next trial's volunteer takes the same place in the same run.

``peer start --coordinator`` is the volunteer's command (an offer at price 0, its trainer started
when matched, as ``rent`` does); it also starts the node's own DHT and publishes its capability record
before it posts the offer, which ``rent`` does not.

The time is broken down from what the processes recorded, in seconds since the bench started the
volunteer's process: the offer posted (the coordinator's ``updated_at`` of its offer), matched to the
run (its match's ``matched_at``), its trainer process started (the kernel's start time of the process),
joined the run's swarm (``joined_at``: the run's DHT is up and the coordinator told), the state loaded
(``state_loaded``), its first counted epoch done (the ``epoch`` event of its first acknowledged
report) and that report acknowledged. Every clock is this machine's.

A volunteer loads the state of the epoch the others are training and trains that epoch late; their
round waits for it at most ``averaging.matchmaking_seconds`` (the spec's 1 s), and a volunteer that
misses the round loads the state again and tries the next epoch. ``--matchmaking`` sets that wait, to
show what the missed rounds cost.

``--timers product`` (the default) runs the market with the product's own timers, as a volunteer
meets them: a 2 s hardware probe before the offer, a clearing round every 3 s, a heartbeat every 5 s
(the worker learns of its match from the next heartbeat's answer). ``--timers local`` keeps the local
market's shortened ones (``peer.demo``: 0.3 s, 1 s and 1 s).

The issue's goal is <= 10 s on loopback; the bench reports whether the median meets it and asserts
nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.local_market import LOST, launched, workspace
from peer.demo import Child, Demo, DemoError
from peer.protocol.identity import Identity, save_identity

PEERS = 2  # training when the volunteer arrives
GOAL_S = 10.0
HEADS = 4
WARM_UP = 3  # epochs every training peer finishes before the first volunteer starts
#: The local market's shortened timers (peer.demo), left out with ``--timers product``.
LOCAL_TIMERS = ("HIVEMARKET_PROBE_SECONDS", "HIVEMARKET_HEARTBEAT_INTERVAL", "HIVEMARKET_CLEARING_INTERVAL")
STAGES = (
    "offer posted",
    "matched",
    "trainer started",
    "joined the swarm",
    "state loaded",
    "first epoch done",
    "report accepted",
)


class JoinDemo(Demo):
    """The local market, with the product's own timers unless ``local_timers``."""

    def __init__(self, local_timers: bool, timeout: float, folder: Path):
        super().__init__(
            PEERS, False, lambda line: print(line, file=sys.stderr), timeout, folder,
            spec="bytes_lm.toml", dataset="text",
        )  # fmt: skip
        self.local_timers = local_timers

    def _env(self, home: Path, **extra: str) -> dict[str, str]:
        env = super()._env(home, **extra)
        if not self.local_timers:
            for key in LOCAL_TIMERS:
                del env[key]
        return env


def model_options(mb: float, layers: int) -> tuple[dict[str, Any], int]:
    """The bytes-lm options of ``layers`` layers whose fp32 parameters come closest to ``mb`` MB (the
    width a multiple of 32), and their parameter count. Counted on the meta device: nothing allocated."""
    import torch

    from peer.tasks import load_task

    def count(dim: int) -> int:
        with torch.device("meta"):
            model = load_task("bytes-lm", options(dim)).build_model(0)
        return sum(p.numel() for p in model.parameters())

    def options(dim: int) -> dict[str, Any]:
        return {"dim": dim, "layers": layers, "heads": HEADS, "dropout": 0.0}

    best = (32, count(32))
    for dim in range(64, 8193, 32):
        params = count(dim)
        if abs(params * 4 / 1e6 - mb) < abs(best[1] * 4 / 1e6 - mb):
            best = (dim, params)
        if params * 4 / 1e6 > mb:  # wider only grows further off
            break
    return options(best[0]), best[1]


def first(events: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((e for e in events if e["event"] == kind), None)


def matched(demo: Demo, account: str) -> bool:
    """Whether ``account`` holds a place in the run now."""
    view = demo.ask(lambda c: c.run(demo.run_id))
    return any(p.account == account and p.state == "active" for p in view.peers)


def trial(demo: Demo, index: int, last: bool, timeout: float) -> dict[str, Any]:
    """One volunteer joins the run; its stages up to its first acknowledged report, or the error if it
    had none within ``timeout`` seconds. Unless ``last``, it is stopped and the run has let it go (so
    that the next volunteer takes its place) on return."""
    name = f"volunteer-{index}"
    home = demo.tmp / name
    home.mkdir(parents=True)
    identity = Identity.generate()
    save_identity(identity, home / "identity.pem")  # where `peer start` looks by default
    argv = ["peer", "start", "--coordinator", demo.url, "--listen", f"/ip4/{demo.host(name)}/tcp/0"]
    demo.deadline = time.monotonic() + timeout  # every wait of the demo's counts from here
    started = time.time()
    child = demo._spawn(name, argv, home)
    try:
        result = stages(demo, name, identity.account, child, started)
    except DemoError as e:  # one volunteer that never contributed is a figure, not the end of the bench
        result = {"seconds": None, "error": str(e)}
    print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    if not last:
        demo.dropped_names.add(name)
        child.stop(demo.settings.shutdown_timeout)
        demo.deadline = time.monotonic() + timeout
        demo.wait(
            f"the run to let {name} go",
            lambda: None if matched(demo, identity.account) else True,
            interval=0.5,
        )
    return result


def stages(demo: Demo, name: str, account: str, child: Child, started: float) -> dict[str, Any]:
    """Wait for the volunteer's first acknowledged report; the seconds from ``started`` (wall clock,
    when its process was started) to each of its stages."""
    report = demo.wait(
        f"{name}'s first acknowledged report",
        lambda: first(demo.events(name), "report_accepted"),
        interval=0.1,
    )
    events = demo.events(name)
    trainer = demo.trainer(name)
    # A process's start time (psutil) counts from the boot time, which Linux gives in whole seconds: the
    # trainer's is taken relative to the volunteer's own process, whose start the bench timed.
    spawned = psutil.Process(child.proc.pid).create_time()
    offer = next(o for o in demo.ask(lambda c: c.offers()) if o.account == account)
    view = demo.ask(lambda c: c.run(demo.run_id))
    match = next(p for p in view.peers if p.account == account and p.state == "active")
    loaded = first(events, "state_loaded")
    # its last try at that epoch before the report (a round that failed is trained again: `redo`)
    epoch = [e for e in events if e["event"] == "epoch" and e["epoch"] == report["epoch"]][-1]
    times = (
        offer.updated_at,
        match.matched_at,
        started + trainer.create_time() - spawned if trainer is not None else None,
        match.joined_at,
        loaded["time"] if loaded is not None else None,
        epoch["time"],
        report["time"],
    )
    seconds = {s: None if t is None else round(t - started, 2) for s, t in zip(STAGES, times, strict=True)}
    return {
        "seconds": seconds["report accepted"],
        "stages": seconds,
        "epoch": report["epoch"],
        "epoch_outcome": epoch["outcome"],
        "state_source": loaded["source"] if loaded is not None else None,
        # epochs it trained and discarded first (a round it missed: the wait that found it missed, then
        # the state of the peers further on loaded again)
        "epochs_lost": sum(
            e["event"] == "epoch" and e["outcome"] in LOST and e["time"] <= report["time"] for e in events
        ),
    }


def epochs_done(demo: Demo, name: str) -> int:
    return sum(e["event"] == "epoch" for e in demo.events(name))


def epoch_period(demo: Demo, until: float) -> float | None:
    """The median time between the training peers' consecutive epochs before ``until``: what a joiner
    waits at most for the epoch under way to end, and what its own first epoch takes."""
    gaps = []
    for name in demo.names().values():
        ends = [e["time"] for e in demo.events(name) if e["event"] == "epoch" and e["time"] < until]
        gaps += [b - a for a, b in itertools.pairwise(ends)]
    return round(statistics.median(gaps), 2) if gaps else None


def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    options, params = model_options(args.mb, args.layers)
    changes = {
        "options": options,
        "batch": {"target": args.target, "per_peer": args.per_peer},
        "stop": {"epochs": 1000},  # the bench ends it
        "peers": {"min": PEERS, "max": PEERS + 1},
        **({"averaging": {"matchmaking_seconds": args.matchmaking}} if args.matchmaking else {}),
    }
    demo = JoinDemo(args.timers == "local", args.timeout, folder)  # set-up: the trials time their own
    with launched(demo, PEERS, peers_min=PEERS, peers_max=PEERS + 1, changes=changes):
        demo.wait(
            f"every peer to finish {WARM_UP} epochs",
            lambda: True if all(epochs_done(demo, n) >= WARM_UP for n in demo.names().values()) else None,
            interval=0.5,
        )
        period = epoch_period(demo, time.time())
        trials = [trial(demo, i, i == args.trials - 1, args.trial_timeout) for i in range(args.trials)]
    totals = [t["seconds"] for t in trials if t["seconds"] is not None]
    median = statistics.median(totals) if totals else None
    return {
        "model": {**options, "parameters": params, "mb": round(params * 4 / 1e6, 1)},
        "batch": {"target": args.target, "per_peer": args.per_peer},
        "peers_training": PEERS,
        "timers": args.timers,
        "matchmaking_s": args.matchmaking,
        "epoch_period_s": period,
        "trials": trials,
        "median_s": median,
        "max_s": max(totals, default=None),
        "failed": len(trials) - len(totals),
        "goal_s": GOAL_S,
        "goal_met": median is not None and len(totals) == len(trials) and median <= GOAL_S,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=100.0, help="the model's fp32 parameters, in MB (10^6 bytes)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--target", type=int, default=8, help="samples a step, all peers together")
    p.add_argument("--per-peer", type=int, default=2, help="micro-batch, in samples of 128 bytes")
    p.add_argument(
        "--matchmaking",
        type=float,
        help="the run's averaging.matchmaking_seconds [default: the spec's]: how long the peers in a round "
        "wait for a member that is late, such as a volunteer still loading the state",
    )
    p.add_argument("--trials", type=int, default=3, help="volunteers joining, one after the other")
    p.add_argument("--timers", choices=("product", "local"), default="product")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds the set-up may take")
    p.add_argument(
        "--trial-timeout", type=float, default=600.0, help="seconds a volunteer may take to contribute"
    )
    p.add_argument("--keep", action="store_true", help="keep the logs")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with workspace("join", args.keep) as folder:
        result = measure(args, folder)
    if args.json:
        print(json.dumps(result))
        return 0
    m = result["model"]
    matchmaking = f"{args.matchmaking:g} s" if args.matchmaking else "the spec's"
    print(
        f"bytes-lm dim {m['dim']}, {m['layers']} layers: {m['parameters'] / 1e6:.1f}M parameters, "
        f"{m['mb']} MB fp32; batch {args.target} (micro-batches of {args.per_peer}); {PEERS} peers "
        f"training, an epoch every {result['epoch_period_s']} s; {args.timers} timers; matchmaking "
        f"{matchmaking}"
    )
    print(
        f"{'SECONDS SINCE `peer start`':<28}" + "".join(f"{f'TRIAL {i + 1}':>9}" for i in range(args.trials))
    )
    rows = [(stage, [t.get("stages", {}).get(stage) for t in result["trials"]]) for stage in STAGES]
    rows.append(("epochs lost before", [t.get("epochs_lost") for t in result["trials"]]))
    for label, cells in rows:
        print(f"{label:<28}" + "".join(f"{'-' if c is None else c:>9}" for c in cells))
    for i, t in enumerate(result["trials"]):
        if "error" in t:
            print(f"trial {i + 1} failed: {t['error']}")
    met = "met" if result["goal_met"] else "not met"
    print(f"join: median {result['median_s']} s, max {result['max_s']} s (goal <= {GOAL_S:g} s: {met})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
