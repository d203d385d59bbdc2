"""Signed block-sum sketches of gradients and parameters: reproducible from the seed, linear, and close
exactly when the vectors are close; gradient seeds are per account and epoch, parameter seeds the same
for every peer."""

from __future__ import annotations

import hashlib
import inspect

import pytest
import torch

from peer.protocol.sketch import SKETCH_DIMS, grad_seed, params_seed, relative_distance, seed_of
from peer.sketch import Sketcher

LENGTH = 10_000
RUN = "run-0123456789ab"


def vector(seed: int, length: int = LENGTH) -> torch.Tensor:
    return torch.randn(length, generator=torch.Generator().manual_seed(seed))


def shaped(flat: torch.Tensor) -> list[torch.Tensor]:
    """The vector as a model's parameters would be passed: several tensors of different shapes."""
    return [flat[:6400].reshape(100, 64), flat[6400:6500], flat[6500:].reshape(35, 100)]


def test_a_sketch_has_dims_numbers() -> None:
    sketch = Sketcher(LENGTH, 1)(shaped(vector(0)))
    assert len(sketch) == SKETCH_DIMS and all(isinstance(v, float) for v in sketch)
    assert len(Sketcher(LENGTH, 1, dims=8)([vector(0)])) == 8


def test_the_same_seed_gives_the_same_sketch() -> None:
    v = vector(0)
    assert Sketcher(LENGTH, 42)(shaped(v)) == Sketcher(LENGTH, 42)(shaped(v))
    # however the vector is cut, to float32 rounding (a block cut in two is two partial sums)
    assert relative_distance(Sketcher(LENGTH, 42)(shaped(v)), Sketcher(LENGTH, 42)([v])) < 1e-6


def test_a_sketch_is_the_documented_signed_block_sum() -> None:
    """The recipe of peer.protocol.sketch, written out in float64 coordinate by coordinate: what a
    validator written elsewhere computes."""
    length, dims, seed = 1_003, 8, 5  # a last block shorter than the others
    v = vector(9, length)
    b = -(-length // dims)
    r = torch.randint(0, 2, (b,), generator=torch.Generator().manual_seed(seed), dtype=torch.int8) * 2 - 1
    expected = [0.0] * dims
    for i, x in enumerate(v.double().tolist()):
        expected[i // b] += int(r[i % b]) * x
    got = Sketcher(length, seed, dims=dims)(shaped_as(v, [(10, 50), (3,), (0,), (2, 250)]))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def shaped_as(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, at = [], 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        out.append(flat[at : at + n].reshape(shape))
        at += n
    return out


def test_different_seeds_give_different_sketches() -> None:
    v = vector(0)
    a, b = Sketcher(LENGTH, 42)([v]), Sketcher(LENGTH, 43)([v])
    assert relative_distance(a, b) > 0.5


def test_sketches_are_linear() -> None:
    sketcher = Sketcher(LENGTH, 7)
    a, b = vector(1), vector(2)
    together, apart = sketcher([a + b]), [x + y for x, y in zip(sketcher([a]), sketcher([b]), strict=True)]
    assert together == pytest.approx(apart, rel=1e-5, abs=1e-4)
    assert sketcher([2 * a]) == [2 * x for x in sketcher([a])]  # scaling by 2 is exact in floating point
    assert sketcher([torch.zeros(LENGTH)]) == [0.0] * SKETCH_DIMS


def test_sketches_keep_the_norm_roughly() -> None:
    """A signed block sum preserves the norm in expectation; it is not all zeros or blown up."""
    v = vector(3)
    norm = torch.tensor(Sketcher(LENGTH, 9)([v]), dtype=torch.float64).norm()
    assert 0.5 * float(v.norm()) < float(norm) < 1.5 * float(v.norm())


def test_relative_distance() -> None:
    sketcher = Sketcher(LENGTH, 11)
    v = vector(4)
    base = sketcher([v])
    assert relative_distance(base, list(base)) == 0.0
    nudged = v + 1e-7 * float(v.norm()) / LENGTH**0.5 * vector(5)  # a relative change of about 1e-7
    assert float((nudged - v).norm() / v.norm()) == pytest.approx(1e-7, rel=0.2)
    assert relative_distance(base, sketcher([nudged])) < 1e-5
    assert relative_distance(base, sketcher([vector(6)])) > 0.5  # unrelated
    assert relative_distance(base, sketcher([v * 1.01])) == pytest.approx(0.01 / 1.01, rel=1e-3)
    assert relative_distance(base, sketcher([-v])) == pytest.approx(2.0)
    assert relative_distance([0.0] * SKETCH_DIMS, [0.0] * SKETCH_DIMS) == 0.0  # no division by zero


def test_a_vector_of_another_length_is_refused() -> None:
    sketcher = Sketcher(LENGTH, 1)
    for wrong in ([vector(0, LENGTH - 1)], [vector(0), torch.zeros(1)]):
        with pytest.raises(ValueError, match=f"sketcher is for {LENGTH} values"):
            sketcher(wrong)


def test_gradient_seeds_differ_by_epoch_and_run_and_not_by_account() -> None:
    """A fast-path round's commitments are checked against every member's report, so every member of
    an epoch sketches with the same signs (peer.protocol.commitment)."""
    assert list(inspect.signature(grad_seed).parameters) == ["run_id", "epoch"]
    seeds = {
        grad_seed(RUN, 0),
        grad_seed(RUN, 1),
        grad_seed("run-other", 0),
        params_seed(RUN, 0),  # the two kinds of sketch never share signs
    }
    assert len(seeds) == 4
    assert grad_seed(RUN, 3) == grad_seed(RUN, 3)
    assert all(0 <= s < 1 << 63 for s in seeds)  # torch.Generator takes it


def test_parameter_seeds_are_the_same_for_every_peer() -> None:
    """Two peers compare parameter sketches, so the seed cannot depend on who computes it."""
    assert list(inspect.signature(params_seed).parameters) == ["run_id", "epoch"]
    assert params_seed(RUN, 5) == seed_of("hivemarket-params", RUN, 5)
    assert params_seed(RUN, 5) != params_seed(RUN, 6)
    params = shaped(vector(8))
    alice = Sketcher(LENGTH, params_seed(RUN, 5))([p.clone() for p in params])
    bob = Sketcher(LENGTH, params_seed(RUN, 5))([p.clone() for p in params])
    assert alice == bob
    assert relative_distance(alice, Sketcher(LENGTH, params_seed(RUN, 6))(params)) > 0.5


def test_seed_of_is_blake2b_as_documented() -> None:
    """A validator in another language reproduces seeds from the module docstring's recipe."""
    digest = hashlib.blake2b(f"hivemarket-grad\n{RUN}\n3".encode(), digest_size=16).digest()
    expected = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    assert grad_seed(RUN, 3) == expected
