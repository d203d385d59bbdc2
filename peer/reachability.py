"""Whether other peers can dial this host, found by asking the coordinator to dial it back.

A volunteer behind a home router (a NAT with no port forwarded) or a firewall can dial out but cannot be
dialed. Its DHT node must then run in client mode and be reached through relays (:mod:`peer.node`),
and a run cannot use it as the seed of its DHT or put it on the fast path. p2pd's AutoNAT would find
this out too, but only after several peers tried to dial it, long after the node chose its mode; the
coordinator is there from the start, so the node asks it (``POST /v1/reachability``): the coordinator
connects to the address the request came from, at a port this host listens on for the check.

``HIVEMARKET_REACHABILITY`` skips the check: ``public`` (the operator forwarded the port, or announced
a public address with ``--announce``), ``private`` (known to be behind a NAT).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

import multiaddr
from hivemind.utils import get_logger

from peer.protocol.client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable

logger = get_logger(__name__)


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    reason: str  # what found it, for the peer's log and the CLI


def _tcp_listen(listen: Sequence[str]) -> tuple[str, int]:
    """The host and port of the first IPv4 TCP address in ``listen`` (any host, any port without one)."""
    for value in listen:
        address = multiaddr.Multiaddr(value)
        names = {p.name for p in address.protocols()}
        if {"ip4", "tcp"} <= names:
            return address.value_for_protocol("ip4"), int(address.value_for_protocol("tcp"))
    return "0.0.0.0", 0


async def check(client: CoordinatorClient, listen: Sequence[str], setting: str) -> Reachability | None:
    """Whether others can dial this host at ``listen`` (before the node binds it), as ``setting``
    (``HIVEMARKET_REACHABILITY``) says or the coordinator's dial-back finds; None when the coordinator
    could not tell (unreachable, or one that has no such check): the node then starts as it would
    without the check, and p2pd's AutoNAT decides."""
    if setting != "auto":
        return Reachability(setting == "public", f"HIVEMARKET_REACHABILITY={setting}")
    host, port = _tcp_listen(listen)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))
        probe.listen(8)  # the kernel completes the coordinator's handshake: no accept needed
        try:
            answer = await client.reachability(probe.getsockname()[1])
        except (CoordinatorError, CoordinatorUnreachable) as e:
            logger.warning(f"Could not check whether other peers can dial this host: {e}")
            return None
    seen = f"the coordinator dialed {answer.address}:{answer.port} (this host as it sees it): {answer.reason}"
    return Reachability(answer.reachable, seen)
