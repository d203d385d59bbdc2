"""A trainer's event log: one JSON object per line in ``$HIVEMARKET_HOME/runs/RUN/events.jsonl``.

Why a file: it is what an operator reads to see how a peer's run went (each epoch's outcome, how long it
computed and how long it waited on the network), and what the chaos tests and ``bench/reliability.py``
read to check that peers agree (``params``: a hash of the parameters an epoch started from) and that
nothing the coordinator acknowledged was lost (``report_accepted``). Written from the training thread
and the coordinator link's thread, so each line is written whole under a lock.

Events (every one has ``time``, wall-clock seconds, and ``event``):

- ``epoch``: ``epoch``, ``outcome`` (``averaged``, ``alone``, ``redo``: the round failed and the epoch
  is trained again, ``caught_up``: the state of peers ahead was loaded instead, ``skipped``: the average
  was not finite), ``params``, ``group``, ``samples``, ``compute_s``, ``round_s`` (time blocked on
  the network: the all-reduce with its matchmaking, and any state download), ``allreduce_s``;
- ``averaging``: ``epoch``, ``group`` (the live peers expected): this peer starts the epoch's round;
- ``state_loaded``: ``epoch``, ``source``;
- ``report_accepted``: ``epoch``, ``samples``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def params_hash(param_sketch: Sequence[float]) -> str:
    """A short hash of a parameter sketch: equal parameters give equal sketches and so equal hashes."""
    return hashlib.sha256(struct.pack(f"<{len(param_sketch)}d", *param_sketch)).hexdigest()[:16]


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
