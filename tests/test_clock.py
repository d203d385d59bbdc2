"""Peers share the coordinator's clock for hivemind's matchmaking: the estimate and its use."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peer.protocol.client import ClockEstimate


def test_the_answer_with_the_shortest_round_trip_sets_the_offset() -> None:
    clock = ClockEstimate()
    assert clock.offset is None
    clock.observe(100.0, 100.4, "102.5")  # 0.4 s round trip: offset 2.3 +- 0.2
    assert clock.offset == pytest.approx(2.3)
    clock.observe(200.0, 200.02, "202.0")  # 0.02 s round trip: 1.99 +- 0.01
    assert clock.offset == pytest.approx(1.99)
    clock.observe(300.0, 300.3, "305.0")  # a slower answer does not replace a better one
    assert clock.offset == pytest.approx(1.99)


@pytest.mark.parametrize("stamped", [None, "soon", "nan", "inf"])
def test_answers_without_a_usable_stamp_change_nothing(stamped: str | None) -> None:
    clock = ClockEstimate()
    clock.observe(1.0, 1.1, stamped)
    assert clock.offset is None


def test_following_the_clock_moves_hivemind_s_time_in_every_module() -> None:
    script = (
        "import time, hivemind\n"
        "from hivemind.averaging import matchmaking, averager\n"
        "from hivemind.dht import node\n"
        "from peer.node import follow_clock\n"
        "follow_clock(2.0)\n"
        "for m in (matchmaking, averager, node, hivemind.utils.timed_storage):\n"
        "    assert abs(m.get_dht_time() - time.time() - 2.0) < 0.1, m\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
