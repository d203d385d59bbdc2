"""A trainer's event log: one JSON object per line in ``$HIVEMARKET_HOME/runs/RUN/events.jsonl``.

Why a file: it is what an operator reads to see how a peer's run went (each epoch's outcome, how long it
computed and how long it waited on the network), and what the chaos tests and ``bench/reliability.py``
read to check that peers agree (``params``: the sketch of the parameters an epoch started from, 32
numbers; peers agree when their sketches are within ``AGREEMENT_TOLERANCE`` of each other) and that
nothing the coordinator acknowledged was lost (``report_accepted``).

Why a sketch and not a hash: the parameters of peers in step are equal only to float rounding, never
bit for bit. hivemind's all-reduce sends each member the difference between the average and *its own*
values, which it adds back (``local + (average - local)``), and that rounds differently on every
member (measured: on clean links the four peers' parameter hashes differed at every epoch, their
sketches by about 1e-7 relative). Written from the training thread
and the coordinator link's thread, so each line is written whole under a lock.

Events (every one has ``time``, wall-clock seconds, and ``event``):

- ``epoch``: ``epoch``, ``outcome`` (``averaged``, ``alone``, ``redo``: the round failed and the epoch
  is trained again, ``caught_up``: the state of peers ahead was loaded instead, ``skipped``: the average
  was not finite), ``params`` (the parameter sketch), ``group``, ``samples``, ``compute_s``,
  ``data_s`` (the part of ``compute_s`` spent waiting for batches), ``round_s`` (time blocked on the
  network: the all-reduce with its matchmaking, and any state download), ``load_s`` (the part of
  ``round_s`` spent downloading the state of peers further on), ``allreduce_s``, ``report_wait_s`` (the
  wait for the backlog of reports and audit answers before the epoch), ``audit_s`` (recomputing other
  peers' audits before the epoch), ``round_bytes`` (the
  payload this peer put into the round, 0 without one; an all-reduce moves about 2(n-1)/n of it each
  way) and ``model_bytes`` (the payload were every parameter averaged: an adapted model's adapters are
  a small share of it);
- ``averaging``: ``epoch``, ``group`` (the live peers expected): this peer starts the epoch's round;
- ``state_loaded``: ``epoch``, ``source``;
- ``report_accepted``: ``epoch``, ``samples``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peer.protocol.sketch import relative_distance

#: Relative sketch distance within which two peers' parameters agree (float rounding leaves ~1e-7;
#: 8-bit averaging leaves each reducer's own part unquantized, about 1% apart).
AGREEMENT_TOLERANCE = {"none": 1e-4, "fp16": 1e-4, "8bit": 2e-2}


def in_agreement(a: Sequence[float], b: Sequence[float], compression: str = "none") -> bool:
    """Whether two parameter sketches are of parameters in step with each other."""
    return relative_distance(a, b) <= AGREEMENT_TOLERANCE[compression]


class EventLog:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields})
        with self._lock, self.path.open("a") as out:
            out.write(line + "\n")


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events written so far (a line cut short by a crash is left out)."""
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
