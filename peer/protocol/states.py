"""The states that both sides name on the wire: a run's life cycle, an audit's and a report's pay.

The coordinator decides the transitions (:mod:`coordinator.runs`, :mod:`coordinator.verification`); a peer
reads the state in a :class:`peer.protocol.run_schemas.RunView` and acts on which group it falls in (a trainer
reports only while the run is in ``REPORTING``, stops once it leaves ``BIDDING``).
"""

from __future__ import annotations

from typing import Literal

RunState = Literal[
    "pending", "recruiting", "running", "paused", "settling", "finished", "cancelled", "failed"
]
ENDED: tuple[RunState, ...] = ("finished", "cancelled", "failed")
# States in which the run still wants peers from the market (a paused run wants replacements).
BIDDING: tuple[RunState, ...] = ("recruiting", "running", "paused")
# States that the coordinator may still move on its own (its sweep re-evaluates these).
LIVE: tuple[RunState, ...] = ("recruiting", "running", "paused", "settling")
# States in which peers may report work: the work was done before the state changed to paused/settling.
REPORTING: tuple[RunState, ...] = ("running", "paused", "settling")

AuditState = Literal["pending", "passed", "failed", "expired"]
PayState = Literal["paid", "held", "voided"]
