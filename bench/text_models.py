"""Benchmark: does a small Llama-style model over BPE tokens (``causal-lm`` on ``text-bpe``) reach a lower
held-out loss than the byte-level baseline (``bytes-lm`` on ``text``) after the same number of training
samples, on the same text?

Both datasets are CPython's documentation (``pydoc_data.topics``), built untimed in a temporary folder:
``text`` as 128-byte samples, ``text-bpe`` as 64-token samples (about 266 bytes each). Each model takes
its options from its example spec (examples/bytes_lm.toml, examples/llama_tiny.toml) unless flags change
them, is built with the same seed and trained in this process, one after the other, with the same
optimizer (AdamW, ``--lr``, ``--weight-decay``; linear warm-up over the first ``--warmup`` of the steps,
then cosine decay to zero), the same micro-batch (``--batch``) and the same number of training samples
(``--samples``, drawn in a seeded shuffle of the training split, epoch after epoch). Held out: every
sample with id % ``--test-every`` == ``--test-every`` - 1, as a run spec's ``test_every`` holds it out.

Loss is compared in bits per byte of text, the only unit both share: bytes-lm's loss is nats per byte
(bits per byte = loss / ln 2), causal-lm's is nats per BPE token, turned into bits per byte with the bytes
each predicted token stands for (the dataset's ``target_bytes``). The ratio is causal-lm's over bytes-lm's:
below 1 means the Llama-style model predicts the held-out text better. Since a BPE sample covers about
twice the text of a byte sample, ``--budget bytes`` instead gives bytes-lm as many samples as it needs to
see the same number of bytes of text. Compute differs too and is reported (FLOPs per sample, wall time).

    python bench/text_models.py [--samples N] [--budget samples|bytes] [--batch B] [--lr LR]
                                [--evals K] [--threads T] [--seed S] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peer.data.examples import build_example  # noqa: E402
from peer.data.reader import DatasetReader  # noqa: E402
from peer.protocol.spec import load_spec  # noqa: E402
from peer.samples import test_ids, train_ids  # noqa: E402
from peer.tasks import Task  # noqa: E402
from peer.tasks.bytes_lm import BytesLM  # noqa: E402
from peer.tasks.causal_lm import CausalLM  # noqa: E402

BASELINE = "bytes-lm"
CANDIDATE = "causal-lm"


@dataclass
class Contender:
    name: str
    task: Task
    reader: DatasetReader
    train: np.ndarray
    test: list[int]
    bytes_per_sample: float  # bytes of text one sample's predicted positions stand for


def _dataset(name: str, folder: Path) -> DatasetReader:
    manifest = build_example(name, folder / name, shard_bytes=64 << 20).manifest
    return DatasetReader(manifest, lambda s: folder / name / s.file)


def _bits_per_byte(contender: Contender, model: torch.nn.Module, batch_size: int) -> float:
    """Held-out bits per byte over the whole test split (nats summed, then divided by the bytes)."""
    nats = predicted_bytes = 0.0
    for start in range(0, len(contender.test), batch_size):
        records = contender.reader.read(contender.test[start : start + batch_size])
        metrics = contender.task.evaluate(model, contender.task.batch(records))
        if "bits_per_byte" in metrics:  # causal-lm on text-bpe: the dataset knows each sample's bytes
            chunk_bytes = float(sum(r["target_bytes"] for r in records))
            nats += metrics["bits_per_byte"] * math.log(2) * chunk_bytes
        else:  # bytes-lm: one predicted byte a position
            chunk_bytes = float(len(records) * (len(records[0]["tokens"]) - 1))
            nats += metrics["loss"] * chunk_bytes
        predicted_bytes += chunk_bytes
    return nats / math.log(2) / predicted_bytes


def _train(contender: Contender, samples: int, args: argparse.Namespace) -> dict[str, Any]:
    task = contender.task
    model = task.build_model(args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = max(1, math.ceil(samples / args.batch))
    warmup = max(1, int(args.warmup * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = np.random.default_rng(args.seed)
    order: list[int] = []
    checkpoints = {max(1, round(steps * (k + 1) / args.evals)) for k in range(args.evals)}
    curve = [{"samples": 0, "bits_per_byte": _bits_per_byte(contender, model, args.eval_batch)}]
    seen = 0
    train_seconds = 0.0
    for step in range(1, steps + 1):
        take = min(args.batch, samples - seen)
        while len(order) < take:
            order.extend(rng.permutation(contender.train).tolist())
        ids, order = order[:take], order[take:]
        batch = task.batch(contender.reader.read(ids))
        started = time.perf_counter()
        model.train()
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        train_seconds += time.perf_counter() - started
        seen += take
        if step in checkpoints:
            bpb = _bits_per_byte(contender, model, args.eval_batch)
            curve.append({"samples": seen, "bits_per_byte": bpb, "train_loss": float(loss.detach())})
            if not args.json:
                print(f"  {contender.name}: {seen} samples, held-out {bpb:.4f} bits/byte", file=sys.stderr)
    return {
        "task": contender.name,
        "parameters": parameters,
        "samples": seen,
        "steps": steps,
        "text_bytes_seen": round(seen * contender.bytes_per_sample),
        "epochs": round(seen / len(contender.train), 3),
        "flops_per_sample": task.flops_per_sample(contender.reader.manifest.schema),
        "train_seconds": round(train_seconds, 2),
        "held_out_samples": len(contender.test),
        "held_out_bits_per_byte": curve[-1]["bits_per_byte"],
        "curve": curve,
    }


def _options(example: str) -> dict[str, Any]:
    return dict(load_spec(REPO / "examples" / example).options)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=4096, help="training samples of the causal-lm model")
    parser.add_argument(
        "--budget",
        choices=("samples", "bytes"),
        default="samples",
        help="bytes-lm trains on as many samples, or on as many bytes of text",
    )
    parser.add_argument("--batch", type=int, default=32, help="samples per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the steps that warm up")
    parser.add_argument("--test-every", type=int, default=20)
    parser.add_argument("--evals", type=int, default=4, help="held-out evaluations along the way")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--layers", type=int, help="both models' layers [default: their example specs']")
    parser.add_argument("--dim", type=int, help="both models' width [default: their example specs']")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    byte_options, llama_options = _options("bytes_lm.toml"), _options("llama_tiny.toml")
    for name in ("layers", "dim"):
        if getattr(args, name):
            byte_options[name] = llama_options[name] = getattr(args, name)
    if args.dim:
        llama_options["ffn"] = 0  # the task's 4 x dim rule rather than the example's 344

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        contenders = []
        for name, task, dataset in (
            (BASELINE, BytesLM(**byte_options), "text"),
            (CANDIDATE, CausalLM(**llama_options), "text-bpe"),
        ):
            reader = _dataset(dataset, folder)
            total = reader.manifest.samples
            everything = reader.read(list(range(total)))
            if "target_bytes" in everything[0]:
                per_sample = float(np.mean([r["target_bytes"] for r in everything]))
            else:
                per_sample = float(len(everything[0]["tokens"]) - 1)
            contenders.append(
                Contender(
                    name,
                    task,
                    reader,
                    train_ids(np.arange(total), args.test_every),
                    test_ids(total, args.test_every).tolist(),
                    per_sample,
                )
            )
        setup_seconds = time.perf_counter() - started
        baseline, candidate = contenders
        baseline_samples = args.samples
        if args.budget == "bytes":
            baseline_samples = round(args.samples * candidate.bytes_per_sample / baseline.bytes_per_sample)
        results = [_train(baseline, baseline_samples, args), _train(candidate, args.samples, args)]
    ratio = results[1]["held_out_bits_per_byte"] / results[0]["held_out_bits_per_byte"]
    report = {
        "budget": args.budget,
        "settings": {
            k: getattr(args, k)
            for k in ("samples", "batch", "lr", "weight_decay", "warmup", "test_every", "seed", "threads")
        },
        "threads": torch.get_num_threads(),
        "options": {BASELINE: byte_options, CANDIDATE: llama_options},
        "baseline": results[0],
        "candidate": results[1],
        "ratio": ratio,  # candidate / baseline held-out bits per byte: below 1, the Llama-style model wins
        "candidate_better": ratio < 1,
        "setup_seconds": round(setup_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for result in results:
            print(
                f"{result['task']:>9}: {result['parameters']:,} parameters, {result['samples']} samples "
                f"({result['epochs']} epochs, {result['text_bytes_seen']:,} bytes of text), "
                f"{result['train_seconds']:.1f} s: held-out {result['held_out_bits_per_byte']:.4f} bits/byte"
            )
        print(
            f"ratio causal-lm / bytes-lm: {ratio:.3f} ({'below' if ratio < 1 else 'not below'} the baseline)"
        )
    return report


if __name__ == "__main__":
    main()
