"""``bytes-lm``: a small causal transformer language model over raw bytes (``hivemarket data example text``).

Every sample is a fixed-length row of bytes (a vocabulary of 256, no tokenizer); the model predicts each
byte from the ones before it. Its compute per sample is that of a real language model (every parameter
is used once per token), which is what the benchmarks need when they set verification or averaging
against training compute; ``dropout`` shows that audits reproduce random layers (each micro-batch's
forward pass is seeded, :func:`peer.validator.micro_seed`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from peer.protocol.dataset import Schema
from peer.tasks import Task

VOCABULARY = 256
MAX_TOKENS = 1024


class _Model(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, dim)
        self.position = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.blocks.layers:  # the encoder deep-copies one layer: give each its own weights
            for module in block.modules():
                reset = getattr(module, "reset_parameters", None) or getattr(
                    module, "_reset_parameters", None
                )
                if callable(reset) and module is not block:
                    reset()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCABULARY)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        x = self.embed(tokens) + self.position[:length]
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


class BytesLM(Task):
    options: ClassVar[dict[str, Any]] = {"dim": 128, "layers": 2, "heads": 4, "dropout": 0.0}

    def build_model(self, seed: int) -> nn.Module:
        v = self.values
        if v["dim"] % v["heads"]:
            raise ValueError(f"spec.options.dim ({v['dim']}) must be a multiple of heads ({v['heads']})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _Model(int(v["dim"]), int(v["layers"]), int(v["heads"]), float(v["dropout"]))

    def batch(self, records: list[dict[str, Any]]) -> torch.Tensor:
        tokens = torch.from_numpy(np.stack([r["tokens"] for r in records]).astype(np.int64))
        if tokens.shape[1] > MAX_TOKENS + 1:
            raise ValueError(f"samples of {tokens.shape[1]} bytes exceed bytes-lm's {MAX_TOKENS + 1}")
        return tokens

    def flops_per_sample(self, schema: Schema) -> float:
        """Every parameter once per predicted byte: a sample of n bytes predicts n - 1."""
        return super().flops_per_sample(schema) * (schema.fields["tokens"].shape[0] - 1)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy; samples have the same length, so it is a per-sample mean."""
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCABULARY), batch[:, 1:].reshape(-1))

    def evaluate(self, model: nn.Module, batch: torch.Tensor) -> dict[str, float]:
        training = model.training
        model.eval()  # no dropout in the figures
        try:
            with torch.no_grad():
                logits = model(batch[:, :-1])
        finally:
            model.train(training)
        targets = batch[:, 1:]
        return {
            "loss": float(F.cross_entropy(logits.reshape(-1, VOCABULARY), targets.reshape(-1))),
            "accuracy": float((logits.argmax(dim=-1) == targets).float().mean()),
        }
