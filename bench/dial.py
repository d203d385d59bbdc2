"""Dial a libp2p peer from a fresh node: ``python -m bench.dial MADDR [--listen MADDR] [--timeout S]``.

Exit 0 when the connection is made, 1 (with the error) when it is not. The NAT scenario of
``bench/reliability.py`` runs it on another host of the network lab to check that a peer behind a NAT
is dialed at the addresses it hands out (its relayed ones).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from hivemind.p2p import P2P, PeerID
from multiaddr import Multiaddr


async def dial(maddr: str, listen: str, timeout: float) -> str | None:
    """None when a node listening on ``listen`` connected to ``maddr`` within ``timeout`` s, else why not."""
    target = Multiaddr(maddr)
    peer_id = PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])
    node = await P2P.create(host_maddrs=[listen])
    try:
        address = target.decapsulate(Multiaddr(f"/p2p/{peer_id.to_base58()}"))
        await asyncio.wait_for(node._client.connect(peer_id, [address]), timeout)
        return None
    except Exception as e:  # the daemon's ControlFailure, a timeout: the answer, not a crash
        return f"{type(e).__name__}: {e}"
    finally:
        await node.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("maddr", help="the peer's multiaddr, ending in /p2p/<peer id>")
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args()
    error = asyncio.run(dial(args.maddr, args.listen, args.timeout))
    print("connected" if error is None else f"not connected: {error}", flush=True)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
