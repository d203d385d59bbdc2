"""Small sketches of large vectors (gradients, parameters) for contribution reports and audits.

A sketch is a signed block sum: every coordinate of the flattened vector is multiplied by a random sign
and the result is cut into ``dims`` contiguous blocks, each summed. It is a random projection, so sketches
are linear (the sketch of a sum is the sum of the sketches) and two vectors that are close have close
sketches, at O(n) cost and no ``dims x n`` matrix. Every block needs every coordinate in it, so the
sketch of a gradient cannot be had without the whole backward pass. (A CountSketch, which scatters
coordinates into random buckets, does the same job 5x slower on a CPU: scattered adds against three
sequential passes; peers sketch every micro-batch, so this is on the training path.) The signs come
from a seed that everyone derives the same way:

    gradient sketches:  seed("hivemarket-grad",   run_id, epoch, account)  (a peer cannot reuse another's)
    parameter sketches: seed("hivemarket-params", run_id, epoch)           (comparable across peers)

seed(...) = the first 8 bytes (little-endian) of BLAKE2b-128 over the parts joined by "\\n", masked to 63
bits for torch.Generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from coordinator.verification import SKETCH_DIMS

DIMS = SKETCH_DIMS


def seed_of(*parts: object) -> int:
    digest = hashlib.blake2b("\n".join(str(p) for p in parts).encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def grad_seed(run_id: str, epoch: int, account: str) -> int:
    return seed_of("hivemarket-grad", run_id, epoch, account)


def params_seed(run_id: str, epoch: int) -> int:
    return seed_of("hivemarket-params", run_id, epoch)


class Sketcher:
    """Sketches vectors of one fixed length with one seed (the signs are drawn once, on the CPU, and
    copied once to each device whose tensors it sketches, so a GPU's gradients never travel).

    Float32 throughout: ~1e-7 of relative rounding, deterministic for the same inputs on the same device.
    Not thread-safe (it reuses one buffer per device); each thread that sketches has its own.
    """

    def __init__(self, length: int, seed: int, dims: int = DIMS):
        generator = torch.Generator().manual_seed(seed)
        self.dims = dims
        self.length = length
        block = -(-length // dims)
        signs = torch.zeros(block * dims)  # the padding past ``length`` stays 0
        # In place: the same signs as ``randint * 2.0 - 1`` without two temporaries of the model's size
        # (measured: 0.5 s instead of 1.0-1.5 s for 102M parameters, drawn twice every epoch).
        head = signs[:length]
        head.copy_(torch.randint(0, 2, (length,), generator=generator, dtype=torch.int8))
        head.mul_(2).sub_(1)
        self._signs = {torch.device("cpu"): signs}
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def __call__(self, tensors: Iterable[torch.Tensor]) -> list[float]:
        tensors = list(tensors)
        total = sum(t.numel() for t in tensors)
        if total != self.length:
            raise ValueError(f"sketcher is for {self.length} values, got {total}")
        device = tensors[0].device if tensors else torch.device("cpu")
        if device not in self._signs:
            self._signs[device] = self._signs[torch.device("cpu")].to(device)
        signs = self._signs[device]
        buffer = self._buffers.setdefault(device, torch.zeros_like(signs))
        offset = 0
        for t in tensors:
            end = offset + t.numel()
            flat = t.detach().reshape(-1).to(device=device, dtype=torch.float32)
            torch.mul(flat, signs[offset:end], out=buffer[offset:end])
            offset = end
        return buffer.view(self.dims, -1).sum(dim=1).double().tolist()
