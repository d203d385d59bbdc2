"""Recomputation of audited micro-batches, and the one function that computes a micro-batch's gradient.

A peer trains with :func:`micro_batch_gradient` and reports a sketch of each micro-batch's gradient; a
validator (another peer of the same run) recomputes an audited micro-batch with the same function, at the
same parameters (its own copy of the epoch's start, kept in :class:`Snapshots`; the peers agree on them,
which the parameter sketch in the report shows), on the same samples and with the same random seed
(dropout), and sends back the sketch and loss it got. The coordinator compares
(:func:`coordinator.verification.verdict`): what differs is float rounding on an honest peer (another
device, precision or thread count) and a whole gradient on a cheat.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peer.data.loader import map_tensors
from peer.data.reader import DatasetReader
from peer.protocol.run_schemas import AuditResultBody, AuditTask
from peer.protocol.sketch import relative_distance, seed_of
from peer.sketch import EpochSketchers, Sketcher
from peer.tasks import Task, load_trained_state, trained_parameters, trained_state


def device_name(device: torch.device) -> str:
    """How a report names what computed it: ``cpu``, or the GPU's model (``NVIDIA H100 80GB HBM3``)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def uses_randomness(model: torch.nn.Module) -> bool:
    """Whether a forward pass in training mode draws random numbers (dropout in its usual forms): then
    only a validator on the same kind of device reproduces a gradient (seeded masks differ across
    devices)."""
    for module in model.modules():
        p = getattr(module, "p", None) if isinstance(module, torch.nn.modules.dropout._DropoutNd) else None
        rate = p if p is not None else getattr(module, "dropout", 0.0)
        if isinstance(rate, float) and rate > 0:
            return True
    return False


def micro_seed(run_id: str, epoch: int, account: str, index: int) -> int:
    """The random seed of a micro-batch's forward pass (dropout and the like), the same for a validator."""
    return seed_of("hivemarket-micro", run_id, epoch, account, index)


def seed_generators(seed: int) -> None:
    """Seed torch's random generators on the CPU and on CUDA (where it is in use), as
    ``torch.manual_seed`` does for them.

    Why not ``torch.manual_seed``: it also queues a seeding for every other backend not initialised (XPU,
    MTIA), each with a formatted stack trace, on every call: measured 0.74 ms a call, 15% of a digits
    trainer's main thread (it seeds every micro-batch and every audit), and two lists that grow by one
    entry a call for the process's life."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def micro_batch_gradient(
    task: Task,
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    batch: Any,
    seed: int,
    autocast: torch.dtype | None = None,
) -> tuple[float, list[torch.Tensor]]:
    """The micro-batch's mean loss and the gradient of every parameter (zeros where it has none); with
    ``autocast``, the forward pass runs under autocast to that dtype (a trainer's ``precision``; audits
    recompute in float32)."""
    seed_generators(seed)
    model.train()  # the mode the peer trained in: dropout and the like behave the same on both sides
    device_type = params[0].device.type if params else "cpu"
    with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = task.loss(model, batch)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return float(loss.detach()), grads


def compute_micro_batches(
    task: Task,
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    chunks: Sequence[list[int]],
    batches: Iterable[Any],
    sketch: Sketcher,
    seed: Callable[[int], int],
    step: Callable[[list[int], list[torch.Tensor]], None],
    *,
    keep_grads: bool = False,
    autocast: torch.dtype | None = None,
) -> tuple[list[dict[str, Any]], list[list[torch.Tensor]] | None]:
    """A peer's honest work on its micro-batches: for each, the gradient (:func:`micro_batch_gradient`,
    seeded by ``seed(index)``), then ``step(ids, grads)`` (accumulate, or an inner optimizer step); the
    report's entries (ids, loss, sketch) and, with ``keep_grads``, a copy of every gradient."""
    micro: list[dict[str, Any]] = []
    kept: list[list[torch.Tensor]] | None = [] if keep_grads else None
    for index, (chunk, batch) in enumerate(zip(chunks, batches, strict=True)):
        loss, grads = micro_batch_gradient(task, model, params, batch, seed(index), autocast)
        micro.append({"ids": chunk, "loss": loss, "sketch": sketch(grads)})
        if kept is not None:
            kept.append([g.detach().clone() for g in grads])
        step(chunk, grads)
    return micro, kept


@dataclass(frozen=True)
class Snapshot:
    state: dict[str, torch.Tensor]  # the model's trained state (peer.tasks.trained_state), on the CPU
    param_sketch: list[float]


class Snapshots:
    """The model's state at the start of the last ``keep`` epochs, for audits of those epochs.

    Audits arrive an epoch or two after the report they check; a validator that no longer holds the
    epoch declines, and the coordinator gives the audit to another validator. Memory: ``keep`` copies
    of the model's trained state on the CPU (``HIVEMARKET_AUDIT_WINDOW``): of an adapted model, only its
    adapters (MiniLM with LoRA: 1.3 MB an epoch, not 91 MB).
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._by_epoch: OrderedDict[int, Snapshot] = OrderedDict()

    def put(self, epoch: int, model: torch.nn.Module, param_sketch: list[float]) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in trained_state(model).items()}
        self._by_epoch[epoch] = Snapshot(state, param_sketch)
        self._by_epoch.move_to_end(epoch)
        while len(self._by_epoch) > self.keep:
            self._by_epoch.popitem(last=False)

    def describe(self) -> str:
        """Which epochs are held, for a declined audit: a peer that joined late never held the early ones."""
        if not self._by_epoch:
            return "it holds none yet"
        return (
            f"it holds epochs {min(self._by_epoch)}-{max(self._by_epoch)} of the last {self.keep} it trained"
        )

    def forget_from(self, epoch: int) -> None:
        for stale in [e for e in self._by_epoch if e >= epoch]:
            del self._by_epoch[stale]

    def get(self, epoch: int) -> Snapshot | None:
        return self._by_epoch.get(epoch)


class Validator:
    """Recomputes other peers' audited micro-batches of one run on a model of its own (so that training
    and auditing never share parameters)."""

    def __init__(
        self,
        run_id: str,
        task: Task,
        model: torch.nn.Module,
        reader: DatasetReader,
        snapshots: Snapshots,
        *,
        agreement: float,
        fetch: Callable[[Sequence[int]], None] = lambda ids: None,
        device: torch.device | None = None,
    ):
        self.run_id = run_id
        self.task = task
        self.model = model
        self.params = trained_parameters(model)
        self.n_params = sum(p.numel() for p in self.params)
        self.reader = reader
        self.snapshots = snapshots
        self.agreement = agreement
        self.fetch = fetch
        self.device = device
        self._sketchers = EpochSketchers(self.n_params, run_id)
        self._loaded: Snapshot | None = None  # recomputing leaves the parameters as they were loaded
        self.random = uses_randomness(model)
        self.device_name = device_name(device or torch.device("cpu"))

    def recompute(self, audit: AuditTask) -> AuditResultBody:
        """The recomputed sketch and loss, or a declined answer saying why this peer cannot recompute."""
        snapshot = self.snapshots.get(audit.epoch)
        if snapshot is None:
            return AuditResultBody(
                declined=f"this peer does not hold epoch {audit.epoch}'s parameters "
                f"({self.snapshots.describe()})"
            )
        if self.random and audit.device != self.device_name:
            return AuditResultBody(
                declined=f"this model draws random masks (dropout), which differ between devices: the "
                f"audited peer computed on {audit.device!r}, this one on {self.device_name!r}"[:300]
            )
        distance = relative_distance(snapshot.param_sketch, audit.param_sketch)
        if not distance <= self.agreement:
            return AuditResultBody(
                declined=f"this peer's parameters of epoch {audit.epoch} differ from the audited peer's "
                f"(sketch distance {distance:.3g})"
            )
        self.fetch(audit.ids)
        if self._loaded is not snapshot:  # audits come in epochs: load each snapshot once
            load_trained_state(self.model, snapshot.state)
            self._loaded = snapshot
        batch = self.task.batch(self.reader.read(audit.ids))
        if self.device is not None:
            device = self.device
            batch = map_tensors(batch, lambda t: t.to(device))
        seed = micro_seed(self.run_id, audit.epoch, audit.account, audit.index)
        loss, grads = micro_batch_gradient(self.task, self.model, self.params, batch, seed)
        return AuditResultBody(sketch=self._sketchers(audit.epoch)(grads), loss=loss)
