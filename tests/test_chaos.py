"""Failures across a real network: the coordinator and each peer on a host of its own (network namespaces
joined by veth links, ``bench/netlab.py``), with packet loss, bandwidth caps, a partition, SIGKILLs and a
restarted coordinator. Each test runs one of ``bench/reliability.py``'s scenarios, smaller than the bench
does, and checks what the scenario must never do: lose or double an acknowledged report, break the
ledger, leave peers disagreeing, or leave a namespace or process behind.

They need root, iproute2, nftables and faketime: CI runs as root and installs them (the README's test
command). Without root they are skipped; as root without the tools they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import netlab
from bench.reliability import AVERAGING, parser, run_trial

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]


@pytest.fixture(autouse=True)
def tools_and_no_leftovers():
    reason = netlab.missing()
    assert reason is None, reason
    before = set(netlab.namespaces())
    yield
    after = set(netlab.namespaces())
    assert not after - before, f"namespaces left behind: {after - before}"
    assert (
        f"{netlab.PREFIX}{os.getpid()}c"
        not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    )


def options(*argv: str):
    return parser().parse_args(["--timeout", "400", *argv])


def test_the_lab_links_hosts_breaks_links_and_removes_everything(tmp_path: Path):
    with netlab.Lab() as lab:
        a, b = lab.add("a"), lab.add("b")
        server = lab.spawn(b, [sys.executable, "-m", "http.server", "8000", "--bind", b.ip],
                           log=tmp_path / "server.log", env=dict(os.environ))  # fmt: skip
        get = f"import urllib.request as u; u.urlopen('http://{b.ip}:8000', timeout=2)"
        fetch = [sys.executable, "-c", get]

        def reachable() -> bool:
            return subprocess.run(lab.command(a, fetch), capture_output=True).returncode == 0

        deadline = time.monotonic() + 20
        while not reachable():
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        lab.partition(a)
        assert not reachable()
        lab.heal(a)
        assert reachable()
        lab.loss(a, 5)
        lab.cap(a, 20)
        rules = netlab.sh("nft", "list", "ruleset", ns=a.ns).stdout
        assert "numgen random mod 100 < 5" in rules
        assert "tbf" in netlab.sh("tc", "qdisc", "show", "dev", a.dev, ns=a.ns).stdout
        assert lab.leftovers() == [server.pid]
        namespaces = {a.ns, b.ns, lab.hub}
    assert server.poll() is not None
    assert not namespaces & set(netlab.namespaces())


def test_a_host_behind_a_home_router_dials_out_and_is_not_dialed(tmp_path: Path):
    with netlab.Lab() as lab:
        out, home = lab.add("out"), lab.add("home", behind_nat=True)
        assert home.behind_nat and home.public_ip == lab.hosts["homert"].ip != home.ip
        env = dict(os.environ)
        for host, bind in ((out, out.ip), (home, "0.0.0.0")):
            lab.spawn(host, [sys.executable, "-m", "http.server", "8000", "--bind", bind],
                      log=tmp_path / f"{host.name}.log", env=env)  # fmt: skip

        def reaches(source: netlab.Host, ip: str) -> bool:
            get = f"import urllib.request as u; u.urlopen('http://{ip}:8000', timeout=2)"
            return (
                subprocess.run(
                    lab.command(source, [sys.executable, "-c", get]), capture_output=True
                ).returncode
                == 0
            )

        deadline = time.monotonic() + 20
        while not reaches(home, out.ip):
            assert time.monotonic() < deadline, (tmp_path / "out.log").read_text()
            time.sleep(0.2)
        assert f"{home.public_ip} - -" in (tmp_path / "out.log").read_text()  # seen as its router
        assert not reaches(out, home.ip) and not reaches(out, home.public_ip)  # nothing forwarded in
        assert "masquerade" in netlab.sh("nft", "list", "ruleset", ns=lab.hosts["homert"].ns).stdout


def test_a_lab_whose_owner_died_is_swept(tmp_path: Path):
    script = "from bench.netlab import Lab; lab = Lab(); lab.add('x'); print(lab.tag, flush=True); input()"
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    tag = owner.stdout.readline().strip()
    owner.kill()
    owner.wait()
    assert any(ns.startswith(tag) for ns in netlab.namespaces())
    removed = netlab.sweep()
    assert {f"{tag}-x", f"{tag}-hub"} <= set(removed)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", ["round", "round-fast"])  # hivemind's averager in 8-bit, the fast path
def test_a_lossy_capped_round_averages_exactly(tmp_path: Path, scenario: str):
    trial = run_trial(scenario, tmp_path / "1", options("--rounds", "2"))
    missed = [r for r in trial.checks.get("not_averaged", []) if r[2] == "averaged" or "find a group" in r[4]]
    if scenario == "round" and missed and missed == trial.checks["not_averaged"]:
        # hivemind's own matchmaking, not the round: with the other core busy it split the 4 peers into
        # smaller groups and left one without a group (CI, once in four runs). One more try, whole.
        trial = run_trial(scenario, tmp_path / "2", options("--rounds", "2"))
    assert trial.completed, trial
    assert len(trial.recovery) == 2  # one wall time per round: every round averaged on every peer
    assert trial.checks["not_averaged"] == [], trial
    assert trial.checks["max_error"] == 0  # constant values survive 8-bit and fp16 exactly


@pytest.mark.timeout(540)
def test_a_partitioned_peer_trains_in_sync_again_and_nothing_is_lost(tmp_path: Path):
    trial = run_trial("partition", tmp_path, options("--partition-seconds", "20"))
    assert trial.completed, trial
    assert trial.recovery and trial.recovery[0] < 60, trial  # it did resync (the bench reports the time)
    assert (trial.data_lost, trial.doubled, trial.conserved) == (0, 0, True), trial


@pytest.mark.timeout(540)
def test_a_coordinator_killed_mid_run_loses_and_doubles_nothing(tmp_path: Path):
    trial = run_trial("coordinator-kill", tmp_path, options("--restarts", "2"))
    assert trial.checks == {"restarts": 2}
    assert trial.completed, trial
    assert (trial.data_lost, trial.doubled, trial.conserved) == (0, 0, True), trial


@pytest.mark.timeout(540)
def test_peers_killed_mid_allreduce_leave_the_others_in_agreement(tmp_path: Path):
    trial = run_trial("peer-kill", tmp_path, options("--kills", "3"))
    checks = {k: v for k, v in trial.checks.items() if k != "repaired"}  # repaired: any number
    expected = {"kills": 3, "rounds_over_deadline": 0, "not_finite": 0, "disagreed": 0, "paths": ["fast"]}
    assert checks == expected, trial  # every round a kill hit ran on the fast path
    assert max(trial.recovery) <= AVERAGING["timeout_seconds"] + 1, trial
    assert (trial.data_lost, trial.doubled, trial.conserved) == (0, 0, True), trial


@pytest.mark.timeout(540)
def test_volunteers_behind_home_routers_train_are_paid_and_dialed_through_relays(tmp_path: Path):
    trial = run_trial("nat", tmp_path, options("--kills", "0"))  # the bench kills a volunteer too
    checks = trial.checks
    assert checks["home_paid"] and checks["private_addresses"] == 0, trial
    assert checks["addresses"] >= 2 and checks["dial_pairs"] == 3 * checks["addresses"], trial
    assert checks["dialed"] == checks["dial_pairs"], trial  # from every other host, every address
    assert trial.completed, trial
    assert (trial.data_lost, trial.doubled, trial.conserved) == (0, 0, True), trial
