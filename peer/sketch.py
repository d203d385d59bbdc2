"""Small sketches of large vectors (gradients, parameters) for contribution reports and audits.

A sketch is a CountSketch: every coordinate of the flattened vector is added, with a random sign, to
one of ``dims`` buckets. It is a sparse random projection, so sketches are linear (the sketch of a sum is
the sum of the sketches) and two vectors that are close have close sketches, at O(n) cost and no
``dims x n`` matrix. The buckets and signs come from a seed that everyone derives the same way:

    gradient sketches:  seed("hivemarket-grad",   run_id, epoch, account)  (a peer cannot reuse another's)
    parameter sketches: seed("hivemarket-params", run_id, epoch)           (comparable across peers)

seed(...) = the first 8 bytes (little-endian) of BLAKE2b-128 over the parts joined by "\\n", masked to 63
bits for torch.Generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

DIMS = 32


def seed_of(*parts: object) -> int:
    digest = hashlib.blake2b("\n".join(str(p) for p in parts).encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def grad_seed(run_id: str, epoch: int, account: str) -> int:
    return seed_of("hivemarket-grad", run_id, epoch, account)


def params_seed(run_id: str, epoch: int) -> int:
    return seed_of("hivemarket-params", run_id, epoch)


class Sketcher:
    """Sketches vectors of one fixed length with one seed (the buckets and signs are drawn once)."""

    def __init__(self, length: int, seed: int, dims: int = DIMS):
        generator = torch.Generator().manual_seed(seed)
        self.dims = dims
        self.buckets = torch.randint(0, dims, (length,), generator=generator)
        self.signs = torch.randint(0, 2, (length,), generator=generator, dtype=torch.int8).float() * 2 - 1

    def __call__(self, tensors: Iterable[torch.Tensor]) -> list[float]:
        flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
        if flat.numel() != self.buckets.numel():
            raise ValueError(f"sketcher is for {self.buckets.numel()} values, got {flat.numel()}")
        out = torch.zeros(self.dims, dtype=torch.float64)
        out.index_add_(0, self.buckets, (flat * self.signs).double())
        return out.tolist()
