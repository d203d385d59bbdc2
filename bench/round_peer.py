"""One peer of an averaging-round measurement: ``python bench/round_peer.py --size-mb 10 --peers 4 ...``.

It starts a DHT (the first peer alone, writing its addresses to ``--addrs``; the others bootstrap from
that file), builds hivemarket's :class:`peer.averaging.RunAverager` over ``--size-mb`` MB of fp32 values,
and, once every peer is ready, runs ``--rounds`` all-reduce rounds with the others, one epoch key per
round. Each round's
result goes to stdout as a JSON line: wall-clock start and end, the group size, and whether every peer
got the same average (each peer's values are its index, so the exact mean is known).

``bench/reliability.py`` starts one per host of a network lab (``bench/netlab.py``) and reads the lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from peer.averaging import RunAverager
from peer.deadlines import RoundDeadlines
from peer.node import start_dht, stop_dht
from peer.settings import load_settings


def barrier(folder: Path, name: str, index: int, peers: int, timeout: float = 120) -> None:
    """Wait until every peer reached this point (each leaves a file), or ``timeout`` passed."""
    (folder / f"{name}-{index}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"{name}-*"))) < peers and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compression", default="none", choices=["none", "fp16", "8bit"])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--addrs", type=Path, required=True, help="in a folder of its own")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--matchmaking", type=float, default=5.0)
    args = parser.parse_args()
    settings = load_settings()
    initial = []
    if args.index:
        deadline = time.monotonic() + 60
        while not args.addrs.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        initial = json.loads(args.addrs.read_text())
    dht, _ = start_dht(settings, initial_peers=initial, listen=[args.listen])
    if not args.index:
        tmp = args.addrs.with_suffix(".tmp")
        tmp.write_text(json.dumps([str(m) for m in dht.get_visible_maddrs()]))
        tmp.rename(args.addrs)
    n = int(args.size_mb * 1e6 / 4)
    values = [torch.zeros(n)]
    averager = RunAverager(
        [torch.zeros(n)],
        dht,
        prefix="bench_round",
        share_state=lambda: None,  # type: ignore[arg-type, return-value]
        max_peers=args.peers,
        matchmaking_seconds=args.matchmaking,
        deadlines=RoundDeadlines(ceiling=args.timeout, floor=settings.chunk_deadline_floor),
        compression_name=args.compression,
    )
    try:
        averager.set_target_group_size(args.peers, 30)
        barrier(args.addrs.parent, "ready", args.index, args.peers)  # a late peer would stay behind
        for r in range(args.rounds):
            values[0].fill_(float(args.index))
            start = time.time()
            result = averager.average(values, epoch=r, weight=1.0, gather=args.index, timeout=args.timeout)
            end = time.time()
            expected = (args.peers - 1) / 2
            error = float((values[0] - expected).abs().max())
            print(
                json.dumps(
                    {
                        "index": args.index,
                        "round": r,
                        "start": start,
                        "end": end,
                        "outcome": result.outcome,
                        "group": len(result.gathered),
                        "max_error": error,
                    }
                ),
                flush=True,
            )
        # A reducer that is done may still be sending its part of the average to the others.
        barrier(args.addrs.parent, "done", args.index, args.peers)
    finally:
        averager.shutdown()
        stop_dht(dht, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
