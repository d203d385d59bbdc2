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
5. trains in lock-step epochs (on the fast path, :mod:`peer.collective`, while the coordinator's group
   puts the run on it; else :mod:`peer.averaging`): its share of the target batch from its assigned
   samples, one all-reduce with the peers at the same epoch, the same update everywhere; after each
   epoch it queues a signed contribution report (samples, loss, per-micro-batch gradient sketches, a
   sketch of the parameters the epoch started from) and checkpoints locally;
6. validates: once an epoch it takes audits of the other peers' reports from the coordinator and
   recomputes them (:mod:`peer.validator`) at the epoch-start parameters it keeps for recent epochs;
7. when the run is settling, the first live peer in match order uploads the final model, and every peer
   goes on validating until the run's last audits are decided.

A round whose group disagrees with this peer's parameters, or that found no group while others are
live, means this peer fell out of step: it loads the state from the others instead of reporting.

Where the parts live: this module holds the :class:`Trainer`'s loop over the run's states, an epoch's
work and report, the audits, the end of the run and the process's entry point. The Trainer's other
parts are mixins of their own modules: :mod:`peer.trainer_setup` (steps 1 to 3), :mod:`peer.trainer_state`
(step 4 and the local checkpoint) and :mod:`peer.trainer_rounds` (an epoch's all-reduce, catching up and
the step). The samples of a step come from :mod:`peer.samples`, the exit codes from
:mod:`peer.trainer_exit`, the final model file's format from :mod:`peer.model_file`.
"""

from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hivemind.utils import get_logger
from hivemind.utils.logging import use_hivemind_log_handler
from pydantic import ValidationError

from peer.adversary import Contribution, EpochWork, behaviour
from peer.averaging import RunAverager, TrainingState, capture, learning_rate, restore
from peer.collective import FastPath
from peer.data.loader import PrefetchLoader
from peer.events import EventLog
from peer.model_file import model_bytes
from peer.node import stop_dht
from peer.protocol.client import CoordinatorError, CoordinatorUnreachable
from peer.protocol.identity import Identity, load_identity
from peer.protocol.run_schemas import (
    MAX_ROUND_MEMBERS,
    AuditResultBody,
    AuditTask,
    MicroBatch,
    ReportBody,
    ReportView,
    RoundCommitment,
    RunView,
)
from peer.protocol.spec import describe
from peer.protocol.states import BIDDING, REPORTING
from peer.run_link import RunLink, live_peers
from peer.settings import PeerSettings, load_settings
from peer.sketch import Sketcher
from peer.trainer_exit import TrainerExit
from peer.trainer_overlap import EpochDone, OverlapMixin
from peer.trainer_rounds import RoundsMixin
from peer.trainer_setup import SetupMixin
from peer.trainer_state import StateMixin
from peer.validator import Snapshots, Validator, compute_micro_batches, device_name, micro_seed

logger = get_logger(__name__)


class Trainer(SetupMixin, StateMixin, RoundsMixin, OverlapMixin):
    def __init__(
        self,
        run_id: str,
        link: RunLink,
        identity: Identity,
        settings: PeerSettings,
        listen: list[str],
        announce: list[str],
    ):
        self.run_id = run_id
        self.link = link
        self.identity = identity
        self.settings = settings
        self.listen = listen
        self.announce = announce  # public addresses of the run's DHT (a port forwarded to this host)
        self.stop = threading.Event()
        self.lock = threading.RLock()  # held while parameters change; the averager copies state under it
        self.workdir = settings.home / "runs" / run_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dht = None
        self.averager: RunAverager | None = None
        self.fast: FastPath | None = None  # this peer's side of the fast path, when it offers one
        self.view: RunView | None = None  # the run as the loop last fetched it (its group decides the path)
        self.checked_in = 0  # the last group version this peer asked to be taken into (_group)
        self.path = "hivemind"  # the path of the epoch's round, for the event log
        self.epoch = 0
        self.group_target = 0
        self.snapshot: TrainingState | None = None  # the epoch's start, while local updates move on
        self.device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.loader_device = self.device if self.device.type == "cuda" else None
        self.behaviour = behaviour(settings.adversary)
        self.snapshots: Snapshots | None = None
        self.validator: Validator | None = None
        self.saver: threading.Thread | None = None  # writes the checkpoints (_checkpoint)
        self.to_save: queue.SimpleQueue[TrainingState] = queue.SimpleQueue()
        self.saved = threading.Event()  # no checkpoint is being written
        self.saved.set()
        self.late = False  # the state was just loaded from the swarm, mid-epoch (_epoch)
        self.witness: tuple[int, dict[str, Any]] | None = None  # (epoch, its fast round's gathered)
        self.announced = -float("inf")  # when the epoch was last announced in the DHT (_announce)
        self.events = EventLog(self.workdir / "events.jsonl")
        link.on_accepted = lambda body: self.events.write(
            "report_accepted", epoch=body.epoch, samples=body.samples
        )

    # ---------------------------------------------------------------------------------------- training

    def run(self) -> int:
        view = self.prepare()
        if view.state == "settling":  # restarted after a crash at the very end: no DHT needed to finish
            self._initial_state(others=False)
            return self._finish(view)
        return self._train(self.connect(view))

    def _train(self, view: RunView) -> int:
        """The training loop, until this peer's part ends or the run settles (then :meth:`_finish`).

        The run's view it acts on is the one fetched in the background while the last epoch trained
        (``RunLink.peek``): at most one epoch old, and no request on the step's critical path (a blocking
        fetch cost a round trip to the coordinator every epoch)."""
        last_view = view
        while not self.stop.is_set():
            view = self.link.peek() or last_view
            if view.state != last_view.state or view.group != last_view.group:
                view = self.link.view() or view  # a change: act on the freshest view of it
            last_view = self.view = view
            # a peer dropped and matched again has two matches: the active one is the one that counts
            matched = any(p.account == self.identity.account and p.state == "active" for p in view.peers)
            if not matched or self.link.ended:
                logger.info(f"This peer's part in {self.run_id} is over ({self.link.ended or 'match ended'})")
                return 0
            if view.state == "settling":
                self._end_in_flight()
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

    def _epoch(self, live: list[str]) -> None:
        report_wait = self.link.keep_up(
            self.settings.report_backlog, self.settings.audits_per_claim, self.stop
        )
        started, self.data_wait, self.load_wait = time.monotonic(), 0.0, 0.0
        self.epoch_audit_s, self.audit_seconds = self.audit_seconds, 0.0
        epoch, spec = self.epoch, self.spec
        # Just loaded from the swarm, this peer is as far into the epoch as the download took: its own
        # share would reach the round after the others closed it, and it would load again, and again
        # (measured: 12 and 28 times in a row, joining a 104 MB run). It enters the round at once with
        # no samples instead, so it receives the group's average; its share waits for the next epoch.
        late, self.late = self.late and len(live) > 1, False
        ids = [] if late else self.stream.take(spec.batch.target, live)
        self._fetch_shards()
        sketch = self.sketchers(epoch)
        self._predict()  # an overlapped epoch computes where the round in flight takes the parameters
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
        done = EpochDone(epoch, samples, micro, param_sketch, computed - started)
        group = self._group()
        if self._overlaps(group):
            self._overlapped(done, group, computed, report_wait)
            return
        if not self._settle_in_flight():  # it found this peer out of step and loaded the group's state
            self._epoch_event(done, "caught_up", computed, report_wait)
            return
        averaged = self._average(epoch, samples, live, param_sketch, group, done.claim)
        outcome, group_size, reportable, allreduce_s = averaged
        if outcome in ("averaged", "alone") and not all(bool(torch.isfinite(b).all()) for b in self.buffers):
            # The group averaged the same values, so every member skips this step alike and they stay in
            # agreement; the parameters keep their last good state. The epoch is not reported.
            logger.warning(f"Epoch {epoch}: the averaged update is not finite; skipping it")
            self._apply(start, skip=True)
            outcome = "skipped"
        self._epoch_event(done, outcome, computed, report_wait, group=group_size, allreduce_s=allreduce_s)
        if outcome == "redo" and self.snapshot is not None:  # local updates moved the parameters: rewind
            with self.lock:
                restore(self.snapshot, self.params, self.optimizers)
                self.snapshot = None
        if outcome not in ("averaged", "alone"):
            return
        self._apply(start)
        if reportable:  # else out of step: its gradients were taken at parameters no validator holds
            # its compute time, as on the overlapped path: the round's wait is the slowest member's pace,
            # and counted in it every peer would show the same samples/s whatever it delivers
            # (coordinator.capacity measures and bills each peer on its own seconds)
            self._report(done, group_size)

    def _epoch_event(
        self,
        done: EpochDone,
        outcome: str,
        computed: float,
        report_wait: float,
        *,
        group: int = 1,
        allreduce_s: float = 0.0,
        **extra: Any,
    ) -> None:
        """The event log's line for an epoch: where its time went (compute, data, the round, loading a
        state, waiting for the report backlog, the audits recomputed before it) and what its round gave."""
        self.events.write(
            "epoch",
            epoch=done.epoch,
            outcome=outcome,
            path=self.path,
            params=done.param_sketch,
            group=group,
            samples=done.samples,
            compute_s=round(done.seconds, 4),
            data_s=round(self.data_wait, 4),
            round_s=round(time.monotonic() - computed, 4),
            load_s=round(self.load_wait, 4),
            allreduce_s=round(allreduce_s, 4),
            report_wait_s=round(report_wait, 4),
            audit_s=round(self.epoch_audit_s, 4),
            round_bytes=self._element_bytes() * self.n_params if group > 1 else 0,
            model_bytes=self._element_bytes() * self.n_model_params,
            **extra,
        )

    def _element_bytes(self) -> int:
        """A parameter's bytes in this epoch's round: 4, or 2 with fp16; 8bit is 1 on hivemind's averager
        (plus its per-chunk scales) and fp16 on the fast path."""
        compression = self.spec.averaging.compression
        return {"none": 4, "fp16": 2, "8bit": 2 if self.path == "fast" else 1}[compression]

    def _report(self, done: EpochDone, group_size: int) -> None:
        """Queue the signed report of an epoch whose round was applied, and checkpoint the state it led
        to; an epoch with too little data for a share of the step has nothing to report."""
        if not done.samples:
            return
        loss = sum(m["loss"] * len(m["ids"]) for m in done.micro) / done.samples
        gathered = self.witness[1] if self.witness is not None and self.witness[0] == done.epoch else {}
        # keyed by account on the fast path, by peer id on hivemind's: each entry names its account
        signed = [(g["account"], g["commitment"]) for g in gathered.values() if "commitment" in g]
        mine = next((i for i, (a, _) in enumerate(signed) if a == self.identity.account), 0)
        signed = (signed[mine:] + signed[:mine])[:MAX_ROUND_MEMBERS]  # its own first, then the next ones
        try:
            body = ReportBody(
                epoch=done.epoch,
                samples=done.samples,
                loss=loss,
                seconds=max(done.seconds, 1e-6),
                group_size=group_size,
                param_sketch=done.param_sketch,
                micro_batches=[MicroBatch(**m) for m in done.micro],
                device=device_name(self.device),
                round=[RoundCommitment(account=a, commitment=c) for a, c in signed],
            )
        except ValidationError as e:  # a loss that is not finite, say: no report, training goes on
            logger.warning(f"Epoch {done.epoch} is not reported: {describe(e, 'report')}")
        else:
            self.link.report(body)
        self._checkpoint()
        logger.info(
            f"Epoch {done.epoch}: {done.samples} samples, loss {loss:.4f}, group of {group_size}, "
            f"{done.seconds:.2f} s"
        )

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
                autocast=self.autocast,
            )
        self.data_wait += loader.stats().wait_seconds
        if start is not None:
            for total, s, p in zip(self.sums, start, self.params, strict=True):
                total.copy_(s - p.detach())
        return Contribution(micro, self.sums, kept)

    def _audit(self) -> None:
        """Recompute the audits the coordinator gave this peer and answer each: the recomputed sketch and
        loss, or declined (an epoch it no longer holds, a recomputation that failed). The recomputation
        is inline, so that auditing keeps pace with training (an audit of an epoch older than the
        snapshots kept, ``HIVEMARKET_AUDIT_WINDOW``, can only be declined; tried in a thread of its own,
        it fell behind the fast path's epochs and the audits expired). Claiming and answering travel in
        the background, one claim's worth an epoch, while auditing keeps up; when it is behind (a full
        claim: audits are waiting; or a claim refused for load) the next claim is awaited and recomputed
        before training on, until one brings nothing new. That is the backpressure: without it, two peers
        at 30 epochs/s on digits went over the coordinator's 50 requests/s per account, their claims were
        refused, they fell out of the window within 10 s and every later audit expired: the reports went
        unpaid and the run never reached its target."""
        if self.validator is None:
            return
        began, behind = time.monotonic(), False
        shown: dict[tuple[int, str], ReportView] | None = None

        def claim_of(audit: AuditTask) -> tuple[list[float], float] | None:
            """What a lazy validator (peer.adversary) can learn of an audited claim: what the API shows
            (fetched once a round, and only when asked: an honest validator never asks)."""
            nonlocal shown
            if shown is None:
                listed = self.link.call(lambda: self.link.client.reports(self.run_id))
                shown = {(r.epoch, r.account): r for r in listed}
            report = shown.get((audit.epoch, audit.account))
            batch = report.micro_batches[audit.index] if report else None
            if batch is None or batch.sketch is None or batch.loss is None:
                return None
            return batch.sketch, batch.loss

        while not self.stop.is_set():
            tasks, behind = self.link.claimed_audits(self.settings.audits_per_claim, wait=behind)
            for audit in tasks:
                try:
                    result = self.behaviour.answer(audit, self.validator.recompute, claim_of)
                except Exception as e:  # a dataset or task failure here must not stop training
                    logger.warning(f"Audit {audit.id} could not be recomputed: {e!r}")
                    result = AuditResultBody(declined=f"recomputation failed: {e!r}"[:300])
                self.link.answer_audit(audit.id, result)
            if not behind:
                break
        self.audit_seconds += time.monotonic() - began

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
        self.saved.wait(self.settings.trainer_stop_timeout / 2)  # what a restart resumes from
        if self.fast is not None:
            self.fast.close()
        self._close_rounds()
        if self.averager is not None:
            self.averager.shutdown()
        if self.dht is not None:
            stop_dht(self.dht, self.settings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument(
        "--coordinator", required=True, help="Its URL, or its replicas' URLs comma-separated (tried in turn)."
    )
    parser.add_argument("--identity", required=True, type=Path)
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--announce", action="append", default=[])
    args = parser.parse_args(argv)
    use_hivemind_log_handler("in_root_logger")  # this module's INFO lines too, in hivemind's format
    settings = load_settings()
    if settings.train_threads:
        torch.set_num_threads(settings.train_threads)
    identity = load_identity(args.identity)
    with RunLink(args.coordinator, identity, args.run_id, settings.view_refresh_interval) as link:
        listen = args.listen or ["/ip4/127.0.0.1/tcp/0"]
        trainer = Trainer(args.run_id, link, identity, settings, listen, args.announce)
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
