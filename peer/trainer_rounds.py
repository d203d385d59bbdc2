"""An epoch's round from the trainer's side (step 5 of :mod:`peer.trainer`): all-reducing the epoch's
update with the live peers (on the fast path, :mod:`peer.collective`, when the coordinator's group puts
this peer on it; else :class:`peer.averaging.RunAverager`), giving way to a group whose parameters
differ from this peer's, catching up with peers further on, and applying the step.

:class:`RoundsMixin` is a part of :class:`peer.trainer.Trainer`: its methods use the attributes that
``Trainer.__init__`` and ``prepare`` (:mod:`peer.trainer_setup`) set, and load states through
:mod:`peer.trainer_state`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from hivemind.utils import get_logger

from peer.averaging import NO_SAMPLES_WEIGHT, restore
from peer.events import in_agreement
from peer.protocol.commitment import TAMPER_TOLERANCE, Commitment, matches
from peer.protocol.run_schemas import BlameBody, CheckinBody, GroupView, RunView
from peer.run_link import live_peers
from peer.sketch import Sketcher
from peer.trainer_state import FROM_PEERS

logger = get_logger(__name__)


class RoundsMixin:
    """A :class:`peer.trainer.Trainer`'s rounds: whether it is behind, the epoch's all-reduce and what it
    means, catching up, and the step."""

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

    def _average(
        self,
        epoch: int,
        samples: int,
        live: list[str],
        param_sketch: list[float],
        group: GroupView | None,
        claim: bytes,
    ) -> tuple[str, int, bool, float]:
        """All-reduce this epoch's update: (the outcome, the group's size, whether this peer's work of
        the epoch can be reported, the all-reduce's seconds); ``claim`` is the digest of the micro-batches
        it will report, which its round commitment names (:func:`peer.protocol.commitment.claim_digest`).
        Outcomes:

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
        if self.fast is not None and self.fast.usable(group):
            if len(group.members) > 1:
                return self._fast_average(epoch, samples, group, param_sketch, claim)
            # The coordinator's group is this peer alone while other peers are live (their trainers are
            # starting or coming back): wait for the version that takes them in, as a round waits for
            # its members (hivemind's averager had waited out its matchmaking for peers on the fast path).
            self.path = "fast"
            if len(live) == 1:
                return "alone", 1, True, 0.0
            self.fast.regroup(group.version, failed=False)
            return "redo", 1, False, 0.0
        self.path = "hivemind"
        if len(live) == 1:
            return "alone", 1, True, 0.0
        self.events.write("averaging", epoch=epoch, group=len(live), path="hivemind")
        if len(live) != self.group_target:
            try:
                self.averager.set_target_group_size(len(live), self.spec.averaging.timeout_seconds)
                self.group_target = len(live)
            except Exception as e:  # the round still forms, after the matchmaking time
                logger.warning(f"Could not tell the averager to expect {len(live)} peers: {e!r}")
        sketcher = self.sketchers(epoch)
        weight = max(samples, NO_SAMPLES_WEIGHT)
        mine = Commitment(
            0, epoch, 0, float(weight), tuple(sketcher(self.buffers)), tuple(param_sketch), claim
        )
        for b in self.buffers:  # peer.adversary's noisy-round: something else than it committed to
            self.behaviour.tamper(b)
        result = self.averager.average(
            self.buffers,
            epoch=epoch,
            weight=weight,
            gather={
                "account": self.identity.account,
                "params": param_sketch,
                "commitment": mine.signed(self.run_id, self.identity).encode().hex(),
            },
            timeout=self.averager.deadlines.step(self.spec.averaging.matchmaking_seconds),
            moved_on=lambda: self._reported(self.link.peek(), epoch),
        )
        if result.outcome == "failed":
            logger.warning(f"Epoch {epoch}: the averaging round failed; looking for peers further on")
            if self._catch_up(epoch) is not None:
                return "caught_up", 1, False, 0.0
            return "redo", 1, False, 0.0
        ok, why = self._check_commitments(epoch, result.gathered, sketcher)
        if not ok:  # every honest member sees the same result and commitments, and refuses alike
            logger.warning(f"Epoch {epoch}: the averaging round is not applied ({why})")
            self.events.write("round_refused", epoch=epoch, outcome="rejected", reason=why[:300])
            return "redo", 1, False, 0.0
        return self._averaged(epoch, result.gathered, param_sketch, result.seconds)

    def _check_commitments(
        self, epoch: int, gathered: dict[str, Any], sketcher: Sketcher
    ) -> tuple[bool, str]:
        """Whether a round on hivemind's path gave the weighted mean of what its members committed to
        (each member's commitment travels, signed, in hivemind's gather): the fast path's check
        (:func:`peer.protocol.commitment.matches`), at the run's compression's rounding. A member whose
        commitment is missing, unsigned or of another epoch refuses the round. Nobody is blamed here:
        hivemind's all-reduce gives no member another's whole update to reveal. Rounds in 8-bit are not
        checked (:data:`peer.protocol.commitment.TAMPER_TOLERANCE` says why); their commitments still
        reach the coordinator with the reports."""
        compression = self.spec.averaging.compression
        if compression not in TAMPER_TOLERANCE:
            return True, ""
        commitments = []
        for data in gathered.values():
            account = data.get("account") if isinstance(data, dict) else None
            raw = data.get("commitment") if isinstance(data, dict) else None
            try:
                c = Commitment.decode(bytes.fromhex(raw))
            except (TypeError, ValueError):
                return False, f"member {str(account)[:12]}... sent no commitment"
            if not isinstance(account, str) or c.epoch != epoch or not c.verifies(self.run_id, account):
                return False, f"member {str(account)[:12]}...'s commitment is not its own for epoch {epoch}"
            commitments.append(c)
        return matches(sketcher(self.buffers), commitments, compression)

    def _averaged(
        self, epoch: int, gathered: dict[str, Any], param_sketch: list[float], seconds: float
    ) -> tuple[str, int, bool, float]:
        """The outcome of a round that averaged (on either path), given what its members gathered: this
        peer gives way (loads the group's state) when its parameters differ from the group's. What the
        members gathered goes into this epoch's report (the fast path's commitments, :meth:`_report`)."""
        self.witness = (epoch, gathered)
        size = len(gathered)
        if self._defers_to_group(gathered, param_sketch):
            logger.warning(f"Epoch {epoch}: parameters differ from the group's; loading theirs")
            loaded = self._catch_up(epoch, same_epoch=True)
            if loaded is not None and loaded > epoch:
                return "caught_up", size, False, seconds
            return "averaged", size, False, seconds
        return "averaged", size, True, seconds

    def _group(self) -> GroupView | None:
        """The newest group version this trainer knows of: from the view its loop fetched, or a newer one
        fetched in the background since. A trainer not in it (it was slow to return after a failed
        version, say) checks in, once per version, to be taken into the next one."""
        views = [v for v in (self.view, self.link.peek()) if v is not None and v.group is not None]
        group = max((v.group for v in views), key=lambda g: g.version, default=None)
        if group is None or group.version == self.checked_in:
            return group
        if not any(m.account == self.identity.account for m in group.members):
            self.checked_in = group.version
            return self._check_in(version=group.version) or group
        return group

    def _check_in(self, **kwargs: Any) -> GroupView | None:
        """Tell the coordinator where this peer is reached for the fast path (no address: it is not, and
        the run stays on hivemind's path while it is a member); the group it answers with, or None when
        the check-in failed (the next version without this peer makes it check in again)."""
        try:
            if self.fast is not None:
                return self.fast.checkin(**kwargs)
            body = CheckinBody(address=None, **kwargs)
            return self.link.call(lambda: self.link.client.group_checkin(self.run_id, body))
        except Exception as e:
            logger.warning(f"Check-in with the coordinator's group failed: {e!r}")
            return None

    def _fast_average(
        self, epoch: int, samples: int, group: GroupView, param_sketch: list[float], claim: bytes
    ) -> tuple[str, int, bool, float]:
        """The epoch's round on the fast path (:mod:`peer.collective`); the outcomes are :meth:`_average`'s.
        A round applied by no one (it broke, its members were at different epochs, or its result did not
        match the commitments) is trained again; a member behind the others loads their state first."""
        assert self.fast is not None
        self.path = "fast"
        size = len(group.members)
        self.events.write("averaging", epoch=epoch, group=size, path="fast", version=group.version)
        if not self.fast.ready(group, self._newer(group, time.monotonic())):
            # what stopped it (a member gone, a newer version) gives a new version: wait for it rather
            # than try this one again at once (a joiner with no samples to compute would spin)
            self.fast.regroup(group.version)
            return "redo", 1, False, 0.0
        result = self.fast.average(
            self.buffers,
            epoch=epoch,
            weight=max(samples, NO_SAMPLES_WEIGHT),
            param_sketch=param_sketch,
            claim=claim,
            wait_deadline=self.fast.deadlines.step(self.spec.averaging.matchmaking_seconds),
            newer=self._newer(group, time.monotonic()),
        )
        if result.outcome == "averaged":
            return self._averaged(epoch, result.gathered, param_sketch, result.seconds)
        logger.warning(
            f"Epoch {epoch}: the fast-path round is not applied ({result.outcome}: {result.reason})"
        )
        self.events.write("round_refused", epoch=epoch, outcome=result.outcome, reason=result.reason[:300])
        accused = [a for a in result.blamed if a != self.identity.account]
        if accused:
            self._blame(epoch, group.version, accused, result.reason)
        if result.outcome == "failed":
            self.fast.regroup(group.version)
        ahead = max(result.epochs.values(), default=epoch) > epoch or self._reported(self.link.peek(), epoch)
        if ahead and self._catch_up(epoch) is not None:
            return "caught_up", 1, False, 0.0
        return "redo", 1, False, 0.0

    def _blame(self, epoch: int, version: int, accused: list[str], reason: str) -> None:
        """Tell the coordinator whom this peer's reveal blamed for a refused round; it fails their epoch
        once most of the round's other members agree (:mod:`coordinator.round_store`)."""
        body = BlameBody(epoch=epoch, version=version, accused=accused, reason=reason[-300:])
        try:
            view = self.link.call(lambda: self.link.client.blame(self.run_id, body))
        except Exception as e:  # the group moved on, or the coordinator is away: the next refusal tells again
            logger.warning(f"Epoch {epoch}: could not blame {len(accused)} members of the round: {e!r}")
            return
        self.events.write("round_blamed", epoch=epoch, accused=accused, failed=view.failed)

    def _newer(self, group: GroupView, began: float) -> Callable[[], bool]:
        """Whether a round on ``group`` that began at ``began`` should stop waiting: a newer version
        formed, or the others stopped training. Asked only once the round is late (a peek starts a fetch
        of the run)."""
        assert self.fast is not None
        straggle = self.fast.deadlines.straggle()

        def newer() -> bool:
            if time.monotonic() - began < straggle:
                return False
            latest = self.link.peek()
            if latest is None:
                return False
            moved = latest.group is not None and latest.group.version > group.version
            return moved or latest.state != "running"

        return newer

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

    def _apply(
        self,
        start: list[torch.Tensor] | None,
        *,
        skip: bool = False,
        update: list[torch.Tensor] | None = None,
        advance: bool = True,
    ) -> None:
        """Take the epoch's step with the averaged update (``update``, else the buffers) and move to the
        next epoch; with ``skip`` only move on, the parameters back at the epoch's start (local updates
        moved them) or as they were. Without ``advance`` it is an extra step at this epoch (an overlapped
        round landed before a synchronous one)."""
        with self.lock:
            if start is not None and self.snapshot is None:  # the group's state was loaded at this epoch
                start = [p.detach().clone() for p in self.params]
            if skip and self.snapshot is not None:  # local updates: the inner optimizer's state too
                restore(self.snapshot, self.params, self.optimizers)
            elif start is not None:
                for p, s in zip(self.params, start, strict=True):
                    p.data.copy_(s)
            if not skip:  # outer step from the epoch's start along the averaged change, or the step itself
                for p, b in zip(self.params, update or self.buffers, strict=True):
                    p.grad = b.to(p.device, copy=True).view_as(p)
                (self.outer if start is not None else self.optimizer).step()
            self.model.zero_grad(set_to_none=True)
            self.snapshot = None
            if not advance:  # the epoch's start (which its report and audits name) stays as it was
                return
            self.epoch += 1
        self._new_start()
        self._announce()
