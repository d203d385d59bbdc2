"""``digits-mlp``: a small MLP on the 8x8 handwritten digits (``hivemarket data example digits``).

Small enough to train on CPUs in a minute, large enough that collaborative training is visible: the
demo's and the tests' task.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from peer.tasks import Task


class DigitsMLP(Task):
    options: ClassVar[dict[str, Any]] = {"hidden": 64}

    def build_model(self, seed: int) -> nn.Module:
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            hidden = int(self.values["hidden"])
            return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        finally:
            torch.random.set_rng_state(generator_state)

    def batch(self, records: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.stack([r["x"] for r in records]).astype(np.float32))  # a writable copy
        y = torch.tensor([int(r["y"]) for r in records], dtype=torch.long)
        return x, y

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        x, y = batch
        with torch.no_grad():
            logits = model(x)
            return {
                "loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
            }
