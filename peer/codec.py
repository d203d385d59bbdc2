"""The 8-bit codec of averaging rounds (``averaging.compression = "8bit"``).

hivemind 1.1.12's own ``Uniform8BitQuantization`` fails on the numpy this project installs: reading the
codebook size does ``int()`` of a one-element array, which numpy 2 refuses ("only 0-dimensional arrays
can be converted to Python scalars"; measured here: every 8-bit round failed). It also quantizes with
``torch.quantize_per_tensor``, which torch deprecates. :class:`Uniform8Bit` keeps hivemind's wire format
(the int64 codebook size, 256 float32 bucket means, one byte per value) and its method (buckets
``6 sigma / 256`` wide around the mean, each decoded as the mean of its values), so peers of either
codec understand each other, and :func:`install` makes it the codec hivemind uses to decode that type.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hivemind.compression import Uniform8BitQuantization, serialization
from hivemind.proto import runtime_pb2

BINS = 256
RANGE_IN_SIGMAS = 6


class Uniform8Bit(Uniform8BitQuantization):
    def quantize(self, tensor: torch.Tensor, allow_inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
        values = tensor.detach().to(torch.float32).flatten()
        centered = values - values.mean()
        std = float(centered.norm()) / math.sqrt(max(1, centered.numel() - 1))
        scale = RANGE_IN_SIGMAS * std / BINS or 1.0  # all values equal: any scale decodes them exactly
        indices = torch.clamp(torch.round(centered / scale) + BINS // 2, 0, BINS - 1).to(torch.int64)
        sums = torch.zeros(BINS).scatter_add_(0, indices, values)
        counts = torch.bincount(indices, minlength=BINS).clamp_min_(1)
        return indices.to(torch.uint8).numpy(), (sums / counts).numpy().astype(np.float32)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer = serialized_tensor.buffer
        size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=size, dtype=np.float32)
        indices = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=np.uint8)
        decoded = torch.from_numpy(codebook.copy())[torch.from_numpy(indices.astype(np.int64))]
        decoded = decoded.reshape(tuple(serialized_tensor.size)).to(getattr(torch, serialized_tensor.dtype))
        return decoded.requires_grad_(serialized_tensor.requires_grad)


def install() -> None:
    """Decode hivemind's UNIFORM_8BIT tensors with :class:`Uniform8Bit` in this process."""
    serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"] = Uniform8Bit()
