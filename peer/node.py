"""The DHT peer node: a hivemind DHT that publishes this peer's signed capability record.

hivemind runs the DHT in a child process which runs p2pd; both are reaped on shutdown, including after
a failed start, so that no p2pd is ever left behind.

Reachability (:func:`start_dht`). A node others can dial runs as a full DHT server and, as every p2pd
does by default, relays for peers that cannot be dialed (circuit relay v2, within p2pd's limits: 128
reservations, 16 circuits per peer, 30 minutes and 4 GiB per relayed connection). A node behind a NAT
runs in client mode (it dials out; it never serves the DHT), holds a reservation with the reachable
peers it bootstrapped from, and is dialed through them at :func:`relayed_maddrs`; p2pd's hole
punching (on with AutoNAT) may upgrade such a connection to a direct one where the NAT allows (not
measured: the network lab tests the relays).
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hivemind
import multiaddr
import psutil
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import get_dht_time, get_logger
from hivemind.utils.crypto import RSAPrivateKey

from peer.p2p_key import signing_key_of
from peer.protocol import __version__
from peer.protocol.identity import Identity
from peer.records import CAPABILITY_KEY, build_record, public_record, record_is_authentic, record_validators
from peer.settings import PeerSettings

logger = get_logger(__name__)

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)
_GO_TIMESTAMP = re.compile(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} ")
#: What a multiaddr reached through a relay carries.
CIRCUIT = "/p2p-circuit"


def _static_relays_only(make_args: Any) -> Any:
    """p2pd's argument builder, changed so that a node given relays uses those and looks for no others.

    Why: p2pd looks for relays through its DHT unless told not to (``-relayDiscovery``, which hivemind
    does not pass), and its relay finder then waits for four candidates or three minutes before it asks
    for a reservation (measured in the lab: no reservation in 25 s with one reachable peer; with the
    static relays alone, a reservation 0.25 s after start)."""

    def build(*args: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("trustedRelays"):
            kwargs["relayDiscovery"] = False
        return make_args(*args, **kwargs)

    return build


P2P._make_process_args = staticmethod(_static_relays_only(P2P._make_process_args))


def is_relayed(maddr: str) -> bool:
    return CIRCUIT in str(maddr)


def relayed_maddrs(relays: Sequence[str], peer_id: str) -> list[str]:
    """The addresses at which a node behind a NAT is dialed: through each reachable relay it holds a
    reservation with. Built here, because p2pd advertises relayed addresses only through relays with
    public IP addresses (go-libp2p drops a relay's private ones), and a home network's peers, or the
    network lab's, may have none."""
    return [f"{m}{CIRCUIT}/p2p/{peer_id}" for m in relays if "/p2p/" in m and not is_relayed(m)]


class NodeError(RuntimeError):
    """A node that cannot start as asked; the message names the option or address at fault."""


def parse_maddrs(values: Sequence[str], option: str, *, peer_id: bool = False) -> list[str]:
    """Validate multiaddrs with the ``multiaddr`` package; the error quotes the bad value and its option.
    With ``peer_id``, each must name the peer too (``/p2p/ID``): a peer to dial, not only an address."""
    parsed = []
    for value in values:
        try:
            address = multiaddr.Multiaddr(value)
        except Exception as e:  # multiaddr raises several unrelated exception types for bad input
            raise NodeError(f"{option} {value!r} is not a valid multiaddr: {e}") from None
        if peer_id and "p2p" not in [protocol.name for protocol in address.protocols()]:
            raise NodeError(
                f"{option} {value!r} does not name a peer: end it with /p2p/<peer id>, as in the maddr "
                "lines `hivemarket peer start` prints"
            )
        parsed.append(str(address))
    return parsed


def _check_ports_free(listen: Sequence[str]) -> None:
    """Fail early on a listen port that is taken.

    libp2p binds with SO_REUSEPORT and would silently share a port with another process; a plain bind
    (without it) fails if anyone holds the port, which is the check users expect.
    """
    for value in listen:
        addr = multiaddr.Multiaddr(value)
        protocols = {p.name for p in addr.protocols()}
        if "tcp" not in protocols or addr.value_for_protocol("tcp") == "0":
            continue
        family, host = (
            (socket.AF_INET6, addr.value_for_protocol("ip6"))
            if "ip6" in protocols
            else (socket.AF_INET, addr.value_for_protocol("ip4") if "ip4" in protocols else "0.0.0.0")
        )
        port = int(addr.value_for_protocol("tcp"))
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise NodeError(f"--listen {value!r}: port {port} is already in use") from None
                raise NodeError(f"--listen {value!r}: cannot bind {host}:{port}: {e.strerror}") from None


def _process_tree(pid: int | None) -> list[psutil.Process]:
    """``pid`` and its descendants, listed before they exit (p2pd is re-parented once its parent dies)."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def reap(processes: list[psutil.Process], timeout: float) -> None:
    """Terminate, then kill, whatever of ``processes`` is still alive (p2pd outlives a killed DHT process)."""
    alive = [p for p in processes if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


def terminate_tree(pid: int, timeout: float) -> None:
    """Stop a process and everything it started (a trainer's DHT, averager and p2pd included)."""
    reap(_process_tree(pid), timeout)


def follow_clock(offset: float) -> None:
    """Run hivemind's clock ``offset`` seconds ahead of this machine's (the coordinator's clock, as
    :class:`peer.protocol.client.ClockEstimate` measured it) in this process and the DHT and averager
    processes it forks after this call.

    Why: hivemind's matchmaking orders leaders and accepts followers by wall-clock expiration times, so
    a peer whose clock is off by a second or two never joins a group (measured: a peer 2 s ahead failed
    every round). hivemind reads ``get_dht_time`` through module globals, each set here.
    """
    import hivemind.utils.timed_storage as timed_storage

    def now() -> float:
        return time.time() + offset

    timed_storage.get_dht_time = now
    for name, module in list(sys.modules.items()):
        if name.startswith("hivemind") and getattr(module, "get_dht_time", None) is not None:
            module.get_dht_time = now  # type: ignore[attr-defined]


def start_dht(
    settings: PeerSettings,
    *,
    initial_peers: Sequence[str] = (),
    listen: Sequence[str] = DEFAULT_LISTEN,
    announce: Sequence[str] = (),
    client_mode: bool = False,
    key: Path | None = None,
    reachable: bool | None = None,
) -> tuple[hivemind.DHT, RSASignatureValidator]:
    """Start a DHT node with hivemarket's record validators, or raise :class:`NodeError` within
    ``settings.bootstrap_timeout`` seconds, leaving no process behind.

    ``key``: the libp2p key file (:mod:`peer.p2p_key`) that fixes the node's peer id and signs its
    records; a new key each start without it. ``reachable``: what a check found (None: unknown, p2pd's
    AutoNAT decides). A reachable node says so to p2pd, which then relays for others; one that is not
    runs in client mode, with the initial peers as its relays."""
    behind_nat = reachable is False
    if not (client_mode or behind_nat):
        _check_ports_free(listen)
    options: dict[str, Any] = {}
    if key is not None:
        # one process per key: the worker starts one trainer per run, `peer start` one node per home
        options.update(identity_path=str(key), check_if_identity_free=False)
    if reachable:
        options["force_reachability"] = "public"
    elif behind_nat:
        options.update(force_reachability="private", use_auto_relay=True, trusted_relays=list(initial_peers))
    rsa = RSASignatureValidator(signing_key_of(key) if key is not None else RSAPrivateKey())
    dht = hivemind.DHT(
        initial_peers=list(initial_peers) or None,
        start=False,
        client_mode=client_mode or behind_nat,
        host_maddrs=list(listen),
        announce_maddrs=list(announce) or None,
        record_validators=record_validators(rsa),
        startup_timeout=settings.bootstrap_timeout,
        wait_timeout=settings.dht_request_timeout,
        shutdown_timeout=settings.shutdown_timeout,
        **options,
    )
    try:
        dht.run_in_background(await_ready=True, timeout=settings.bootstrap_timeout)
    except (P2PDaemonError, FutureTimeoutError, OSError, RuntimeError, ValueError) as e:
        stop_dht(dht, settings)
        raise NodeError(_explain_start_failure(e, initial_peers, settings)) from None
    return dht, rsa


def _explain_start_failure(error: Exception, initial_peers: Sequence[str], settings: PeerSettings) -> str:
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    text = _GO_TIMESTAMP.sub("", text)  # p2pd prefixes its log lines with a date and time
    if isinstance(error, FutureTimeoutError):
        return f"the DHT did not start within {settings.bootstrap_timeout:g} s (HIVEMARKET_BOOTSTRAP_TIMEOUT)"
    if "bootstrap" in text and initial_peers:
        return f"cannot reach any of the initial peers {', '.join(initial_peers)}: {text}"
    return f"the DHT failed to start: {text}"


def stop_dht(dht: hivemind.DHT, settings: PeerSettings) -> None:
    """Shut the DHT down and reap its p2pd even if the DHT process had to be terminated."""
    tree = _process_tree(dht.pid)
    if dht.is_alive():
        dht.shutdown()
    reap(tree, settings.shutdown_timeout)


@dataclass
class PeerNode:
    """A running DHT node that keeps this peer's capability record published."""

    dht: hivemind.DHT
    rsa: RSASignatureValidator
    identity: Identity
    settings: PeerSettings
    hardware: dict[str, Any]
    roles: list[str]
    relays: list[str] | None = None  # behind a NAT: the peers it is dialed through (maybe none)
    published_at: float = field(default=0.0)

    @property
    def peer_id(self) -> str:
        return str(self.dht.peer_id)

    def maddrs(self) -> list[str]:
        """The addresses others dial this node at: never a private one of a node behind a NAT."""
        if self.relays is not None:
            return relayed_maddrs(self.relays, self.peer_id)
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def publish(self) -> bool:
        """Store a fresh record expiring ``record_ttl`` seconds from now; True if any peer accepted it."""
        expires_at = get_dht_time() + self.settings.record_ttl
        record = build_record(
            self.identity,
            self.rsa.local_public_key,
            peer_id=self.peer_id,
            maddrs=self.maddrs(),
            hardware=self.hardware,
            roles=self.roles,
            version=__version__,
            expires_at=expires_at,
        )
        stored = self.dht.store(CAPABILITY_KEY, record, expires_at, subkey=self.rsa.local_public_key)
        self.published_at = time.monotonic()
        return bool(stored)

    def publish_due(self) -> bool:
        return time.monotonic() - self.published_at >= self.settings.record_refresh

    def neighbors(self) -> list[str]:
        return self.dht.run_coroutine(_routing_table_peers)

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "account": self.identity.account,
            "maddrs": self.maddrs(),
            "dht_neighbors": self.neighbors(),
            "roles": self.roles,
            "hardware": self.hardware,
            "version": __version__,
            "record_published_at": time.time() - (time.monotonic() - self.published_at),
        }


async def _routing_table_peers(_dht: hivemind.DHT, node: Any) -> list[str]:
    return sorted(str(peer_id) for peer_id in node.protocol.routing_table.peer_id_to_uid)


def fetch_records(dht: hivemind.DHT) -> list[dict[str, Any]]:
    """Live capability records in the DHT, each re-checked against its account signature."""
    found = dht.get(CAPABILITY_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    now = get_dht_time()
    for subkey, item in found.value.items():
        record = item.value
        if item.expiration_time > now and isinstance(record, dict) and record_is_authentic(record, subkey):
            records.append(public_record(record, item.expiration_time))
    return sorted(records, key=lambda r: (r["account"], r["peer_id"]))
