"""The final model file of a run: what the peer that uploads it writes (:func:`model_bytes`) and what
``hivemarket runs fetch`` users, the demo, the benches and the tests load (:func:`load_model_file`).

One ``torch.save`` of the task's name and options, the epoch the model reached and its trained state
(:func:`peer.tasks.trained_state`: the state dict without frozen parameters): the task rebuilds the model,
pretrained weights included, so the file carries no code and an adapted model's file holds only its
adapters.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from peer.tasks import Task, load_task, load_trained_state, trained_state


def model_bytes(task_name: str, options: dict[str, Any], epoch: int, model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"task": task_name, "options": options, "epoch": epoch, "state_dict": trained_state(model)}, buffer
    )
    return buffer.getvalue()


def load_model_file(path: Path) -> tuple[Task, torch.nn.Module, dict[str, Any]]:
    """A model file written by a run (``hivemarket runs fetch``): its task, the model, and the metadata."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    task = load_task(saved["task"], saved["options"])
    model = task.build_model(0)
    load_trained_state(model, saved["state_dict"])
    return task, model, saved
