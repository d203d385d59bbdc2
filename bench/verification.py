"""Benchmark: audits catch each cheat, never an honest peer, and cost the swarm little compute.

Everything runs in this process on a real task and dataset (``--task``: the digits MLP by default,
``embed-lora`` for MiniLM adapted with LoRA, ``causal-lm`` for the small Llama; each with the options,
dataset and micro-batch of its example spec, the dataset built untimed in a temporary folder) with the
code peers and the coordinator run: the contribution behaviours of peer.adversary, the recomputation of
peer.validator, the draw and the verdict of coordinator.verification, at the default ``[verification]``
settings of a run spec unless flags change them.

1. Catch rate. ``--trials`` trials per cheat. A trial is a fresh run (a new secret audit key, a new model
   seed) of ``--epochs`` epochs; each epoch the cheat reports ``--micro-batches`` micro-batches of
   ``--per-peer`` samples, the coordinator's draw picks micro-batches, a validator recomputes them at the
   epoch's start parameters and the trial counts as caught at the first failed audit. Between epochs the
   model takes an honest step, as the swarm would. Besides the audits, the update the cheat puts into the
   round (what a fast-path member commits to) is checked against its report as the coordinator does
   (peer.protocol.commitment); ``poisoned-round`` is caught there. Goal: >= 99% within 5 epochs.
2. False positives (``FAILED`` counts failed audits and failed round checks: ``ROUNDS`` epochs' updates
   checked against their reports, ``MAX ROUND DIST`` against peer.protocol.commitment's tolerance).
   ``--honest-audits`` audits of honest reports (and ``--honest-rounds`` round checks), recomputed by a
   float32 CPU validator while the reporting peer computed (a) the same way, (b) on another number of
   threads, (c) in bfloat16 autocast (reduced precision), (d) on CUDA, where a GPU is present. Prints
   the largest sketch distance and loss gap per condition against the tolerances, and the count of
   failed audits. Goal: 0.
3. Cost. For one peer of a ``--peers``-peer swarm whose epoch is ``--cost-micro-batches`` micro-batches
   of the task's (its example spec's micro-batch; for digits, ``--cost-per-peer`` samples of the bytes-lm
   transformer instead, ``--cost-dim``, ``--cost-layers``: the digits MLP does too little work per sample
   to stand for a model anyone rents GPUs for): the time it
   spends on verification (sketching each micro-batch's gradient, drawing the epoch's sketchers, keeping
   the epoch's start parameters, recomputing its share of the audits: on average as many as one report
   draws; the data of audited samples is read from the local cache, as after a first fetch) over the time
   it spends
   training (the same micro-batches without sketches). Every peer reports and audits alike, so this is
   the swarm's ratio. Goal: <= 5%. Per micro-batch timings are medians of ``--repeat`` micro-batches.

    python bench/verification.py [--task digits-mlp|embed-lora|causal-lm]
                                 [--trials N] [--epochs E] [--micro-batches M] [--per-peer B]
                                 [--honest-audits N] [--honest-rounds N] [--cost-micro-batches M]
                                 [--cost-per-peer B]
                                 [--cost-dim D] [--cost-layers L] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.capacity import CapacityPolicy, Delivery, assess, capped_units, entitled_units
from coordinator.runs import report_pay
from coordinator.verification import (
    AuditPolicy,
    canary_block,
    canary_due,
    canary_verdict,
    choose_audits,
    claim_rank,
    validator_banned,
    verdict,
)
from peer.adversary import KINDS, EpochWork, behaviour, local_work
from peer.data.examples import build_example
from peer.data.reader import DatasetReader
from peer.protocol.commitment import binding
from peer.protocol.run_schemas import AuditResultBody, AuditTask
from peer.protocol.sketch import grad_seed, params_seed
from peer.protocol.spec import load_spec
from peer.samples import train_ids
from peer.sketch import Sketcher
from peer.tasks import Task, load_task, trained_parameters
from peer.tasks.bytes_lm import BytesLM
from peer.tasks.digits import DigitsMLP
from peer.validator import Snapshots, Validator, micro_batch_gradient, micro_seed

RUN = "run-bench"
PEER = "c" * 64
GOAL_CATCH = 0.99
GOAL_COST = 0.05
LR = 0.1
# The capacity-liar row (capacity_trials): the reference machine's samples/s and probed TFLOP/s, what the
# liar claims over its probe, the log-normal noise of probes and of epochs, a round's seconds, a throttled
# GPU's speed (and clock ratio), each peer's share of an epoch, the unit price (units an hour per TFLOP/s),
# and the share of its compute time a peer reporting a tiny ``seconds`` reports.
SPEED, TFLOPS, LIE, PROBE_NOISE, NOISE, ROUND_S, THROTTLE, SHARE, UNIT, TINY = (
    200.0,
    10.0,
    4.0,
    0.05,
    0.1,
    0.2,
    0.6,
    64,
    1e5,
    0.01,
)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: The task of each row and the example spec whose options, dataset and micro-batch it takes.
TASKS = {"digits-mlp": "digits.toml", "embed-lora": "adapt_minilm.toml", "causal-lm": "llama_tiny.toml"}


@dataclass
class Data:
    reader: DatasetReader
    ids: list[int]  # the training split


@dataclass
class Setting:
    task: Task
    data: Data
    per_peer: int  # the example spec's micro-batch
    label: str


def load_setting(name: str, folder: Path) -> Setting:
    """The task ``name`` as its example spec sets it up, on that spec's example dataset."""
    spec = load_spec(EXAMPLES / TASKS[name])
    dataset = spec.dataset.name
    assert dataset is not None, f"examples/{TASKS[name]} names no dataset"
    manifest = build_example(dataset, folder / dataset, shard_bytes=1 << 20).manifest
    reader = DatasetReader(manifest, lambda s: folder / dataset / s.file)
    ids = train_ids(torch.arange(manifest.samples).numpy(), spec.dataset.test_every).tolist()
    options = ", ".join(f"{k} {v}" for k, v in spec.options.items() if k != "base")
    task = load_task(spec.task, dict(spec.options))
    return Setting(task, Data(reader, ids), spec.batch.per_peer, f"{spec.task} ({options}) on {dataset}")


class Epochs:
    """A stream of micro-batches over a shuffled training split, cycling, with spare ids after them."""

    def __init__(self, ids: list[int], seed: int, micro_batches: int, per_peer: int):
        self.order = list(ids)
        random.Random(seed).shuffle(self.order)
        self.micro_batches, self.per_peer, self.position = micro_batches, per_peer, 0

    def _take(self, start: int, count: int) -> list[int]:
        return [self.order[(start + j) % len(self.order)] for j in range(count)]

    def next(self) -> list[list[int]]:
        flat = self._take(self.position, self.micro_batches * self.per_peer)
        self.position += len(flat)
        return [flat[i : i + self.per_peer] for i in range(0, len(flat), self.per_peer)]

    def spare(self, count: int) -> list[int]:
        return self._take(self.position, min(count, len(self.order) - self.micro_batches * self.per_peer))


def sketchers(n_params: int, epoch: int) -> tuple[Sketcher, Sketcher]:
    return Sketcher(n_params, grad_seed(RUN, epoch)), Sketcher(n_params, params_seed(RUN, epoch))


def start_epoch(
    task: Task,
    model: torch.nn.Module,
    data: Data,
    stream: Epochs,
    snapshots: Snapshots,
    epoch: int,
    device: str = "cpu",
) -> tuple[EpochWork, list[float]]:
    """What a peer does as an epoch starts: keep the start parameters for audits, and set up the epoch's
    work on its next micro-batches; the work, and the parameter sketch its reports carry."""
    trained = trained_parameters(model)
    grads, params = sketchers(sum(p.numel() for p in trained), epoch)
    param_sketch = params(trained)
    snapshots.put(epoch, model, param_sketch)
    seed = lambda i: micro_seed(RUN, epoch, PEER, i)  # noqa: E731
    work = local_work(task, model, data.reader, stream.next(), grads, seed, stream.spare, device=device)
    return work, param_sketch


def audit_task(epoch: int, index: int, micro: dict[str, Any], param_sketch: list[float]) -> AuditTask:
    return AuditTask(
        id=f"a{index}",
        run_id=RUN,
        epoch=epoch,
        account=PEER,
        index=index,
        ids=micro["ids"],
        param_sketch=param_sketch,
        device="cpu",
    )


def step(model: torch.nn.Module, update: list[torch.Tensor]) -> None:
    """The swarm's step: plain SGD with the averaged gradient (moves the parameters between epochs)."""
    with torch.no_grad():
        for p, g in zip(trained_parameters(model), update, strict=True):
            p.sub_(LR * g.to(p.device))


# ------------------------------------------------------------------------------------------ catch rate


def catch_trials(
    setting: Setting, kind: str, args: argparse.Namespace, policy: AuditPolicy
) -> dict[str, Any]:
    task, data, per_peer = setting.task, setting.data, args.per_peer or setting.per_peer
    caught_at: list[int | None] = []
    distances: list[float] = []  # of the audit that caught each trial
    for trial in range(args.trials):
        key, model = secrets.token_bytes(32), task.build_model(trial)
        snapshots = Snapshots(keep=args.epochs)
        validator = Validator(RUN, task, task.build_model(0), data.reader, snapshots, agreement=1e-4)
        cheat, stream = behaviour(kind), Epochs(data.ids, trial, args.micro_batches, per_peer)  # type: ignore[arg-type]
        caught_at.append(None)
        for epoch in range(args.epochs):
            work, param_sketch = start_epoch(task, model, data, stream, snapshots, epoch)
            contribution = cheat.contribute(work)
            report = contribution.micro
            failed = []
            for i in choose_audits(key, epoch, PEER, len(report), policy):
                answer = validator.recompute(audit_task(epoch, i, report[i], param_sketch))
                assert answer.sketch is not None and answer.loss is not None, answer.declined
                result = verdict(report[i]["sketch"], report[i]["loss"], answer.sketch, answer.loss, policy)
                if not result.passed:
                    failed.append(result.distance)
            # the coordinator's check of the update it sends into the round (its commitment) against its
            # report (peer.protocol.commitment): what every member of a fast-path round forwards
            committed = work.sketch(contribution.update)
            bound, distance = binding(committed, [(len(m["ids"]), m["sketch"]) for m in report])
            if not bound:
                failed.append(distance)
            if failed:
                caught_at[-1] = epoch + 1
                distances.append(min(failed))
                break
            step(model, work.compute(False).update)
    caught = [e for e in caught_at if e is not None]
    return {
        "kind": kind,
        "trials": args.trials,
        "caught": len(caught),
        "rate": len(caught) / args.trials,
        "mean_epochs_to_catch": statistics.fmean(caught) if caught else None,
        "max_epochs_to_catch": max(caught) if caught else None,
        "min_distance": min(distances) if distances else None,
    }


# ------------------------------------------------------------------------------------- false positives


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def conditions() -> dict[str, tuple[Callable[[], contextlib.AbstractContextManager[Any]], str]]:
    """How the reporting peer computes: a context and a device. The validator is always the CPU in
    float32 with torch's default threads."""
    found: dict[str, tuple[Callable[[], contextlib.AbstractContextManager[Any]], str]] = {
        "same as the validator": (contextlib.nullcontext, "cpu"),
        "1 thread vs default": (lambda: threads(1), "cpu"),
        "bfloat16 autocast vs float32": (lambda: torch.autocast("cpu", dtype=torch.bfloat16), "cpu"),
    }
    if torch.cuda.is_available():
        found["CUDA vs CPU"] = (contextlib.nullcontext, "cuda")
    return found


def honest_audits(setting: Setting, args: argparse.Namespace, policy: AuditPolicy) -> list[dict[str, Any]]:
    task, data, per_peer = setting.task, setting.data, args.per_peer or setting.per_peer
    results = []
    found = conditions()
    per_condition = -(-args.honest_audits // len(found))
    rounds_per_condition = -(-args.honest_rounds // len(found))
    for name, (context, device) in found.items():
        model = task.build_model(1).to(device)
        snapshots = Snapshots(keep=2)
        validator = Validator(RUN, task, task.build_model(0), data.reader, snapshots, agreement=1e-4)
        stream = Epochs(data.ids, 7, args.micro_batches, per_peer)
        distances, gaps, failed, audits, epoch = [], [], 0, 0, 0
        round_distances: list[float] = []  # the round check of each epoch (peer.protocol.commitment)
        while audits < per_condition or len(round_distances) < rounds_per_condition:
            work, param_sketch = start_epoch(task, model, data, stream, snapshots, epoch, device)
            with context():
                contribution = behaviour(None).contribute(work)
            for i, micro in enumerate(contribution.micro if audits < per_condition else []):
                answer = validator.recompute(audit_task(epoch, i, micro, param_sketch))
                assert answer.sketch is not None and answer.loss is not None, answer.declined
                result = verdict(micro["sketch"], micro["loss"], answer.sketch, answer.loss, policy)
                distances.append(result.distance)
                gaps.append(abs(micro["loss"] - answer.loss) / max(1.0, abs(answer.loss)))
                failed += not result.passed
                audits += 1
            micro = [(len(m["ids"]), m["sketch"]) for m in contribution.micro]
            bound, distance = binding(work.sketch(contribution.update), micro)
            round_distances.append(distance)
            failed += not bound
            step(model, contribution.update)
            epoch += 1
        results.append(
            {
                "condition": name,
                "audits": audits,
                "false_positives": failed,
                "max_distance": max(distances),
                "max_loss_gap": max(gaps),
                "round_checks": len(round_distances),
                "max_round_distance": max(round_distances),
            }
        )
    return results


# ------------------------------------------------------------------------------------------------ cost


def cost_setting(args: argparse.Namespace, setting: Setting, folder: Path) -> Setting:
    """What the cost is measured on: the task itself, but for digits a byte-level transformer language
    model (the MLP does too little work per sample to stand for a model anyone rents GPUs for)."""
    if not isinstance(setting.task, DigitsMLP):
        return setting
    manifest = build_example("text", folder / "text", shard_bytes=1 << 20).manifest
    reader = DatasetReader(manifest, lambda s: folder / "text" / s.file)
    task = BytesLM(dim=args.cost_dim, layers=args.cost_layers, heads=4, dropout=0.1)
    label = f"bytes-lm dim {args.cost_dim}, {args.cost_layers} layers, dropout 0.1"
    return Setting(task, Data(reader, list(range(manifest.samples))), args.cost_per_peer, label)


def cost(args: argparse.Namespace, policy: AuditPolicy, setting: Setting) -> dict[str, Any]:
    """Per micro-batch timings, scaled to an epoch of ``--cost-micro-batches`` micro-batches (training
    them all would take minutes on a CPU)."""
    task, reader = setting.task, setting.data.reader
    per_peer = setting.per_peer
    model = task.build_model(0)
    params = trained_parameters(model)
    n_params = sum(p.numel() for p in params)
    stream = Epochs(setting.data.ids, 3, args.repeat, per_peer)
    snapshots = Snapshots(keep=2)
    validator = Validator(RUN, task, task.build_model(0), reader, snapshots, agreement=1e-4)
    m = args.cost_micro_batches
    audits_per_report = statistics.fmean(
        len(choose_audits(secrets.token_bytes(32), 0, PEER, m, policy)) for _ in range(2000)
    )
    started = time.perf_counter()
    grads, param_sketcher = sketchers(n_params, 0)
    sketchers_s = time.perf_counter() - started  # per epoch a peer draws a gradient sketcher, and audits
    param_sketch = param_sketcher(params)  # need one per audited (epoch, peer): about as many again
    started = time.perf_counter()
    snapshots.put(0, model, param_sketch)
    snapshot_s = time.perf_counter() - started
    update = [torch.zeros_like(p) for p in params]
    rounds: dict[str, list[float]] = {"train": [], "sketch": [], "audit": []}
    chunks = stream.next()
    for index, chunk in enumerate([chunks[0], *chunks]):  # the first micro-batch warms up, left out
        batch = task.batch(reader.read(chunk))
        started = time.perf_counter()
        _, g = micro_batch_gradient(task, model, params, batch, micro_seed(RUN, 0, PEER, index))
        for u, x in zip(update, g, strict=True):
            u.add_(x, alpha=1 / m)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        sketch = grads(g)
        sketch_s = time.perf_counter() - started
        started = time.perf_counter()
        validator.recompute(audit_task(0, index, {"ids": chunk, "loss": 0.0, "sketch": sketch}, param_sketch))
        audit_s = time.perf_counter() - started
        if index:
            rounds["train"].append(train_s)
            rounds["sketch"].append(sketch_s)
            rounds["audit"].append(audit_s)
    train, sketch, audit = (statistics.median(rounds[k]) for k in ("train", "sketch", "audit"))
    # a validator's canaries: one per block of epochs (coordinator.verification.canary_due)
    canaries = 1 / canary_block(policy.canary_rate) if policy.canary_rate > 0 else 0.0
    verification = m * sketch + sketchers_s + snapshot_s + (audits_per_report + canaries) * audit
    return {
        "model": setting.label,
        "parameters": n_params,
        "peers": args.peers,
        "micro_batches": m,
        "per_peer": per_peer,
        "target": args.peers * m * per_peer,
        "train_s": m * train,
        "sketch_s": m * sketch,
        "snapshot_s": snapshot_s,
        "sketchers_s": sketchers_s,
        "audit_s": audit,
        "audits_per_report": audits_per_report,
        "canaries_per_epoch": canaries,
        "verification_s": verification,
        "ratio": verification / (m * train),
    }


# ---------------------------------------------------------------------------------------- capacity liar


def _lockstep_run(
    rng: random.Random,
    claims: dict[str, float],
    speeds: dict[str, float],
    epochs: int,
    clocks: dict[str, float] | None = None,
    shrink: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One run of lock-step epochs priced and measured by coordinator.capacity, as the store does it.

    Each epoch every peer trains an equal share (``SHARE`` samples) at its true speed times run-to-run
    noise, and reports that compute time as its ``seconds`` (times ``shrink[k]`` for a peer that
    under-reports it); the epoch's wall clock is the slowest peer's compute plus a round, and caps what
    each report is billed; reports arrive in a random order. Each match is priced ``UNIT * claim`` an hour
    (the market's price for its claimed TFLOP/s at one unit price: the same ask per TFLOP-hour). A peer in
    ``clocks`` reported throttling after its match, at that clock ratio."""
    policy = CapacityPolicy()
    clocks, shrink = clocks or {}, shrink or {}
    tallies = {k: [0, 0, 0.0, 0] for k in claims}  # reports, samples, billed seconds, units paid
    flagged: dict[str, tuple[str, int]] = {}
    ratios: dict[str, float] = {}  # each match's lowest measured ratio
    for epoch in range(epochs):
        compute = {k: SHARE / (speeds[k] * rng.lognormvariate(0, NOISE)) for k in claims}
        wall = max(compute.values()) + ROUND_S
        order = list(claims)
        rng.shuffle(order)
        for key in order:
            seconds = compute[key] * shrink.get(key, 1.0)
            plain = report_pay(wall, round(UNIT * claims[key]), 0.0, seconds, 10**15)
            t = tallies[key]
            t[0], t[1], t[2] = t[0] + 1, t[1] + SHARE, t[2] + min(seconds, wall)
            deliveries = [Delivery(k, claims[k], v[0], v[1], v[2]) for k, v in tallies.items()]
            verdict = assess(deliveries, key, clocks.get(key), policy)
            entitled = entitled_units(round(UNIT * claims[key]), t[2], verdict.pay_factor)
            t[3] += capped_units(plain.units, entitled, t[3])
            if verdict.delivered_tflops is not None:
                ratios[key] = min(ratios.get(key, 1.0), verdict.ratio)
            if verdict.flag is not None and key not in flagged:
                flagged[key] = (verdict.flag, epoch + 1)
    return {"per_sample": {k: v[3] / v[1] for k, v in tallies.items()}, "flagged": flagged, "ratios": ratios}


def _peers(rng: random.Random, sizes: dict[str, int]) -> tuple[dict[str, float], dict[str, float]]:
    """Claims and true speeds of honest peers of ``sizes`` times the reference machine (probes noisy)."""
    speeds = {k: SPEED * n for k, n in sizes.items()}
    return {k: TFLOPS * n * rng.lognormvariate(0, PROBE_NOISE) for k, n in sizes.items()}, speeds


def capacity_trials(liar_trials: int, honest_trials: int, epochs: int, seed: int = 0) -> dict[str, Any]:
    """The ``capacity-liar`` row: ``liar_trials`` runs of three honest peers of 1x, 2x and 3x the
    reference machine, and one on the reference machine that claims ``LIE`` times its probe, reporting its
    compute time (``liar``) or a ``LIE``-th of it to look as fast as it claims (``hiding``, the same runs
    again); ``honest_trials`` runs of honest peers of 1x, 2x and 3x, one that throttles after its match
    (runs at ``THROTTLE`` of its speed and reports that clock ratio in its heartbeats) and one that
    reports ``TINY`` of its compute time as its ``seconds``. Peers' probes carry ``PROBE_NOISE`` and their
    epochs ``NOISE`` (log-normal sigmas). The liar's pay per verified sample is compared with the honest
    peers' mean in its run; a false positive is an honest or throttling peer flagged ``short`` (its
    reputation would drop)."""
    rng = random.Random(seed)
    sizes = {"h1": 1, "h2": 2, "h3": 3}
    ratios, hiding, flag_epochs, caught, hidden_flags = [], [], [], 0, 0
    for _ in range(liar_trials):
        claims, speeds = _peers(rng, sizes | {"liar": 1})
        claims["liar"] *= LIE
        state = rng.getstate()
        for shrink, paid in (({}, ratios), ({"liar": 1 / LIE}, hiding)):
            rng.setstate(state)  # the same epochs, the liar reporting its seconds or hiding them
            run = _lockstep_run(rng, claims, speeds, epochs, shrink=shrink)
            honest = statistics.fmean(v for k, v in run["per_sample"].items() if k != "liar")
            paid.append(run["per_sample"]["liar"] / honest)
            flag = run["flagged"].get("liar")
            if shrink:
                hidden_flags += flag is not None
            elif flag is not None and flag[0] == "short":
                caught += 1
                flag_epochs.append(flag[1])
    false_positives = rerated = penalised = 0
    min_ratio, sizes_paid = 1.0, []
    for _ in range(honest_trials):
        claims, speeds = _peers(rng, sizes | {"hot": 1, "tiny": 1})
        speeds["hot"] *= THROTTLE
        run = _lockstep_run(rng, claims, speeds, epochs, clocks={"hot": THROTTLE}, shrink={"tiny": TINY})
        short = {k for k, (flag, _) in run["flagged"].items() if flag == "short"}
        false_positives += bool(short - {"tiny"})
        penalised += "hot" in short
        min_ratio = min(min_ratio, *(run["ratios"].get(k, 1.0) for k in sizes))
        sizes_paid.append(run["per_sample"]["h3"] / run["per_sample"]["h1"])
        # re-rated: its heartbeats' clock ratio weighs its ask (coordinator.market_store), or a run's measure
        # flagged it throttled and replaced its offer's TFLOP/s
        rerated += THROTTLE < 1 or run["flagged"].get("hot", ("",))[0] == "throttled"
    return {
        "liar": {
            "trials": liar_trials,
            "lie": LIE,
            "flagged": caught,
            "mean_pay_ratio": statistics.fmean(ratios),
            "max_pay_ratio": max(ratios),
            "mean_epochs_to_flag": statistics.fmean(flag_epochs) if flag_epochs else None,
            "max_epochs_to_flag": max(flag_epochs) if flag_epochs else None,
            "hiding_mean_pay_ratio": statistics.fmean(hiding),
            "hiding_max_pay_ratio": max(hiding),
            "hiding_flagged": hidden_flags,
        },
        "honest": {
            "trials": honest_trials,
            "false_positives": false_positives,
            "min_ratio": min_ratio,
            # a 3x peer's pay per verified sample over a 1x peer's in the same run (each's probe noise)
            "size_pay_ratio": statistics.fmean(sizes_paid),
            "throttled_rerated": rerated,
            "throttled_penalised": penalised,
        },
        "epochs": epochs,
    }


# -------------------------------------------------------------------------------------- lazy validator

LAZY = "d" * 64  # the lazy validator's account
SOURCE = "e" * 64  # the peer whose audited reports are the canaries' sources


def _never(audit: AuditTask) -> AuditResultBody:
    raise AssertionError("the lazy validator recomputed an audit")


def lazy_trials(setting: Setting, args: argparse.Namespace, policy: AuditPolicy) -> dict[str, Any]:
    """The ``lazy-validator`` row: ``--trials`` runs of up to twice ``--epochs`` epochs, each with the
    coordinator's draws (coordinator.verification). Each epoch a reporting peer's report (``--micro-batches``
    micro-batches) draws its audits, which all go to the lazy validator (peer.adversary.LazyValidator) with
    their claims leaked to it: it sends the claims back and they pass. A second peer's report is audited by
    an honest validator; its passed micro-batches of the last ``canary_window`` epochs are the canaries'
    sources, whose claims the API hides (so the lazy validator answers a canary with the sketch and loss of
    a micro-batch it computed itself). Canaries come as the coordinator deals them (canary_due, one source
    drawn under the key). Fees: one unit per audited sample, held until the validator passes a canary,
    forfeit at its ban. Caught: the first wrong canary; banned: ``ban_after`` wrong canaries."""
    task, data, per_peer = setting.task, setting.data, args.per_peer or setting.per_peer
    block = canary_block(policy.canary_rate) if policy.canary_rate > 0 else 0
    caught_at: list[int | None] = []
    banned_at: list[int | None] = []
    distances: list[float] = []
    faked = earned = forfeit = still_held = 0
    for trial in range(args.trials):
        key, model = secrets.token_bytes(32), task.build_model(trial)
        snapshots = Snapshots(keep=policy.canary_window + 1)
        honest = Validator(RUN, task, task.build_model(0), data.reader, snapshots, agreement=1e-4)
        lazy = behaviour("lazy-validator")
        reporter = Epochs(data.ids, trial, args.micro_batches, per_peer)
        other = Epochs(data.ids, 10_000 + trial, args.micro_batches, per_peer)
        own = Epochs(data.ids, 20_000 + trial, 1, per_peer)
        sources: list[tuple[int, int, dict[str, Any], list[float]]] = []  # epoch, index, claim, params
        last_block: int | None = None
        held = failures = 0
        caught_at.append(None)
        banned_at.append(None)
        for epoch in range(2 * args.epochs):
            work, param_sketch = start_epoch(task, model, data, reporter, snapshots, epoch)
            report = behaviour(None).contribute(work)
            for i in choose_audits(key, epoch, PEER, len(report.micro), policy):
                claim = report.micro[i]
                leaked = (claim["sketch"], claim["loss"])
                answer = lazy.answer(
                    audit_task(epoch, i, claim, param_sketch), _never, lambda t, known=leaked: known
                )
                assert answer.sketch is not None and answer.loss is not None
                assert verdict(claim["sketch"], claim["loss"], answer.sketch, answer.loss, policy).passed
                faked += 1
                held += len(claim["ids"])
            usable = [s for s in sources if s[0] > epoch - policy.canary_window]
            if usable and canary_due(key, LAZY, epoch, policy.canary_rate, last_block):
                last_block = epoch // block
                source = min(usable, key=lambda s: claim_rank(key, LAZY, f"canary:{s[0]}-{s[1]}"))
                sources.remove(source)  # never the same micro-batch twice to one validator
                src_epoch, index, claim, params = source
                canary = audit_task(src_epoch, index, claim, params).model_copy(update={"account": SOURCE})
                answer = lazy.answer(canary, _never, lambda t: None)  # the source's claims are hidden
                assert answer.sketch is not None and answer.loss is not None
                result = canary_verdict(claim["sketch"], claim["loss"], answer.sketch, answer.loss, policy)
                if result.passed:
                    earned += held + len(claim["ids"])
                    held = 0
                else:
                    failures += 1
                    if caught_at[-1] is None:
                        caught_at[-1] = epoch + 1
                        distances.append(result.distance)
                    if validator_banned(failures, policy) is not None:
                        banned_at[-1] = epoch + 1
                        forfeit += held
                        held = 0
                        break
            # the other peer's report, audited by an honest validator: its passed audits become sources
            seed = lambda i, e=epoch: micro_seed(RUN, e, SOURCE, i)  # noqa: E731
            theirs = local_work(task, model, data.reader, other.next(), work.sketch, seed).compute(False)
            for i in choose_audits(key, epoch, SOURCE, len(theirs.micro), policy):
                claim = theirs.micro[i]
                task_i = audit_task(epoch, i, claim, param_sketch).model_copy(update={"account": SOURCE})
                checked = honest.recompute(task_i)
                assert checked.sketch is not None and checked.loss is not None, checked.declined
                if verdict(claim["sketch"], claim["loss"], checked.sketch, checked.loss, policy).passed:
                    sources.append((epoch, i, claim, param_sketch))
            # the lazy peer trains honestly (its made-up answers are its own earlier sketches)
            seed_own = lambda i, e=epoch: micro_seed(RUN, e, LAZY, i)  # noqa: E731
            lazy.contribute(local_work(task, model, data.reader, own.next(), work.sketch, seed_own))
            step(model, report.update)
        still_held += held
    within = [e for e in caught_at if e is not None and e <= args.epochs]
    caught = [e for e in caught_at if e is not None]
    banned = [e for e in banned_at if e is not None]
    return {
        "kind": "lazy-validator",
        "trials": args.trials,
        "caught": len(within),
        "rate": len(within) / args.trials,
        "mean_epochs_to_catch": statistics.fmean(caught) if caught else None,
        "max_epochs_to_catch": max(caught) if caught else None,
        "min_distance": min(distances) if distances else None,
        "banned": len(banned),
        "max_epochs_to_ban": max(banned) if banned else None,
        "faked_audits": faked,
        "fees_earned": earned,
        "fees_forfeit": forfeit,
        "fees_still_held": still_held,
    }


def honest_canaries(setting: Setting, args: argparse.Namespace, policy: AuditPolicy) -> dict[str, Any]:
    """``--honest-canaries`` canaries answered by an honest float32 CPU validator, spread over the honest
    rows' conditions: the source's claim computed the same way, on 1 thread, in bfloat16 autocast (and on
    CUDA where present) for a passed source; for a confirmed failure's source, the known answer is another
    validator's recomputation on 1 thread. Counts wrong verdicts (goal 0) and the largest distance."""
    task, data, per_peer = setting.task, setting.data, args.per_peer or setting.per_peer
    found = conditions()
    names = [*found, "confirmed failure: answer recomputed on 1 thread"]
    per_condition = -(-args.honest_canaries // len(names))
    distances: list[float] = []
    failed = checked = 0
    for name in names:
        context, device = found.get(name, (contextlib.nullcontext, "cpu"))
        model = task.build_model(2).to(device)
        snapshots = Snapshots(keep=2)
        validator = Validator(RUN, task, task.build_model(0), data.reader, snapshots, agreement=1e-4)
        stream = Epochs(data.ids, 11, args.micro_batches, per_peer)
        done, epoch = 0, 0
        while done < per_condition:
            work, param_sketch = start_epoch(task, model, data, stream, snapshots, epoch, device)
            with context():
                contribution = behaviour(None).contribute(work)
            for i, micro in enumerate(contribution.micro):
                canary = audit_task(epoch, i, micro, param_sketch)
                expected = (micro["sketch"], micro["loss"])
                if name not in found:
                    with threads(1):
                        known = validator.recompute(canary)
                    assert known.sketch is not None and known.loss is not None
                    expected = (known.sketch, known.loss)
                answer = validator.recompute(canary)
                assert answer.sketch is not None and answer.loss is not None, answer.declined
                result = canary_verdict(expected[0], expected[1], answer.sketch, answer.loss, policy)
                distances.append(result.distance)
                failed += not result.passed
                done += 1
            step(model, contribution.update)
            epoch += 1
        checked += done
    return {
        "canaries": checked,
        "false_positives": failed,
        "max_distance": max(distances),
        "conditions": names,
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="digits-mlp")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=8, help="per report, in the catch trials")
    parser.add_argument(
        "--per-peer", type=int, default=None, help="samples per micro-batch (trials) [the example spec's]"
    )
    parser.add_argument("--honest-audits", type=int, default=3000)
    parser.add_argument("--honest-rounds", type=int, default=1000, help="honest epochs' round checks")
    parser.add_argument("--honest-canaries", type=int, default=1000, help="canaries for honest validators")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--cost-micro-batches", type=int, default=64, help="per peer and epoch")
    parser.add_argument(
        "--cost-per-peer", type=int, default=16, help="samples (of 128 bytes) per micro-batch (digits' cost)"
    )
    parser.add_argument("--cost-dim", type=int, default=128)
    parser.add_argument("--cost-layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7, help="micro-batches timed for the cost")
    parser.add_argument("--capacity-trials", type=int, default=100, help="capacity-liar runs")
    parser.add_argument(
        "--capacity-honest-trials",
        type=int,
        default=1000,
        help="honest runs of 1x, 2x, 3x peers, one throttling, one reporting a tiny seconds",
    )
    parser.add_argument("--capacity-epochs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    policy = AuditPolicy.default()
    with tempfile.TemporaryDirectory(prefix="bench-verification-") as folder:
        setting = load_setting(args.task, Path(folder))
        catch = [catch_trials(setting, kind, args, policy) for kind in (*KINDS, "poisoned-round")]
        honest = honest_audits(setting, args, policy)
        lazy = lazy_trials(setting, args, policy)
        canaries = honest_canaries(setting, args, policy)
        spend = cost(args, policy, cost_setting(args, setting, Path(folder)))
    liar = capacity_trials(args.capacity_trials, args.capacity_honest_trials, args.capacity_epochs)
    result = {
        "capacity": liar,
        "task": setting.label,
        "policy": {
            "rate": policy.rate,
            "min_audits": policy.min_audits,
            "tolerance": policy.tolerance,
            "loss_tolerance": policy.loss_tolerance,
            "canary_rate": policy.canary_rate,
            "canary_window": policy.canary_window,
        },
        "catch": catch,
        "honest": honest,
        "validators": {"lazy": lazy, "honest": canaries},
        "cost": spend,
        "goals": {
            "catch_rate": all(c["rate"] >= GOAL_CATCH for c in catch),
            "false_positives": sum(h["false_positives"] for h in honest) == 0,
            "cost": spend["ratio"] <= GOAL_COST,
            "validators": lazy["rate"] >= GOAL_CATCH
            and lazy["fees_earned"] == 0
            and canaries["false_positives"] == 0,
            "capacity": liar["liar"]["max_pay_ratio"] <= 1.1
            and liar["liar"]["flagged"] == liar["liar"]["trials"]
            and (liar["liar"]["max_epochs_to_flag"] or 99) <= 3
            and liar["honest"]["false_positives"] == 0,
        },
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"task: {setting.label}")
    print(f"audits: rate {policy.rate:g}, >= {policy.min_audits} per report, tolerance {policy.tolerance:g}")
    header = ("CHEAT", "TRIALS", "CAUGHT", "RATE", "MEAN EPOCHS", "MAX", "MIN DISTANCE")
    print(
        "\n"
        + "".join(
            f"{h:<18}" if i == 0 else f"{h:>{w}}"
            for i, (h, w) in enumerate(zip(header, (18, 7, 8, 8, 13, 5, 14), strict=True))
        )
    )
    for c in catch:
        print(
            f"{c['kind']:<18}{c['trials']:>7}{c['caught']:>8}{c['rate']:>8.1%}"
            f"{c['mean_epochs_to_catch'] or 0:>13.2f}{c['max_epochs_to_catch'] or 0:>5}"
            f"{c['min_distance'] or 0:>14.3f}"
        )
    print(
        f"\n{'HONEST PEER COMPUTED':<32}{'AUDITS':>7}{'FAILED':>8}{'MAX DISTANCE':>14}{'MAX LOSS GAP':>14}"
        f"{'ROUNDS':>8}{'MAX ROUND DIST':>16}"
    )
    for h in honest:
        print(
            f"{h['condition']:<32}{h['audits']:>7}{h['false_positives']:>8}{h['max_distance']:>14.2e}"
            f"{h['max_loss_gap']:>14.2e}{h['round_checks']:>8}{h['max_round_distance']:>16.2e}"
        )
    lv, hc = lazy, canaries
    print(
        f"\nlazy-validator (canary_rate {policy.canary_rate:g}, window {policy.canary_window}): caught "
        f"within {args.epochs} epochs {lv['caught']}/{lv['trials']} ({lv['rate']:.1%}), mean "
        f"{lv['mean_epochs_to_catch'] or 0:.2f} epochs, at most {lv['max_epochs_to_catch']}; banned from "
        f"validating {lv['banned']}/{lv['trials']} within {lv['max_epochs_to_ban']} epochs; "
        f"{lv['faked_audits']} audits faked, fees earned {lv['fees_earned']}, forfeit {lv['fees_forfeit']}, "
        f"still held {lv['fees_still_held']}; min canary distance {lv['min_distance'] or 0:.3f}\n"
        f"honest validators on canaries: {hc['false_positives']} of {hc['canaries']} failed "
        f"(max distance {hc['max_distance']:.2e})"
    )
    cl, ch = liar["liar"], liar["honest"]
    print(
        f"\ncapacity-liar (claims {cl['lie']:g}x its probe; {liar['epochs']} lock-step epochs): flagged "
        f"{cl['flagged']}/{cl['trials']} within {cl['max_epochs_to_flag']} epochs (mean "
        f"{cl['mean_epochs_to_flag'] or 0:.2f}); pay per verified sample {cl['mean_pay_ratio']:.3f}x an "
        f"honest peer's (at most {cl['max_pay_ratio']:.3f}x); reporting 1/{cl['lie']:g} of its seconds "
        f"instead: flagged {cl['hiding_flagged']}, paid {cl['hiding_mean_pay_ratio']:.3f}x (at most "
        f"{cl['hiding_max_pay_ratio']:.3f}x)\n  honest runs of 1x, 2x, 3x peers, a throttling one and one "
        f"reporting {TINY:g} of its seconds: {ch['false_positives']} of {ch['trials']} flagged an honest "
        f"peer short (lowest ratio {ch['min_ratio']:.2f}); a 3x peer paid {ch['size_pay_ratio']:.3f}x a 1x "
        f"peer's per sample; throttling peer re-rated {ch['throttled_rerated']}, penalised "
        f"{ch['throttled_penalised']}"
    )
    c = spend
    print(
        f"\ncost: {c['peers']} peers x {c['micro_batches']} micro-batches of {c['per_peer']} "
        f"(target {c['target']}), {c['model']} ({c['parameters']:,} parameters)\n"
        f"  training {c['train_s'] * 1000:.1f} ms/epoch; sketches {c['sketch_s'] * 1000:.1f} ms, "
        f"sketchers drawn {c['sketchers_s'] * 1000:.1f} ms, snapshot {c['snapshot_s'] * 1000:.2f} ms, "
        f"({c['audits_per_report']:.2f} audits + {c['canaries_per_epoch']:.2f} canaries) x "
        f"{c['audit_s'] * 1000:.2f} ms\n"
        f"  verification / training = {c['ratio']:.2%} (goal <= {GOAL_COST:.0%})"
    )
    goals = result["goals"]
    print(
        f"\ngoals: catch >= {GOAL_CATCH:.0%} {'met' if goals['catch_rate'] else 'NOT met'}; "
        f"false positives 0 {'met' if goals['false_positives'] else 'NOT met'}; "
        f"cost {'met' if goals['cost'] else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
