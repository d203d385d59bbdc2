"""Sketches of large vectors (gradients, parameters): what contribution reports commit to, audits compare.

A sketch is a signed block sum: the flattened vector is cut into ``dims`` contiguous blocks, every
coordinate of a block is multiplied by a random sign, and each block is summed. The signs are one random
vector of a block's length, the same for every block, so a sketch is a matrix-vector product that reads
the vector once (signs drawn for every coordinate made it a multiply into a buffer and a sum: 4x the
time, and a buffer and signs the size of the model). It is a random projection, so sketches
are linear (the sketch of a sum is the sum of the sketches) and two vectors that are close have close
sketches, at O(n) cost and no ``dims x n`` matrix. Every block needs every coordinate in it, so the
sketch of a gradient cannot be had without the whole backward pass. (A CountSketch, which scatters
coordinates into random buckets, does the same job slower on a CPU: scattered adds against one sequential
read; peers sketch every micro-batch, so this is on the training path.) The signs come
from a seed that everyone derives the same way:

    gradient sketches:  seed("hivemarket-grad",   run_id, epoch)  (every member's alike: see below)
    parameter sketches: seed("hivemarket-params", run_id, epoch)  (comparable across peers)

Every member of an epoch sketches its gradients with the same signs, so that a fast-path round's
commitments (the sketch of the update a member sends, the weighted mean of its micro-batches' gradients)
can be checked both against the round's result and against the member's report
(:mod:`peer.protocol.commitment`). A peer gains nothing by copying another's sketches: audits recompute
the samples its own report names, which no other peer was assigned.

seed(...) = the first 8 bytes (little-endian) of BLAKE2b-128 over the parts joined by "\\n", masked to 63
bits for torch.Generator.

Everyone must compute the same numbers: a peer sketches with :class:`peer.sketch.Sketcher` (torch), the
coordinator compares sketches with :func:`relative_distance` (plain Python, so the service never imports
torch). With ``b = ceil(n / dims)``, block ``j`` holds coordinates ``[j * b, (j + 1) * b)``, and the sign
of coordinate ``i`` is ``r[i mod b]``, where ``r`` is ``b`` draws of ``2 * randint(0, 2) - 1`` in order
from a ``torch.Generator`` seeded as above.
"""

from __future__ import annotations

import hashlib
import math

#: Numbers in every sketch (peer.sketch): part of the protocol, so that a report's sketches and a validator's
#: recomputation can always be compared, and a sketch of another length is refused when it is sent.
SKETCH_DIMS = 32


def seed_of(*parts: object) -> int:
    digest = hashlib.blake2b("\n".join(str(p) for p in parts).encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def grad_seed(run_id: str, epoch: int) -> int:
    return seed_of("hivemarket-grad", run_id, epoch)


def params_seed(run_id: str, epoch: int) -> int:
    return seed_of("hivemarket-params", run_id, epoch)


def relative_distance(a: list[float], b: list[float]) -> float:
    """``|a - b| / max(|a|, |b|)``: 0 for equal sketches, 1 against a zero sketch, about 1.4 for unrelated
    ones. Plain Python (no torch in the coordinator): sketches are at most 64 numbers."""
    if len(a) != len(b):
        return math.inf
    scale = max(math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b)), 1e-30)
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True))) / scale
