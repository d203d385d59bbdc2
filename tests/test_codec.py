"""The 8-bit codec of averaging rounds: hivemind's wire format, decodable by hivemind's registry."""

from __future__ import annotations

import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

import peer.averaging  # noqa: F401 - installs the codec
from peer.codec import Uniform8Bit


def test_values_round_trip_within_a_bucket_at_a_quarter_of_the_bytes() -> None:
    torch.manual_seed(0)
    x = torch.randn(100_000) * 3 + 1
    wire = serialize_torch_tensor(x, runtime_pb2.UNIFORM_8BIT)
    assert len(wire.buffer) == 8 + 256 * 4 + x.numel()
    y = deserialize_torch_tensor(wire)
    assert y.shape == x.shape and y.dtype == x.dtype
    bucket = 6 * float(x.std()) / 256
    inside = (x - x.mean()).abs() < 2.5 * x.std()  # the end buckets also hold everything beyond 3 sigma
    assert float((y - x)[inside].abs().max()) <= bucket
    assert float((y - x).norm() / x.norm()) < 0.02


def test_constant_and_shaped_tensors_decode_exactly() -> None:
    x = torch.full((3, 4), 2.5)
    assert torch.equal(deserialize_torch_tensor(serialize_torch_tensor(x, runtime_pb2.UNIFORM_8BIT)), x)


def test_the_layout_is_hivemind_s_count_codebook_indices() -> None:
    x = torch.tensor([0.0, 1.0, -1.0, 0.5])
    wire = Uniform8Bit().compress(x, None)  # type: ignore[arg-type]
    size = int(np.frombuffer(wire.buffer, count=1, dtype=np.int64)[0])
    codebook = np.frombuffer(wire.buffer, offset=8, count=size, dtype=np.float32)
    indices = np.frombuffer(wire.buffer, offset=8 + codebook.nbytes, dtype=np.uint8)
    assert size == 256 and indices.size == 4
    assert np.allclose(codebook[indices], x.numpy())
