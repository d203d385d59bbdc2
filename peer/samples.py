"""Which samples a peer trains on: the train/test split of a dataset (:func:`train_ids`, :func:`test_ids`),
each live peer's share of a step (:func:`shares`), and :class:`SampleStream`, this peer's assigned samples
pass after pass.

Every peer computes the same split, shares and assignment from the run's spec and the live peers
(:func:`peer.protocol.assignment.assign`), so the swarm visits each training sample once per pass without
agreeing on it over the network. Without torch or hivemind: :mod:`peer.launch` takes the test split from
here when it posts a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from peer.protocol.assignment import assign
from peer.protocol.dataset import Manifest
from peer.trainer_exit import EXIT_REFUSED, TrainerExit


def train_ids(ids: np.ndarray, test_every: int) -> np.ndarray:
    """The training split: every sample but each ``test_every``-th (id % N == N - 1, the test split)."""
    return ids[ids % test_every != test_every - 1]


def test_ids(total: int, test_every: int) -> np.ndarray:
    ids = np.arange(total, dtype=np.int64)
    return ids[ids % test_every == test_every - 1]


def shares(target: int, owned: dict[str, int]) -> dict[str, int]:
    """Split ``target`` samples among peers in proportion to the training samples each owns, summing to
    ``target`` exactly (largest remainders, ties to the smaller account).

    Proportional shares make every peer go through its blocks at the same pace, so the swarm visits each
    sample once per pass like one process would; equal shares would over-sample the peers that own less.
    """
    total = sum(owned.values())
    if total == 0:
        raise ValueError("the live peers own no training samples")
    exact = {a: target * n / total for a, n in owned.items()}
    result = {a: math.floor(x) for a, x in exact.items()}
    by_remainder = sorted(owned, key=lambda a: (result[a] - exact[a], a))
    for a in by_remainder[: target - sum(result.values())]:
        result[a] += 1
    return result


@dataclass
class SampleStream:
    """This peer's training samples in assignment order, pass after pass over its blocks.

    The assignment (:func:`peer.protocol.assignment.assign`) depends on the live peers; when they change, the
    current pass is re-assigned and this peer starts its new list from the beginning (samples it already
    trained on in this pass may come again: a change of peers costs a little repetition, never a gap).
    """

    manifest: Manifest
    seed: int
    test_every: int
    block_size: int
    account: str
    passes: int = 0
    position: int = 0
    peers: tuple[str, ...] = ()
    order: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    owned: dict[str, int] = field(default_factory=dict)
    shards: tuple[int, ...] = ()  # the shards this peer's blocks sit in (ownership does not change by pass)

    def take(self, target: int, peers: Sequence[str]) -> list[int]:
        """This peer's share of a step of ``target`` samples over ``peers``, in its training order.

        A share that straddles two passes must not name a sample twice (a report may not): the samples
        it already took from the old pass move to the end of the new pass's order."""
        if tuple(sorted(peers)) != self.peers:
            self.peers = tuple(sorted(peers))
            self._assign()
        count = shares(target, self.owned)[self.account]
        taken: list[int] = []
        while len(taken) < count:
            if self.position >= len(self.order):
                self.passes += 1
                self._assign()
                if taken:
                    again = np.isin(self.order, taken)
                    self.order = np.concatenate([self.order[~again], self.order[again]])
            end = min(len(self.order), self.position + count - len(taken))
            taken += self.order[self.position : end].tolist()
            self.position = end
        return taken

    def spare(self, count: int) -> list[int]:
        """Up to ``count`` ids that come after this peer's current position in the pass, without taking
        them (what an ``inflated-samples`` cheat claims it processed)."""
        return self.order[self.position : self.position + count].tolist()

    def _assign(self) -> None:
        result = assign(self.seed, self.passes, self.peers, self.manifest.shards, self.block_size)
        self.owned = {a: len(train_ids(ids, self.test_every)) for a, ids in result.samples.items()}
        self.order = train_ids(result.samples[self.account], self.test_every)
        self.shards = result.shards[self.account]
        self.position = 0
        if not len(self.order):
            raise TrainerExit(EXIT_REFUSED, "this peer was assigned no training samples")
