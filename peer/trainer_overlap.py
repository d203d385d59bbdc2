"""Overlapped rounds (``averaging.overlap``, the default on the fast path): the all-reduce of epoch t runs
in a thread of its own while epoch t+1 computes, and the step after epoch t+1 applies epoch t's average.

Why: a synchronous round is the step's critical path (measured on digits, 4 peers on 2 cores: the round
was 59% of a fast-path step). With one-step-delayed gradients the round costs a step only what it takes
beyond the next epoch's compute.

What stays as in a synchronous run, and how:

- Every epoch starts from the same parameters on every member: each applies the same averaged update
  (or none, when the round was applied by no one) at the same epoch boundary. Validators recompute a
  report at the parameters its epoch started from, as before.
- Work is reported when its round is applied, one epoch later than synchronously; a round that broke,
  was out of step or was refused (:mod:`peer.collective`) is applied by no one, and that epoch's work is
  neither applied nor reported (it is not trained again: the next epoch's work is already done).
- A state handed to a joiner carries the round still to apply (``TrainingState.pending``): the donor waits
  for that round to end (within its deadlines) before answering, so that the joiner applies the same
  update at the end of its first epoch as everyone else.
- Leaving the fast path (a peer without an address joined, the run is down to one peer), the round in
  flight is applied as an extra step before the synchronous round, the same on every member.

:class:`OverlapMixin` is a part of :class:`peer.trainer.Trainer`.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.utils import get_logger

from peer.averaging import NO_SAMPLES_WEIGHT, TrainingState
from peer.collective import FastRound
from peer.protocol.commitment import claim_digest
from peer.protocol.run_schemas import GroupView

logger = get_logger(__name__)


@dataclass
class EpochDone:
    """An epoch's work, kept until its round is applied and it can be reported."""

    epoch: int
    samples: int
    micro: list[dict[str, Any]]
    param_sketch: list[float]
    # its compute time: from the epoch's start to the end of its micro-batches, before its round (the
    # report's ``seconds``, which the coordinator bills and measures its delivered capacity on)
    seconds: float

    @property
    def claim(self) -> bytes:
        """The digest of the micro-batches it will report, which its round commitment names."""
        return claim_digest([(m["ids"], m["sketch"]) for m in self.micro])


@dataclass
class InFlight:
    """A round started but not yet applied: running in the background (``future``), or done and held as
    ``update`` (one loaded with a donor's state, whose ``done`` is None: nothing of it is this peer's)."""

    epoch: int
    done: EpochDone | None
    group: GroupView | None
    future: Future[FastRound] | None = None
    update: list[torch.Tensor] | None = None

    def result(self) -> FastRound:
        if self.future is None:
            return FastRound("averaged")
        try:
            return self.future.result()
        except Exception as e:  # the group was discarded under it (a state loaded, the trainer closing)
            return FastRound("failed", repr(e)[:300])


def predicted_step(optimizer: torch.optim.Optimizer) -> list[torch.Tensor | None]:
    """Per parameter, the step ``optimizer``'s state says comes next if the next gradient is like the
    recent ones (None where it says nothing: plain SGD, or no state yet). For Adam and AdamW that is the
    step it took last (the same moments at this epoch's learning rate); for SGD with momentum, the
    momentum buffer's step.

    Why: a delayed gradient is taken at parameters one step behind those it is applied to (measured on
    digits, 45 steps of Adam at lr 0.01: held-out loss 0.46 against 0.23 synchronous); taken at the
    parameters this step predicts, 0.29 (and within 1% at lr 0.003 over 400 steps). Every member and
    every joiner holds the same parameters and optimizer state, so all predict the same parameters."""
    steps: list[torch.Tensor | None] = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        for p in group["params"]:
            state = optimizer.state.get(p) or {}
            if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and "exp_avg" in state:
                k = float(state["step"])
                beta1, beta2 = group["betas"]
                mean = state["exp_avg"] / (1 - beta1**k)
                scale = (state["exp_avg_sq"] / (1 - beta2**k)).sqrt_().add_(group["eps"])
                step = mean.div_(scale).mul_(-lr)
                if isinstance(optimizer, torch.optim.AdamW) and group["weight_decay"]:
                    step.add_(p.detach(), alpha=-lr * group["weight_decay"])
                steps.append(step)
            elif isinstance(optimizer, torch.optim.SGD) and state.get("momentum_buffer") is not None:
                steps.append(state["momentum_buffer"] * (-lr * group["momentum"]))
            else:
                steps.append(None)
    return steps


class OverlapMixin:
    """A :class:`peer.trainer.Trainer`'s overlapped rounds."""

    in_flight: InFlight | None = None
    real: list[torch.Tensor] | None = None  # the parameters while the epoch computes at predicted ones
    _rounds: ThreadPoolExecutor | None = None

    def _predict(self) -> None:
        """With a round in flight, which this epoch's end applies, compute the epoch at the parameters
        that step will about lead to (:func:`predicted_step`); they are what the epoch starts from for
        its report and its audits. The parameters themselves are kept aside until the round lands."""
        if self.in_flight is None or self.real is not None:
            return
        with self.lock:
            self.real = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, step in zip(self.params, predicted_step(self.optimizer), strict=True):
                    if step is not None:
                        p.add_(step)
        self._new_start()

    def _unpredict(self) -> None:
        """Back to the parameters kept aside by :meth:`_predict` (the lock is held)."""
        if self.real is not None:
            with torch.no_grad():
                for p, real in zip(self.params, self.real, strict=True):
                    p.copy_(real)
            self.real = None

    def _overlaps(self, group: GroupView | None) -> bool:
        """Whether this epoch's round runs in the background: the spec asks for it, the run averages
        gradients (not local updates) and ``group`` puts this peer on the fast path with others."""
        return (
            self.spec.averaging.overlap
            and self.outer is None
            and self.fast is not None
            and self.fast.usable(group)
            and len(group.members) > 1
        )

    def _overlapped(self, done: EpochDone, group: GroupView, computed: float, report_wait: float) -> None:
        """End an overlapped epoch: apply the round in flight (the previous epoch's), then start this
        epoch's in the background."""
        assert self.fast is not None
        self.path = "fast"
        previous = self.in_flight
        result = previous.result() if previous is not None else None
        blocked = time.monotonic() - computed  # the round's time beyond the epoch's compute
        outcome, regrouped = self._land(previous, result, advance=True)
        launched = False
        if outcome not in ("caught_up", "redo"):  # else this epoch's work was done out of step: dropped
            group = regrouped or self._group() or group
            if self._overlaps(group) and self.fast.ready(group, self._newer(group, time.monotonic())):
                self._launch(done, group)
                launched = True
        self._epoch_event(
            done,
            outcome,
            computed,
            report_wait,
            group=len(result.gathered) if result is not None and result.gathered else 1,
            allreduce_s=result.seconds if result is not None else 0.0,
            overlap=True,
            wait_s=round(blocked, 4),
            launched=launched,
        )

    def _launch(self, done: EpochDone, group: GroupView) -> None:
        """Start ``done``'s round on ``group`` (ready) in the round thread."""
        assert self.fast is not None
        self.events.write("averaging", epoch=done.epoch, group=len(group.members), path="fast",
                          version=group.version, overlap=True)  # fmt: skip
        if self._rounds is None:
            self._rounds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round")
        with self.lock:  # a donor never sees the step applied without the round that follows it
            self.fast.load(self.buffers, max(done.samples, NO_SAMPLES_WEIGHT))
            future = self._rounds.submit(
                self.fast.reduce,
                epoch=done.epoch,
                param_sketch=done.param_sketch,
                claim=done.claim,
                mean=True,  # _update_of() applies the flat tensor's views
                # the members wait for the slowest one's next epoch in the gather, beside their own
                wait_deadline=self.fast.deadlines.overlapped(
                    self.spec.averaging.matchmaking_seconds, done.seconds
                ),
                newer=self._newer(group, time.monotonic()),
            )
            self.in_flight = InFlight(done.epoch, done, group, future)

    def _land(
        self, flight: InFlight | None, result: FastRound | None, *, advance: bool
    ) -> tuple[str, GroupView | None]:
        """Apply ``flight``'s round if every member does (its average, else nothing), report its work,
        and with ``advance`` move to the next epoch. Returns what happened to it, and the group version
        formed after it broke (or None):

        - ``averaged``, or ``none`` when nothing was in flight;
        - the round's outcome when no one applies it (``failed``, ``out_of_step``, ``rejected``) or it is
          not finite (``skipped``, alike on every member);
        - ``caught_up``: this peer was out of step and loaded the group's state, or ``redo``: it was and
          no state came; either way the epoch that just computed was done at the wrong parameters."""
        with self.lock:
            self._unpredict()
        if flight is None or result is None:
            if advance:
                self._apply(None, skip=True)
            return "none", None
        outcome = result.outcome
        mine = flight.done
        if outcome == "averaged" and mine and self._defers_to_group(result.gathered, mine.param_sketch):
            logger.warning(f"Epoch {flight.epoch}: parameters differ from the group's; loading theirs")
            self._drop_in_flight()
            return self._caught_up(flight.epoch, same_epoch=True), None
        update = self._update_of(flight)
        if outcome == "averaged" and not all(bool(torch.isfinite(u).all()) for u in update):
            logger.warning(f"Epoch {flight.epoch}: the averaged update is not finite; skipping it")
            outcome = "skipped"
        if outcome == "averaged":
            with self.lock:
                self.in_flight = None
                self._apply(None, update=update, advance=advance)
            if flight.done is not None and result.gathered:
                self.witness = (flight.epoch, result.gathered)
                self._report(flight.done, len(result.gathered))
            return "averaged", None
        if outcome != "skipped":
            logger.warning(
                f"Epoch {flight.epoch}: the round is applied by no one ({outcome}: {result.reason})"
            )
            self.events.write(
                "round_refused", epoch=flight.epoch, outcome=outcome, reason=result.reason[:300]
            )
        with self.lock:
            self.in_flight = None
            if advance:
                self._apply(None, skip=True)
        regrouped = None
        if outcome == "failed" and self.fast is not None and flight.group is not None:
            regrouped = self.fast.regroup(flight.group.version)
        if max(result.epochs.values(), default=flight.epoch) > flight.epoch:  # the others are further on
            return self._caught_up(self.epoch), None
        return outcome, regrouped

    def _caught_up(self, epoch: int, *, same_epoch: bool = False) -> str:
        loaded = self._catch_up(epoch, same_epoch=same_epoch)
        if loaded is None:
            return "redo"
        self.late = True  # the others compute the next epoch already: this peer joins its round at once
        return "caught_up"

    def _update_of(self, flight: InFlight) -> list[torch.Tensor]:
        """The averaged update ``flight`` holds: loaded with a state, or in the fast path's flat tensor."""
        if flight.update is not None:
            return flight.update
        assert self.fast is not None
        return self.fast.views([p.shape for p in self.params])

    def _settle_in_flight(self) -> bool:
        """Leaving overlapped rounds (the run went to hivemind's path, or is down to this peer): apply
        the round in flight as an extra step at this epoch, as every member does, before the synchronous
        round. False when it found this peer out of step (it loaded the group's state instead)."""
        if self.in_flight is None:
            return True
        outcome, _ = self._land(self.in_flight, self.in_flight.result(), advance=False)
        return outcome not in ("caught_up", "redo")

    def _end_in_flight(self) -> None:
        """The run settles: the round in flight is applied and its work reported if it averaged, else
        dropped. Its result is the same on every member, and a member still training applies it (seen
        in CI: the other member had reached the run's target first; dropping the round it had finished
        left its work in the model unreported)."""
        flight = self.in_flight
        if flight is None:
            return
        result = flight.result()  # within the round's deadlines; at once when a member has gone
        if result.outcome == "averaged":
            self._land(flight, result, advance=True)
        else:
            self._drop_in_flight()

    def _drop_in_flight(self) -> None:
        """Forget the round in flight, unapplied (a state is being loaded, or the run settles): its
        group is discarded so that its thread ends within a poll, not at its deadline."""
        flight, self.in_flight = self.in_flight, None
        if flight is not None and flight.future is not None and not flight.future.done():
            if self.fast is not None:
                self.fast.discard()
            flight.result()

    def _pending(self, state: TrainingState) -> TrainingState:
        """``state`` with the round still to apply at its epoch's end, for a joiner (the lock is held:
        the round thread never takes it, so waiting here only delays this trainer's next step)."""
        flight = self.in_flight
        if flight is None or flight.result().outcome != "averaged":
            return state  # nothing to apply, or no member applies it
        pending = [u.detach().to("cpu", copy=True) for u in self._update_of(flight)]
        return dataclasses.replace(state, pending=pending)

    def _adopt(self, state: TrainingState) -> None:
        """Take the round a loaded state says is still to apply (the lock is held)."""
        self._drop_in_flight()
        if state.pending is not None:
            self.in_flight = InFlight(state.epoch - 1, None, None, update=state.pending)

    def _close_rounds(self) -> None:
        if self._rounds is not None:
            self._rounds.shutdown(wait=False, cancel_futures=True)
