"""Deterministic assignment of samples to peers: every peer and every validator computes the same lists.

The unit of assignment is a *block*: up to ``block_size`` consecutive sample ids inside one shard, so a
peer fetches only the shards its blocks sit in. Each block belongs to the live peer with the highest
rendezvous weight ``mix(peer_key ^ mix(block ^ seed_key))``; a peer that drops or joins moves only its
own blocks, so everyone else keeps (and does not re-download) what it had. Ownership depends on the run
seed, not on the epoch, for the same reason; the epoch reshuffles the *order* in which a peer visits
its samples (sorted by ``mix(order_key ^ sample_id)``).

Everything is 64-bit unsigned integer arithmetic with wrap-around (SplitMix64's finaliser as ``mix``)
and keys taken from BLAKE2b, so a validator in any language reproduces a peer's list exactly:

    seed_key  = u64(blake2b(b"hivemarket-seed"  | seed as 8 little-endian bytes))
    peer_key  = u64(blake2b(b"hivemarket-owner" | seed | account as ASCII))
    order_key = u64(blake2b(b"hivemarket-order" | seed | epoch as 8 LE bytes | account as ASCII))

(u64 = the first 8 bytes of the 16-byte digest, little-endian.) Ties in weight go to the smaller account.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from peer.protocol.dataset import ShardInfo

DEFAULT_BLOCK_SIZE = 256
_U64 = np.uint64


def _key(*parts: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b"".join(parts), digest_size=16).digest()[:8], "little")


def _le(value: int) -> bytes:
    return (value % 2**64).to_bytes(8, "little")


def mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrap-around multiplication is intended)."""
    with np.errstate(over="ignore"):
        x = x.astype(_U64, copy=True)
        x ^= x >> _U64(30)
        x *= _U64(0xBF58476D1CE4E5B9)
        x ^= x >> _U64(27)
        x *= _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
    return x


@dataclass(frozen=True)
class Block:
    start: int  # first sample id
    stop: int  # one past the last
    shard: int  # index of the shard in the manifest


def blocks(shards: Sequence[ShardInfo], block_size: int = DEFAULT_BLOCK_SIZE) -> list[Block]:
    """Cut every shard into blocks of at most ``block_size`` samples (blocks never straddle shards)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return [
        Block(start, min(start + block_size, shard.first_id + shard.samples), index)
        for index, shard in enumerate(shards)
        for start in range(shard.first_id, shard.first_id + shard.samples, block_size)
    ]


@dataclass(frozen=True)
class Assignment:
    """Who trains on what in one epoch, and why (in words, for logs and the dashboard)."""

    samples: dict[str, np.ndarray]  # account -> sample ids in training order
    shards: dict[str, tuple[int, ...]]  # account -> indexes of the shards it needs
    reason: str


def assign(
    seed: int,
    epoch: int,
    peers: Collection[str],
    shards: Sequence[ShardInfo],
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Assignment:
    """Split the dataset among the live ``peers``: disjoint lists that together cover every sample."""
    accounts = sorted(set(peers))
    if not accounts:
        raise ValueError("cannot assign samples to an empty set of peers")
    cut = blocks(shards, block_size)
    owner = _owners(seed, accounts, len(cut))
    samples, needed = {}, {}
    by_owner = np.split(
        np.argsort(owner, kind="stable"), np.cumsum(np.bincount(owner, minlength=len(accounts)))[:-1]
    )
    for account, blocks_of_account in zip(accounts, by_owner, strict=True):
        mine = [cut[i] for i in blocks_of_account]
        ids = np.concatenate(
            [np.arange(b.start, b.stop, dtype=np.int64) for b in mine] or [np.empty(0, np.int64)]
        )
        order_key = _key(b"hivemarket-order", _le(seed), _le(epoch), account.encode("ascii"))
        samples[account] = ids[np.argsort(mix(ids.astype(_U64) ^ _U64(order_key)), kind="stable")]
        needed[account] = tuple(sorted({b.shard for b in mine}))
    total = sum(s.samples for s in shards)
    reason = (
        f"{total} samples in {len(cut)} blocks of <= {block_size} over {len(accounts)} peers, epoch {epoch}"
    )
    return Assignment(samples, needed, reason)


def _owners(seed: int, accounts: list[str], n_blocks: int) -> np.ndarray:
    """Index (into ``accounts``) of each block's owner: the highest rendezvous weight wins."""
    seed_key = _U64(_key(b"hivemarket-seed", _le(seed)))
    block_mix = mix(np.arange(n_blocks, dtype=_U64) ^ seed_key)
    best = np.zeros(n_blocks, dtype=np.int64)
    best_weight = np.zeros(n_blocks, dtype=_U64)
    for index, account in enumerate(accounts):  # sorted: on equal weight the smaller account keeps it
        weight = mix(block_mix ^ _U64(_key(b"hivemarket-owner", _le(seed), account.encode("ascii"))))
        wins = (weight > best_weight) if index else np.ones(n_blocks, dtype=bool)
        best[wins] = index
        best_weight[wins] = weight[wins]
    return best
