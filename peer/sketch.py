"""The torch implementation of the sketch that :mod:`peer.protocol.sketch` defines (peers sketch every
micro-batch's gradient, so this is on the training path)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from peer.protocol.sketch import SKETCH_DIMS


class Sketcher:
    """Sketches vectors of one fixed length with one seed (the signs are drawn once, on the CPU, and
    copied once to each device whose tensors it sketches, so a GPU's gradients never travel).

    Float32 throughout: ~1e-7 of relative rounding, deterministic for the same inputs on the same device.
    Not thread-safe (it reuses one buffer per device); each thread that sketches has its own.
    """

    def __init__(self, length: int, seed: int, dims: int = SKETCH_DIMS):
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
        buffer = self._buffers.get(device)
        if buffer is None:  # not setdefault: its default, a model-sized tensor, was built on every call
            buffer = self._buffers[device] = torch.zeros_like(signs)
        offset = 0
        for t in tensors:
            end = offset + t.numel()
            flat = t.detach().reshape(-1).to(device=device, dtype=torch.float32)
            torch.mul(flat, signs[offset:end], out=buffer[offset:end])
            offset = end
        return buffer.view(self.dims, -1).sum(dim=1).double().tolist()
