"""Lock-step averaging rounds over hivemind's DecentralizedAverager, and the training state peers share.

Why not ``hivemind.Optimizer``: its progress tracker lets each peer step whenever the swarm's samples
reach the target batch, as seen through DHT records refreshed every fraction of a second. With steps of
milliseconds (the digits task on CPUs) each peer reached the target alone before the others' progress
arrived, the peers fell out of step, and the laggard then waited the full averaging timeout for a group
that had moved on ("could not find a group"; measured here: 10 epochs took 0.6 s on two peers and 50 s
on the third, and the parameters no longer agreed). A run here instead moves in lock-step: every epoch
each live peer computes its share of the target batch, then the peers all-reduce under a group key that
includes the epoch number, so a peer can only ever average with peers at the same epoch; every member of
a round applies the same averaged update, and the parameters agree after each epoch (to float rounding).

hivemind's all-reduce still does what it is good at: matchmaking over the DHT, splitting the tensors into
parts reduced by different peers, compression, banning a sender that fails mid-round, and serving the
training state to a peer that joins late (:meth:`RunAverager.load_state`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.control import AveragingStage
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
)
from hivemind.utils import MPFuture, get_logger

from peer import codec
from peer.deadlines import RoundDeadlines

logger = get_logger(__name__)

codec.install()  # before the averager process forks: it decodes what other peers send
POLL_SECONDS = 0.1  # how often a running round looks whether the others moved on
EPOCH_BITS = 16  # the group key carries the epoch modulo 2**16: peers 65k epochs apart never meet


class IncompleteRound(AllreduceException):
    """A member of the group failed while reducing its part of the tensors.

    hivemind fills such a part with each member's *own* values and reports success, so the members
    would apply different updates; raising instead makes hivemind retry the round with the members left
    (within the step's deadline), whose values then agree again.
    """


@dataclass(frozen=True)
class RoundResult:
    """What one all-reduce round gave: ``averaged`` (``values`` hold the group's average) or ``failed``
    (no group formed, or every retry of a broken round ran out of time; ``values`` are unchanged)."""

    outcome: Literal["averaged", "failed"]
    gathered: dict[str, Any]  # each member's gathered data by peer id (empty when failed)
    seconds: float  # the all-reduce itself, matchmaking not included (0 when failed)
    reason: str = ""


def compression(name: str) -> CompressionBase:
    return {"none": NoCompression, "fp16": Float16Compression, "8bit": codec.Uniform8Bit}[name]()


@dataclass
class TrainingState:
    """Parameters and optimizer states, flattened into tensors plus the metadata to rebuild them."""

    epoch: int
    tensors: list[torch.Tensor]
    layout: list[list[Any]]  # per optimizer: [[param index, key], ...] of its tensor states
    scalars: list[dict[str, Any]]  # per optimizer: its non-tensor states and param-group hyperparameters
    # An overlapped run's round still to be applied: the averaged update of the epoch before ``epoch``,
    # which the step after ``epoch`` applies (None: nothing pending, as in a synchronous run).
    pending: list[torch.Tensor] | None = None


def capture(
    epoch: int, params: Sequence[torch.Tensor], optimizers: Sequence[torch.optim.Optimizer]
) -> TrainingState:
    """A copy of the state (the caller holds the lock that keeps training from changing it meanwhile)."""
    tensors = [p.detach().to("cpu", copy=True) for p in params]  # sent to peers and saved: on the CPU
    layout, scalars = [], []
    for optimizer in optimizers:
        state = optimizer.state_dict()
        entries, plain = [], {}
        for index, values in sorted(state["state"].items()):
            for key, value in sorted(values.items()):
                if isinstance(value, torch.Tensor):
                    entries.append([index, key])
                    tensors.append(value.detach().to("cpu", copy=True))
                else:
                    plain[f"{index}/{key}"] = value
        layout.append(entries)
        scalars.append({"plain": plain, "groups": _groups(state["param_groups"])})
    return TrainingState(epoch, tensors, layout, scalars)


def restore(
    state: TrainingState, params: Sequence[torch.Tensor], optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """Load a state captured by a peer with the same model and optimizers.

    The state comes from another peer, so it is checked whole before anything changes: the number and
    shapes of the tensors, finite values, and optimizer states shaped like their parameters. Raises
    ValueError (or TypeError for data of the wrong kind) and leaves the model and optimizers as they were.
    """
    expected = len(params) + sum(len(entries) for entries in state.layout)
    if len(state.layout) != len(optimizers) or len(state.tensors) != expected:
        raise ValueError(
            f"the state holds {len(state.tensors)} tensors for {len(state.layout)} optimizers; this run's "
            f"model and optimizers need {expected} for {len(optimizers)}"
        )
    for p, value in zip(params, state.tensors, strict=False):
        if p.shape != value.shape:
            raise ValueError(f"a parameter of shape {tuple(value.shape)} was sent for {tuple(p.shape)}")
    if not all(bool(torch.isfinite(t).all()) for t in state.tensors if t.is_floating_point()):
        raise ValueError("the state holds values that are not finite")
    if state.pending is not None:
        if len(state.pending) != len(params):
            raise ValueError(f"the pending update holds {len(state.pending)} tensors for {len(params)}")
        for p, value in zip(params, state.pending, strict=True):
            if p.shape != value.shape or not value.is_floating_point():
                raise ValueError(
                    f"a pending update of shape {tuple(value.shape)} was sent for {tuple(p.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError("the pending update holds values that are not finite")
    rest = iter(state.tensors[len(params) :])
    loaded_states = []
    for optimizer, entries, scalars in zip(optimizers, state.layout, state.scalars, strict=True):
        keys = {(int(index), str(key)) for index, key in entries}
        if keys and keys != _state_keys(optimizer):
            raise ValueError(f"the optimizer state sent is not the one a {type(optimizer).__name__} keeps")
        ordered = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
        shapes = {i: p.shape for i, p in enumerate(ordered)}
        loaded: dict[int, dict[str, Any]] = {}
        for index, key in entries:
            value = next(rest)
            if value.numel() > 1 and value.shape != shapes.get(int(index)):
                raise ValueError(
                    f"optimizer state {key!r} of parameter {index} has shape {tuple(value.shape)}"
                )
            loaded.setdefault(int(index), {})[str(key)] = value
        for name, value in dict(scalars["plain"]).items():
            index, key = str(name).split("/", 1)
            if (int(index), key) in keys or not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"optimizer state {name!r} = {value!r} is not a plain number of its own")
            loaded.setdefault(int(index), {})[key] = value
        # Hyperparameters come from this peer's spec, never from the donor (a `maximize` would reverse
        # training); only the per-parameter state is taken.
        loaded_states.append({"state": loaded, "param_groups": optimizer.state_dict()["param_groups"]})
    backups = [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers]
    try:
        for optimizer, loaded_state in zip(optimizers, loaded_states, strict=True):
            optimizer.load_state_dict(loaded_state)
    except Exception:
        for optimizer, backup in zip(optimizers, backups, strict=True):
            optimizer.load_state_dict(backup)
        raise
    with torch.no_grad():
        for p, value in zip(params, state.tensors, strict=False):
            p.copy_(value)


def _state_keys(optimizer: torch.optim.Optimizer) -> set[tuple[int, str]]:
    """The (parameter index, key) of every tensor the optimizer keeps once it has stepped, found by one
    step of a copy on zero gradients (so it holds for any optimizer class and its options)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    twins = [torch.zeros_like(p, requires_grad=True) for p in params]
    groups, start = [], 0
    for group in optimizer.param_groups:
        count = len(group["params"])
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": twins[start : start + count]}
        )
        start += count
    probe = type(optimizer)(groups)
    for twin in twins:
        twin.grad = torch.zeros_like(twin)
    probe.step()
    return {
        (index, key)
        for index, values in probe.state_dict()["state"].items()
        for key, value in values.items()
        if isinstance(value, torch.Tensor)
    }


def _groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hyperparameters as msgpack-friendly values (tuples become lists)."""
    return [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"} for g in groups
    ]


class _UndeclareInBackground:
    """A group key manager's ``declare_averager`` whose withdrawals ("no longer looking for a group") are
    sent without waiting for them.

    Why: hivemind withdraws the declaration while it ends a search, holding the matchmaking lock until
    that DHT store returns. A round given up because the others moved on (``average``'s ``moved_on``)
    keeps the lock meanwhile, and the peer's next round, at the epoch it just caught up to, waits behind
    it ("Another look_for_group is already in progress") and can miss that group too. A withdrawal is
    advisory: a declaration expires anyway, and a peer that asks a member no longer looking is turned
    away and asks the next. Measured in bench/reliability.py's 20-kill peer-kill run: that message
    preceded the one survivor round over its deadline before this change (6 times in the run), and 5
    times after it with no round over its deadline; ending a search has other waits too (closing the
    streams of the leaders it asked), so the message remains.
    """

    def __init__(self, declare: Callable[..., Any]):
        self._declare = declare
        self._sending: set[asyncio.Task] = set()  # strong references until done

    async def __call__(
        self, group_key: str, peer_id: Any, expiration_time: float, looking_for_group: bool = True
    ) -> bool:
        if looking_for_group:
            return await self._declare(group_key, peer_id, expiration_time, looking_for_group=True)
        task = asyncio.create_task(
            self._declare(group_key, peer_id, expiration_time, looking_for_group=False)
        )
        self._sending.add(task)
        task.add_done_callback(self._sent)
        return True

    def _sent(self, task: asyncio.Task) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug(f"Withdrawing a group declaration failed: {task.exception()!r}")


#: The weight of a member that brings no samples (a peer that just loaded the state). hivemind averages
#: sum(w x) / sum(w): a group of such members alone divided 0 by 0, and each skipped a NaN update
#: (measured: 2 of 20 kills in bench/reliability.py's peer-kill). With this weight their zero updates
#: average to zero and the group moves on together; beside real samples (weights >= 1) it shrinks the
#: average by at most a millionth per such member.
NO_SAMPLES_WEIGHT = 1e-6


class RunAverager(DecentralizedAverager):
    """One run's averager: averages ``buffers`` in rounds keyed by epoch and serves the training state.

    ``share_state`` is called (in this process) when another peer downloads the state; it returns a
    :class:`TrainingState`.
    """

    def __init__(
        self,
        buffers: Sequence[torch.Tensor],
        dht: hivemind.DHT,
        *,
        prefix: str,
        share_state: Callable[[], TrainingState],
        max_peers: int,
        matchmaking_seconds: float,
        deadlines: RoundDeadlines,
        compression_name: str,
    ):
        self._share_state = share_state
        self.fp16 = compression_name == "fp16"
        self.deadlines = deadlines
        self._applied = (deadlines.chunk(), deadlines.round())
        # hivemind waits forever by default for a peer that died mid-round (measured: the survivors of
        # a peer killed while averaging hung until killed); every wait here has a bound, and the bounds
        # follow the measured rounds (peer.deadlines).
        super().__init__(
            buffers,
            dht,
            start=True,
            prefix=prefix,
            target_group_size=1 << max(1, (max_peers - 1).bit_length()),  # a power of 2, as hivemind asks
            min_group_size=2,
            min_matchmaking_time=matchmaking_seconds,
            # below min_matchmaking_time, as hivemind's matchmaking requires to rule out deadlocks
            request_timeout=matchmaking_seconds / 2,
            allreduce_timeout=self._applied[1],
            next_chunk_timeout=self._applied[0],
            compression=compression(compression_name),
            state_compression=NoCompression(),
            allow_state_sharing=not dht.client_mode,  # a peer behind a NAT cannot be downloaded from
        )

    def set_target_group_size(self, size: int, timeout: float) -> None:
        """Assemble a group as soon as ``size`` peers are in it (the live peers), not only after waiting
        the matchmaking time for peers that are not coming."""
        self._command("_set_target_group_size", timeout, size=max(2, size))

    def _command(self, name: str, timeout: float, **kwargs: Any) -> None:
        """Run ``name`` in the averager process (where matchmaking and all-reduce live) and wait for it."""
        future = MPFuture()
        self._outer_pipe.send((name, [], dict(kwargs, future=future)))
        future.result(timeout=timeout)

    async def _set_target_group_size(self, size: int, future: MPFuture) -> None:  # in the averager process
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        future.set_result(None)

    async def _set_deadlines(self, chunk: float, round: float, future: MPFuture) -> None:  # ditto
        self.next_chunk_timeout = chunk
        # a reducer waits on its slowest sender first, so it gets longer (hivemind requires it)
        self.allreduce_kwargs.update(sender_timeout=chunk, reducer_timeout=1.5 * chunk)
        self._allreduce_timeout = round
        future.set_result(None)

    async def _set_group_bits(self, group_bits: str, future: MPFuture) -> None:  # in the averager process
        self._epoch_bits = group_bits
        manager = self._matchmaking.group_key_manager
        if not isinstance(manager.declare_averager, _UndeclareInBackground):
            manager.declare_averager = _UndeclareInBackground(manager.declare_averager)
        await super()._set_group_bits(group_bits, future)

    async def _aggregate_with_group(
        self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any
    ) -> tuple[Any, float]:  # in the averager process: the gathered data, and how long the round took
        # hivemind moves each member's group key by a random index of its own once a group assembled (its
        # moshpit scheme). Put back the epoch's key, so that a retry of this round, if it breaks, looks
        # under the same key on every member; else each looks alone (measured: a round broken for all
        # four peers retried for 9 s without ever forming a group, and the whole epoch was lost).
        self._matchmaking.group_key_manager.group_bits = self._epoch_bits
        started = time.perf_counter()
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        return gathered, time.perf_counter() - started

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: bytes | None = None, **kwargs
    ) -> None:  # in the averager process
        await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        runner = self._running_groups[group_id or group_info.group_id].result()
        failed = runner.tensor_part_container.failed_size
        if failed:
            raise IncompleteRound(f"{failed} of {runner.tensor_part_container.total_size} values not reduced")

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], Sequence[Any]]:
        state = self._share_state()
        metadata = {"epoch": state.epoch, "layout": state.layout, "scalars": state.scalars}
        tensors = state.tensors
        if state.pending is not None:
            metadata["pending"] = len(state.pending)
            tensors = [*tensors, *state.pending]
        return metadata, tensors, [CompressionInfo.from_tensor(t) for t in tensors]

    def average(
        self,
        values: Sequence[torch.Tensor],
        *,
        epoch: int,
        weight: float,
        gather: Any,
        timeout: float,
        moved_on: Callable[[], bool] = lambda: False,
    ) -> RoundResult:
        """All-reduce ``values`` (in place) with the peers at the same ``epoch``, within ``timeout``
        seconds in all; a failed round leaves ``values`` unchanged.

        ``moved_on()`` (asked a few times a second, so it must not block) says whether the other peers
        are already past ``epoch``. Their group then formed and finished without this peer, and no other
        group will form at this epoch: the round is given up as soon as it is not itself exchanging
        tensors, or has been for longer than the straggle allowance, instead of waiting out ``timeout``
        (measured before: a peer whose round broke for it alone blocked 15 s).
        """
        self.set_group_bits(format(epoch % (1 << EPOCH_BITS), f"0{EPOCH_BITS}b"))
        with self.get_tensors() as tensors:
            for mine, shared in zip(values, tensors, strict=True):
                shared.copy_(mine)
        control = self.step(gather=gather, weight=max(weight, NO_SAMPLES_WEIGHT), timeout=timeout, wait=False)
        began, noticed = time.monotonic(), None  # noticed: when moved_on() first said yes
        while True:
            try:
                gathered, seconds = control.result(timeout=POLL_SECONDS)
                break
            except concurrent.futures.TimeoutError:
                pass
            except Exception as e:  # hivemind raises a variety of errors for a round that broke up
                logger.warning(f"Averaging round of epoch {epoch} failed: {e!r}")
                return RoundResult("failed", {}, 0.0, repr(e)[:300])
            # a round within the straggle allowance is on time: only later is it worth asking
            straggle = self.deadlines.straggle()
            if noticed is None and time.monotonic() - began > straggle and moved_on():
                noticed = time.monotonic()
            if noticed is None:
                continue
            exchanging = control.stage == AveragingStage.RUNNING_ALLREDUCE
            if not exchanging or time.monotonic() - noticed > straggle:
                control.cancel()
                logger.warning(f"Averaging round of epoch {epoch}: the other peers moved on without this one")
                return RoundResult("failed", {}, 0.0, "the other peers finished this epoch without this one")
        with self.get_tensors() as tensors:
            for mine, shared in zip(values, tensors, strict=True):
                # A reducer keeps its own part of the average uncompressed while the others receive it
                # in fp16 (clamped to its range); rounding every part through fp16 the same way keeps the
                # members within fp16 rounding of each other, and an overflow alike on all of them.
                mine.copy_(shared.clamp(-65504, 65504).half() if self.fp16 else shared)
        self.deadlines.observe(seconds)
        self._follow_deadlines()
        return RoundResult("averaged", {str(peer): data for peer, data in gathered.items()}, seconds)

    def _follow_deadlines(self) -> None:
        """Hand the averager process new deadlines when they moved by more than a tenth."""
        wanted = (self.deadlines.chunk(), self.deadlines.round())
        if all(abs(w - a) <= 0.1 * a for w, a in zip(wanted, self._applied, strict=True)):
            return
        try:
            self._command("_set_deadlines", self.deadlines.ceiling, chunk=wanted[0], round=wanted[1])
            self._applied = wanted
        except Exception as e:  # the old deadlines still bound every wait
            logger.warning(f"Could not change the averaging deadlines: {e!r}")

    def load_state(self, deadline: float) -> TrainingState | None:
        """The state of the most advanced peer, or None if none answered within ``deadline`` seconds.

        hivemind's own retry loop can go on forever when the only donor left (seen here); this waits for
        one attempt with a deadline and abandons it after.
        """
        future = self.load_state_from_peers(wait=False, timeout=deadline)
        try:
            loaded = future.result(timeout=deadline)
        except (concurrent.futures.TimeoutError, TimeoutError):
            future.cancel()
            return None
        except Exception as e:
            logger.warning(f"Loading the state from peers failed: {e!r}")
            return None
        if loaded is None:
            return None
        metadata, tensors = loaded
        try:  # what a donor sends is untrusted: anything malformed counts as no state (restore checks it)
            tensors, pending = list(tensors), int(metadata.get("pending") or 0)
            if not 0 <= pending <= len(tensors):
                raise ValueError(f"a pending update of {pending} tensors in a state of {len(tensors)}")
            return TrainingState(
                int(metadata["epoch"]),
                tensors[: len(tensors) - pending],
                list(metadata["layout"]),
                list(metadata["scalars"]),
                tensors[len(tensors) - pending :] if pending else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            logger.warning(f"A peer sent a malformed training state: {e!r}")
            return None


def learning_rate(base: float, schedule: str, warmup: int, epoch: int, total_epochs: int) -> float:
    """The learning rate of optimizer step ``epoch``: linear warm-up, then constant, linear or cosine."""
    if warmup and epoch < warmup:
        return base * (epoch + 1) / warmup
    if schedule == "constant" or total_epochs <= warmup:
        return base
    progress = min(1.0, (epoch - warmup) / max(1, total_epochs - warmup))
    if schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
