"""Where a trainer's training state comes from and where it goes (step 4 of :mod:`peer.trainer`, and the
checkpoint of step 5): the state it hands a joining peer, the state it starts from (the other peers', its
local checkpoint after a crash, or the spec's seed), a state loaded later to catch up, the local
checkpoint written after each reported epoch, and the sketches of epoch starts kept for audits.

:class:`StateMixin` is a part of :class:`peer.trainer.Trainer`: its methods use the attributes that
``Trainer.__init__`` and ``prepare`` (:mod:`peer.trainer_setup`) set. What a state holds and how it is
taken and restored (:class:`peer.averaging.TrainingState`) lives with the averager that serves it.
"""

from __future__ import annotations

import os
import threading
import time

import torch
from hivemind.utils import get_logger

from peer.averaging import TrainingState, capture, restore
from peer.protocol.sketch import params_seed
from peer.sketch import Sketcher

logger = get_logger(__name__)
FROM_PEERS = "the other peers"  # the source of a state downloaded from the swarm


class StateMixin:
    """A :class:`peer.trainer.Trainer`'s state: sharing it, loading it, checkpointing it, and the epoch
    starts its validator keeps."""

    def _share_state(self) -> TrainingState:
        """The state at the current epoch's start, for a joining peer: with local updates the parameters
        move during the epoch, so the snapshot taken when it began; with overlapped rounds, the round
        that the epoch's end applies too (:meth:`peer.trainer_overlap.OverlapMixin._pending`)."""
        with self.lock:
            state = self.snapshot or capture(self.epoch, self.real or self.params, self.optimizers)
            return self._pending(state)

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
            self.real = None  # the loaded parameters replace those kept aside from a prediction
            self._adopt(state)
        self._new_start()
        self._announce(force=True)
        logger.info(f"Loaded the training state of epoch {self.epoch} from {source}")
        self.events.write("state_loaded", epoch=self.epoch, source=source)
        return True

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

    def _announce(self, *, force: bool = False) -> None:
        """Tell the DHT this peer's epoch: the priority by which joiners choose whom to load the state from
        (the highest). At most every ``state_announce_interval`` unless ``force`` (a state just loaded):
        each change is a DHT store through the peers' p2pd daemons, and announced after every epoch of
        a digits swarm (8 epochs a second, 4 peers) the daemons took 0.28 of the machine's 2 cores. A late
        announcement only makes a joiner's choice among peers at about the same epoch; the state it
        loads is the donor's current one, whatever the priority said."""
        now = time.monotonic()
        due = force or now - self.announced >= self.settings.state_announce_interval
        if self.averager is None or self.averager.client_mode or not due:  # client mode: nothing to share
            return
        self.averager.state_sharing_priority = self.epoch
        self.announced = now

    def _checkpoint(self) -> None:
        """Save the state the next epoch starts from, for a restart after a crash, in a thread of its
        own: a large model's save takes seconds (measured: 2.7 s for bytes-lm's 102M parameters with
        their AdamW state), which the next epoch's compute uses instead. While one save is still being
        written, later epochs skip theirs: a restart resumes at most a few epochs back (and from the
        swarm's state when the swarm is further on). The file is replaced whole or not at all."""
        if not self.saved.is_set():
            return
        with self.lock:  # a copy: training goes on while it is written. Without the round in flight
            # (waiting for it would stall the step): a restart from it loads the others' state when they
            # are on, and alone it goes on from it.
            state = self.snapshot or capture(self.epoch, self.real or self.params, self.optimizers)
        self.saved.clear()
        self.to_save.put(state)
        if self.saver is None:  # one thread for every save: starting one per epoch cost a digits step
            # 4 ms in Thread.start alone (it waits for the new thread to run, behind the GIL)
            self.saver = threading.Thread(target=self._saving, name="checkpoint", daemon=True)
            self.saver.start()

    def _saving(self) -> None:
        while True:
            state = self.to_save.get()
            try:
                self._save(state)
            except Exception as e:  # training goes on without a fresh checkpoint, and saves go on
                logger.warning(f"Could not save the checkpoint of epoch {state.epoch}: {e!r}")
            self.saved.set()

    def _save(self, state: TrainingState) -> None:
        tmp = self.workdir / "checkpoint.pt.tmp"
        saved = {"epoch": state.epoch, "tensors": state.tensors, "layout": state.layout}
        torch.save({**saved, "scalars": state.scalars}, tmp)
        os.replace(tmp, self.workdir / "checkpoint.pt")
