"""The GPU check: how much of one GPU a swarm of hivemarket peers sharing it turns into training, against
one plain PyTorch process training the same model on the same data and batch.

    python -m bench.gpu [--task bytes-lm|embed-lora] [--precision fp32|bf16] [--peers 2] [--seconds 60]
        [--dim 1024 --layers 8] [--json]

The workload (``--task``): ``bytes-lm``, the byte-level transformer of examples/bytes_lm.toml on the text
example, sized by ``--dim``/``--layers``/``--heads``; or ``embed-lora``, the LoRA adaptation of the
packaged MiniLM of examples/adapt_minilm.toml on the python-code example (needs ``hivemarket[hf]``;
only the adapters train and travel). ``--precision bf16`` computes micro-batches under bfloat16 autocast
where the GPU does it natively, in both the plain process and the peers (the spec's ``precision``).

Three measurements, one after the other on the same GPU:

- ``plain``: one process, no hivemarket: the workload's model trained with the spec's optimizer,
  ``--target`` samples a step in micro-batches of ``--micro``, read by the same loader the peers use
  (:class:`peer.data.loader.PrefetchLoader`);
- ``swarm``: the whole product on this machine (:class:`peer.demo.Demo`): a coordinator serving the
  dataset and ``--peers`` ``hivemarket rent`` peers on this GPU, matched to a run of the workload's spec
  with the same model, target batch and micro-batch. Each step the peers split the target batch, then
  all-reduce their gradients over loopback; verification audits run too;
- ``local``: the same swarm with ``local_updates`` (DiLoCo-style: an inner step per micro-batch, the
  parameters' change averaged once a step).

For each: samples/s over ``--seconds`` once training runs (the swarm's from the peers' event logs), the
GPU's busy fraction (NVML's utilization: the share of time a kernel ran, sampled every 0.2 s over the
same window), and the shares of time spent waiting for data and blocked on averaging. The issue's goal
is a busy fraction >= 95% and >= 0.95x the plain process's samples/s.

Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.local_market import epochs, market, steady_rate, workspace
from peer.protocol.spec import RunSpec

GOAL_BUSY = 0.95
GOAL_RATIO = 0.95
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class Workload:
    """A task to measure: its example spec, the example dataset it trains on and the default batch."""

    spec: str
    dataset: str
    micro: int
    target: int


WORKLOADS = {
    "bytes-lm": Workload("bytes_lm.toml", "text", micro=64, target=4096),
    "embed-lora": Workload("adapt_minilm.toml", "python-code", micro=32, target=512),
}


class Busy:
    """Samples NVML's GPU utilization (and memory used) in a thread; ``busy`` is the mean over a window.
    With ``gpu`` False (a dry run on the CPU) it samples nothing."""

    def __init__(self, gpu: bool, index: int = 0, interval: float = 0.2):
        self._samples: list[tuple[float, int, int]] = []  # (time, utilization %, memory bytes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not gpu:
            return
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._interval = interval
        self._thread = threading.Thread(target=self._sample, name="nvml", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self._samples.append((time.time(), int(rates.gpu), int(memory)))

    def window(self, start: float, end: float) -> dict[str, float]:
        inside = [s for s in self._samples if start <= s[0] <= end]
        if not inside:
            return {"busy": 0.0, "memory_gib": 0.0}
        return {
            "busy": round(sum(s[1] for s in inside) / len(inside) / 100, 3),
            "memory_gib": round(max(s[2] for s in inside) / 2**30, 2),
        }

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._nvml.nvmlShutdown()


def workload_spec(args: argparse.Namespace) -> RunSpec:
    from peer.protocol.spec import load_spec

    return load_spec(EXAMPLES / WORKLOADS[args.task].spec)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The model's options: bytes-lm sized by the command line, the others as their spec has them."""
    if args.task == "bytes-lm":
        return {"dim": args.dim, "layers": args.layers, "heads": args.heads, "dropout": 0.0}
    return dict(workload_spec(args).options)


def plain(args: argparse.Namespace, dataset: Path, busy: Busy) -> dict[str, Any]:
    """One process trains the model alone for ``args.seconds`` (after one warm-up step)."""
    from peer.data.loader import PrefetchLoader
    from peer.data.reader import DatasetReader
    from peer.protocol.dataset import load_manifest
    from peer.samples import train_ids
    from peer.tasks import load_task, trained_parameters
    from peer.trainer_setup import make_optimizer, training_autocast

    spec = workload_spec(args)
    task = load_task(spec.task, options(args))
    device = torch.device("cpu" if args.cpu else "cuda")
    autocast = training_autocast(args.precision, device)
    model = task.build_model(spec.seed).to(device)
    params = trained_parameters(model)
    optimizer = make_optimizer(spec, params)
    manifest = load_manifest(dataset)
    reader = DatasetReader(manifest, lambda s: dataset / s.file)
    ids = train_ids(np.arange(manifest.samples), spec.dataset.test_every)
    micro = args.target // args.micro

    def step(offset: int) -> float:
        """One optimizer step of ``args.target`` samples; the seconds spent waiting for batches."""
        chosen = [int(ids[(offset + i) % len(ids)]) for i in range(args.target)]
        loader = PrefetchLoader(reader, chosen, args.micro, collate=task.batch, device=device)
        with loader:
            for batch in loader:
                with torch.autocast(
                    device.type, dtype=autocast or torch.float32, enabled=autocast is not None
                ):
                    loss = task.loss(model, batch)
                (loss / micro).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loader.stats().wait_seconds

    sync = (lambda: None) if args.cpu else torch.cuda.synchronize
    step(0)
    sync()
    start, steps, waited = time.time(), 0, 0.0
    while time.time() - start < args.seconds:
        waited += step((steps + 1) * args.target)
        steps += 1
    sync()
    end = time.time()
    seconds = end - start
    return {
        "mode": "plain",
        "samples_per_s": round(steps * args.target / seconds, 1),
        "steps": steps,
        "seconds": round(seconds, 1),
        **busy.window(start, end),
        "data_wait": round(waited / seconds, 4),
        "blocked": 0.0,
        "longest_block_s": 0.0,
    }


def swarm(args: argparse.Namespace, folder: Path, busy: Busy, local_updates: bool) -> dict[str, Any]:
    """``args.peers`` hivemarket peers on this GPU train a run of the same model; measured from the
    moment every peer has finished an epoch, for ``args.seconds``."""
    workload = WORKLOADS[args.task]
    changes = {
        "options": options(args),
        "precision": args.precision,
        "batch": {"target": args.target, "per_peer": args.micro},
        "stop": {"epochs": 1000},  # the measurement ends it, not the run
        "averaging": {"local_updates": local_updates, "timeout_seconds": 60.0},
        # audits recompute gradients at an epoch's start, which inner steps move away from
        **({"verification": {"rate": 0.0}} if local_updates else {}),
    }
    with market(folder, args.peers, changes=changes, timeout=args.timeout, spec=workload.spec,
                dataset=workload.dataset) as demo:  # fmt: skip
        demo.wait(
            "every peer to finish an epoch",
            lambda: True if len({e["peer"] for e in epochs(demo)}) == args.peers else None,
            interval=1.0,
        )
        start = time.time()
        demo.wait("the measurement window", lambda: True if time.time() - start >= args.seconds else None)
        end = time.time()
        inside = [e for e in epochs(demo) if start <= e["time"] <= end]
    seconds = end - start
    # per peer: the time its steps took (compute and round), over which waits and blocks are shares
    stepping = sum(e["compute_s"] + e["round_s"] for e in inside) / args.peers or 1e-9
    return {
        "mode": "local" if local_updates else "swarm",
        "samples_per_s": round(steady_rate(inside, seconds), 1),
        "steps": len({e["epoch"] for e in inside}),
        "seconds": round(seconds, 1),
        **busy.window(start, end),
        "data_wait": round(sum(e.get("data_s", 0.0) for e in inside) / args.peers / stepping, 4),
        "blocked": round(sum(e["round_s"] for e in inside) / args.peers / stepping, 4),
        "longest_block_s": round(max((e["round_s"] for e in inside), default=0.0), 2),
        "epochs_lost": sum(e["outcome"] != "averaged" for e in inside),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(WORKLOADS), default="bytes-lm", help="the workload")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="the spec's precision")
    p.add_argument("--peers", type=int, default=2, help="hivemarket peers sharing the GPU")
    p.add_argument("--seconds", type=float, default=90.0, help="measurement window of each mode")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument(
        "--micro", type=int, help="micro-batch [bytes-lm: 64 samples of 128 bytes; embed-lora: 32]"
    )
    p.add_argument("--target", type=int, help="samples a step, all peers [bytes-lm: 4096; embed-lora: 512]")
    p.add_argument("--modes", default="plain,swarm,local")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds one swarm mode may take")
    p.add_argument("--keep", action="store_true", help="keep the logs")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cpu", action="store_true", help="a dry run on the CPU (tests): the busy share is 0")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    workload = WORKLOADS[args.task]
    args.micro = args.micro or workload.micro
    args.target = args.target or workload.target
    if not args.cpu and not torch.cuda.is_available():
        reason = "no CUDA GPU on this machine: nothing to measure"
        print(json.dumps({"gpu": None, "reason": reason}) if args.json else reason)
        return 0
    from peer.data.examples import build_example

    name = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    model = _model(args)
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    busy = Busy(gpu=not args.cpu)
    try:
        with workspace("gpu", args.keep) as folder:
            dataset = folder / workload.dataset
            build_example(workload.dataset, dataset, shard_bytes=1 << 20)
            for mode in args.modes.split(","):
                print(f"measuring {mode} ...", file=sys.stderr)
                try:
                    if mode == "plain":
                        rows.append(plain(args, dataset, busy))
                    else:
                        rows.append(swarm(args, folder / mode, busy, local_updates=mode == "local"))
                except Exception as e:  # one mode's failure still leaves the others' figures
                    rows.append({"mode": mode, "error": repr(e)[:500]})
                print(json.dumps(rows[-1]), file=sys.stderr)  # a run cut short still leaves these
    finally:
        busy.close()
    baseline = next((r["samples_per_s"] for r in rows if r["mode"] == "plain"), None)
    for row in rows:
        if "error" in row:
            continue
        row["ratio"] = round(row["samples_per_s"] / baseline, 3) if baseline else None
        row["goal_met"] = bool(row["ratio"] and row["ratio"] >= GOAL_RATIO and row["busy"] >= GOAL_BUSY)
    result = {
        "gpu": name,
        "machine": f"{platform.node()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "model": f"{args.task} ({_shape(args)}), {params / 1e6:.1f}M parameters, "
        f"{trained / 1e6:.2f}M trained, {args.precision}",
        "batch": {"target": args.target, "micro": args.micro, "peers": args.peers},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{name}: {result['model']}; target batch {args.target}, micro-batch {args.micro}")
    print(f"{'MODE':<8}{'SAMPLES/S':>11}{'RATIO':>8}{'BUSY':>7}{'DATA':>7}{'BLOCKED':>9}{'LONGEST s':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<8}failed: {r['error']}")
            continue
        print(f"{r['mode']:<8}{r['samples_per_s']:>11}{r['ratio'] or 0:>8.3f}{r['busy']:>7.0%}"
              f"{r['data_wait']:>7.1%}{r['blocked']:>9.1%}{r['longest_block_s']:>11}")  # fmt: skip
    return 0


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from peer.tasks import load_task

    return load_task(workload_spec(args).task, options(args)).build_model(0)


def _shape(args: argparse.Namespace) -> str:
    if args.task == "bytes-lm":
        return f"dim {args.dim}, {args.layers} layers"
    o = options(args)
    return f"LoRA rank {o['rank']} on {o['targets']}, last {o['layers']} layers"


if __name__ == "__main__":
    sys.exit(main())
