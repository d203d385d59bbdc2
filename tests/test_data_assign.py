"""Deterministic assignment: disjoint, covering, stable under churn, and the same wherever it is computed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.protocol.assignment import assign, blocks
from peer.protocol.dataset import ShardInfo


def _shards(sizes: list[int]) -> list[ShardInfo]:
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    return [
        ShardInfo(f"shard-{i:05d}.msgpack", "0" * 64, 1, n, s)
        for i, (n, s) in enumerate(zip(sizes, starts, strict=True))
    ]


accounts = st.lists(
    st.text("0123456789abcdef", min_size=64, max_size=64), min_size=1, max_size=12, unique=True
)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 700), min_size=1, max_size=8),
    peers=accounts,
    seed=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 1000),
    block_size=st.integers(1, 300),
)
def test_lists_are_disjoint_and_cover_the_epoch(sizes, peers, seed, epoch, block_size) -> None:
    shards = _shards(sizes)
    result = assign(seed, epoch, peers, shards, block_size)
    assert set(result.samples) == set(peers)
    everything = np.concatenate(list(result.samples.values()))
    assert sorted(everything.tolist()) == list(range(sum(sizes)))  # covers, and no id twice
    for account, ids in result.samples.items():
        needed = {
            shards.index(next(s for s in shards if s.first_id <= i < s.first_id + s.samples)) for i in ids
        }
        assert set(result.shards[account]) == needed  # a peer fetches exactly the shards it trains on


@settings(max_examples=100, deadline=None)
@given(peers=accounts.filter(lambda p: len(p) >= 2), seed=st.integers(0, 2**32), data=st.data())
def test_a_drop_moves_only_the_dropped_peers_blocks(peers, seed, data) -> None:
    shards = _shards([500, 300, 900])
    before = assign(seed, 3, peers, shards, 50)
    gone = data.draw(st.sampled_from(peers))
    after = assign(seed, 3, [p for p in peers if p != gone], shards, 50)
    for account in after.samples:
        kept = set(before.samples[account].tolist())
        assert kept <= set(after.samples[account].tolist())  # nobody loses what it had
    moved = set().union(
        *(set(after.samples[a].tolist()) - set(before.samples[a].tolist()) for a in after.samples)
    )
    assert moved == set(before.samples[gone].tolist())  # what moved is exactly the dropped peer's share


def test_a_join_takes_blocks_only_from_others() -> None:
    peers = [f"{i:064x}" for i in range(5)]
    shards = _shards([1000, 1000])
    before = assign(7, 0, peers, shards, 64)
    newcomer = "f" * 64
    after = assign(7, 0, [*peers, newcomer], shards, 64)
    assert len(after.samples[newcomer]) > 0
    for account in peers:
        lost = set(before.samples[account].tolist()) - set(after.samples[account].tolist())
        assert lost <= set(after.samples[newcomer].tolist())


def test_the_epoch_reorders_but_keeps_ownership() -> None:
    peers = [f"{i:064x}" for i in range(3)]
    shards = _shards([600])
    first, second = assign(1, 0, peers, shards), assign(1, 1, peers, shards)
    for account in peers:
        assert sorted(first.samples[account].tolist()) == sorted(second.samples[account].tolist())
    assert any(
        not np.array_equal(first.samples[a], second.samples[a]) for a in peers if len(first.samples[a]) > 1
    )


def test_a_validator_in_another_process_computes_the_same_list() -> None:
    peers = [f"{i:064x}" for i in range(4)]
    sizes = [333, 100, 567]
    mine = assign(2**63 + 5, 9, peers, _shards(sizes), 32).samples[peers[2]].tolist()
    script = (
        "import json, sys\n"
        "from peer.protocol.assignment import assign\n"
        "from tests.test_data_assign import _shards\n"
        f"result = assign({2**63 + 5}, 9, {peers!r}, _shards({sizes!r}), 32)\n"
        f"print(json.dumps(result.samples[{peers[2]!r}].tolist()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash seed must not matter
    theirs = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True, timeout=60
    )
    assert json.loads(theirs.stdout) == mine


def test_known_answer_pins_the_algorithm() -> None:
    # Validators in other languages implement the documented algorithm; this fixes its output.
    result = assign(42, 1, ["a" * 64, "b" * 64, "c" * 64], _shards([10, 6]), 4)
    assert {k: v.tolist() for k, v in result.samples.items()} == KNOWN_ANSWER


KNOWN_ANSWER = {
    "a" * 64: [0, 1, 3, 11, 12, 10, 13, 4, 6, 2, 7, 5],
    "b" * 64: [8, 14, 15, 9],
    "c" * 64: [],
}


def test_blocks_never_straddle_shards() -> None:
    cut = blocks(_shards([5, 0, 7]), 4)
    assert [(b.start, b.stop, b.shard) for b in cut] == [(0, 4, 0), (4, 5, 0), (5, 9, 2), (9, 12, 2)]
    with pytest.raises(ValueError, match="block_size"):
        blocks(_shards([5]), 0)
    with pytest.raises(ValueError, match="empty set of peers"):
        assign(1, 0, [], _shards([5]))
