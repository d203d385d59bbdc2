"""A network of hosts on one machine: each host a Linux network namespace, all joined to one bridge.

Used by ``bench/reliability.py`` and the chaos tests (``tests/test_chaos.py``) to put the coordinator
and each peer on its own host, so that their traffic crosses real interfaces, and to break those
interfaces on purpose. Needs root, iproute2 (``ip``, ``tc``) and nftables (``nft``).

Layout: a hub namespace holds the bridge; every host namespace has one veth link to it, with the address
``10.213.N.(10 + i)``; the machine itself gets a fault-free control link at ``10.213.N.1`` so that the
test or bench process can reach the hosts' servers directly. Each lab takes a /24 (``N``) that no
interface of the machine uses, so that two labs (a bench still cleaning up, and a new one) never route
to each other's hosts. Only these addresses are ever traffic targets.

A host can sit behind a home router (``add(name, behind_nat=True)``): a router namespace on the bridge
holds the public address, the host has a private one (``10.214.N.2`` on a /24 of its own, N counted per
lab) behind it, and the router masquerades the host's outgoing traffic (nftables NAT) and forwards
nothing inbound, as a home router with no port forwarding does. The other hosts can reach the router's
address and nothing behind it; the host reaches every other host.

Faults (each on one host's link, in both directions unless said otherwise):

- ``loss(host, percent)``: the host's namespace drops that share of the packets it *sends* (nftables
  ``numgen random``), so every path between two hosts loses ``percent`` in each direction;
- ``cap(host, mbit)``: a token bucket (``tc tbf``) on both ends of the link, so the host sends and
  receives at most ``mbit`` Mbit/s;
- ``partition(host)`` / ``heal(host)``: every packet to or from the host is dropped, then allowed again;
- processes: :meth:`Lab.spawn` starts a command on a host (optionally with its clock shifted, through
  libfaketime), and the caller signals it (SIGKILL, SIGSTOP/SIGCONT) like any process.

``tc netem`` is not in every kernel (not in this one), hence nftables for loss.

Everything the lab creates is removed by :meth:`Lab.close`: processes still running in its namespaces
(p2pd daemons included) are killed, then the namespaces, which takes their links and rules with them.
Namespaces are named after the creating process (``hm<pid>-...``) and :func:`sweep` removes those of
processes that no longer exist, so a lab killed before it could clean up is removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hm"
NETWORK = "10.213"  # each lab takes a free /24 of 10.213.0.0/16 (see Lab.subnet)
HOME_NETWORK = "10.214"  # the private /24s behind the lab's home routers (see Lab.add)
TOOLS = ("ip", "tc", "nft")


class LabError(RuntimeError):
    """The lab could not be set up (not root, a tool missing, a command refused)."""


def missing() -> str | None:
    """Why a lab cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"missing {', '.join(absent)} (Debian packages iproute2 and nftables)"
    return None


def sh(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (in namespace ``ns``); LabError with its stderr when it fails and ``check``."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    done = subprocess.run(full, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(full)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def namespaces() -> list[str]:
    listed = sh("ip", "netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.strip()]


def sweep() -> list[str]:
    """Remove the namespaces (and the processes in them) of labs whose creating process is gone."""
    removed = []
    for name in namespaces():
        owner = name[len(PREFIX) :].split("-", 1)[0]
        if name.startswith(PREFIX) and owner.isdigit() and not _alive(int(owner)):
            _remove_namespace(name)
            removed.append(name)
    return removed


def free_subnet(network: str = NETWORK, taken: Sequence[str] = ()) -> str:
    """A /24 of ``network`` (a /16) that no interface of this machine, and none of ``taken``, has."""
    used = sh("ip", "-o", "-4", "addr", "show", check=False).stdout
    for n in range(1, 255):
        if f" {network}.{n}." not in used and f"{network}.{n}" not in taken:
            return f"{network}.{n}"
    raise LabError(f"every /24 of {network}.0.0/16 is in use")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids(ns: str) -> list[int]:
    done = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split()]


def _remove_namespace(ns: str) -> None:
    for _ in range(50):  # processes first: a namespace with a process in it outlives its name
        pids = _pids(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped process cannot die
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    sh("ip", "netns", "delete", ns, check=False)


@dataclass
class Host:
    """A host: its namespace, its own address, and its link (``dev`` here, ``hub_dev`` at the other end,
    in ``link_ns``: the hub's, or its home router's). ``public_ip`` is the address the other hosts see
    its traffic come from: its own, or its router's when it is behind a NAT."""

    name: str
    ns: str
    ip: str
    dev: str = "eth0"
    hub_dev: str = ""
    link_ns: str = ""
    public_ip: str = ""

    @property
    def behind_nat(self) -> bool:
        return self.public_ip != self.ip


class Lab:
    """Hosts on a bridge; use as a context manager (or call :meth:`close`)."""

    made = 0  # labs this process has made: each gets names of its own

    def __init__(self) -> None:
        reason = missing()
        if reason:
            raise LabError(reason)
        sweep()
        Lab.made += 1
        self.tag = f"{PREFIX}{os.getpid()}-{Lab.made}"
        self.hub = f"{self.tag}-hub"
        self.control = f"{PREFIX}{os.getpid()}c{Lab.made}"[-15:]  # an interface name has 15 characters
        self.hosts: dict[str, Host] = {}
        self.homes: list[str] = []  # the private /24s behind the home routers
        self.processes: list[subprocess.Popen] = []
        self.subnet = free_subnet()
        self.control_ip = f"{self.subnet}.1"
        try:
            sh("ip", "netns", "add", self.hub)
            sh("ip", "link", "set", "lo", "up", ns=self.hub)
            sh("ip", "link", "add", "br0", "type", "bridge", ns=self.hub)
            sh("ip", "link", "set", "br0", "up", ns=self.hub)
            # The control link: this process reaches the hosts through it; no fault is ever put on it.
            control = self.control
            sh("ip", "link", "add", control, "type", "veth", "peer", "name", "ctl", "netns", self.hub)
            sh("ip", "link", "set", "ctl", "master", "br0", "up", ns=self.hub)
            sh("ip", "addr", "add", f"{self.control_ip}/24", "dev", control)
            sh("ip", "link", "set", control, "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, name: str, *, behind_nat: bool = False) -> Host:
        """A new host called ``name`` with loopback up, linked to the bridge, or with ``behind_nat`` to a
        home router of its own (a host ``<name>rt`` on the bridge) that masquerades its traffic and lets
        nothing in that the host did not start."""
        if not behind_nat:
            host = self._bridged(name)
            self.hosts[name] = host
            return host
        router = self._bridged(f"{name}rt")
        self.hosts[router.name] = router
        home = free_subnet(HOME_NETWORK, self.homes)
        self.homes.append(home)
        host = Host(name, f"{self.tag}-{name}", f"{home}.2", hub_dev="lan", link_ns=router.ns,
                    public_ip=router.ip)  # fmt: skip
        sh("ip", "netns", "add", host.ns)
        sh("ip", "link", "set", "lo", "up", ns=host.ns)
        sh(
            "ip",
            "link",
            "add",
            "lan",
            "type",
            "veth",
            "peer",
            "name",
            host.dev,
            "netns",
            host.ns,
            ns=router.ns,
        )
        sh("ip", "addr", "add", f"{home}.1/24", "dev", "lan", ns=router.ns)
        sh("ip", "link", "set", "lan", "up", ns=router.ns)
        sh("ip", "addr", "add", f"{host.ip}/24", "dev", host.dev, ns=host.ns)
        sh("ip", "link", "set", host.dev, "up", ns=host.ns)
        sh("ip", "route", "add", "default", "via", f"{home}.1", ns=host.ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router.ns)
        sh("nft", "add", "table", "ip", "hmnat", ns=router.ns)
        sh("nft", "add chain ip hmnat post { type nat hook postrouting priority 100 ; }", ns=router.ns)
        sh(
            "nft",
            f"add rule ip hmnat post ip saddr {home}.0/24 oifname {router.dev} masquerade",
            ns=router.ns,
        )
        # a home router forwards what its hosts started (and the answers to it), nothing else inbound
        sh(
            "nft",
            "add chain ip hmnat inbound { type filter hook forward priority 0 ; policy drop ; }",
            ns=router.ns,
        )
        sh("nft", "add rule ip hmnat inbound ct state established,related accept", ns=router.ns)
        sh("nft", "add rule ip hmnat inbound iifname lan accept", ns=router.ns)
        self.hosts[name] = host
        return host

    def _bridged(self, name: str) -> Host:
        """A host on the bridge, at the lab's next address."""
        i = len([h for h in self.hosts.values() if h.link_ns == self.hub])
        ip = f"{self.subnet}.{10 + i}"
        host = Host(name, f"{self.tag}-{name}", ip, hub_dev=f"v{i}", link_ns=self.hub, public_ip=ip)
        sh("ip", "netns", "add", host.ns)
        sh("ip", "link", "set", "lo", "up", ns=host.ns)
        sh("ip", "link", "add", host.hub_dev, "type", "veth", "peer", "name", host.dev, "netns", host.ns,
           ns=self.hub)  # fmt: skip
        sh("ip", "link", "set", host.hub_dev, "master", "br0", "up", ns=self.hub)
        sh("ip", "addr", "add", f"{host.ip}/24", "dev", host.dev, ns=host.ns)
        sh("ip", "link", "set", host.dev, "up", ns=host.ns)
        return host

    # ------------------------------------------------------------------------------------------- faults

    def loss(self, host: Host, percent: int) -> None:
        """Drop ``percent`` of the packets ``host`` sends (0 removes the fault)."""
        sh("nft", "delete", "table", "inet", "hmloss", ns=host.ns, check=False)
        if percent:
            sh("nft", "add", "table", "inet", "hmloss", ns=host.ns)
            sh("nft", "add chain inet hmloss out { type filter hook output priority 0 ; }", ns=host.ns)
            sh("nft", f"add rule inet hmloss out oifname {host.dev} numgen random mod 100 < {percent} drop",
               ns=host.ns)  # fmt: skip

    def cap(self, host: Host, mbit: float) -> None:
        """Limit ``host``'s link to ``mbit`` Mbit/s each way (0 removes the cap)."""
        ends = ((host.dev, host.ns), (host.hub_dev, host.link_ns))
        for dev, ns in ends:
            sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
        if mbit:
            burst = max(16_000, int(mbit * 1e6 / 8 / 100))  # 10 ms worth of bytes, at least 16 kB
            for dev, ns in ends:
                sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst",
                   str(burst), "latency", "100ms", ns=ns)  # fmt: skip

    def partition(self, host: Host) -> None:
        """Cut ``host`` off: nothing in or out on its link (loopback still works)."""
        sh("nft", "add", "table", "inet", "hmcut", ns=host.ns)
        for chain, hook, match in (("in", "input", "iifname"), ("out", "output", "oifname")):
            hooked = f"{{ type filter hook {hook} priority -10 ; }}"
            sh("nft", f"add chain inet hmcut {chain} {hooked}", ns=host.ns)
            sh("nft", f"add rule inet hmcut {chain} {match} {host.dev} drop", ns=host.ns)

    def heal(self, host: Host) -> None:
        sh("nft", "delete", "table", "inet", "hmcut", ns=host.ns, check=False)

    # ---------------------------------------------------------------------------------------- processes

    def command(self, host: Host, argv: Sequence[str], clock_offset: float = 0.0) -> list[str]:
        """``argv`` as run on ``host``, with its wall clock ``clock_offset`` seconds off if asked."""
        prefix = ["ip", "netns", "exec", host.ns]
        if clock_offset:
            if shutil.which("faketime") is None:
                raise LabError("a shifted clock needs faketime (Debian package faketime)")
            prefix += ["faketime", "-f", f"{clock_offset:+g}s"]
        return [*prefix, *argv]

    def spawn(
        self, host: Host, argv: Sequence[str], *, log: Path, env: dict[str, str], clock_offset: float = 0.0
    ) -> subprocess.Popen:
        """Start ``argv`` on ``host`` in a process group of its own, output to ``log``."""
        with log.open("a") as out:
            proc = subprocess.Popen(
                self.command(host, argv, clock_offset),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**env, "FAKETIME_DONT_FAKE_MONOTONIC": "1"},
                start_new_session=True,
            )
        self.processes.append(proc)
        return proc

    def leftovers(self) -> list[int]:
        """Processes still running in the lab's namespaces."""
        return [pid for host in self.hosts.values() for pid in _pids(host.ns)]

    def close(self) -> None:
        """Kill every process in the lab's namespaces and remove the namespaces (and so every link,
        queue discipline and nftables rule the lab made). Safe to call twice."""
        for host in self.hosts.values():
            _remove_namespace(host.ns)
        sh("ip", "link", "delete", self.control, check=False)
        _remove_namespace(self.hub)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.hosts.clear()
