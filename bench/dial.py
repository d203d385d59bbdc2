"""Dial libp2p peers from one fresh node: ``python -m bench.dial MADDR [MADDR ...] [--listen MADDR]``.

Prints ``connected MADDR`` or ``not connected MADDR: why`` for each, and exits 0 when every one connected.
The NAT scenario of ``bench/reliability.py`` runs it on the other hosts of the network lab to check that a
peer behind a NAT is dialed at the addresses it hands out (its relayed ones).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from hivemind.p2p import P2P, PeerID
from multiaddr import Multiaddr


async def dial(maddrs: list[str], listen: str, timeout: float) -> dict[str, str | None]:
    """Each of ``maddrs``: None when a node listening on ``listen`` connected to it within ``timeout`` s,
    else why not."""
    node = await P2P.create(host_maddrs=[listen])
    found: dict[str, str | None] = {}
    try:
        for maddr in maddrs:
            peer_id = PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])
            address = Multiaddr(maddr).decapsulate(Multiaddr(f"/p2p/{peer_id.to_base58()}"))
            try:
                await asyncio.wait_for(node._client.connect(peer_id, [address]), timeout)
                found[maddr] = None
            except Exception as e:  # the daemon's ControlFailure, a timeout: the answer, not a crash
                found[maddr] = f"{type(e).__name__}: {e}"
    finally:
        await node.shutdown()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("maddrs", nargs="+", help="peers' multiaddrs, each ending in /p2p/<peer id>")
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()
    found = asyncio.run(dial(args.maddrs, args.listen, args.timeout))
    for maddr, error in found.items():
        print(f"connected {maddr}" if error is None else f"not connected {maddr}: {error}", flush=True)
    return 0 if all(error is None for error in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
