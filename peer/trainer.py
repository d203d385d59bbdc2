"""One peer's part in a collaborative run, as a process: ``python -m peer.trainer RUN_ID --coordinator URL``.

The worker (``hivemarket rent``) starts it when its lease is matched to a run and stops it when the
match ends. The trainer:

1. reads the run's spec from the coordinator and refuses a task this peer has not installed (exit 3);
2. fetches the dataset version the spec names (only the shards of its assigned blocks), checking hashes;
3. starts a hivemind DHT for the run, bootstrapped from the peers that joined before it (the first peer
   in match order starts alone; the others wait for it, so the run's DHT never starts as two swarms),
   and joins the run at the coordinator with its addresses;
4. loads the training state from the other peers if the run is under way (with a deadline), else
   resumes its local checkpoint after a crash, else starts from the spec's seed;
5. trains in lock-step epochs (:mod:`peer.averaging`): its share of the target batch from its assigned
   samples, one all-reduce with the peers at the same epoch, the same update everywhere; after each
   epoch it queues a signed contribution report (samples, loss, per-micro-batch gradient sketches, a
   sketch of the parameters the epoch started from) and checkpoints locally;
6. validates: once an epoch it takes audits of the other peers' reports from the coordinator and
   recomputes them (:mod:`peer.validator`) at the epoch-start parameters it keeps for recent epochs;
7. when the run is settling, the first live peer in match order uploads the final model, and every peer
   goes on validating until the run's last audits are decided.

A round whose group disagrees with this peer's parameters, or that found no group while others are
live, means this peer fell out of step: it loads the state from the others instead of reporting.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hivemind.utils import get_logger
from hivemind.utils.logging import use_hivemind_log_handler
from pydantic import ValidationError

from peer.adversary import Contribution, EpochWork, behaviour
from peer.averaging import RunAverager, TrainingState, capture, learning_rate, restore
from peer.data.fetch import FetchSettings, ShardCache, fetch_manifest, fetch_shards
from peer.data.loader import PrefetchLoader
from peer.data.reader import DatasetReader
from peer.deadlines import RoundDeadlines
from peer.events import AGREEMENT_TOLERANCE, EventLog, in_agreement
from peer.node import NodeError, follow_clock, start_dht, stop_dht
from peer.protocol.assignment import assign
from peer.protocol.client import CoordinatorError, CoordinatorUnreachable
from peer.protocol.dataset import DatasetError, Manifest, ShardInfo
from peer.protocol.identity import Identity, load_identity
from peer.protocol.schemas import AuditResultBody, MicroBatch, ReportBody, RunPeerView, RunView
from peer.protocol.sketch import grad_seed, params_seed
from peer.protocol.spec import RunSpec, SpecError, describe, validate_spec
from peer.protocol.states import BIDDING, REPORTING
from peer.run_link import RunLink
from peer.settings import PeerSettings, load_settings
from peer.sketch import Sketcher
from peer.tasks import Task, TaskError, load_task
from peer.validator import Snapshots, Validator, compute_micro_batches, device_name, micro_seed

logger = get_logger(__name__)
FROM_PEERS = "the other peers"  # the source of a state downloaded from the swarm

EXIT_REFUSED = 3  # the run cannot be trained here (task not installed, bad spec): do not restart
EXIT_RETRY = 4  # something transient (no bootstrap peer, no state donor): the worker may start it again


class TrainerExit(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ helpers


def live_peers(view: RunView) -> list[RunPeerView]:
    """The run's active peers in match order (the order that picks the bootstrap seed and the uploader)."""
    return sorted((p for p in view.peers if p.state == "active"), key=lambda p: (p.matched_at, p.account))


def model_bytes(task_name: str, options: dict[str, Any], epoch: int, model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"task": task_name, "options": options, "epoch": epoch, "state_dict": model.state_dict()}, buffer
    )
    return buffer.getvalue()


def load_model_file(path: Path) -> tuple[Task, torch.nn.Module, dict[str, Any]]:
    """A model file written by a run (``hivemarket runs fetch``): its task, the model, and the metadata."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    task = load_task(saved["task"], saved["options"])
    model = task.build_model(0)
    model.load_state_dict(saved["state_dict"])
    return task, model, saved


def make_optimizer(spec: RunSpec, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def train_ids(ids: np.ndarray, test_every: int) -> np.ndarray:
    """The training split: every sample but each ``test_every``-th (id % N == N - 1, the test split)."""
    return ids[ids % test_every != test_every - 1]


def test_ids(total: int, test_every: int) -> np.ndarray:
    ids = np.arange(total, dtype=np.int64)
    return ids[ids % test_every == test_every - 1]


def shares(target: int, owned: dict[str, int]) -> dict[str, int]:
    """Split ``target`` samples among peers in proportion to the training samples each owns, summing to
    ``target`` exactly (largest remainders, ties to the smaller account).

    Proportional shares make every peer go through its blocks at the same pace, so the swarm visits each
    sample once per pass like one process would; equal shares would over-sample the peers that own less.
    """
    total = sum(owned.values())
    if total == 0:
        raise ValueError("the live peers own no training samples")
    exact = {a: target * n / total for a, n in owned.items()}
    result = {a: math.floor(x) for a, x in exact.items()}
    by_remainder = sorted(owned, key=lambda a: (result[a] - exact[a], a))
    for a in by_remainder[: target - sum(result.values())]:
        result[a] += 1
    return result


@dataclass
class SampleStream:
    """This peer's training samples in assignment order, pass after pass over its blocks.

    The assignment (:func:`peer.protocol.assignment.assign`) depends on the live peers; when they change, the
    current pass is re-assigned and this peer starts its new list from the beginning (samples it already
    trained on in this pass may come again: a change of peers costs a little repetition, never a gap).
    """

    manifest: Manifest
    seed: int
    test_every: int
    block_size: int
    account: str
    passes: int = 0
    position: int = 0
    peers: tuple[str, ...] = ()
    order: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    owned: dict[str, int] = field(default_factory=dict)
    shards: tuple[int, ...] = ()  # the shards this peer's blocks sit in (ownership does not change by pass)

    def take(self, target: int, peers: Sequence[str]) -> list[int]:
        """This peer's share of a step of ``target`` samples over ``peers``, in its training order.

        A share that straddles two passes must not name a sample twice (a report may not): the samples
        it already took from the old pass move to the end of the new pass's order."""
        if tuple(sorted(peers)) != self.peers:
            self.peers = tuple(sorted(peers))
            self._assign()
        count = shares(target, self.owned)[self.account]
        taken: list[int] = []
        while len(taken) < count:
            if self.position >= len(self.order):
                self.passes += 1
                self._assign()
                if taken:
                    again = np.isin(self.order, taken)
                    self.order = np.concatenate([self.order[~again], self.order[again]])
            end = min(len(self.order), self.position + count - len(taken))
            taken += self.order[self.position : end].tolist()
            self.position = end
        return taken

    def spare(self, count: int) -> list[int]:
        """Up to ``count`` ids that come after this peer's current position in the pass, without taking
        them (what an ``inflated-samples`` cheat claims it processed)."""
        return self.order[self.position : self.position + count].tolist()

    def _assign(self) -> None:
        result = assign(self.seed, self.passes, self.peers, self.manifest.shards, self.block_size)
        self.owned = {a: len(train_ids(ids, self.test_every)) for a, ids in result.samples.items()}
        self.order = train_ids(result.samples[self.account], self.test_every)
        self.shards = result.shards[self.account]
        self.position = 0
        if not len(self.order):
            raise TrainerExit(EXIT_REFUSED, "this peer was assigned no training samples")


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(
        self, run_id: str, link: RunLink, identity: Identity, settings: PeerSettings, listen: list[str]
    ):
        self.run_id = run_id
        self.link = link
        self.identity = identity
        self.settings = settings
        self.listen = listen
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held while parameters change; the averager copies state under it
        self.workdir = settings.home / "runs" / run_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dht = None
        self.averager: RunAverager | None = None
        self.epoch = 0
        self.group_target = 0
        self.snapshot: TrainingState | None = None  # the epoch's start, while local updates move on
        self.device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.loader_device = self.device if self.device.type == "cuda" else None
        self.behaviour = behaviour(settings.adversary)
        self.snapshots: Snapshots | None = None
        self.validator: Validator | None = None
        self.saving: threading.Thread | None = None  # the checkpoint being written (_checkpoint)
        self.late = False  # the state was just loaded from the swarm, mid-epoch (_epoch)
        self.events = EventLog(self.workdir / "events.jsonl")
        link.on_accepted = lambda body: self.events.write(
            "report_accepted", epoch=body.epoch, samples=body.samples
        )

    # ---------------------------------------------------------------------------------------- set-up

    def prepare(self) -> RunView:
        view = self.link.view()
        if view is None:
            raise TrainerExit(EXIT_RETRY, "the coordinator is unreachable")
        try:
            self.spec = validate_spec(view.spec)
            self.task = load_task(self.spec.task, dict(self.spec.options))
        except (SpecError, TaskError) as e:  # the worker then gives the place back
            raise TrainerExit(EXIT_REFUSED, f"refusing run {self.run_id}: {e}") from None
        self.target = view.target_samples
        self.total_epochs = math.ceil(self.target / self.spec.batch.target)
        self.model = self.task.build_model(self.spec.seed).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.spec, self.params)
        self.optimizers = [self.optimizer]
        self.outer: torch.optim.Optimizer | None = None
        if self.spec.averaging.local_updates:
            a = self.spec.averaging
            self.outer = torch.optim.SGD(self.params, lr=a.outer_lr, momentum=a.outer_momentum, nesterov=True)
            self.optimizers.append(self.outer)
        # What is averaged lives on the CPU (hivemind shares it with its averager process); gradients are
        # summed on the training device and copied over once an epoch.
        self.buffers = [torch.zeros_like(p, device="cpu") for p in self.params]
        self.sums = [torch.zeros_like(p) for p in self.params]
        self.data_wait = 0.0  # seconds this epoch's training waited for its batches (the event log's data_s)
        self.load_wait = 0.0  # seconds this epoch waited for the state of peers further on (load_s)
        self.n_params = sum(p.numel() for p in self.params)
        self._open_dataset()
        if self.spec.verification.rate > 0:
            self.snapshots = Snapshots(self.settings.audit_window)
            self.validator = Validator(
                self.run_id,
                self.task,
                self.task.build_model(self.spec.seed).to(self.device),
                self.reader,
                self.snapshots,
                agreement=AGREEMENT_TOLERANCE[self.spec.averaging.compression],
                fetch=lambda ids: self._fetch(self.reader.shards_for(ids)),
                device=self.device,
            )
        return view

    def _open_dataset(self) -> None:
        location = self.spec.dataset.location
        if location == "coordinator":
            location = self.link.client.base_url
        self.location = location
        fetch_settings = FetchSettings()
        self.cache = ShardCache(fetch_settings.cache_root)
        try:
            self.manifest = asyncio.run(
                fetch_manifest(location, self.spec.dataset.version, fetch_settings, self.cache)
            )
        except DatasetError as e:
            raise TrainerExit(EXIT_RETRY, f"dataset {self.spec.dataset.version[:12]}: {e}") from None
        self.reader = DatasetReader(self.manifest, self.cache.final_path)
        self.stream = SampleStream(
            self.manifest,
            self.spec.seed,
            self.spec.dataset.test_every,
            self.spec.batch.per_peer,
            self.identity.account,
        )

    def _fetch_shards(self) -> None:
        self._fetch([self.manifest.shards[i] for i in self.stream.shards])

    def _fetch(self, wanted: Sequence[ShardInfo]) -> None:
        missing = [s for s in wanted if self.cache.path(s) is None]
        if missing:
            try:
                asyncio.run(fetch_shards(self.location, self.manifest, missing, self.cache))
            except DatasetError as e:
                raise TrainerExit(EXIT_RETRY, f"dataset {self.manifest.version[:12]}: {e}") from None

    def connect(self, view: RunView) -> RunView:
        """Start the run's DHT from the peers that joined before this one, then join at the coordinator."""
        deadline = time.monotonic() + self.settings.bootstrap_wait
        while True:
            live = live_peers(view)
            if not any(p.account == self.identity.account for p in live):
                raise TrainerExit(EXIT_REFUSED, f"this peer is not (or no longer) matched to {self.run_id}")
            bootstrap = [m for p in live if p.joined and p.account != self.identity.account for m in p.maddrs]
            if bootstrap or live[0].account == self.identity.account:
                break
            if time.monotonic() > deadline or self.stop.is_set():
                raise TrainerExit(EXIT_RETRY, "no peer of the run joined to bootstrap from")
            self.stop.wait(self.settings.run_poll_interval)
            view = self.link.view() or view
        if self.link.client.clock.offset is not None:  # the run's peers share the coordinator's clock
            follow_clock(self.link.client.clock.offset)
        try:
            self.dht, _ = start_dht(self.settings, initial_peers=bootstrap, listen=self.listen)
        except NodeError as e:
            raise TrainerExit(EXIT_RETRY, f"the run's DHT did not start: {e}") from None
        maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        self.averager = RunAverager(
            self.buffers,
            self.dht,
            prefix=f"{self.run_id}_grads",
            share_state=self._share_state,
            max_peers=max(view.peers_max, 2),
            matchmaking_seconds=self.spec.averaging.matchmaking_seconds,
            deadlines=RoundDeadlines(
                ceiling=self.spec.averaging.timeout_seconds,
                floor=self.settings.chunk_deadline_floor,
                factor=self.settings.chunk_deadline_factor,
            ),
            compression_name=self.spec.averaging.compression,
        )
        view = self.link.join(str(self.dht.peer_id), maddrs)
        logger.info(f"Joined run {self.run_id} as {self.dht.peer_id} ({len(bootstrap)} bootstrap addresses)")
        others = [p for p in live_peers(view) if p.joined and p.account != self.identity.account]
        underway = len(others) >= view.peers_min  # they train without this peer (not waiting for it)
        if underway:
            view = self._next_epoch(view)
        self._initial_state(bool(bootstrap))
        self.late = underway  # at a run's start the peers begin epoch 0 together: nobody is late
        return view

    def _next_epoch(self, view: RunView) -> RunView:
        """Wait (at most ``state_load_timeout``) until an epoch that began before this peer joined has
        been reported (the run's first epoch too: ``view.epoch`` counts reported epochs). The peers
        training it did not know of this peer and formed its round without waiting for it; a peer that
        joined then loaded its state would train it, find that round gone, and wait the whole step
        deadline for nothing (measured: 15 s). Every epoch that begins after the join expects this peer,
        so the state loaded once that epoch begins leads to a round it makes."""
        deadline = time.monotonic() + self.settings.state_load_timeout
        joined_at = view.epoch
        while view.epoch <= joined_at and time.monotonic() < deadline and not self.stop.is_set():
            self.stop.wait(min(self.settings.run_poll_interval, 0.2))
            view = self.link.view() or view
        return view

    def _share_state(self) -> TrainingState:
        """The state at the current epoch's start: with local updates the parameters move during the
        epoch, so the snapshot taken when it began is what a joining peer gets."""
        with self.lock:
            return self.snapshot or capture(self.epoch, self.params, self.optimizers)

    def _initial_state(self, others: bool) -> None:
        """The others' state when the run is under way, else the local checkpoint (a restart after a
        crash), whichever is further along; else the spec's seed."""
        checkpoint = self.workdir / "checkpoint.pt"
        local = None
        if checkpoint.exists():
            try:
                saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
                local = TrainingState(saved["epoch"], saved["tensors"], saved["layout"], saved["scalars"])
            except Exception as e:  # a checkpoint cut short by the crash itself, say
                logger.warning(f"Ignoring the unreadable checkpoint {checkpoint}: {e!r}")
        if others:
            assert self.averager is not None
            loaded = self.averager.load_state(self.settings.state_load_timeout)
            if (
                loaded is not None
                and (local is None or loaded.epoch >= local.epoch)
                and self._apply_state(loaded, FROM_PEERS)
            ):
                return
            if local is None:
                logger.warning("No peer sent a usable training state in time; starting from the spec's seed")
        if local is not None:
            self._apply_state(local, f"the local checkpoint {checkpoint}")

    def _apply_state(self, state: TrainingState, source: str) -> bool:
        """Load ``state``; False (and nothing changed but, at worst, the optimizer) if it does not fit."""
        with self.lock:
            try:
                restore(state, self.params, self.optimizers)
            except Exception as e:  # a peer's state is untrusted data: anything malformed is refused
                logger.warning(f"Refusing the training state from {source}: {e!r}")
                return False
            self.epoch = state.epoch
            self.snapshot = None
        self._new_start()
        if self.averager is not None:
            self.averager.state_sharing_priority = self.epoch
        logger.info(f"Loaded the training state of epoch {self.epoch} from {source}")
        self.events.write("state_loaded", epoch=self.epoch, source=source)
        return True

    # ---------------------------------------------------------------------------------------- training

    def run(self) -> int:
        view = self.prepare()
        if view.state == "settling":  # restarted after a crash at the very end: no DHT needed to finish
            self._initial_state(others=False)
            return self._finish(view)
        view = self.connect(view)
        last_view = view
        while not self.stop.is_set():
            view = self.link.view() or last_view
            last_view = view
            # a peer dropped and matched again has two matches: the active one is the one that counts
            matched = any(p.account == self.identity.account and p.state == "active" for p in view.peers)
            if not matched or self.link.ended:
                logger.info(f"This peer's part in {self.run_id} is over ({self.link.ended or 'match ended'})")
                return 0
            if view.state == "settling":
                return self._finish(view)
            if view.state in REPORTING:
                self._audit()
            if view.state not in BIDDING:
                logger.info(f"Run {self.run_id} is {view.state}: {view.reason}")
                return 0
            if view.state != "running":  # paused or recruiting: wait for peers
                self.stop.wait(self.settings.run_poll_interval)
                continue
            live = [p.account for p in live_peers(view) if p.joined]
            if self.identity.account not in live:
                live.append(self.identity.account)
            if len(live) < view.peers_min:  # the first peers wait for each other, never train alone
                self.stop.wait(self.settings.run_poll_interval)
                continue
            if self._behind(view) and self._catch_up(self.epoch) is not None:
                continue
            self._epoch(live)
        return 0

    def _behind(self, view: RunView) -> bool:
        """Whether another live peer has reported an epoch past this peer's current one: its round
        would find nobody (lock-step peers are at most one epoch apart), so it loads their state first."""
        return self._reported(view, self.epoch + 1)

    def _reported(self, view: RunView | None, epoch: int) -> bool:
        """Whether another live peer has reported ``epoch`` or a later one (so it is past ``epoch``)."""
        if view is None:
            return False
        reported = [
            p.epoch for p in live_peers(view) if p.account != self.identity.account and p.epoch is not None
        ]
        return max(reported, default=-1) >= epoch

    def _epoch(self, live: list[str]) -> None:
        started, self.data_wait, self.load_wait = time.monotonic(), 0.0, 0.0
        epoch, spec = self.epoch, self.spec
        # Just loaded from the swarm, this peer is as far into the epoch as the download took: its own
        # share would reach the round after the others closed it, and it would load again, and again
        # (measured: 12 and 28 times in a row, joining a 104 MB run). It enters the round at once with
        # no samples instead, so it receives the group's average; its share waits for the next epoch.
        late, self.late = self.late and len(live) > 1, False
        ids = [] if late else self.stream.take(spec.batch.target, live)
        self._fetch_shards()
        sketch = Sketcher(self.n_params, grad_seed(self.run_id, epoch, self.identity.account))
        param_sketch = self._start_of(epoch)
        start = None
        if self.outer is not None:
            with self.lock:
                self.snapshot = capture(epoch, self.params, self.optimizers)
            start = [p.detach().clone() for p in self.params]
        lr = learning_rate(
            spec.optimizer.lr, spec.schedule.name, spec.schedule.warmup_epochs, epoch, self.total_epochs
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        chunks = [ids[o : o + spec.batch.per_peer] for o in range(0, len(ids), spec.batch.per_peer)]
        work = EpochWork(
            chunks=chunks,
            sketch=sketch,
            compute=lambda keep: self._compute(epoch, ids, chunks, sketch, start, keep),
            spare_ids=self.stream.spare,
            shapes=[p.shape for p in self.params],
        )
        contribution = self.behaviour.contribute(work) if chunks else work.compute(False)
        micro = contribution.micro  # validated with the report they belong to
        for b, update in zip(self.buffers, contribution.update, strict=True):
            b.copy_(update)
        samples = sum(len(m["ids"]) for m in micro)
        computed = time.monotonic()
        outcome, group_size, reportable, allreduce_s = self._average(epoch, samples, live, param_sketch)
        if outcome in ("averaged", "alone") and not all(bool(torch.isfinite(b).all()) for b in self.buffers):
            # The group averaged the same values, so every member skips this step alike and they stay in
            # agreement; the parameters keep their last good state. The epoch is not reported.
            logger.warning(f"Epoch {epoch}: the averaged update is not finite; skipping it")
            self._apply(start, skip=True)
            outcome = "skipped"
        self.events.write(
            "epoch",
            epoch=epoch,
            outcome=outcome,
            params=param_sketch,
            group=group_size,
            samples=samples,
            compute_s=round(computed - started, 4),
            data_s=round(self.data_wait, 4),
            round_s=round(time.monotonic() - computed, 4),
            load_s=round(self.load_wait, 4),
            allreduce_s=round(allreduce_s, 4),
        )
        if outcome == "redo" and self.snapshot is not None:  # local updates moved the parameters: rewind
            with self.lock:
                restore(self.snapshot, self.params, self.optimizers)
                self.snapshot = None
        if outcome not in ("averaged", "alone"):
            return
        self._apply(start)
        seconds = time.monotonic() - started
        if not samples or not reportable:  # too little data for a share of this step, or out of step
            return
        loss = sum(m["loss"] * len(m["ids"]) for m in micro) / samples
        try:
            body = ReportBody(
                epoch=epoch,
                samples=samples,
                loss=loss,
                seconds=max(seconds, 1e-6),
                group_size=group_size,
                param_sketch=param_sketch,
                micro_batches=[MicroBatch(**m) for m in micro],
                device=device_name(self.device),
            )
        except ValidationError as e:  # a loss that is not finite, say: no report, training goes on
            logger.warning(f"Epoch {epoch} is not reported: {describe(e, 'report')}")
        else:
            self.link.report(body)
        self._checkpoint()
        logger.info(
            f"Epoch {epoch}: {samples} samples, loss {loss:.4f}, group of {group_size}, {seconds:.2f} s"
        )

    def _start_of(self, epoch: int) -> list[float]:
        """The sketch of the parameters ``epoch`` starts from; when this peer audits, they are kept from
        the moment the previous epoch's step made them (:meth:`_apply`), so that a peer that stops before
        training ``epoch`` (the run reached its target) can still audit the others' reports of it."""
        kept = self.snapshots.get(epoch) if self.snapshots is not None else None
        if kept is not None:
            return kept.param_sketch
        param_sketch = Sketcher(self.n_params, params_seed(self.run_id, epoch))(self.params)
        if self.snapshots is not None:
            self.snapshots.put(epoch, self.model, param_sketch)
        return param_sketch

    def _new_start(self) -> None:
        """The parameters as they are now start ``self.epoch``: what was kept of it and later epochs is
        stale. Only this thread changes the parameters, so they are read without the lock."""
        if self.snapshots is not None:
            self.snapshots.forget_from(self.epoch)
            self._start_of(self.epoch)

    def _compute(
        self,
        epoch: int,
        ids: list[int],
        chunks: list[list[int]],
        sketch: Sketcher,
        start: list[torch.Tensor] | None,
        keep_grads: bool,
    ) -> Contribution:
        """This peer's honest work for the epoch: every micro-batch's gradient (an inner step after each
        with local updates), its loss and sketch, and the samples-weighted mean gradient (or, with local
        updates, the change of the parameters) to average."""
        for total in self.sums:
            total.zero_()

        def step(chunk: list[int], grads: list[torch.Tensor]) -> None:
            if self.outer is not None:  # local updates: an inner step per micro-batch
                with self.lock:
                    self.optimizer.step()
            else:
                for total, g in zip(self.sums, grads, strict=True):
                    total.add_(g, alpha=len(chunk) / len(ids))

        loader = PrefetchLoader(
            self.reader, ids, self.spec.batch.per_peer, collate=self.task.batch, device=self.loader_device
        )
        with loader:
            micro, kept = compute_micro_batches(
                self.task,
                self.model,
                self.params,
                chunks,
                loader,
                sketch,
                lambda index: micro_seed(self.run_id, epoch, self.identity.account, index),
                step,
                keep_grads=keep_grads,
            )
        self.data_wait += loader.stats().wait_seconds
        if start is not None:
            for total, s, p in zip(self.sums, start, self.params, strict=True):
                total.copy_(s - p.detach())
        return Contribution(micro, self.sums, kept)

    def _audit(self) -> None:
        """Take the audits the coordinator has for this peer and answer each: the recomputed sketch and
        loss, or declined (an epoch it no longer holds, a recomputation that failed)."""
        if self.validator is None:
            return
        for audit in self.link.claim_audits(self.settings.audits_per_claim):
            try:
                result = self.validator.recompute(audit)
            except Exception as e:  # a dataset or task failure here must not stop training
                logger.warning(f"Audit {audit.id} could not be recomputed: {e!r}")
                result = AuditResultBody(declined=f"recomputation failed: {e!r}"[:300])
            self.link.submit_audit(audit.id, result)

    def _average(
        self, epoch: int, samples: int, live: list[str], param_sketch: list[float]
    ) -> tuple[str, int, bool, float]:
        """All-reduce this epoch's update: (the outcome, the group's size, whether this peer's work of
        the epoch can be reported, the all-reduce's seconds). Outcomes:

        - ``alone``: the only live peer; its own update is the step;
        - ``averaged``: the buffers hold the group's average, to apply. Not reportable when this peer's
          parameters differed from the group's and it loaded theirs: its gradients were taken at
          parameters no validator holds;
        - ``caught_up``: the round failed or this peer was out of step, and it loaded the state of peers
          further on: nothing to apply;
        - ``redo``: the round failed (no group formed, or it broke up and its retries ran out of time)
          and nobody is further on: nothing is applied, and the epoch is trained again. Applying this
          peer's own update instead would set it apart from every other member of the broken round.
        """
        assert self.averager is not None
        if len(live) == 1:
            return "alone", 1, True, 0.0
        self.events.write("averaging", epoch=epoch, group=len(live))
        if len(live) != self.group_target:
            try:
                self.averager.set_target_group_size(len(live), self.spec.averaging.timeout_seconds)
                self.group_target = len(live)
            except Exception as e:  # the round still forms, after the matchmaking time
                logger.warning(f"Could not tell the averager to expect {len(live)} peers: {e!r}")
        result = self.averager.average(
            self.buffers,
            epoch=epoch,
            weight=samples,
            gather={"account": self.identity.account, "params": param_sketch},
            timeout=self.averager.deadlines.step(self.spec.averaging.matchmaking_seconds),
            moved_on=lambda: self._reported(self.link.peek(), epoch),
        )
        if result.outcome == "failed":
            logger.warning(f"Epoch {epoch}: the averaging round failed; looking for peers further on")
            if self._catch_up(epoch) is not None:
                return "caught_up", 1, False, 0.0
            return "redo", 1, False, 0.0
        size = len(result.gathered)
        if self._defers_to_group(result.gathered, param_sketch):
            logger.warning(f"Epoch {epoch}: parameters differ from the group's; loading theirs")
            loaded = self._catch_up(epoch, same_epoch=True)
            if loaded is not None and loaded > epoch:
                return "caught_up", size, False, result.seconds
            return "averaged", size, False, result.seconds
        return "averaged", size, True, result.seconds

    def _defers_to_group(self, gathered: dict[str, Any], param_sketch: list[float]) -> bool:
        """Whether the group's members disagree with this peer's parameters and this peer should give way:
        when fewer agree with it than disagree, or as many and the smallest account is among the others
        (a deterministic tie-break, so that exactly one side of a two-peer split gives way). What other
        peers sent is untrusted: an entry that is not a sketch like ours is left out of the count."""
        agree, differ = 1, []
        for data in gathered.values():
            if not isinstance(data, dict) or data.get("account") == self.identity.account:
                continue
            theirs, account = data.get("params"), data.get("account")
            if not (
                isinstance(account, str)
                and isinstance(theirs, list)
                and len(theirs) == len(param_sketch)
                and all(isinstance(x, float) and math.isfinite(x) for x in theirs)
            ):
                continue
            if in_agreement(param_sketch, theirs, self.spec.averaging.compression):
                agree += 1
            else:
                differ.append(account)
        if not differ:
            return False
        return agree < len(differ) or (agree == len(differ) and min(differ) < self.identity.account)

    def _catch_up(self, epoch: int, *, same_epoch: bool = False) -> int | None:
        """Load the state of a peer further on than ``epoch`` (or, with ``same_epoch``, at it); the epoch
        loaded, or None when no such state came (or it did not fit)."""
        assert self.averager is not None
        began = time.monotonic()
        loaded = self.averager.load_state(self.settings.state_load_timeout)
        self.load_wait += time.monotonic() - began
        if loaded is None or loaded.epoch < epoch or (loaded.epoch == epoch and not same_epoch):
            return None
        if not self._apply_state(loaded, FROM_PEERS):
            return None
        self.late = not same_epoch  # loaded right after the round, it is in step with the others
        return loaded.epoch

    def _apply(self, start: list[torch.Tensor] | None, *, skip: bool = False) -> None:
        """Take the epoch's step with the averaged update and move to the next epoch; with ``skip`` only
        move on, the parameters back at the epoch's start (local updates moved them) or as they were."""
        with self.lock:
            if start is not None and self.snapshot is None:  # the group's state was loaded at this epoch
                start = [p.detach().clone() for p in self.params]
            if skip and self.snapshot is not None:  # local updates: the inner optimizer's state too
                restore(self.snapshot, self.params, self.optimizers)
            elif start is not None:
                for p, s in zip(self.params, start, strict=True):
                    p.data.copy_(s)
            if not skip:  # outer step from the epoch's start along the averaged change, or the step itself
                for p, b in zip(self.params, self.buffers, strict=True):
                    p.grad = b.to(p.device, copy=True)
                (self.outer if start is not None else self.optimizer).step()
            self.model.zero_grad(set_to_none=True)
            self.epoch += 1
            self.snapshot = None
        self._new_start()
        assert self.averager is not None
        self.averager.state_sharing_priority = self.epoch

    def _checkpoint(self) -> None:
        """Save the state the next epoch starts from, for a restart after a crash, in a thread of its
        own: a large model's save takes seconds (measured: 2.7 s for bytes-lm's 102M parameters with
        their AdamW state), which the next epoch's compute uses instead. While one save is still being
        written, later epochs skip theirs: a restart resumes at most a few epochs back (and from the
        swarm's state when the swarm is further on). The file is replaced whole or not at all."""
        if self.saving is not None and self.saving.is_alive():
            return
        state = self._share_state()  # a copy: training goes on while it is written
        self.saving = threading.Thread(target=self._save, args=(state,), name="checkpoint", daemon=True)
        self.saving.start()

    def _save(self, state: TrainingState) -> None:
        tmp = self.workdir / "checkpoint.pt.tmp"
        try:
            torch.save(
                {
                    "epoch": state.epoch,
                    "tensors": state.tensors,
                    "layout": state.layout,
                    "scalars": state.scalars,
                },
                tmp,
            )
            os.replace(tmp, self.workdir / "checkpoint.pt")
        except OSError as e:  # a full disk, say: training goes on without a fresh checkpoint
            logger.warning(f"Could not save the checkpoint of epoch {state.epoch}: {e!r}")

    # ---------------------------------------------------------------------------------------- the end

    def _finish(self, view: RunView) -> int:
        """Drain the reports; the first live peer uploads the final model once the others' last reports
        are in (or after ``report_drain_timeout``: ending the run refuses later reports); every peer audits
        until the run ends. Gives up after ``finish_timeout``: the coordinator then ends the run itself.
        """
        others_due = time.monotonic() + self.settings.report_drain_timeout  # one bound for all the waiting
        deadline = time.monotonic() + self.settings.finish_timeout
        self.link.drain(self.settings.report_drain_timeout)
        while not self.stop.is_set() and time.monotonic() < deadline:
            if view.state != "settling":
                return 0
            self._audit()  # the last epochs' reports are paid once their audits are decided
            if view.model is not None:
                self.stop.wait(self.settings.run_poll_interval)
                view = self.link.view() or view
                continue
            live = [p for p in live_peers(view) if p.joined]
            lead = bool(live) and live[0].account == self.identity.account and self.epoch > 0
            behind = [p for p in live[1:] if (p.epoch if p.epoch is not None else -1) < self.epoch - 1]
            if lead and (not behind or time.monotonic() > others_due):
                path = self.workdir / "model.pt"
                path.write_bytes(model_bytes(self.spec.task, dict(self.spec.options), self.epoch, self.model))
                try:
                    view = self.link.upload_model(path)
                    logger.info(f"Uploaded the final model of {self.run_id} (epoch {self.epoch})")
                    continue
                except (CoordinatorError, CoordinatorUnreachable) as e:  # the next view says what happened
                    logger.warning(f"Uploading the final model failed: {e}")
            self.stop.wait(self.settings.run_poll_interval)
            view = self.link.view() or view
        return 0

    def close(self) -> None:
        if self.saving is not None:  # the last checkpoint is what a restart resumes from
            self.saving.join(self.settings.trainer_stop_timeout / 2)
        if self.averager is not None:
            self.averager.shutdown()
        if self.dht is not None:
            stop_dht(self.dht, self.settings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--identity", required=True, type=Path)
    parser.add_argument("--listen", action="append", default=[])
    args = parser.parse_args(argv)
    use_hivemind_log_handler("in_root_logger")  # this module's INFO lines too, in hivemind's format
    settings = load_settings()
    if settings.train_threads:
        torch.set_num_threads(settings.train_threads)
    identity = load_identity(args.identity)
    with RunLink(args.coordinator, identity, args.run_id) as link:
        trainer = Trainer(args.run_id, link, identity, settings, args.listen or ["/ip4/127.0.0.1/tcp/0"])
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: trainer.stop.set())
        try:
            return trainer.run()
        except TrainerExit as e:
            print(f"trainer: {e}", file=sys.stderr, flush=True)
            return e.code
        finally:
            link.drain(settings.report_drain_timeout)
            trainer.close()


if __name__ == "__main__":
    sys.exit(main())
