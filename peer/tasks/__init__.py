"""The task registry: the code a run may execute, installed on the peer ahead of time.

A run spec names a task; the peer looks the name up among the entry points of the group
``hivemarket.tasks`` that its installed packages declare, and refuses a run whose task is not there. Nothing
received over the network is ever executed: a spec only selects a task and passes it plain options.

A task package declares, in its ``pyproject.toml``::

    [project.entry-points."hivemarket.tasks"]
    my-task = "my_package.tasks:MyTask"

where ``MyTask`` subclasses :class:`Task`.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch

from peer.protocol.dataset import Schema

GROUP = "hivemarket.tasks"


class TaskError(ValueError):
    """A task that is not installed, or options it does not accept; the message says which."""


class Task:
    """What a peer needs to train and evaluate one kind of model on one kind of dataset.

    Subclasses set ``options`` (name -> default; the type of the default is the type accepted) and
    implement the four methods. ``batch`` turns decoded records into tensors; ``loss`` must return the
    mean loss of the batch, so gradients of micro-batches of different sizes can be weighted by samples.
    """

    options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise TaskError(f"spec.options.{unknown[0]}: not an option of this task (options: {known})")
        values = dict(self.options)
        for name, value in options.items():
            default = self.options[name]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # TOML writes 1 for 1.0
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, type(default)):
                raise TaskError(f"spec.options.{name}: expected {type(default).__name__}, got {value!r}")
            values[name] = value
        self.values = values

    def build_model(self, seed: int) -> torch.nn.Module:
        """A freshly initialised model; the same seed gives the same parameters on every peer."""
        raise NotImplementedError

    def batch(self, records: list[dict[str, Any]]) -> Any:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, batch: Any) -> dict[str, float]:
        """Metrics of the model on one batch (at least ``loss``); averaged over batches by the caller."""
        raise NotImplementedError

    def flops_per_sample(self, schema: Schema) -> float:
        """Floating-point operations one training sample costs, forward and backward: about 6 per
        parameter per token, one token a sample unless the task says otherwise. ``launch --dry-run``
        turns the market's TFLOP/s into time with it."""
        return 6.0 * sum(p.numel() for p in self.build_model(0).parameters())


def trained_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What a peer trains, averages, sketches and is paid for: the parameters that take gradients (a LoRA
    task's adapters, not its frozen base)."""
    return [p for p in model.parameters() if p.requires_grad]


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its frozen parameters: what training changes, and so what a final
    model file and a validator's epoch snapshots hold. A task that adapts a pretrained model (LoRA) trains
    well under 1% of it; the rest comes back from ``build_model``, which loads the same weights on every
    peer (:mod:`peer.tasks.pretrained`)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name not in frozen}


def load_trained_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`trained_state` took into a model from ``build_model``; every trained entry must be
    there (a file of another model is refused, not half loaded)."""
    expected = set(trained_state(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise TaskError(
            f"the saved state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(dict(state), strict=False)


def installed_tasks() -> dict[str, str]:
    """Task name -> the ``module:attribute`` it loads from, for every task installed on this machine."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load_task(name: str, options: Mapping[str, Any]) -> Task:
    """The installed task ``name`` with ``options``; :class:`TaskError` if it is not installed."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        known = ", ".join(sorted(installed_tasks())) or "none"
        raise TaskError(f"spec.task: {name!r} is not installed on this peer (installed: {known})")
    cls = found[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"spec.task: the entry point {found[0].value} of {name!r} is not a Task")
    return cls(**options)
