"""``embed-lora``: adapt a pretrained sentence-embedding model with LoRA adapters, trained contrastively on
(query, passage) pairs (the ``hf`` extra: ``pip install 'hivemarket[hf]'``).

The base model is named by its digest (``options.base``, :mod:`peer.tasks.pretrained`) and loaded from
this peer's disk; a peer without it refuses the run. ``peft`` attaches rank-``rank`` adapters to the
linear layers whose names end in one of ``targets``, in the last ``layers`` transformer layers (0: all);
everything else is frozen, so only the adapters are trained, averaged, sketched, audited, checkpointed
and sent to joiners (MiniLM with the defaults: 331,776 of 22.9M parameters, 1.45%).

Why contrastive and not masked-language modelling: all-MiniLM-L6-v2 is a sentence-embedding model whose
masked-LM head was removed, so an MLM objective would train a new head from scratch and the "before"
figure would be a random head's. The objective is the one the model was trained with: an embedding is
the mean of the last layer over the non-padding tokens, normalised; each query's own passage must score
above the other passages of its micro-batch (cross-entropy over ``scale`` times the cosine
similarities). ``accuracy`` is recall@1 among the batch's passages.

Dropout is switched off in the base model's config: audits recompute micro-batches and a model that draws
random masks can only be audited on a device like the trainer's (:mod:`peer.validator`).

Samples are two fields of token ids of the base model's tokenizer, 0 the padding:
``query`` and ``passage`` (``hivemarket data example python-code`` packs them).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from peer.protocol.dataset import Schema
from peer.tasks import Task, TaskError
from peer.tasks.pretrained import find_model, quiet_transformers

FIELDS = ("query", "passage")


def _hf() -> tuple[Any, Any]:
    """transformers and peft, imported on use: the base install does not carry them."""
    transformers = quiet_transformers("embed-lora")
    try:
        import peft
    except ImportError:
        raise TaskError("embed-lora needs peft: pip install 'hivemarket[hf]'") from None
    return transformers, peft


class _Embedder(nn.Module):
    """The adapted encoder, and the pooling that turns its last layer into one unit vector a text."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(pooled, dim=-1)


class EmbedLoRA(Task):
    options: ClassVar[dict[str, Any]] = {
        "base": "",
        "targets": "query,key,value,dense",
        "layers": 0,
        "rank": 8,
        "alpha": 16.0,
        "scale": 20.0,
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        v = self.values
        self.targets = [t.strip() for t in str(v["targets"]).split(",") if t.strip()]
        if not self.targets:
            raise TaskError(f"spec.options.targets: {v['targets']!r} names no module")
        for name in ("rank", "layers"):
            if v[name] < (1 if name == "rank" else 0):
                raise TaskError(f"spec.options.{name}: {v[name]!r} is out of range")
        if not v["alpha"] > 0 or not v["scale"] > 0:
            raise TaskError(f"spec.options: alpha ({v['alpha']!r}) and scale ({v['scale']!r}) must be > 0")
        self.base: Path = find_model(str(v["base"]))

    def build_model(self, seed: int) -> nn.Module:
        """The base model from disk with fresh adapters: lora_A drawn from ``seed``, lora_B zero, so every
        peer starts from the same parameters and the adapted model starts equal to the base."""
        transformers, peft = _hf()
        config = transformers.AutoConfig.from_pretrained(self.base, local_files_only=True)
        for key, value in vars(config).items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
        encoder = transformers.AutoModel.from_pretrained(self.base, config=config, local_files_only=True)
        v = self.values
        depth = int(getattr(config, "num_hidden_layers", 0))
        if v["layers"] > depth:
            raise TaskError(f"spec.options.layers: {v['layers']} but the base model has {depth} layers")
        lora = peft.LoraConfig(
            r=int(v["rank"]),
            lora_alpha=float(v["alpha"]),
            lora_dropout=0.0,
            target_modules=self.targets,
            # Always a list of layers: it also keeps adapters off modules outside the layers that the
            # embedding never uses (BERT's pooler), whose adapters would get no gradient.
            layers_to_transform=list(range(depth - int(v["layers"] or depth), depth)),
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft 0.21 calls an API transformers 5 deprecated; not ours to fix, and not the user's.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            torch.manual_seed(seed)
            try:
                adapted = peft.get_peft_model(encoder, lora)
            except ValueError as e:  # peft: none of the targets is a module of this model
                raise TaskError(f"spec.options.targets: {v['targets']!r}: {e}") from None
        return _Embedder(adapted)

    def batch(self, records: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            query, passage = (
                torch.from_numpy(np.stack([r[field] for r in records]).astype(np.int64)) for field in FIELDS
            )
        except KeyError as e:
            raise ValueError(
                f"embed-lora needs the fields {FIELDS} (token ids); a record lacks {e}"
            ) from None
        return query, passage

    def _scores(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        query, passage = batch
        return self.values["scale"] * model(query) @ model(passage).T

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean over the micro-batch's queries of the cross-entropy of picking their own passage."""
        scores = self._scores(model, batch)
        return F.cross_entropy(scores, torch.arange(len(scores), device=scores.device))

    def evaluate(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        with torch.no_grad():
            scores = self._scores(model, batch)
        own = torch.arange(len(scores), device=scores.device)
        return {
            "loss": float(F.cross_entropy(scores, own)),
            "accuracy": float((scores.argmax(dim=1) == own).float().mean()),
        }

    def flops_per_sample(self, schema: Schema) -> float:
        """Per token of the query and the passage: 2 a parameter forward; backward 2 more a frozen one
        (gradients flow through it) and 4 a trained one. Embedding tables are lookups, not counted."""
        model = self.build_model(0)
        tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in tables)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tokens = sum(schema.fields[field].shape[0] for field in FIELDS if field in schema.fields)
        return (4.0 * frozen + 6.0 * trained) * tokens
