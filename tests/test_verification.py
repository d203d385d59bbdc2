"""Audit decisions as pure functions: which micro-batches are drawn, verdicts, pay outcomes, bans."""

from __future__ import annotations

import math
import secrets
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.verification import (
    AuditPolicy,
    audit_fee,
    banned,
    canary_block,
    canary_due,
    canary_verdict,
    choose_audits,
    claim_rank,
    report_outcome,
    reputation,
    validator_banned,
    verdict,
)
from peer.protocol.sketch import relative_distance

KEY = bytes(range(32))
POLICY = AuditPolicy.default()  # rate 0.03, at least 2 audits, tolerance 0.2


@given(micro_batches=st.integers(1, 4096), epoch=st.integers(0, 10**6))
def test_the_draw_is_distinct_sorted_in_range_and_at_least_the_minimum(
    micro_batches: int, epoch: int
) -> None:
    chosen = choose_audits(KEY, epoch, "a" * 64, micro_batches, POLICY)
    assert chosen == sorted(set(chosen)) and all(0 <= i < micro_batches for i in chosen)
    expected = POLICY.rate * micro_batches
    assert min(micro_batches, 2) <= len(chosen) <= max(2, math.ceil(expected))
    assert choose_audits(KEY, epoch, "a" * 64, micro_batches, POLICY) == chosen  # a retried report: same draw


def test_the_draw_depends_on_the_secret_key_and_covers_every_micro_batch() -> None:
    draws = [tuple(choose_audits(secrets.token_bytes(32), 3, "a" * 64, 64, POLICY)) for _ in range(400)]
    assert len(set(draws)) > 300  # unpredictable without the key
    seen = {i for draw in draws for i in draw}
    assert seen == set(range(64))  # no micro-batch is safe from audits


def test_the_mean_number_of_audits_follows_the_rate_above_the_minimum() -> None:
    policy = replace(POLICY, rate=0.1, min_audits=1)
    counts = [len(choose_audits(secrets.token_bytes(32), 0, "b" * 64, 45, policy)) for _ in range(2000)]
    assert sum(counts) / len(counts) == pytest.approx(4.5, abs=0.05)  # 4 or 5, in proportion
    assert set(counts) == {4, 5}


def test_rate_zero_audits_nothing() -> None:
    assert choose_audits(KEY, 0, "a" * 64, 100, replace(POLICY, rate=0)) == []


def test_verdicts_pass_within_tolerance_and_name_what_differs() -> None:
    claim = [1.0, -2.0, 0.5]
    passed = verdict(claim, 2.0, [1.001, -2.0, 0.5], 2.001, POLICY)
    assert passed.passed and passed.distance < 1e-3 and "tolerance 0.2" in passed.reason
    far = verdict(claim, 2.0, [-1.0, 2.0, 0.1], 2.0, POLICY)
    assert not far.passed and far.distance > 1 and far.reason.startswith("gradient sketch is ")
    zero = verdict([0.0, 0.0, 0.0], 2.0, claim, 2.0, POLICY)  # a free rider's made-up sketch
    assert not zero.passed and zero.distance == pytest.approx(1.0)
    lossy = verdict(claim, 0.5, claim, 2.0, POLICY)
    assert not lossy.passed and "loss 0.5 differs from the recomputed 2" in lossy.reason
    assert not verdict(claim, 1.0, [1.0, -2.0], 1.0, POLICY).passed  # a sketch of the wrong length


def test_relative_distance() -> None:
    assert relative_distance([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert relative_distance([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert relative_distance([3.0, 4.0], [-3.0, -4.0]) == pytest.approx(2.0)
    assert relative_distance([1.0], [1.0, 2.0]) == math.inf


@pytest.mark.parametrize(
    ("states", "outcome"),
    [
        ([], "paid"),
        (["passed", "passed"], "paid"),
        (["passed", "pending"], "held"),
        (["failed", "pending"], "voided"),  # one failure is enough: no need to wait for the rest
        (["passed", "expired"], "voided"),  # unverified is unpaid
    ],
)
def test_report_outcomes(states: list, outcome: str) -> None:
    assert report_outcome(states)[0] == outcome


def test_bans_reputation_and_fees() -> None:
    assert banned(1, POLICY) is None
    assert banned(2, POLICY) == "2 epochs failed their audits (ban after 2)"
    assert reputation(0, 0) == 1.0 and reputation(1000, 0) == 1.0
    assert reputation(0, 1) == 0.5 and reputation(90, 1) == pytest.approx(100 / 110)
    assert reputation(0, 2) < reputation(0, 1)
    assert audit_fee(1000, 32, 96) == 333 and audit_fee(0, 32, 96) == 0 and audit_fee(7, 1, 0) == 0


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.25, 0.2, 0.1])
def test_a_validator_meets_one_canary_in_each_block_at_an_epoch_under_the_key(rate: float) -> None:
    """Stratified: a validator that claims every epoch gets exactly one canary per block of epochs, at an
    epoch drawn under the run's key (different validators, different epochs)."""
    block = canary_block(rate)
    assert block == round(1 / rate)
    given_at: dict[str, list[int]] = {}
    for validator in ("a" * 64, "b" * 64, "c" * 64, "d" * 64):
        last: int | None = None
        for epoch in range(40 * block):
            if canary_due(KEY, validator, epoch, rate, last):
                given_at.setdefault(validator, []).append(epoch)
                last = epoch // block
        assert [e // block for e in given_at[validator]] == list(range(40))  # one in every block
    if block > 1:
        assert len({tuple(e % block for e in epochs) for epochs in given_at.values()}) > 1
    # a canary not taken at its epoch (no source, no claim) stays due for the rest of its block only
    due = next(e for e in range(block) if canary_due(KEY, "a" * 64, e, rate, None))
    assert all(canary_due(KEY, "a" * 64, e, rate, None) for e in range(due, block))
    assert not canary_due(KEY, "a" * 64, block - 1, rate, 0)
    assert not canary_due(KEY, "a" * 64, 3, 0.0, None)  # rate 0: no canaries


def test_claims_are_ranked_under_the_key_and_canaries_judged_like_audits() -> None:
    ids = [f"audit-{i:016x}" for i in range(50)]
    mine = sorted(ids, key=lambda i: claim_rank(KEY, "a" * 64, i))
    assert mine != ids and mine != sorted(ids, key=lambda i: claim_rank(KEY, "b" * 64, i))
    assert mine != sorted(ids, key=lambda i: claim_rank(bytes(32), "a" * 64, i))  # another run's key
    known = [0.5, -0.25] * 16
    right = canary_verdict(known, 1.0, [x * 1.01 for x in known], 1.0, POLICY)
    wrong = canary_verdict(known, 1.0, [-x for x in known], 1.0, POLICY)
    assert right.passed and not wrong.passed and wrong.reason.startswith("canary: gradient sketch is 2")
    assert validator_banned(1, POLICY) is None
    assert validator_banned(2, POLICY) == "2 canary audits answered wrongly (ban after 2)"
