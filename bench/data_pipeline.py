"""Benchmark: the PrefetchLoader against a naive synchronous loop, for a training step of fixed cost.

The baseline reads and collates each batch in the training thread, then steps (same reader, same ids).
The step is fixed work, calibrated alone to take ``--step-ms``: matmuls on one torch thread (the
accelerator's share: the GIL is released, one core stands in for the device) interleaved with pure-Python
busy work (the dispatch share, ``--gil-share`` of the step, GIL held), as a real step alternates Python op
dispatch and kernels. The loader's raw throughput (no step) is measured too: the issue's goal is waiting
<= 1% of step time whenever that raw throughput exceeds what the model consumes.

"wait" is the time the loop spends inside ``next()``, timed around the call (the previous batch is freed
before it, as part of the step). The first batch of each pipeline pays for checking and indexing every
shard it touches (a shuffled assignment touches them all), so "steady" leaves the first batch out; "loader"
is the PrefetchLoader's own ``stats().wait_share``; "step ms" is the median step inside each loop, where
the tax of the workers' GIL time and CPU use shows (not waiting, but it costs throughput). The dataset is
built untimed in a temporary folder: CIFAR-sized records (3x32x32 uint8 image, int label) read in a seeded
random order, as an assignment would be. Each pipeline runs ``--repeat`` times, interleaved, with a fresh
reader each time; medians are printed.

    python bench/data_pipeline.py [--samples N] [--batch-size B] [--step-ms T] [--workers W]
                                  [--queue-depth D] [--gil-share F] [--shard-mb M] [--switch-interval S]
                                  [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer.data.loader import PrefetchLoader, collate_records
from peer.data.reader import DatasetReader
from peer.protocol.dataset import FieldSpec, Manifest, Schema, ShardWriter

GOAL_WAIT_SHARE = 0.01
SCHEMA = Schema(
    {"image": FieldSpec("tensor", "uint8", (3, 32, 32)), "label": FieldSpec("int")}, label="label"
)
MATMUL_SIZE = 192  # about 0.5 ms on one core: fine enough to calibrate a step of a few ms
CALIBRATION_ROUNDS = 5  # the fastest round is the step's cost on this machine when nothing else runs


@dataclass(frozen=True)
class Row:
    pipeline: str
    samples_per_s: float
    wait_share: float | None  # time inside next() / the loop's wall time; None with no step to wait between
    steady_wait_share: float | None  # the same without the first batch (pipeline fill and shard checks)
    first_wait_ms: float
    step_ms: float | None  # median time of one step inside this loop: the GIL's and the cores' tax shows here
    loader_wait_share: float | None  # PrefetchLoader.stats().wait_share, for the loader rows
    steps: int


class Step:
    """A training step of fixed work: alternating pure-Python dispatch (GIL held) and a matmul (released)."""

    def __init__(self, step_ms: float, gil_share: float):
        self._a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
        self._out = torch.empty_like(self._a)
        matmul_s = _seconds_per_call(lambda: torch.mm(self._a, self._a, out=self._out))
        self.kernels = max(1, round(step_ms / 1000 * (1 - gil_share) / matmul_s))
        loop_s = _seconds_per_call(lambda: _busy(10_000)) / 10_000
        self.dispatch = round(step_ms / 1000 * gil_share / loop_s / self.kernels)

    def __call__(self, batch: dict[str, Any]) -> float:
        checksum = float(batch["image"].float().mean()) + float(batch["label"].sum())
        for _ in range(self.kernels):
            _busy(self.dispatch)
            torch.mm(self._a, self._a, out=self._out)
        return checksum


def _busy(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i
    return total


def _seconds_per_call(fn: Callable[[], object], calls: int = 20) -> float:
    fn()
    rounds = []
    for _ in range(CALIBRATION_ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls)
    return min(rounds)


def build_dataset(root: Path, samples: int, shard_mb: float) -> Manifest:
    rng = np.random.default_rng(0)
    writer = ShardWriter(root, SCHEMA, int(shard_mb * (1 << 20)))
    images = rng.integers(0, 256, (samples, 3, 32, 32), dtype=np.uint8)
    for i in range(samples):
        writer.add({"image": images[i], "label": i % 10})
    return writer.finish("bench")


def timed_loop(name: str, batches: Iterator[Any], step: Step | None) -> Row:
    """Run the loop, timing each ``next`` (the wait) and the whole loop; the step runs in between."""
    waits: list[float] = []
    steps: list[float] = []
    samples = 0
    start = time.perf_counter()
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        waits.append(time.perf_counter() - asked)
        if batch is None:
            break
        samples += len(batch["label"])
        if step is not None:
            stepped = time.perf_counter()
            step(batch)
            steps.append(time.perf_counter() - stepped)
        del batch  # freeing it is the step's business, not time spent waiting for the next one
    seconds = time.perf_counter() - start
    fed = step is not None
    loader_wait = batches.stats().wait_share if fed and isinstance(batches, PrefetchLoader) else None
    return Row(
        name,
        samples / seconds,
        sum(waits) / seconds if fed else None,
        sum(waits[1:]) / (seconds - waits[0]) if fed else None,
        waits[0] * 1000,
        statistics.median(steps) * 1000 if fed else None,
        loader_wait,
        len(waits) - 1,
    )


def naive(reader: DatasetReader, ids: list[int], batch_size: int) -> Iterator[dict[str, Any]]:
    """The baseline: read and collate in the training thread."""
    for k in range(0, len(ids), batch_size):
        yield collate_records(reader.read(ids[k : k + batch_size]))


def median_row(rows: list[Row]) -> Row:
    values = {}
    for f in fields(Row):
        column = [getattr(r, f.name) for r in rows]
        values[f.name] = statistics.median(column) if isinstance(column[0], float | int) else column[0]
    return Row(**values)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    sys.setswitchinterval(args.switch_interval)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = build_dataset(root, args.samples, args.shard_mb)
        ids = list(range(manifest.samples))
        random.Random(0).shuffle(ids)
        step = Step(args.step_ms, args.gil_share)

        def reader() -> DatasetReader:
            return DatasetReader(manifest, lambda s: root / s.file)

        def loader() -> PrefetchLoader:
            return PrefetchLoader(
                reader(), ids, args.batch_size, workers=args.workers, queue_depth=args.queue_depth
            )

        in_memory = collate_records(reader().read(ids[: args.batch_size]))
        steps = -(-len(ids) // args.batch_size)
        runs: dict[str, list[Row]] = {}
        for _ in range(args.repeat):
            for name, make, fed in (
                ("model alone (batch in memory)", lambda: iter([in_memory] * steps), True),
                (f"prefetch loader raw, no step ({args.workers}w)", loader, False),
                ("naive synchronous loop", lambda: naive(reader(), ids, args.batch_size), True),
                (f"prefetch loader ({args.workers} workers)", loader, True),
            ):
                batches = make()
                try:
                    runs.setdefault(name, []).append(timed_loop(name, batches, step if fed else None))
                finally:
                    if isinstance(batches, PrefetchLoader):
                        batches.close()
    model, raw, baseline, prefetch = (median_row(rows) for rows in runs.values())
    return {
        "config": vars(args) | {"shards": len(manifest.shards), "step_kernels": step.kernels},
        "rows": [asdict(r) for r in (model, raw, baseline, prefetch)],
        "per_repeat": {name: [asdict(r) for r in rows] for name, rows in runs.items()},
        "model_consumes_samples_per_s": model.samples_per_s,
        "raw_exceeds_consumption": raw.samples_per_s > model.samples_per_s,
        "speedup_vs_naive": prefetch.samples_per_s / baseline.samples_per_s,
        "step_slowdown_vs_model_alone": model.samples_per_s / prefetch.samples_per_s,
        "goal_wait_share": GOAL_WAIT_SHARE,
        "goal_met_steady": (prefetch.steady_wait_share or 0.0) <= GOAL_WAIT_SHARE,
        "goal_met_overall": (prefetch.wait_share or 0.0) <= GOAL_WAIT_SHARE,
    }


def print_table(result: dict[str, Any]) -> None:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    header = (
        f"{'pipeline':<40} {'samples/s':>10} {'wait %':>7} {'steady %':>8} {'loader %':>8} {'1st ms':>7} "
        f"{'step ms':>7} {'steps':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        wait, steady, loader = (pct(r[k]) for k in ("wait_share", "steady_wait_share", "loader_wait_share"))
        print(
            f"{r['pipeline']:<40} {r['samples_per_s']:>10.0f} {wait:>7} {steady:>8} {loader:>8} "
            f"{r['first_wait_ms']:>7.1f} {'-' if r['step_ms'] is None else format(r['step_ms'], '.2f'):>7} "
            f"{r['steps']:>6}"
        )
    print(
        f"\nmedians of {result['config']['repeat']} runs. The raw loader "
        f"{'exceeds' if result['raw_exceeds_consumption'] else 'does NOT exceed'} what the model consumes "
        f"({result['model_consumes_samples_per_s']:.0f} samples/s); prefetch vs naive "
        f"{result['speedup_vs_naive']:.2f}x; model alone vs prefetch "
        f"{result['step_slowdown_vs_model_alone']:.2f}x."
        f"\ngoal wait <= {pct(result['goal_wait_share'])}% of step time: "
        f"steady {'met' if result['goal_met_steady'] else 'MISSED'}, "
        f"overall (first batch included) {'met' if result['goal_met_overall'] else 'MISSED'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000, help="dataset size = ids assigned")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=20.0, help="cost of one training step, alone")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue-depth", type=int, default=4)
    parser.add_argument("--gil-share", type=float, default=0.25, help="share of the step that holds the GIL")
    parser.add_argument("--shard-mb", type=float, default=4.0)
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=sys.getswitchinterval(),
        help="seconds between forced GIL hand-offs (sys.setswitchinterval), to show the GIL's part",
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs of each pipeline; medians are reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
