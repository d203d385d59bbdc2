"""The whole product on this machine, for the benches that measure training: a coordinator serving an
example dataset, renting peers (``hivemarket rent``), and one run launched on them
(:class:`peer.demo.Demo`), plus the figures every such bench reads off the peers' event logs.

Figures come from the event logs (``peer/events.py``), not from the coordinator: they are what the
peers did, timed by the peers, whatever the coordinator was told.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from peer.demo import BID_OVER_ASKS, Demo


def market(
    folder: Path,
    peers: int,
    *,
    changes: dict[str, Any],
    timeout: float,
    spec: str = "digits.toml",
    dataset: str = "digits",
    peers_min: int | None = None,
) -> AbstractContextManager[Demo]:
    """A coordinator and ``peers`` renting peers, with a run of examples/``spec`` (changed by ``changes``)
    launched on them; every process is stopped on the way out. ``demo.run_id`` names the run."""
    demo = Demo(peers, False, lambda line: print(line, file=sys.stderr), timeout, folder,
                spec=spec, dataset=dataset)  # fmt: skip
    return launched(demo, peers, peers_min=peers_min or peers, peers_max=peers, changes=changes)


def epochs(demo: Demo) -> list[dict[str, Any]]:
    """Every peer's ``epoch`` events so far, each with the peer's process name as ``peer``."""
    return [
        {**e, "peer": name}
        for name in demo.names().values()
        for e in demo.events(name)
        if e["event"] == "epoch"
    ]


def steady_rate(events: list[dict[str, Any]], window: float) -> float:
    """Samples a second of the steps the peers averaged: those of every step after the first to end, over
    the time from the first's end to the last's (a step ends when its last peer's round does). Steps of
    large models take many seconds, so counting the whole steps in a window alone would be off by up to
    a step; with fewer than two steps, that count over ``window`` is what there is."""
    ends: dict[int, float] = {}
    samples: dict[int, int] = {}
    for e in events:
        if e["outcome"] == "averaged":
            ends[e["epoch"]] = max(ends.get(e["epoch"], 0.0), e["time"])
            samples[e["epoch"]] = samples.get(e["epoch"], 0) + e["samples"]
    order = sorted(ends, key=ends.__getitem__)
    if len(order) < 2:
        return sum(samples.values()) / window
    return sum(samples[epoch] for epoch in order[1:]) / (ends[order[-1]] - ends[order[0]])


#: Epoch outcomes of work trained and then discarded (``peer/events.py``): a failed round trained again,
#: a state loaded from peers further on instead, an update that was not finite.
LOST = ("redo", "caught_up", "skipped")


@contextmanager
def launched(
    demo: Demo,
    peers: int,
    *,
    peers_min: int,
    peers_max: int,
    changes: dict[str, Any],
    bid_over_asks: Decimal = BID_OVER_ASKS,
) -> Iterator[Demo]:
    """What :func:`market` does, for a ``demo`` the caller made (a subclass with other settings, say) and a
    run that peers arriving later are matched into: ``peers_max`` may exceed the ``peers`` started here,
    and the run may bid more over the first asks than the demo does (``Demo.add_peer`` prices each new
    peer 0.1 above the last, and a peer probing this machine's speed while others train on it measures
    less, so a later peer's ask per TFLOP-hour is higher than any first one's)."""
    try:
        demo.start_coordinator()
        demo.fund_launcher()
        for _ in range(peers):
            demo.add_peer()
        demo.wait_offers(peers)
        demo.launch(peers_min, peers_max, bid_over_asks=bid_over_asks, changes=changes)
        yield demo
    finally:
        survivors = demo.close()
        if survivors:
            print(f"processes survived the bench: {survivors}", file=sys.stderr)


@contextmanager
def workspace(name: str, keep: bool) -> Iterator[Path]:
    """A temporary folder for a bench's databases and logs, removed afterwards unless ``keep``, or unless
    the bench failed: then the logs are what explains it, and the folder is named on stderr."""
    folder = Path(tempfile.mkdtemp(prefix=f"hivemarket-{name}-"))
    failed = True
    try:
        yield folder
        failed = False
    finally:
        if keep or failed:
            print(f"logs kept in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
