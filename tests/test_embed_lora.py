"""The ``embed-lora`` task and the pretrained weights it starts from: models are named by the digest of
their files and found on the peer's disk (the packaged MiniLM, HIVEMARKET_MODEL_DIRS), a peer without the
named weights refuses with a reason, only the adapters train and travel (model file, snapshots), the
seed pins them, and training on the ``python-code`` example improves retrieval of held-out pairs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from peer.data.examples import build_example
from peer.data.python_code import PASSAGE_TOKENS, QUERY_TOKENS
from peer.data.reader import DatasetReader
from peer.model_file import load_model_file, model_bytes
from peer.protocol.dataset import load_manifest
from peer.samples import test_ids as held_out_ids
from peer.tasks import TaskError, load_task, trained_state
from peer.tasks.embed_lora import EmbedLoRA
from peer.tasks.pretrained import find_model, local_models, model_digest
from peer.validator import Snapshots, micro_batch_gradient

pytest.importorskip("peft", reason="the hf extra is not installed: pip install 'hivemarket[hf]'")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(autouse=True)
def peer_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEMARKET_HOME", str(home))
    monkeypatch.delenv("HIVEMARKET_MODEL_DIRS", raising=False)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT saved as a transformers checkpoint folder: another base model."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-bert"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HIVEMARKET_HOME", str(home))
        out = tmp_path_factory.mktemp("data") / "python-code"
        build_example("python-code", out, shard_bytes=1 << 20)
    return out


def minilm_digest() -> str:
    (minilm,) = [m for m in local_models() if m.name.startswith("all-MiniLM-L6-v2")]
    return minilm.digest


# ------------------------------------------------------------------------------------------ the weights


def test_the_digest_covers_every_file_and_only_the_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    first = model_digest(tmp_path)
    assert first.startswith("sha256:") and len(first) == 7 + 64
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_text("x")  # hidden: a tool's state, not the model
    assert model_digest(tmp_path) == first
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\x00" * 9 + b"\x01")  # same size, other bytes
    assert model_digest(tmp_path) != first
    (tmp_path / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    assert model_digest(tmp_path) == first
    (tmp_path / "sub" / "weights.bin").rename(tmp_path / "weights.bin")  # same bytes, another path
    assert model_digest(tmp_path) != first


def test_the_example_names_the_packaged_minilm_by_its_digest() -> None:
    spec = tomllib.loads((ROOT / "examples" / "adapt_minilm.toml").read_text())
    assert spec["task"] == "embed-lora"
    assert spec["options"]["base"] == minilm_digest()  # a peer with the hf extra holds the example's base
    assert find_model(spec["options"]["base"]).joinpath("model.safetensors").is_file()


def test_a_peer_without_the_weights_refuses_naming_the_field_and_what_it_holds() -> None:
    missing = "sha256:" + "ab" * 32
    with pytest.raises(TaskError) as caught:
        load_task("embed-lora", {"base": missing})
    message = str(caught.value)
    assert message.startswith("spec.options.base: ") and missing in message
    assert "all-MiniLM-L6-v2" in message and "HIVEMARKET_MODEL_DIRS" in message
    with pytest.raises(TaskError, match=r"spec.options.base: 'all-MiniLM-L6-v2' is not a model digest"):
        load_task("embed-lora", {"base": "all-MiniLM-L6-v2"})
    with pytest.raises(TaskError, match=r"spec.options.targets: 'nothing'"):
        EmbedLoRA(base=minilm_digest(), targets="nothing").build_model(0)
    with pytest.raises(TaskError, match=r"spec.options.layers: 7 but the base model has 6 layers"):
        EmbedLoRA(base=minilm_digest(), layers=7).build_model(0)


def test_a_checkpoint_folder_named_in_model_dirs_is_found_by_digest(
    tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = model_digest(tiny_bert)
    with pytest.raises(TaskError):
        EmbedLoRA(base=digest)
    monkeypatch.setenv("HIVEMARKET_MODEL_DIRS", str(tiny_bert.parent))  # a folder of checkpoint folders
    task = EmbedLoRA(base=digest, rank=2)
    assert task.base == tiny_bert
    model = task.build_model(0)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # rank 2 on query, key, value and the 3 dense layers of each of the 2 layers: 2 * (32 + 32) per 32x32,
    # 2 * (32 + 64) for the two 32x64 ones
    assert trained == 2 * (4 * 2 * (32 + 32) + 2 * 2 * (32 + 64))


# ------------------------------------------------------------------------------------------ the adapters


def test_only_the_adapters_train_and_the_seed_pins_them() -> None:
    task = EmbedLoRA(base=minilm_digest())
    a, b, c = task.build_model(0), task.build_model(0), task.build_model(1)
    state_a, state_b, state_c = trained_state(a), trained_state(b), trained_state(c)
    assert state_a and all("lora_" in name for name in state_a)
    assert sum(t.numel() for t in state_a.values()) == 331_776  # 1.45% of MiniLM's 22.9M
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a if "lora_A" in k)
    # lora_B starts at zero: the adapted model starts as the base model, whatever the seed
    assert all(not t.any() for k, t in state_c.items() if "lora_B" in k)


@pytest.mark.timeout(300)  # the first test to use ``code`` packs the dataset (about 10 s alone)
def test_the_model_file_and_the_snapshots_hold_the_adapters_only(code: Path) -> None:
    task = EmbedLoRA(base=minilm_digest(), layers=1)
    model = task.build_model(0)
    reader = DatasetReader(load_manifest(code), lambda s: code / s.file)
    batch = task.batch(reader.read(list(range(8))))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    task.loss(model, batch).backward()
    optimizer.step()
    raw = model_bytes("embed-lora", dict(task.values), 1, model)
    assert len(raw) < 0.05 * sum(t.numel() * 4 for t in model.state_dict().values())
    path = code.parent / "model.pt"
    path.write_bytes(raw)
    _, loaded, saved = load_model_file(path)
    assert saved["epoch"] == 1
    with torch.no_grad():
        assert torch.equal(loaded(batch[0]), model(batch[0]))
    snapshots = Snapshots(2)
    snapshots.put(1, model, [])
    assert set(snapshots.get(1).state) == set(trained_state(model))


def test_the_gradient_of_a_micro_batch_agrees_across_thread_counts(code: Path) -> None:
    """What an audit relies on: a validator with another thread count recomputes the same gradient."""
    task = EmbedLoRA(base=minilm_digest(), layers=2)
    model = task.build_model(0)
    params = [p for p in model.parameters() if p.requires_grad]
    reader = DatasetReader(load_manifest(code), lambda s: code / s.file)
    batch = task.batch(reader.read(list(range(8, 24))))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss_1, grads_1 = micro_batch_gradient(task, model, params, batch, 7)
        grads_1 = [g.clone() for g in grads_1]
        torch.set_num_threads(2)
        loss_2, grads_2 = micro_batch_gradient(task, model, params, batch, 7)
    finally:
        torch.set_num_threads(threads)
    assert loss_1 == pytest.approx(loss_2, rel=1e-5)
    flat_1, flat_2 = torch.cat([g.flatten() for g in grads_1]), torch.cat([g.flatten() for g in grads_2])
    assert flat_1.abs().sum() > 0
    assert float((flat_1 - flat_2).norm() / flat_1.norm()) < 1e-4


# ------------------------------------------------------------------------------------------ the data


def test_the_python_code_example_pairs_docstrings_with_their_functions(code: Path) -> None:
    from tokenizers import Tokenizer

    manifest = load_manifest(code)
    assert manifest.samples > 5000  # CPython 3.11's standard library: 5,790
    assert manifest.schema.fields["query"].shape == (QUERY_TOKENS,)
    assert manifest.schema.fields["passage"].shape == (PASSAGE_TOKENS,)
    assert "tokenizer.json:sha256:" in manifest.source  # the version covers the tokenization
    tokenizer = Tokenizer.from_file(str(code / "tokenizer.json"))
    reader = DatasetReader(manifest, lambda s: code / s.file)
    (record,) = reader.read([0])
    query = tokenizer.decode([int(i) for i in record["query"] if i])
    passage = tokenizer.decode([int(i) for i in record["passage"] if i])
    assert passage.startswith("def ") and len(query.split()) >= 4
    again = build_example("python-code", code.parent / "again", shard_bytes=1 << 20)
    assert again.version == manifest.version  # packed alike on every machine with this Python


@pytest.mark.timeout(300)  # about 10 s alone; MiniLM's forward passes crawl on a machine shared with a swarm
def test_a_few_steps_improve_retrieval_of_held_out_pairs(code: Path) -> None:
    """The adaptation learns something that carries to pairs it never saw (held out as a run holds
    them out: every 10th id)."""
    torch.manual_seed(0)
    task = EmbedLoRA(base=minilm_digest(), layers=2)
    model = task.build_model(0)
    manifest = load_manifest(code)
    reader = DatasetReader(manifest, lambda s: code / s.file)
    held_out = held_out_ids(manifest.samples, 10)[:96].tolist()
    train = [i for i in range(manifest.samples) if i % 10 != 9][: 16 * 8]
    test_batch = task.batch(reader.read(held_out))
    before = task.evaluate(model, test_batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for start in range(0, len(train), 16):
        optimizer.zero_grad()
        task.loss(model, task.batch(reader.read(train[start : start + 16]))).backward()
        optimizer.step()
    after = task.evaluate(model, test_batch)
    assert after["loss"] < before["loss"], (before, after)
    assert 0 < before["accuracy"] < 1
