"""Averaging deadlines follow the measured rounds, within the floor and the spec's ceiling."""

from __future__ import annotations

import pytest

from peer.deadlines import RoundDeadlines


def test_before_any_round_the_deadlines_are_the_widest() -> None:
    d = RoundDeadlines(ceiling=15.0, floor=2.0)
    assert (d.chunk(), d.round(), d.step(1.0)) == (5.0, 15.0, 15.0)


def test_fast_rounds_shorten_the_deadlines_down_to_the_floor() -> None:
    d = RoundDeadlines(ceiling=15.0, floor=2.0)
    for _ in range(5):
        d.observe(0.05)
    assert d.chunk() == 2.0  # 2 x 0.05 s would take a busy CPU's pause for a dead peer
    assert d.round() == 6.0
    assert d.step(1.0) == 8.0  # two matchmaking times and a round: a missed group is given up early


def test_slow_rounds_lengthen_them_up_to_the_ceiling() -> None:
    d = RoundDeadlines(ceiling=60.0, floor=2.0)
    d.observe(4.0)
    assert (d.chunk(), d.round()) == (8.0, 24.0)
    d.observe(30.0)
    assert (d.chunk(), d.round(), d.step(3.0)) == (20.0, 60.0, 60.0)


def test_only_the_recent_rounds_count() -> None:
    d = RoundDeadlines(ceiling=60.0, floor=1.0, window=3)
    d.observe(9.0)
    for _ in range(3):
        d.observe(1.0)
    assert d.chunk() == pytest.approx(2.0)


def test_a_straggler_is_allowed_the_slowest_recent_round() -> None:
    d = RoundDeadlines(ceiling=15.0, floor=2.0)
    assert d.straggle() == 2.0  # nothing measured (it just joined): the floor
    d.observe(0.3)
    assert d.straggle() == 1.0  # half the floor: a round of 0.3 s on a busy CPU may take a second
    d.observe(1.8)
    assert d.straggle() == 1.8
    d.observe(9.0)
    assert d.straggle() == 5.0  # never beyond the chunk wait


def test_an_overlapped_round_waits_up_to_an_epoch_and_a_half_beyond_the_step_deadline() -> None:
    """A member of an overlapped round can be a whole epoch ahead of the slowest (measured: 4,096-sample
    epochs of 15-30 s on shared cores failed every round at the step deadline alone)."""
    d = RoundDeadlines(ceiling=30.0, floor=2.0)
    for _ in range(5):
        d.observe(0.1)
    assert d.step(1.0) == 8.0
    assert d.overlapped(1.0, epoch_seconds=20.0) == 38.0  # past the ceiling: the wait runs beside compute
    assert d.overlapped(1.0, epoch_seconds=0.05) == pytest.approx(8.075)  # tiny epochs: the step deadline


def test_a_reveal_waits_a_round_for_each_other_member() -> None:
    d = RoundDeadlines(ceiling=30.0, floor=0.5)
    for _ in range(5):
        d.observe(0.2)
    assert d.reveal(4) == pytest.approx(3 * d.round()) and d.reveal(1) == d.round()
