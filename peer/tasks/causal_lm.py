"""``causal-lm``: pretraining a causal language model of any architecture ``transformers`` implements, from
a config in the run spec, on a dataset of token ids (``hivemarket data example text-bpe``).

The options name the architecture's family (``llama``, ``qwen2``, ``mistral``, ``gpt2``, ... any model type
with a causal-LM head in transformers) and its size; they are set on the family's config under
transformers' common names (``hidden_size``, ``num_hidden_layers``, ...; a family that calls them
otherwise maps them itself, GPT-2's ``n_embd`` for one) and every value is read back, so an option the
family would silently ignore is refused instead; every other field keeps the family's default (run spec
options are scalars, so there is no free-form config). Nothing is downloaded: the model is built from the
config and random-initialised under the run's seed inside ``torch.random.fork_rng``, so every peer holds
bit-identical parameters and the caller's random numbers are left alone.

Attention is transformers' ``eager`` implementation: plain matmuls and softmax, whose results do not depend
on which fused kernel a machine picks, so an auditor recomputing a gradient gets the trainer's figures
(tests/test_causal_lm.py compares 1 and 2 CPU threads).

Samples are fixed-length rows of token ids (field ``tokens``); every row is one training sample and the
model predicts each token from the ones before it. When the dataset stores ``target_bytes`` (the bytes of
text the predicted tokens stand for, as text-bpe does), ``evaluate`` also reports ``bits_per_byte``: nats
per BPE token and the byte-level ``bytes-lm``'s nats per byte are different units, bits per byte are not.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from peer.protocol.dataset import Schema
from peer.tasks import Task, TaskError
from peer.tasks.pretrained import quiet_transformers

# option -> the name transformers' configs share for it
_CONFIG_NAMES = {
    "vocab": "vocab_size",
    "dim": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "ffn": "intermediate_size",
    "positions": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
}


class CausalLM(Task):
    """A transformers causal LM built from the run spec's config, random-initialised with the run's seed.

    ``kv_heads`` 0 means as many as ``heads`` (no grouped-query attention); ``ffn`` 0 means 4 x ``dim``.
    ``vocab`` must cover the dataset's token ids (text-bpe's are below 4096).
    """

    options: ClassVar[dict[str, Any]] = {
        "family": "llama",
        "layers": 2,
        "dim": 128,
        "heads": 4,
        "kv_heads": 0,
        "ffn": 0,
        "vocab": 4096,
        "positions": 512,
        "tie_embeddings": True,
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._config = self._build_config()  # refuse bad options when the spec is loaded, not at step 1

    # ------------------------------------------------------------------------------------------- config

    def _build_config(self) -> Any:
        v = self.values
        for name in ("layers", "dim", "heads", "vocab", "positions"):
            if v[name] < 1:
                raise TaskError(f"spec.options.{name}: must be at least 1, got {v[name]!r}")
        for name in ("kv_heads", "ffn"):
            if v[name] < 0:
                raise TaskError(
                    f"spec.options.{name}: must be 0 (the default rule) or positive, got {v[name]!r}"
                )
        if v["dim"] % v["heads"]:
            raise TaskError(f"spec.options.dim: {v['dim']} is not a multiple of heads ({v['heads']})")
        kv_heads = v["kv_heads"] or v["heads"]
        if v["heads"] % kv_heads:
            raise TaskError(f"spec.options.kv_heads: heads ({v['heads']}) is not a multiple of {kv_heads}")
        transformers = quiet_transformers("causal-lm")
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        family = v["family"]
        if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or family not in transformers.CONFIG_MAPPING:
            raise TaskError(
                f"spec.options.family: {family!r} is not a causal language model transformers "
                f"{transformers.__version__} implements (e.g. llama, qwen2, mistral, gpt2, gpt_neox)"
            )
        config_class = transformers.CONFIG_MAPPING[family]
        known = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
        wanted = {
            "vocab": v["vocab"],
            "dim": v["dim"],
            "layers": v["layers"],
            "heads": v["heads"],
            "kv_heads": kv_heads,
            "ffn": v["ffn"] or 4 * v["dim"],
            "positions": v["positions"],
            "tie_embeddings": v["tie_embeddings"],
        }
        fields: dict[str, Any] = {}
        for option, value in wanted.items():
            name = _CONFIG_NAMES[option]
            if name in known:
                fields[name] = value
            elif v[option] != self.options[option]:  # the family has no such knob: a set option would be lost
                raise TaskError(
                    f"spec.options.{option}: the {family} family has no {name} (got {v[option]!r})"
                )
        if "head_dim" in known:  # some families (gemma: 256) fix it apart from dim / heads
            fields["head_dim"] = v["dim"] // v["heads"]
        # No special tokens (the datasets have none); no key-value cache (nothing generates during training).
        fields.update({k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in known})
        if "use_cache" in known:
            fields["use_cache"] = False
        try:
            config = config_class(**fields)
        except (TypeError, ValueError) as e:
            raise TaskError(f"spec.options: transformers refuses this {family} config: {e}") from None
        for option, value in wanted.items():
            name = _CONFIG_NAMES[option]
            if name in fields and getattr(config, name, None) != value:
                got = getattr(config, name, None)
                raise TaskError(f"spec.options.{option}: the {family} config took {value!r} as {got!r}")
        return config

    # -------------------------------------------------------------------------------------------- model

    def build_model(self, seed: int) -> torch.nn.Module:
        """The model from the config, float32, eager attention; the seed alone decides every parameter."""
        transformers = quiet_transformers("causal-lm")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transformers.AutoModelForCausalLM.from_config(
                self._config, attn_implementation="eager", dtype=torch.float32
            )

    def batch(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Token rows as int64 (and ``target_bytes`` when the dataset has them); ids outside the vocabulary
        or rows longer than the positions are refused here, not as an index error deep in the model."""
        tokens = torch.from_numpy(np.stack([r["tokens"] for r in records]).astype(np.int64))
        v = self.values
        if tokens.shape[1] > v["positions"] + 1:
            raise ValueError(
                f"samples of {tokens.shape[1]} tokens exceed spec.options.positions ({v['positions']}) + 1"
            )
        low, high = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
        if low < 0 or high >= v["vocab"]:
            raise ValueError(f"token ids {low}..{high} fall outside spec.options.vocab ({v['vocab']})")
        batch = {"tokens": tokens}
        if all("target_bytes" in r for r in records):
            batch["target_bytes"] = torch.tensor([int(r["target_bytes"]) for r in records], dtype=torch.int64)
        return batch

    def _logits(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens[:, :-1], use_cache=False).logits

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy; samples have the same length, so it is a per-sample mean."""
        tokens = batch["tokens"]
        logits = self._logits(model, tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def evaluate(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss (nats per token), accuracy, and bits per byte when the batch knows its bytes."""
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = self._logits(model, batch["tokens"])
        finally:
            model.train(training)
        targets = batch["tokens"][:, 1:]
        nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        metrics = {
            "loss": float(nats) / targets.numel(),
            "accuracy": float((logits.argmax(dim=-1) == targets).float().mean()),
        }
        if "target_bytes" in batch:
            metrics["bits_per_byte"] = float(nats) / math.log(2) / float(batch["target_bytes"].sum())
        return metrics

    def flops_per_sample(self, schema: Schema) -> float:
        """Every parameter once per predicted token: a sample of n tokens predicts n - 1."""
        parameters = sum(p.numel() for p in self.build_model(0).parameters())
        return 6.0 * parameters * (schema.fields["tokens"].shape[0] - 1)
