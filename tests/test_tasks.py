"""The task registry and the digits task: names and options are checked before any code runs, a seed pins
the model, the loss is a per-sample mean (gradients of micro-batches are weighted by samples), and a
run's model file loads back exactly."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from peer.model_file import load_model_file, model_bytes
from peer.tasks import Task, TaskError, installed_tasks, load_task
from peer.tasks.digits import DigitsMLP


def records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Digits-shaped records (8x8 float32 pixels in [0, 1], a label 0..9), as the dataset reader yields."""
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.random((8, 8), dtype=np.float32), "y": int(label)} for label in rng.integers(0, 10, size=n)
    ]


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ registry


def test_digits_is_installed() -> None:
    assert installed_tasks()["digits-mlp"] == "peer.tasks.digits:DigitsMLP"
    task = load_task("digits-mlp", {})
    assert type(task) is DigitsMLP and isinstance(task, Task)
    assert task.values == {"hidden": 64}  # the defaults


def test_an_unknown_task_is_refused_naming_it_and_the_installed_ones() -> None:
    with pytest.raises(TaskError) as caught:
        load_task("imagenet-vit", {})
    message = str(caught.value)
    assert message.startswith("spec.task: ")
    assert "'imagenet-vit'" in message
    assert "digits-mlp" in message  # what is installed instead


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"hiddden": 32}, "spec.options.hiddden", "not an option of this task (options: hidden)"),
        ({"hidden": "64"}, "spec.options.hidden", "expected int, got '64'"),
        ({"hidden": 64.0}, "spec.options.hidden", "expected int, got 64.0"),
        ({"hidden": True}, "spec.options.hidden", "expected int, got True"),  # bool is an int to Python
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(TaskError) as caught:
        load_task("digits-mlp", options)
    assert str(caught.value) == f"{field}: {words}"


def test_options_set_the_model() -> None:
    task = load_task("digits-mlp", {"hidden": 16})
    assert task.values == {"hidden": 16}
    shapes = [tuple(p.shape) for p in task.build_model(0).parameters()]
    assert shapes == [(16, 64), (16,), (10, 16), (10,)]


# ------------------------------------------------------------------------------------------------ the model


def test_build_model_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    task = DigitsMLP()
    first, again, other = (parameters(task.build_model(s)) for s in (7, 7, 8))
    assert same(first, again)
    assert all(not torch.equal(first[k], other[k]) for k in first if k.endswith("weight"))


def test_build_model_leaves_the_global_generator_alone() -> None:
    """Building a model must not reseed the caller's random numbers (the trainer draws from them too)."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    DigitsMLP().build_model(5)
    assert torch.equal(torch.rand(4), expected)


def test_batch_makes_tensors() -> None:
    x, y = DigitsMLP().batch(records(5))
    assert x.shape == (5, 8, 8) and x.dtype == torch.float32
    assert y.shape == (5,) and y.dtype == torch.long


def test_loss_is_the_mean_of_the_per_sample_losses() -> None:
    task = DigitsMLP()
    model = task.build_model(0)
    batch = records(12, seed=3)
    loss = task.loss(model, task.batch(batch))
    assert loss.dim() == 0 and loss.requires_grad
    singles = torch.stack([task.loss(model, task.batch([r])) for r in batch])
    assert loss.item() == pytest.approx(singles.mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(singles.sum().item(), rel=1e-3)  # a sum would weigh big batches


def test_evaluate_returns_loss_and_accuracy() -> None:
    task = DigitsMLP()
    model = task.build_model(1)
    x, _ = task.batch(records(10, seed=4))
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    right = (x, predicted)
    wrong = (x, (predicted + 1) % 10)
    half = (x, torch.cat([predicted[:5], (predicted[5:] + 1) % 10]))
    before = parameters(model)
    metrics = task.evaluate(model, right)
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["accuracy"] == 1.0
    assert metrics["loss"] == pytest.approx(task.loss(model, right).item(), rel=1e-6)
    assert task.evaluate(model, wrong)["accuracy"] == 0.0
    assert task.evaluate(model, half)["accuracy"] == 0.5
    assert task.evaluate(model, wrong)["loss"] > metrics["loss"]
    assert same(parameters(model), before)
    assert all(p.grad is None for p in model.parameters())  # evaluation builds no graph


# ------------------------------------------------------------------------------------------------ model files


def test_model_file_round_trips_the_parameters_exactly(tmp_path: Path) -> None:
    task = load_task("digits-mlp", {"hidden": 16})
    model = task.build_model(3)
    with torch.no_grad():  # parameters no fresh model has: a trained model's
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "model.pt"
    path.write_bytes(model_bytes("digits-mlp", {"hidden": 16}, 45, model))
    loaded_task, loaded, saved = load_model_file(path)
    assert type(loaded_task) is DigitsMLP and loaded_task.values == {"hidden": 16}
    assert same(parameters(loaded), parameters(model))
    assert (saved["task"], saved["options"], saved["epoch"]) == ("digits-mlp", {"hidden": 16}, 45)
    x, _ = task.batch(records(3))
    assert torch.equal(loaded(x), model(x))


def test_a_model_file_of_an_unknown_task_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(model_bytes("not-installed", {}, 0, DigitsMLP().build_model(0)))
    with pytest.raises(TaskError, match=re.escape("spec.task: 'not-installed' is not installed")):
        load_model_file(path)


# ------------------------------------------------------------------------------------------------ bytes-lm


def test_bytes_lm_learns_next_bytes_and_seeds_its_dropout() -> None:
    from peer.tasks.bytes_lm import BytesLM

    task = load_task("bytes-lm", {"dim": 32, "layers": 1, "heads": 2, "dropout": 0.1})
    assert type(task) is BytesLM
    assert same(parameters(task.build_model(3)), parameters(task.build_model(3)))
    deep = load_task("bytes-lm", {"dim": 32, "layers": 2, "heads": 2}).build_model(0)
    first, second = (dict(layer.named_parameters()) for layer in deep.blocks.layers)
    assert not torch.equal(first["linear1.weight"], second["linear1.weight"])  # layers start apart
    rows = [{"tokens": np.frombuffer(b"abcdefgh" * 4, dtype=np.uint8)} for _ in range(4)]
    batch = task.batch(rows)
    assert batch.shape == (4, 32) and batch.dtype == torch.long
    model = task.build_model(0)
    torch.manual_seed(9)
    first = task.loss(model, batch).item()
    torch.manual_seed(9)
    assert task.loss(model, batch).item() == first  # same seed, same dropout: audits can recompute it
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()
    model.eval()
    assert task.evaluate(model, batch)["accuracy"] > 0.9  # a repeating text is learnt
    with pytest.raises(ValueError, match=r"spec\.options\.dim \(30\) must be a multiple of heads \(4\)"):
        load_task("bytes-lm", {"dim": 30}).build_model(0)
