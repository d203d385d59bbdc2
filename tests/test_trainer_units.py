"""The trainer's pieces without a swarm: shares of a step, the sample stream over the real digits dataset,
the training state that peers hand each other, the learning-rate schedule and the optimizers."""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import samples, trainer
from peer.averaging import TrainingState, capture, learning_rate, restore
from peer.data.examples import build_example
from peer.protocol.assignment import assign
from peer.protocol.dataset import Manifest, load_manifest
from peer.protocol.sketch import relative_distance
from peer.protocol.spec import validate_spec
from peer.run_link import live_peers
from peer.samples import SampleStream, shares, train_ids
from peer.settings import PeerSettings
from peer.sketch import Sketcher
from peer.tasks.digits import DigitsMLP
from peer.trainer_setup import make_optimizer, training_autocast
from peer.validator import micro_batch_gradient
from tests.harness import minimal_spec, peer_view, run_view

A, B, C = "a" * 64, "b" * 64, "c" * 64
PEERS = [A, B, C]
SEED, TEST_EVERY, BLOCK = 0, 5, 32
DIGITS = 1797


# ------------------------------------------------------------------------------------------------ shares


@settings(max_examples=200, deadline=None)
@given(
    target=st.integers(0, 100_000),
    owned=st.dictionaries(
        st.text("0123456789abcdef", min_size=1, max_size=8), st.integers(0, 5000), min_size=1
    ),
)
def test_shares_sum_to_the_target_in_proportion(target: int, owned: dict[str, int]) -> None:
    if not sum(owned.values()):
        return  # covered by test_shares_need_someone_with_samples
    result = shares(target, owned)
    assert result.keys() == owned.keys()
    assert sum(result.values()) == target
    total = sum(owned.values())
    for account, n in owned.items():
        assert abs(result[account] - target * n / total) < 1, (account, result)
        assert result[account] >= 0


def test_shares_give_the_remainder_by_largest_fraction_then_smaller_account() -> None:
    assert shares(1, {B: 1, A: 1}) == {A: 1, B: 0}
    assert shares(2, {C: 1, B: 1, A: 1}) == {A: 1, B: 1, C: 0}
    assert shares(1, {A: 1, B: 2}) == {A: 0, B: 1}  # B's 0.67 beats A's 0.33, whatever the names
    assert shares(2, {A: 1, B: 2}) == {A: 1, B: 1}  # A's 0.67 beats B's 0.33
    assert shares(256, {A: 0, B: 10}) == {A: 0, B: 256}


def test_shares_need_someone_with_samples() -> None:
    for owned in ({}, {A: 0}, {A: 0, B: 0}):
        with pytest.raises(ValueError, match="own no training samples"):
            shares(256, owned)


def test_train_and_test_ids_split_the_dataset() -> None:
    ids = np.arange(DIGITS, dtype=np.int64)
    train, test = train_ids(ids, TEST_EVERY), samples.test_ids(DIGITS, TEST_EVERY)
    assert len(train) == 1438 and len(test) == 359
    assert sorted(np.concatenate([train, test]).tolist()) == ids.tolist()
    assert all(i % TEST_EVERY == TEST_EVERY - 1 for i in test.tolist())
    assert train_ids(np.array([9, 3, 4, 0], dtype=np.int64), TEST_EVERY).tolist() == [3, 0]  # keeps order


# ------------------------------------------------------------------------------------------------ the stream


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("data") / "digits"
    build_example("digits", root, shard_bytes=1 << 20)
    found = load_manifest(root)
    assert found.samples == DIGITS
    return found


def stream(manifest: Manifest, account: str) -> SampleStream:
    return SampleStream(manifest, SEED, TEST_EVERY, BLOCK, account)


def order(manifest: Manifest, account: str, peers: Sequence[str], passes: int) -> list[int]:
    """The account's training samples in the order of pass ``passes``, as every peer computes it."""
    ids = assign(SEED, passes, peers, manifest.shards, BLOCK).samples[account]
    return train_ids(ids, TEST_EVERY).tolist()


def all_train_ids() -> list[int]:
    return train_ids(np.arange(DIGITS, dtype=np.int64), TEST_EVERY).tolist()


def test_a_step_of_the_whole_split_covers_it_once(manifest: Manifest) -> None:
    target = len(all_train_ids())
    taken = {a: stream(manifest, a).take(target, PEERS) for a in PEERS}
    union = [i for ids in taken.values() for i in ids]
    assert len(union) == len(set(union)) == target  # disjoint
    assert sorted(union) == all_train_ids()  # and covering
    for a in PEERS:
        assert taken[a] == order(manifest, a, PEERS, 0)


def test_steps_hold_out_the_test_split_and_add_up_to_the_target(manifest: Manifest) -> None:
    streams = {a: stream(manifest, a) for a in PEERS}
    for _ in range(8):
        step = {a: s.take(256, PEERS) for a, s in streams.items()}
        assert sum(len(ids) for ids in step.values()) == 256
        for a, ids in step.items():
            assert len(ids) == shares(256, streams[a].owned)[a]
            assert not [i for i in ids if i % TEST_EVERY == TEST_EVERY - 1], "a test sample was trained on"
        for a, b in itertools.combinations(PEERS, 2):
            assert not set(step[a]) & set(step[b])  # peers never train on the same sample


def test_taking_goes_on_into_the_next_pass(manifest: Manifest) -> None:
    s = stream(manifest, A)
    first, second = order(manifest, A, PEERS, 0), order(manifest, A, PEERS, 1)
    assert sorted(first) == sorted(second) and first != second  # same samples, reshuffled
    taken: list[int] = []
    while len(taken) <= len(first):  # the last step straddles the end of the pass
        before = len(taken)
        step = s.take(256, PEERS)
        assert len(step) == len(set(step))  # a report may not name a sample twice
        taken += step
    assert s.passes == 1
    straddling = set(step[: len(first) - before])  # what the straddling step took from the old pass
    # the new pass starts with its samples the straddling step did not already take, in order
    reordered = [i for i in second if i not in straddling] + [i for i in second if i in straddling]
    assert taken == first + reordered[: len(taken) - len(first)]
    while s.passes == 1:
        taken += s.take(256, PEERS)
    assert sorted(taken[len(first) : len(first) + len(second)]) == sorted(second)  # each once per pass


def test_when_a_peer_leaves_the_others_take_over_its_samples(manifest: Manifest) -> None:
    streams = {a: stream(manifest, a) for a in PEERS}
    for s in streams.values():
        s.take(256, PEERS)
        s.take(256, PEERS)
    before = set(order(manifest, A, PEERS, 0))
    remaining = [A, B]
    step = {a: streams[a].take(256, remaining) for a in remaining}
    assert sum(len(ids) for ids in step.values()) == 256
    for a in remaining:
        assert streams[a].owned.keys() == set(remaining)
        mine = order(manifest, a, remaining, streams[a].passes)
        assert step[a] == mine[: len(step[a])]  # the new list, from its start
        assert len(step[a]) == shares(256, streams[a].owned)[a]
    assert set(order(manifest, A, remaining, 0)) >= before  # A keeps its blocks and gains some of C's
    covered = order(manifest, A, remaining, 0) + order(manifest, B, remaining, 0)
    assert sorted(covered) == all_train_ids()
    assert not set(step[A]) & set(step[B])


def test_the_stream_knows_the_shards_of_its_assignment(manifest: Manifest) -> None:
    s = stream(manifest, A)
    s.take(1, PEERS)
    assert s.shards == (0,)  # the digits fit in one shard of 1 MiB


# ------------------------------------------------------------------------------------------------ state


def _records(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.random((8, 8), dtype=np.float32), "y": int(rng.integers(10))} for _ in range(n)]


def _train(
    model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], steps: int, seed: int
) -> None:
    task = DigitsMLP()
    for step in range(steps):
        loss = task.loss(model, task.batch(_records(16, seed + step)))
        for o in optimizers:
            o.zero_grad()
        loss.backward()
        for o in optimizers:
            o.step()


def _optimizers(kind: str, params: list[torch.nn.Parameter], lr: float) -> list[torch.optim.Optimizer]:
    if kind == "adam":
        return [torch.optim.Adam(params, lr=lr)]
    if kind == "sgd":
        return [torch.optim.SGD(params, lr=lr, momentum=0.9)]
    # local updates: an inner Adam and the outer Nesterov SGD over the same parameters
    return [torch.optim.Adam(params, lr=lr), torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)]


def _plain(value: Any) -> Any:
    """Hyperparameters compared regardless of tuple/list (the state carries lists, for msgpack)."""
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("kind", ["adam", "sgd", "adam+outer"])
def test_capture_restore_round_trips_parameters_and_optimizer_state(kind: str) -> None:
    task = DigitsMLP()
    model = task.build_model(0)
    params = list(model.parameters())
    optimizers = _optimizers(kind, params, lr=0.01)
    _train(model, optimizers, 3, seed=0)
    state = capture(3, params, optimizers)

    fresh = task.build_model(1)
    fresh_params = list(fresh.parameters())
    fresh_optimizers = _optimizers(kind, fresh_params, lr=0.01)  # every peer's spec sets the same ones
    restore(state, fresh_params, fresh_optimizers)

    assert state.epoch == 3
    assert all(torch.equal(p, q) for p, q in zip(params, fresh_params, strict=True))
    for original, restored in zip(optimizers, fresh_optimizers, strict=True):
        want, got = original.state_dict(), restored.state_dict()
        assert want["state"].keys() == got["state"].keys() and want["state"]
        for index, values in want["state"].items():
            assert values.keys() == got["state"][index].keys()
            for key, value in values.items():
                assert torch.equal(value, got["state"][index][key]), (index, key)
        if "step" in want["state"][0]:
            assert int(got["state"][0]["step"]) == 3
        for group, restored_group in zip(want["param_groups"], got["param_groups"], strict=True):
            assert {k: _plain(v) for k, v in group.items()} == {
                k: _plain(v) for k, v in restored_group.items()
            }
    # the proof that nothing was missed: one more identical step keeps the two models identical
    _train(model, optimizers, 1, seed=100)
    _train(fresh, fresh_optimizers, 1, seed=100)
    assert all(torch.equal(p, q) for p, q in zip(params, fresh_params, strict=True))


def test_the_state_survives_the_wire() -> None:
    """Its metadata goes through msgpack when a peer downloads it (hivemind's serializer)."""
    task = DigitsMLP()
    model = task.build_model(0)
    params = list(model.parameters())
    optimizers = _optimizers("adam+outer", params, lr=0.01)
    _train(model, optimizers, 2, seed=0)
    state = capture(2, params, optimizers)
    layout, scalars = msgpack.unpackb(msgpack.packb([state.layout, state.scalars]), strict_map_key=False)
    sent = TrainingState(state.epoch, [t.clone() for t in state.tensors], layout, scalars)
    fresh = task.build_model(1)
    fresh_optimizers = _optimizers("adam+outer", list(fresh.parameters()), lr=0.01)
    restore(sent, list(fresh.parameters()), fresh_optimizers)
    _train(model, optimizers, 1, seed=50)
    _train(fresh, fresh_optimizers, 1, seed=50)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))


def test_capture_is_a_copy() -> None:
    model = DigitsMLP().build_model(0)
    params = list(model.parameters())
    optimizers = _optimizers("adam", params, lr=0.01)
    _train(model, optimizers, 1, seed=0)
    state = capture(1, params, optimizers)
    kept = [t.clone() for t in state.tensors]
    _train(model, optimizers, 2, seed=1)  # training goes on after the state was handed out
    assert all(torch.equal(t, k) for t, k in zip(state.tensors, kept, strict=True))


def test_restore_refuses_a_state_of_another_model() -> None:
    small = DigitsMLP(hidden=8).build_model(0)
    state = capture(1, list(small.parameters()), _optimizers("adam", list(small.parameters()), 0.01))
    large = DigitsMLP(hidden=16).build_model(0)
    large_params = list(large.parameters())
    with pytest.raises(ValueError, match=r"shape \(8, 64\) was sent for \(16, 64\)"):
        restore(state, large_params, _optimizers("adam", large_params, 0.01))
    with pytest.raises(ValueError, match=r"for 1 optimizers; .* need .* for 2"):  # one optimizer's for two
        restore(state, list(small.parameters()), _optimizers("adam+outer", list(small.parameters()), 0.01))


def test_restore_refuses_a_truncated_state_with_value_error() -> None:
    """A broken or hostile donor's state whose layout names more tensors than it carries is refused."""
    model = DigitsMLP().build_model(0)
    params = list(model.parameters())
    optimizers = _optimizers("adam", params, 0.01)
    _train(model, optimizers, 1, seed=0)
    state = capture(1, params, optimizers)
    truncated = TrainingState(state.epoch, state.tensors[: len(params) + 2], state.layout, state.scalars)
    with pytest.raises(ValueError):
        restore(truncated, params, _optimizers("adam", params, 0.01))


def test_a_state_s_pending_round_must_be_shaped_like_the_parameters_and_finite() -> None:
    """An overlapped run's state carries the averaged update still to apply (``pending``): what a donor
    sends there is checked like the rest of its state before anything changes."""
    model = DigitsMLP().build_model(0)
    params = list(model.parameters())
    state = capture(1, params, _optimizers("adam", params, 0.01))
    good = [torch.full_like(p, 0.5) for p in params]
    restore(dataclasses.replace(state, pending=good), params, _optimizers("adam", params, 0.01))
    bad_shape = [*good[:-1], torch.zeros(3)]
    with pytest.raises(ValueError, match=r"pending update of shape \(3,\) was sent for \(10,\)"):
        restore(dataclasses.replace(state, pending=bad_shape), params, _optimizers("adam", params, 0.01))
    with pytest.raises(ValueError, match="holds 1 tensors for 4"):
        restore(dataclasses.replace(state, pending=good[:1]), params, _optimizers("adam", params, 0.01))
    not_finite = [*good[:-1], torch.full_like(params[-1], float("nan"))]
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="not finite"):
        restore(dataclasses.replace(state, pending=not_finite), params, _optimizers("adam", params, 0.01))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_a_refused_restore_leaves_the_model_as_it_was() -> None:
    """Shapes are checked before anything is copied: a state whose last layer does not fit changes
    nothing."""
    donor = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10)
    )
    state = capture(1, list(donor.parameters()), _optimizers("adam", list(donor.parameters()), 0.01))
    other = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 12)
    )
    params = list(other.parameters())
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"shape \(10, 8\) was sent for \(12, 8\)"):
        restore(state, params, _optimizers("adam", params, 0.01))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


# ------------------------------------------------------------------------------------------------ schedule


def test_constant_schedule() -> None:
    assert {learning_rate(0.1, "constant", 0, e, 50) for e in range(0, 60)} == {0.1}


def test_warm_up_is_linear_from_base_over_warmup_to_base() -> None:
    rates = [learning_rate(0.1, "constant", 4, e, 50) for e in range(8)]
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert rates[4:] == [0.1] * 4
    assert learning_rate(0.1, "linear", 10, 3, 5) == pytest.approx(0.04)  # warm-up even when it is all


def test_linear_schedule_decays_to_zero_at_the_end() -> None:
    rates = [learning_rate(0.1, "linear", 0, e, 10) for e in range(11)]
    assert rates[0] == 0.1
    assert rates[-1] == 0.0
    assert all(math.isclose(a - b, 0.01, rel_tol=1e-9) for a, b in itertools.pairwise(rates))
    after_warmup = [learning_rate(0.1, "linear", 2, e, 12) for e in range(2, 13)]
    assert after_warmup[0] == 0.1 and after_warmup[-1] == 0.0 and after_warmup == sorted(after_warmup)[::-1]
    assert learning_rate(0.1, "linear", 0, 20, 10) == 0.0  # never negative past the end


def test_cosine_schedule() -> None:
    assert learning_rate(0.1, "cosine", 0, 0, 10) == 0.1
    assert learning_rate(0.1, "cosine", 0, 5, 10) == pytest.approx(0.05)
    assert learning_rate(0.1, "cosine", 0, 10, 10) == pytest.approx(0.0, abs=1e-15)
    assert learning_rate(0.1, "cosine", 3, 3, 13) == 0.1  # the decay starts after the warm-up
    rates = [learning_rate(0.1, "cosine", 0, e, 10) for e in range(11)]
    assert rates == sorted(rates, reverse=True)


# ------------------------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_make_optimizer(name: str, cls: type[torch.optim.Optimizer]) -> None:
    spec = validate_spec(
        minimal_spec("opt", optimizer={"name": name, "lr": 0.02, "weight_decay": 0.125, "momentum": 0.5})
    )
    params = list(DigitsMLP().build_model(0).parameters())
    optimizer = make_optimizer(spec, params)
    assert type(optimizer) is cls  # AdamW subclasses Adam: the exact class matters
    (group,) = optimizer.param_groups
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.125)
    assert group["params"] == params
    if name == "sgd":
        assert group["momentum"] == 0.5


# ------------------------------------------------------------------------------------------------ live peers


def test_live_peers_are_the_active_ones_in_match_order() -> None:
    d = "d" * 64
    peers = [
        peer_view(C, "active", 5.0),
        peer_view(d, "dropped", 1.0),
        peer_view(B, "active", 2.0),
        peer_view(A, "active", 5.0),
    ]
    view = run_view(peers, owner=d)
    assert [p.account for p in live_peers(view)] == [B, A, C]  # by match time, then account


class _Priority:
    state_sharing_priority = 0.0
    client_mode = False  # a peer others can dial: it shares its state


def _bare_trainer(local_updates: bool) -> trainer.Trainer:
    """A Trainer with only what taking a step needs (no coordinator, DHT or averager process)."""
    t = trainer.Trainer.__new__(trainer.Trainer)
    t.lock = threading.Lock()
    t.model = DigitsMLP(hidden=8).build_model(0)
    t.params = list(t.model.parameters())
    t.optimizer = torch.optim.Adam(t.params, lr=0.01)
    t.outer = torch.optim.SGD(t.params, lr=0.7, momentum=0.9, nesterov=True) if local_updates else None
    t.optimizers = [t.optimizer, *([t.outer] if t.outer else [])]
    t.buffers = [torch.full_like(p, 0.5) for p in t.params]
    t.averager = _Priority()  # type: ignore[assignment]
    t.epoch, t.snapshot, t.snapshots = 3, None, None
    t.settings, t.announced = PeerSettings(state_announce_interval=60.0), -math.inf
    return t


def test_a_skipped_step_moves_to_the_next_epoch_and_keeps_the_parameters() -> None:
    t = _bare_trainer(local_updates=False)
    before = [p.detach().clone() for p in t.params]
    t._apply(None, skip=True)
    assert t.epoch == 4 and t.averager.state_sharing_priority == 4
    assert all(torch.equal(a, b) for a, b in zip(before, t.params, strict=True))
    assert not t.optimizer.state  # the optimizer took no step either
    t._apply(None)
    assert t.epoch == 5 and not all(torch.equal(a, b) for a, b in zip(before, t.params, strict=True))
    assert t.averager.state_sharing_priority == 4  # announced at most once a state_announce_interval


def test_a_skipped_local_updates_step_returns_to_the_epochs_start() -> None:
    t = _bare_trainer(local_updates=True)
    start = [p.detach().clone() for p in t.params]
    t.snapshot = capture(3, t.params, t.optimizers)  # as _epoch takes it
    with torch.no_grad():
        for p in t.params:
            p.add_(1.0)  # the inner steps moved the parameters
    t._apply(start, skip=True)
    assert t.epoch == 4 and t.snapshot is None
    assert all(torch.equal(a, b) for a, b in zip(start, t.params, strict=True))


def test_a_donors_hyperparameters_and_foreign_state_are_not_taken() -> None:
    """Only per-parameter state crosses: a donor cannot set the learning rate or ``maximize`` (which
    would reverse training), nor send state another optimizer keeps."""
    model = DigitsMLP().build_model(0)
    params = list(model.parameters())
    donor = _optimizers("adam", params, lr=0.5)
    donor[0].param_groups[0]["maximize"] = True
    _train(model, donor, 1, seed=0)
    state = capture(1, params, donor)
    fresh = DigitsMLP().build_model(1)
    mine = _optimizers("adam", list(fresh.parameters()), lr=0.01)
    restore(state, list(fresh.parameters()), mine)
    (group,) = mine[0].param_groups
    assert group["lr"] == 0.01 and group["maximize"] is False
    sgd_opts = _optimizers("sgd", params, lr=0.01)  # momentum buffers, no moments
    _train(model, sgd_opts, 1, seed=0)
    sgd_state = capture(1, params, sgd_opts)
    with pytest.raises(ValueError, match="not the one a Adam keeps"):
        restore(sgd_state, list(fresh.parameters()), _optimizers("adam", list(fresh.parameters()), lr=0.01))


# ------------------------------------------------------------------------------------------ precision


def test_bf16_is_used_only_where_the_device_computes_it_natively() -> None:
    assert training_autocast("fp32", torch.device("cpu")) is None
    assert training_autocast("bf16", torch.device("cpu")) is None  # a CPU runs bf16 slower than fp32
    assert validate_spec(minimal_spec("p", precision="bf16")).precision == "bf16"
    with pytest.raises(ValueError, match=r"spec.precision"):
        validate_spec(minimal_spec("p", precision="fp8"))


def test_a_bf16_micro_batch_is_audited_against_float32_within_the_tolerance() -> None:
    """A peer under bf16 autocast computes another gradient than the float32 validator, close enough."""
    task = DigitsMLP(hidden=64)
    model = task.build_model(0)
    params = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.default_rng(0)
    batch = task.batch([{"x": rng.random((8, 8), dtype=np.float32), "y": int(y)} for y in range(10)] * 3)
    sketch = Sketcher(sum(p.numel() for p in params), 1)
    loss_32, grads_32 = micro_batch_gradient(task, model, params, batch, 5)
    reference = sketch([g.clone() for g in grads_32])
    loss_16, grads_16 = micro_batch_gradient(task, model, params, batch, 5, autocast=torch.bfloat16)
    distance = relative_distance(sketch(grads_16), reference)
    tolerance = validate_spec(minimal_spec("p", verification={})).verification.tolerance
    assert 0 < distance < tolerance / 4, distance
    assert loss_16 != loss_32 and abs(loss_16 - loss_32) / loss_32 < 0.05
