"""Audits of contribution reports: which micro-batches to recompute, verdicts, bans and reputation.

Pure functions of their arguments (no clock, no I/O); :mod:`coordinator.audit_store` gathers what they
need and writes what they return, with the reason.

How a contribution is verified:

1. A report lists its micro-batches, each with its sample ids, its loss and a sketch of its gradient
   (:mod:`peer.protocol.sketch`, seeded by run, epoch and peer). The report is signed, so the sketches are a
   commitment: what is audited later is what the peer claimed before it knew what would be audited.
2. When the report arrives, :func:`choose_audits` draws the micro-batches to recompute from a secret key
   the coordinator keeps per run; the peer cannot predict the draw, a retried report gets the same one.
3. A validator (another peer of the run, holding the same epoch-start parameters) recomputes each audited
   micro-batch's gradient and loss and sends them back; :func:`verdict` compares them with the claim.
4. A report with every audit passed is paid; one failed audit voids the report's pay and its samples no
   longer count toward the run's target; :func:`banned` bans a peer from the run after ``ban_after``
   failed epochs. Audits nobody recomputed in time expire, and an expired audit leaves the report unpaid:
   nothing is paid without a verified contribution.

Why at least ``min_audits`` (2) micro-batches of every report: a cheat that fabricates a fraction ``f`` of
a report's micro-batches survives ``n`` audits with probability about ``(1 - f) ** n``; with two audits a
report that doubles its samples (``f = 1/2``) is caught with probability 3/4 per epoch, > 99.9% within five
epochs, and one that fabricates everything is caught every epoch. Above the minimum, ``rate`` sets the
expected share of micro-batches recomputed, which is what verification costs the swarm.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from peer.protocol.sketch import relative_distance
from peer.protocol.spec import VerificationSpec
from peer.protocol.states import AuditState, PayState

# A new peer starts as if it had passed this many audits, so that one failure (or a first honest audit)
# does not swing its reputation to either end; each failed audit weighs as much as this many passes.
REPUTATION_PRIOR_PASSES = 10
FAILURE_WEIGHT = 10


@dataclass(frozen=True)
class AuditPolicy:
    """A run's ``spec.verification`` section (:class:`peer.protocol.spec.VerificationSpec`), stored with
    the run."""

    rate: float
    min_audits: int
    tolerance: float
    loss_tolerance: float
    ban_after: int
    canary_rate: float = 0.0  # runs stored before canaries: none
    canary_window: int = 4

    @classmethod
    def default(cls) -> AuditPolicy:
        """The policy of a spec that does not set ``[verification]``."""
        return cls(**VerificationSpec().model_dump())


@dataclass(frozen=True)
class Verdict:
    passed: bool
    distance: float
    reason: str


def choose_audits(key: bytes, epoch: int, account: str, micro_batches: int, policy: AuditPolicy) -> list[int]:
    """The indices of the micro-batches of ``account``'s report of ``epoch`` to recompute, in order.

    ``max(min_audits, k)`` distinct indices (all of them when the report has fewer), where ``k`` is
    ``rate * micro_batches`` rounded up or down at random so that its mean is exact. The randomness is
    HMAC-SHA256 of (epoch, account) under the run's secret ``key``: unpredictable to peers, and the same
    for the same report. ``rate = 0`` audits nothing.
    """
    if policy.rate <= 0 or micro_batches <= 0:
        return []
    digest = hmac.new(key, f"{epoch}\n{account}".encode(), hashlib.sha256).digest()
    draw = random.Random(int.from_bytes(digest, "big"))
    expected = policy.rate * micro_batches
    count = math.floor(expected) + (draw.random() < expected - math.floor(expected))
    count = min(micro_batches, max(policy.min_audits, count))
    return sorted(draw.sample(range(micro_batches), count))


def verdict(
    claimed_sketch: list[float],
    claimed_loss: float,
    recomputed_sketch: list[float],
    recomputed_loss: float,
    policy: AuditPolicy,
) -> Verdict:
    """Whether a validator's recomputation confirms the claim: the gradient sketches within ``tolerance``
    (relative distance) and the losses within ``loss_tolerance`` (relative to the larger, at least 1)."""
    distance = relative_distance(claimed_sketch, recomputed_sketch)
    if not distance <= policy.tolerance:
        return Verdict(
            False,
            distance,
            f"gradient sketch is {distance:.3g} from the recomputed one (tolerance {policy.tolerance:g})",
        )
    loss_gap = abs(claimed_loss - recomputed_loss) / max(1.0, abs(claimed_loss), abs(recomputed_loss))
    if not loss_gap <= policy.loss_tolerance:
        return Verdict(
            False,
            distance,
            f"loss {claimed_loss:.6g} differs from the recomputed {recomputed_loss:.6g} by {loss_gap:.3g} "
            f"(tolerance {policy.loss_tolerance:g})",
        )
    return Verdict(True, distance, f"recomputed within {distance:.3g} (tolerance {policy.tolerance:g})")


def report_outcome(states: list[AuditState]) -> tuple[PayState, str]:
    """What happens to a report's pay given its audits' states: ``held`` while any is pending."""
    if "failed" in states:
        return "voided", "an audit failed"
    if "pending" in states:
        return "held", f"{states.count('pending')} of {len(states)} audits pending"
    if "expired" in states:
        return "voided", "an audit expired before a validator recomputed it"
    return "paid", f"{len(states)} audits passed" if states else "not audited"


#: The fewest members whose blame fails another: a blame is a member's word, not a proof the coordinator
#: can check, so one member alone (in a round of two) can never have its partner failed and banned.
MIN_ACCUSERS = 2


def blame_verdict(accusers: set[str], accused: str, members: Sequence[str]) -> tuple[bool, str]:
    """Whether a fast-path round's ``accused`` member is failed, given who of the round's ``members``
    blamed it: when more than half of the others did, and at least :data:`MIN_ACCUSERS`. Honest members
    that received the same revealed bytes blame alike, so an honest majority fails a liar and a lying
    minority cannot frame anyone. In a round of two nobody is failed this way: the round stays refused
    (the run stalls at that epoch while the liar is in it) rather than an honest peer being banned on
    its partner's word. Pure."""
    others = [m for m in members if m != accused]
    votes = len(accusers & set(others))
    if votes >= MIN_ACCUSERS and votes * 2 > len(others):
        return True, f"blamed by {votes} of the round's {len(others)} other members"
    return False, (
        f"blamed by {votes} of {len(others)} other members; more than half, and {MIN_ACCUSERS} at least, must"
    )


def banned(failed_epochs: int, policy: AuditPolicy) -> str | None:
    """Why a peer with ``failed_epochs`` voided reports in a run is banned from it, or None."""
    if failed_epochs >= policy.ban_after:
        return f"{failed_epochs} epochs failed their audits (ban after {policy.ban_after})"
    return None


def reputation(passed: int, failed: int) -> float:
    """A peer's standing from its audits, in (0, 1]: 1 with no failure, lower with each failed audit of
    its work (and each of its own verdicts another validator overturned)."""
    good = passed + REPUTATION_PRIOR_PASSES
    return good / (good + FAILURE_WEIGHT * failed)


def audit_fee(report_units: int, audited_samples: int, report_samples: int) -> int:
    """A validator's fee for one audit: what the audited peer is paid for the samples recomputed (the same
    work at the same price), rounded down; paid from the run's escrow whatever the verdict."""
    if report_samples <= 0:
        return 0
    return math.floor(Fraction(report_units) * audited_samples / report_samples)


# ------------------------------------------------------------------------------- checking the checkers
#
# A validator does not vote: it sends back the sketch and loss it recomputed. One that never recomputes can
# only send a claim it learnt (from a colluding reporter, or the API once a report is decided) or a made-up
# answer. A canary is an audit of a micro-batch whose right answer the coordinator already holds; the
# validator cannot tell it from a real audit (same task, an epoch it holds, a source report whose claims
# the API hides while it can serve as one), so a made-up answer fails it. See docs/verification.md.


def claim_rank(key: bytes, validator: str, audit_id: str) -> bytes:
    """Where a pending audit stands in ``validator``'s claims (lowest first, within an epoch): HMAC-SHA256
    of (validator, audit) under the run's secret key. First-come oldest-first handed every validator the
    same order, so a validator racing to claim knew which audits it would get; under the key nobody can
    compute the order, and two validators claiming at once take different audits."""
    return hmac.new(key, f"claim\n{validator}\n{audit_id}".encode(), hashlib.sha256).digest()


def canary_block(rate: float) -> int:
    """Epochs per canary at ``rate``: a validator gets one canary in each block of this many epochs."""
    return max(1, round(1 / rate))


def canary_due(key: bytes, validator: str, epoch: int, rate: float, last_block: int | None) -> bool:
    """Whether a claim that hands ``validator`` audits of ``epoch`` should carry a canary.

    Stratified, not a coin per audit: the epochs are cut into blocks of :func:`canary_block` epochs, and in
    each block the canary is due from one epoch drawn with HMAC-SHA256 of (validator, block) under the run's
    key, until a claim carries it (``last_block``: the block of the validator's last canary). So a
    validator that fakes any epoch risks a canary, and one that fakes all of them meets one within a block
    (where the run has a source for it): a coin per audit at the same cost needs about 4.6 expected
    canaries for a 99% catch, four times as many."""
    if rate <= 0:
        return False
    block = canary_block(rate)
    number = epoch // block
    if last_block is not None and number <= last_block:
        return False
    digest = hmac.new(key, f"canary\n{validator}\n{number}".encode(), hashlib.sha256).digest()
    return epoch % block >= int.from_bytes(digest[:8], "big") % block


def canary_verdict(
    expected_sketch: list[float],
    expected_loss: float,
    answer_sketch: list[float],
    answer_loss: float,
    policy: AuditPolicy,
) -> Verdict:
    """Whether a validator answered a canary right: its sketch and loss within the audit tolerances of the
    answer the coordinator holds (the claim of a passed audit, or the recomputation that confirmed a failed
    one). The same comparison as :func:`verdict`, so an honest validator fails a canary only where it
    would fail an honest audit (0 of 1,000 in bench/verification.py)."""
    result = verdict(expected_sketch, expected_loss, answer_sketch, answer_loss, policy)
    return Verdict(result.passed, result.distance, f"canary: {result.reason}")


def validator_banned(canaries_failed: int, policy: AuditPolicy) -> str | None:
    """Why a validator that answered ``canaries_failed`` canaries of a run wrongly may no longer validate
    it, or None: after ``ban_after``, as a peer whose reports fail."""
    if canaries_failed >= policy.ban_after:
        return f"{canaries_failed} canary audits answered wrongly (ban after {policy.ban_after})"
    return None
