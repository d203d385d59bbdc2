"""One peer of an averaging-round measurement: ``python bench/round_peer.py --size-mb 10 --peers 4 ...``.

Once every peer is ready, it runs ``--rounds`` all-reduce rounds of ``--size-mb`` MB of fp32 values with
the others, by ``--method``:

- ``hivemarket`` (the default): hivemarket's :class:`peer.averaging.RunAverager`, one epoch key per round;
- ``hivemind``: hivemind's own ``DecentralizedAverager`` as it comes (only the prefix and the target group
  size set) with hivemind's own codecs, hivemarket's 8-bit codec (``peer.codec``) not installed;
- ``gloo``: ``torch.distributed``'s gloo ``all_reduce`` (the sum, divided by the number of peers);
- ``fast``: hivemarket's fast path (:class:`peer.collective.FastPath`) as a trainer drives it, through a
  real coordinator: with ``--identity`` (a peer matched to ``--run`` on ``--coordinator``), it joins the
  run, checks in with its reach address until the group's version holds all ``--peers``, makes that
  version's process group (``FastPath.ready``) and runs each round with ``FastPath.average`` (weight 1,
  epoch = the round's index on every peer; ``--compression fp16`` sends fp16);
- ``fast-rebuild``: the same, but each round first rebuilds the group for a new version, the way the
  trainer's survivors do after a round that broke (``FastPath.regroup``): every peer checks in with the
  current version as failed, waits for the next version, which holds the same peers, and makes its
  process group (reach checks, the coordinator's rendezvous, gloo's connections); the round's time is
  that rebuild and the round. Before each round the peers wait for each other (outside the timed part),
  so that no peer drops the old version's group while another still finishes a round on it.

The averagers run over a DHT per peer: the first peer starts alone and writes its addresses to
``--addrs``; the others bootstrap from that file. For gloo the first peer writes the address and
port of its rendezvous store there instead. Each round's result goes to stdout as a JSON line:
wall-clock start and end, the outcome and why it failed, the group size (and on the fast path its
version), and how far this peer's result is from the exact mean (each peer's values are its index, so
the mean is known).

``bench/reliability.py`` starts one per host of a network lab (``bench/netlab.py``) and reads the lines;
``bench/averaging.py`` starts them on this machine's loopback, once per method and compression.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import hivemind
import multiaddr
import torch
import torch.distributed as dist
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
)

from peer.deadlines import RoundDeadlines
from peer.node import start_dht, stop_dht
from peer.protocol.identity import load_identity
from peer.protocol.sketch import SKETCH_DIMS
from peer.settings import PeerSettings, load_settings

#: Averages ``values`` in place in round ``r``; returns the outcome ("averaged" or "failed"), the number
#: of peers averaged with (this one included), why the round failed ("" when it did not) and, on the
#: fast path, the group version it ran on (None elsewhere).
Average = Callable[[torch.Tensor, int], tuple[str, int, str, int | None]]
HIVEMIND_CODECS: dict[str, type[CompressionBase]] = {
    "none": NoCompression,  # DecentralizedAverager's default
    "fp16": Float16Compression,
    "8bit": Uniform8BitQuantization,
}


def barrier(folder: Path, name: str, index: int, peers: int, timeout: float = 120) -> None:
    """Wait until every peer reached this point (each leaves a file), or ``timeout`` passed."""
    (folder / f"{name}-{index}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"{name}-*"))) < peers and time.monotonic() < deadline:
        time.sleep(0.05)


def publish(path: Path, value: Any) -> None:
    """Write ``value`` as JSON for the other peers, whole or not at all (they poll for the file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)


def published(path: Path, timeout: float = 60) -> Any:
    """What the first peer published at ``path``, once it did (FileNotFoundError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return json.loads(path.read_text())


@contextlib.contextmanager
def swarm(args: argparse.Namespace, settings: PeerSettings) -> Iterator[hivemind.DHT]:
    """This peer's DHT, joined to the first peer's; stopped with its p2pd on the way out."""
    initial = published(args.addrs) if args.index else []
    dht, _ = start_dht(settings, initial_peers=initial, listen=[args.listen])
    try:
        if not args.index:
            publish(args.addrs, [str(m) for m in dht.get_visible_maddrs()])
        yield dht
    finally:
        stop_dht(dht, settings)


@contextlib.contextmanager
def hivemarket(args: argparse.Namespace, n: int) -> Iterator[Average]:
    # Imported here: importing peer.averaging installs hivemarket's 8-bit decoder in this process (and
    # the averager processes it forks), which the `hivemind` method must measure without.
    from peer.averaging import RunAverager

    settings = load_settings()
    with swarm(args, settings) as dht:
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

            def average(values: torch.Tensor, r: int) -> tuple[str, int, str, int | None]:
                result = averager.average(
                    [values], epoch=r, weight=1.0, gather=args.index, timeout=args.timeout
                )
                return result.outcome, len(result.gathered), result.reason, None

            yield average
        finally:
            averager.shutdown()


@contextlib.contextmanager
def hivemind_default(args: argparse.Namespace, n: int) -> Iterator[Average]:
    with swarm(args, load_settings()) as dht:
        averager = DecentralizedAverager(
            [torch.zeros(n)],
            dht,
            prefix="bench_round",
            target_group_size=args.peers,
            compression=HIVEMIND_CODECS[args.compression](),
            start=True,
        )
        try:

            def average(values: torch.Tensor, r: int) -> tuple[str, int, str, int | None]:
                with averager.get_tensors() as tensors:
                    tensors[0].copy_(values)
                # hivemind's `timeout` bounds only the search for a group, and by default nothing bounds
                # the all-reduce itself: the wait for the result is bounded here.
                control = averager.step(timeout=args.timeout, wait=False)
                try:
                    gathered = control.result(timeout=args.timeout)
                except TimeoutError:
                    control.cancel()
                    return "failed", 0, f"no result within {args.timeout:g} s", None
                except Exception as e:  # hivemind raises a variety of errors for a round that broke up
                    return "failed", 0, repr(e)[:300], None
                if gathered is None:
                    return "failed", 0, "no group", None
                with averager.get_tensors() as tensors:
                    values.copy_(tensors[0])
                return "averaged", len(gathered), "", None

            yield average
        finally:
            averager.shutdown()


@contextlib.contextmanager
def gloo(args: argparse.Namespace, n: int) -> Iterator[Average]:
    """A gloo process group on the ``--listen`` address (gloo's own connections follow
    ``GLOO_SOCKET_IFNAME``); the rendezvous store listens on a port the system picks."""
    host = multiaddr.Multiaddr(args.listen).value_for_protocol("ip4")
    timeout = timedelta(seconds=args.timeout)
    if args.index:
        master, port = published(args.addrs)
        store = dist.TCPStore(master, port, args.peers, is_master=False, timeout=timeout)
    else:
        # not waiting for the others in the constructor: they learn the port only once it returns
        store = dist.TCPStore(host, 0, args.peers, is_master=True, timeout=timeout, wait_for_workers=False)
        publish(args.addrs, [host, store.port])
    dist.init_process_group("gloo", store=store, rank=args.index, world_size=args.peers, timeout=timeout)
    try:

        def average(values: torch.Tensor, r: int) -> tuple[str, int, str, int | None]:
            try:
                dist.all_reduce(values)
            except RuntimeError as e:  # gloo's timeouts and broken connections
                return "failed", 0, repr(e)[:300], None
            values.div_(args.peers)
            return "averaged", args.peers, "", None

        yield average
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def fast(args: argparse.Namespace, n: int) -> Iterator[Average]:
    """hivemarket's fast path through the coordinator at ``--coordinator``, on the ``--listen`` address,
    as ``--identity`` (matched to ``--run``); with ``--method fast-rebuild`` every round rebuilds the
    group first."""
    # Imported here, as in the trainer: the other methods measure without it.
    from peer.collective import POLL_SECONDS, FastPath
    from peer.protocol.run_schemas import GroupView
    from peer.run_link import RunLink

    settings = load_settings()
    identity = load_identity(args.identity)
    host = multiaddr.Multiaddr(args.listen).value_for_protocol("ip4")
    rebuild = args.method == "fast-rebuild"
    with RunLink(args.coordinator, identity, args.run) as link:
        link.call(lambda: link.client.join(args.run, f"bench-peer-{args.index}", [args.listen]))
        path = FastPath(
            run_id=args.run,
            identity=identity,
            client=link.client,
            call=link.call,
            host=host,
            n_params=n,
            precision="fp16" if args.compression == "fp16" else "fp32",
            deadlines=RoundDeadlines(
                ceiling=args.timeout,
                floor=settings.chunk_deadline_floor,
                factor=settings.chunk_deadline_factor,
            ),
            reach_timeout=settings.reach_timeout,
            regroup_timeout=settings.regroup_timeout,
        )

        def whole(group: GroupView | None) -> GroupView:
            """Check in until the group's version holds every peer, on the fast path."""
            ends = time.monotonic() + args.timeout
            while group is None or not (path.usable(group) and len(group.members) == args.peers):
                if group is not None and group.path != "fast":
                    raise RuntimeError(f"the coordinator put the group on {group.path}: {group.reason}")
                if time.monotonic() > ends:
                    raise TimeoutError(f"no group of {args.peers} within {args.timeout:g} s: {group}")
                if group is not None:
                    time.sleep(POLL_SECONDS)
                group = path.checkin(version=group.version if path.usable(group) else None)
            return group

        try:
            group = whole(path.checkin())
            if not path.ready(group):
                raise RuntimeError(f"group version {group.version} could not be made (see the log)")

            def average(values: torch.Tensor, r: int) -> tuple[str, int, str, int | None]:
                if rebuild:
                    assert path.group is not None
                    failed = path.group.version
                    new = path.regroup(failed)
                    if new is None:
                        return (
                            "failed",
                            0,
                            f"no version after {failed} within {path.regroup_timeout:g} s",
                            None,
                        )
                    group = whole(new)
                    if not path.ready(group):
                        return "failed", 0, f"group version {group.version} could not be made", None
                result = path.average(
                    [values],
                    epoch=r,
                    weight=1.0,
                    param_sketch=[0.0] * SKETCH_DIMS,
                    wait_deadline=args.timeout,
                )
                group = path.group
                size = len(group.members) if result.outcome == "averaged" and group else 0
                return result.outcome, size, result.reason, group.version if group else None

            yield average
        finally:
            path.close()


METHODS: dict[str, Callable[[argparse.Namespace, int], contextlib.AbstractContextManager[Average]]] = {
    "hivemarket": hivemarket,
    "hivemind": hivemind_default,
    "gloo": gloo,
    "fast": fast,
    "fast-rebuild": fast,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--method", default="hivemarket", choices=list(METHODS))
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compression", default="none", choices=list(HIVEMIND_CODECS), help="not for gloo")
    parser.add_argument("--listen", required=True, help="a multiaddr; gloo and fast take its IPv4 address")
    parser.add_argument("--addrs", type=Path, required=True, help="in a folder of its own")
    parser.add_argument("--coordinator", help="fast: the coordinator's URL")
    parser.add_argument("--run", help="fast: the run this peer is matched to")
    parser.add_argument("--identity", type=Path, help="fast: this peer's key (PEM)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one round may take")
    parser.add_argument("--matchmaking", type=float, default=5.0, help="hivemarket's matchmaking time")
    args = parser.parse_args()
    n = int(args.size_mb * 1e6 / 4)
    values = torch.zeros(n)
    with METHODS[args.method](args, n) as average:
        barrier(args.addrs.parent, "ready", args.index, args.peers)  # a late peer would stay behind
        for r in range(args.rounds):
            if args.method == "fast-rebuild":  # no peer drops the last version while another uses it
                barrier(args.addrs.parent, f"round-{r}", args.index, args.peers)
            values.fill_(float(args.index))
            start = time.time()
            outcome, group, reason, version = average(values, r)
            end = time.time()
            expected = (args.peers - 1) / 2
            error = float((values - expected).abs().max())
            print(
                json.dumps(
                    {
                        "index": args.index,
                        "round": r,
                        "start": start,
                        "end": end,
                        "outcome": outcome,
                        "reason": reason,
                        "group": group,
                        "version": version,
                        "max_error": error,
                    }
                ),
                flush=True,
            )
        # A reducer that is done may still be sending its part of the average to the others.
        barrier(args.addrs.parent, "done", args.index, args.peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
