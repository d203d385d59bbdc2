"""A member's signed commitment to what it puts into a fast-path round, and the check that binds it to the
member's contribution report (both sides need them: members gather and check commitments in the round,
the coordinator checks each against the member's own report).

A commitment's update sketch uses the epoch's gradient seed (:func:`peer.protocol.sketch.grad_seed`), the
one every member's micro-batch sketches use (its parameter sketch uses the parameters' seed), so that:

- in the round, the sketch of the weighted mean must equal the weighted mean of the committed update
  sketches (sketches are linear): a member that sends something other than what it committed to is seen
  by every member, and no one applies the round (:mod:`peer.collective`);
- at the coordinator, a member's committed update sketch must equal the samples-weighted mean of the
  micro-batch sketches its report commits to (its update *is* that weighted mean of the micro-batches'
  gradients): a member that computes and reports honestly, so that every audit passes, but sends another
  update into the round, and commits to it consistently, is caught by :func:`binding` and fails the
  epoch. The proof is the member's own two signatures (the commitment's and the report's), so nobody can
  be framed by the peer that forwards it.

Plain Python (struct and the identity's Ed25519), so the coordinator never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from peer.protocol.identity import Identity, IdentityError, verify_signature
from peer.protocol.sketch import SKETCH_DIMS, relative_distance

_HEADER = struct.Struct("<qqqd")  # version, epoch, rank, weight
_SKETCHES = struct.Struct(f"<{2 * SKETCH_DIMS}d")  # update sketch, parameter sketch
CLAIM_BYTES = 32  # SHA-256 of the micro-batches the member will report: claim_digest()
SIGNATURE_BYTES = 64
COMMITMENT_BYTES = _HEADER.size + _SKETCHES.size + CLAIM_BYTES + SIGNATURE_BYTES

#: How far a member's committed update sketch may be from the weighted mean of its reported micro-batch
#: sketches, relative to the larger of the two and of the micro-batches' own weighted norms (so that
#: gradients that cancel out do not inflate rounding). Honest members differ by float rounding only: the
#: update is summed in float32 and sketched once, the micro-batches are sketched one by one (measured:
#: below 2e-6 on digits and bytes-lm); an update that differs by 1% of its norm gives about 1e-2.
BINDING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Commitment:
    """What a member says it puts into a round, signed with its account's key."""

    version: int
    epoch: int
    rank: int
    weight: float
    update: tuple[float, ...]  # sketch of the update it sends (before scaling by its share)
    params: tuple[float, ...]  # sketch of its parameters at the epoch's start
    claim: bytes = b"\0" * CLAIM_BYTES  # claim_digest() of the micro-batches whose mean the update is
    signature: bytes = b""

    def message(self, run_id: str) -> bytes:
        return (
            b"hivemarket-round\0"
            + run_id.encode()
            + b"\0"
            + _HEADER.pack(self.version, self.epoch, self.rank, self.weight)
            + _SKETCHES.pack(*self.update, *self.params)
            + self.claim
        )

    def signed(self, run_id: str, identity: Identity) -> Commitment:
        return Commitment(**{**self.__dict__, "signature": identity.sign(self.message(run_id))})

    def verifies(self, run_id: str, account: str) -> bool:
        """Whether ``account`` signed this commitment (False for an account that is not a key at all: a
        member's gather names it, and what a member sends is checked before it is used)."""
        try:
            return verify_signature(account, self.signature, self.message(run_id))
        except IdentityError:
            return False

    def encode(self) -> bytes:
        header = _HEADER.pack(self.version, self.epoch, self.rank, self.weight)
        return header + _SKETCHES.pack(*self.update, *self.params) + self.claim + self.signature

    @classmethod
    def decode(cls, raw: bytes) -> Commitment:
        if len(raw) != COMMITMENT_BYTES:
            raise ValueError(f"a commitment is {COMMITMENT_BYTES} bytes, got {len(raw)}")
        version, epoch, rank, weight = _HEADER.unpack_from(raw)
        values = _SKETCHES.unpack_from(raw, _HEADER.size)
        at = _HEADER.size + _SKETCHES.size
        claim, signature = raw[at : at + CLAIM_BYTES], raw[at + CLAIM_BYTES :]
        return cls(version, epoch, rank, weight, values[:SKETCH_DIMS], values[SKETCH_DIMS:], claim, signature)


def claim_digest(micro: Sequence[tuple[Sequence[int], Sequence[float]]]) -> bytes:
    """SHA-256 of a report's micro-batches (their ids and sketches, in order, as compact JSON): what a
    round commitment names, so that the coordinator holds a commitment against a member's report only
    when it was made for that very report. A member that redid an epoch (a refused round, new samples)
    signed commitments for claims it never reported; without the digest any other member could forward
    one of those and have an honest member failed."""
    canonical = [[list(ids), list(sketch)] for ids, sketch in micro]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).digest()


def binding(update: Sequence[float], micro: Sequence[tuple[int, Sequence[float]]]) -> tuple[bool, float]:
    """Whether a committed ``update`` sketch is the samples-weighted mean of a report's micro-batch
    sketches (``micro``: (samples, sketch) per micro-batch), and the relative distance. Pure."""
    total = sum(n for n, _ in micro)
    if total <= 0 or len(update) != SKETCH_DIMS or any(len(s) != SKETCH_DIMS for _, s in micro):
        return False, math.inf
    mean = [sum(n * s[d] for n, s in micro) / total for d in range(SKETCH_DIMS)]
    parts = sum(n / total * math.sqrt(sum(x * x for x in s)) for n, s in micro)
    scale = max(math.sqrt(sum(x * x for x in update)), math.sqrt(sum(x * x for x in mean)), parts, 1e-30)
    distance = math.sqrt(sum((a - b) ** 2 for a, b in zip(update, mean, strict=True))) / scale
    if not math.isfinite(distance):
        return False, math.inf
    return distance <= BINDING_TOLERANCE, distance


#: How far the sketch of a round's result may be from the weighted mean of the committed update sketches:
#: float rounding of the sum (fp32, or hivemind's "none"), or of each member's part sent in fp16. Measured
#: on digits and random tensors: fp32 below 1e-6, fp16 below 1e-3 (3.5e-4 on heavy-tailed Student-t(2)
#: values); an added noise of 1% of the update's norm gives about 1e-2. Hivemind's 8-bit rounds are not
#: checked: their rounding alone gave 0.024-0.030 on Gaussian values and 0.73 on heavy-tailed ones.
TAMPER_TOLERANCE = {"fp32": 1e-4, "none": 1e-4, "fp16": 5e-3}


def expected_sketch(commitments: Sequence[Commitment]) -> list[float]:
    """The sketch the weighted mean of the committed updates must have (sketches are linear)."""
    total = sum(c.weight for c in commitments)
    return [sum(c.weight * c.update[d] for c in commitments) / total for d in range(SKETCH_DIMS)]


def matches(result: Sequence[float], commitments: Sequence[Commitment], precision: str) -> tuple[bool, str]:
    """Whether a round's ``result`` sketch is the weighted mean of the ``commitments`` within the
    rounding of ``precision`` (:data:`TAMPER_TOLERANCE`), and why not. Pure; every member runs it on the
    same bytes and so agrees. An honest overflow overflows the result too: a non-finite commitment
    matches only a non-finite result."""
    if not all(math.isfinite(x) for c in commitments for x in c.update):
        if all(math.isfinite(x) for x in result):
            return (
                False,
                "a member committed to a non-finite update, yet the result is finite: it sent something else",
            )
        return True, ""
    distance = relative_distance(list(result), expected_sketch(commitments))
    tolerance = TAMPER_TOLERANCE[precision]
    if distance <= tolerance:
        return True, ""
    return False, (
        f"the result is {distance:.3g} from the members' commitments (tolerance {tolerance:g}): "
        "a member sent something else"
    )


NO_CLAIM = claim_digest([])  # a member with no samples this epoch (it reports nothing)
