"""The ``causal-lm`` task and the ``text-bpe`` dataset: a config builds a transformers model whose seed pins
every parameter, bad options are refused naming the field, the tokenizer and the dataset are deterministic
and covered by the version, the tokenizer decodes samples back to the text, training lowers the loss, and
an audit recomputes the same loss and gradient on another number of threads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from peer.data.bpe import BPE_TOKENS, TOKENIZER_FILE, VOCABULARY, corpus, load_tokenizer, token_bytes
from peer.data.examples import build_example
from peer.data.reader import DatasetReader
from peer.protocol.dataset import DatasetError, verify_dataset
from peer.tasks import TaskError, installed_tasks, load_task, load_trained_state, trained_state
from peer.tasks.causal_lm import CausalLM
from peer.validator import micro_batch_gradient

TINY = {"dim": 32, "layers": 1, "heads": 2, "ffn": 64}  # fast to build; the example's size is tested once


@pytest.fixture(scope="module")
def text_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bpe") / "text-bpe"
    build_example("text-bpe", root, shard_bytes=1 << 20)
    return root


@pytest.fixture(scope="module")
def records(text_bpe: Path) -> list[dict[str, Any]]:
    reader = DatasetReader(verify_dataset(text_bpe), lambda s: text_bpe / s.file)
    return reader.read(range(reader.manifest.samples))


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ the model


def test_the_task_is_installed_under_its_name() -> None:
    assert installed_tasks()["causal-lm"] == "peer.tasks.causal_lm:CausalLM"
    assert type(load_task("causal-lm", {"layers": 1})) is CausalLM


def test_a_seed_pins_every_parameter_and_another_seed_changes_them() -> None:
    task = CausalLM(**TINY)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = parameters(task.build_model(7))
    assert torch.equal(torch.rand(3), expected)  # the caller's generator is left alone
    again, other = parameters(CausalLM(**TINY).build_model(7)), parameters(task.build_model(8))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    randomised = [k for k in first if first[k].std() > 0]  # norms start at one on every seed
    assert randomised and all(not torch.equal(first[k], other[k]) for k in randomised)


def test_the_options_set_the_architecture() -> None:
    model = CausalLM(family="llama", dim=64, layers=3, heads=4, kv_heads=2, ffn=96, vocab=500).build_model(0)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 3, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (2, 96, 500)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)  # grouped-query attention
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_embeddings defaults to true
    assert config._attn_implementation == "eager"
    untied = CausalLM(**TINY, tie_embeddings=False).build_model(0)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_other_families_build_from_the_same_options() -> None:
    gpt2 = CausalLM(family="gpt2", dim=32, layers=1, heads=2, vocab=300).build_model(0)
    assert type(gpt2).__name__ == "GPT2LMHeadModel" and (gpt2.config.n_embd, gpt2.config.n_head) == (32, 2)
    qwen = CausalLM(family="qwen2", **TINY, vocab=300).build_model(0)
    batch = {"tokens": torch.randint(0, 300, (2, 9))}
    for model in (gpt2, qwen):
        assert 4 < CausalLM(family="gpt2", vocab=300).loss(model, batch).item() < 8  # about ln 300


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"family": "llamma"}, "spec.options.family: 'llamma' is not a causal language model"),
        ({"family": "vit"}, "spec.options.family: 'vit' is not a causal language model"),
        ({"dim": 130}, "spec.options.dim: 130 is not a multiple of heads (4)"),
        ({"kv_heads": 3}, "spec.options.kv_heads: heads (4) is not a multiple of 3"),
        ({"layers": 0}, "spec.options.layers: must be at least 1, got 0"),
        ({"ffn": -1}, "spec.options.ffn: must be 0 (the default rule) or positive, got -1"),
        (
            {"family": "gpt2", "kv_heads": 2},
            "spec.options.kv_heads: the gpt2 family has no num_key_value_heads",
        ),
        ({"family": "gpt2", "ffn": 100}, "spec.options.ffn: the gpt2 family has no intermediate_size"),
        ({"dim": "128"}, "spec.options.dim: expected int, got '128'"),
        ({"width": 128}, "spec.options.width: not an option of this task"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options: dict[str, Any], words: str) -> None:
    with pytest.raises(TaskError) as caught:
        CausalLM(**options)
    assert str(caught.value).startswith(words)


def test_batch_refuses_ids_outside_the_vocabulary() -> None:
    task = CausalLM(**TINY, vocab=100)
    with pytest.raises(ValueError, match=r"token ids 0\.\.100 fall outside spec.options.vocab \(100\)"):
        task.batch([{"tokens": np.array([0, 100], dtype=np.int16)}])


# ------------------------------------------------------------------------------------------------ the dataset


def test_the_dataset_and_its_tokenizer_are_deterministic(text_bpe: Path, tmp_path: Path) -> None:
    again = build_example("text-bpe", tmp_path / "again", shard_bytes=1 << 20)
    first = verify_dataset(text_bpe)
    assert again.version == first.version
    assert (tmp_path / "again" / TOKENIZER_FILE).read_bytes() == (text_bpe / TOKENIZER_FILE).read_bytes()
    assert first.schema.fields["tokens"].shape == (BPE_TOKENS,) and first.samples > 1500
    assert TOKENIZER_FILE in first.source and load_tokenizer(text_bpe).get_vocab_size() == VOCABULARY


def test_the_version_covers_the_tokenizer(text_bpe: Path, tmp_path: Path) -> None:
    """A tokenizer that is not the one packed is refused: its hash is in the manifest, so in the version."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in text_bpe.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    data = json.loads((copy / TOKENIZER_FILE).read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]
    (copy / TOKENIZER_FILE).write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="not the one this dataset version was packed with"):
        load_tokenizer(copy)
    (copy / TOKENIZER_FILE).unlink()
    with pytest.raises(DatasetError, match=r"tokenizer\.json is missing"):
        load_tokenizer(copy)


def test_the_stored_tokenizer_decodes_the_samples_back_to_the_text(
    text_bpe: Path, records: list[dict[str, Any]]
) -> None:
    tokenizer = load_tokenizer(text_bpe)
    pieces = token_bytes(tokenizer)
    text = corpus().encode()
    assert text.startswith(tokenizer.decode(records[0]["tokens"].tolist()).encode())
    position = 0  # samples follow each other through the text (cleaning drops the odd duplicate)
    for record in records[:300]:
        ids = record["tokens"].tolist()
        raw = b"".join(pieces[i] for i in ids)
        position = text.index(raw, position)
        assert tokenizer.decode(ids) == raw.decode(errors="replace")
        # target_bytes: the bytes of the predicted tokens (all but the first)
        assert record["target_bytes"] == len(raw) - len(pieces[ids[0]])


# ------------------------------------------------------------------------------------------------ training


def test_training_lowers_the_loss_and_evaluate_reports_bits_per_byte(records: list[dict[str, Any]]) -> None:
    task = CausalLM(**TINY)
    model = task.build_model(0)
    batch = task.batch(records[:16])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    held_out = task.batch(records[19:400:20])
    metrics = task.evaluate(model, held_out)
    assert set(metrics) == {"loss", "accuracy", "bits_per_byte"}
    tokens = held_out["tokens"][:, 1:].numel()
    expected = metrics["loss"] * tokens / math.log(2) / float(held_out["target_bytes"].sum())
    assert metrics["bits_per_byte"] == pytest.approx(expected, rel=1e-6)
    assert 0 < metrics["bits_per_byte"] < metrics["loss"] / math.log(2)  # a token is more than a byte


def test_the_loss_is_the_mean_of_the_per_sample_losses(records: list[dict[str, Any]]) -> None:
    task = CausalLM(**TINY)
    model = task.build_model(0)
    loss = task.loss(model, task.batch(records[:6]))
    singles = [task.loss(model, task.batch([r])).item() for r in records[:6]]
    assert loss.item() == pytest.approx(float(np.mean(singles)), rel=1e-5)


def test_an_audit_on_another_number_of_threads_recomputes_the_same_gradient(
    records: list[dict[str, Any]],
) -> None:
    """The example's size (eager attention, float32): the loss within 1e-5 relative, gradients close."""
    task = CausalLM(family="llama", dim=128, layers=2, heads=4, kv_heads=4, ffn=344)
    model = task.build_model(3)
    params = list(model.parameters())
    batch = task.batch(records[100:108])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss, grads = micro_batch_gradient(task, model, params, batch, seed=11)
            results.append((loss, [g.clone() for g in grads]))
    finally:
        torch.set_num_threads(threads)
    (one, g1), (two, g2) = results
    assert one == pytest.approx(two, rel=1e-5)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_flops_per_sample_counts_every_predicted_token(text_bpe: Path) -> None:
    task = CausalLM(**TINY)
    count = sum(p.numel() for p in task.build_model(0).parameters())
    assert task.flops_per_sample(verify_dataset(text_bpe).schema) == 6.0 * count * (BPE_TOKENS - 1)


def test_a_trained_state_with_tied_embeddings_loads_back_exactly() -> None:
    """Snapshots and model files hold ``trained_state``: both names of the tied embedding, one tensor."""
    task = CausalLM(**TINY)
    model = task.build_model(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    state = {k: v.clone() for k, v in trained_state(model).items()}
    fresh = task.build_model(0)
    load_trained_state(fresh, state)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
