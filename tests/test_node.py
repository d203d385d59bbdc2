"""The DHT peer node as users run it: real `hivemarket peer start` processes on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import socket
import stat
import time
import urllib.request
from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peer.protocol.identity import Identity
from peer.records import CAPABILITY_KEY, build_record
from tests.harness import PeerSwarm, cli_env, group_members, run_cli, wait_until


def _listed(maddr: str, home: Path) -> list[dict]:
    result = run_cli("peers", "--initial-peers", maddr, "--json", env=cli_env(home))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_peers_lists_a_started_peer_within_15_s(swarm: PeerSwarm, tmp_path: Path) -> None:
    started = time.monotonic()
    peer = swarm.start("--role", "validator", "--role", "trainer")
    status = peer.status()
    assert status["peer_id"] in peer.output() and status["maddrs"][0] in peer.output()
    records = wait_until(lambda: _listed(peer.maddrs[0], tmp_path), 15, "the peer's record")
    assert time.monotonic() - started < 15 + 10  # start-up included; the listing itself is bounded above
    [record] = records
    assert record["peer_id"] == status["peer_id"]
    assert record["account"] == status["account"]
    assert record["maddrs"] == status["maddrs"]
    assert record["roles"] == ["trainer", "validator"]
    assert record["hardware"]["cpu_cores"] >= 1 and "gpu" in record["hardware"]
    assert 0 < record["expires_at"] - time.time() <= 6 + 1


def test_a_restarted_peer_keeps_its_peer_id_and_its_addresses(swarm: PeerSwarm) -> None:
    port = _free_port()
    first = swarm.start("--listen", f"/ip4/127.0.0.1/tcp/{port}")
    home, before = first.log.parent, first.status()
    assert first.stop() == 0
    again = swarm.start("--listen", f"/ip4/127.0.0.1/tcp/{port}", home=home)
    after = again.status()
    assert after["peer_id"] == before["peer_id"]
    fixed = [m for m in before["maddrs"] if f"/tcp/{port}/" in m]
    assert fixed and fixed[0] in after["maddrs"]  # the address handed out still reaches this peer
    assert swarm.start().status()["peer_id"] != before["peer_id"]  # another home, another peer
    shown = run_cli("identity", "show", "--json", env=cli_env(home))
    assert json.loads(shown.stdout)["peer_id"] == before["peer_id"]
    key = Path(json.loads(shown.stdout)["p2p_key"])
    assert key.parent == home and stat.S_IMODE(key.stat().st_mode) == 0o600
    plain = run_cli("identity", "show", env=cli_env(home))
    assert plain.stdout.strip() == before["account"]  # `$(hivemarket identity show)` is the account
    assert f"peer id  {before['peer_id']}" in plain.stderr


def test_status_file_tracks_neighbors(swarm: PeerSwarm) -> None:
    first = swarm.start()
    second = swarm.start("--initial-peers", first.maddrs[0])
    wait_until(
        lambda: second.status()["peer_id"] in first.status()["dht_neighbors"], 20, "first to see second"
    )
    assert first.status()["peer_id"] in second.status()["dht_neighbors"]
    assert set(second.status()) >= {"peer_id", "account", "maddrs", "dht_neighbors"}


def test_metrics_port_serves_the_peer_s_metrics(swarm: PeerSwarm) -> None:
    node = swarm.start("--metrics-port", "0")
    found = wait_until(
        lambda: re.search(r"^metrics\s+(http://\S+)", node.output(), re.MULTILINE), 20, "the URL"
    )
    with urllib.request.urlopen(found.group(1), timeout=10) as response:
        text = response.read().decode()
    for name in (
        "hivemarket_peer_samples_total 0.0",
        "hivemarket_peer_round_seconds_count 0.0",
        "# TYPE hivemarket_peer_gpu_power_watts gauge",
    ):
        assert name in text, name


def test_a_stopped_peer_disappears_after_its_record_expires(swarm: PeerSwarm, tmp_path: Path) -> None:
    first = swarm.start()
    second = swarm.start("--initial-peers", first.maddrs[0])
    both = {first.status()["account"], second.status()["account"]}
    wait_until(lambda: {r["account"] for r in _listed(first.maddrs[0], tmp_path)} == both, 15, "both records")
    assert second.stop() == 0
    wait_until(
        lambda: {r["account"] for r in _listed(first.maddrs[0], tmp_path)} == {first.status()["account"]},
        6 + 10,
        "the stopped peer's record to expire",
    )


def _forging_dht(bootstrap: str) -> tuple[hivemind.DHT, RSASignatureValidator]:
    """A client that runs no hivemarket validation itself: only honest peers can reject its records."""
    rsa = RSASignatureValidator(RSAPrivateKey())
    dht = hivemind.DHT(initial_peers=[bootstrap], client_mode=True, record_validators=[rsa], start=True)
    return dht, rsa


def test_forged_records_are_rejected_by_other_peers(swarm: PeerSwarm, tmp_path: Path) -> None:
    victim = swarm.start()
    status = victim.status()
    wait_until(lambda: _listed(victim.maddrs[0], tmp_path), 15, "the victim's record")
    dht, rsa = _forging_dht(victim.maddrs[0])
    try:
        mallory = Identity.generate()
        expires_at = get_dht_time() + 30
        fields = dict(peer_id="fake", maddrs=[], hardware={"gpu": "H100"}, roles=["trainer"], version="0")

        # 1. A record that names the victim's account but is signed with Mallory's key.
        claimed = build_record(mallory, rsa.local_public_key, expires_at=expires_at, **fields)
        claimed["account"] = status["account"]
        assert not dht.store(CAPABILITY_KEY, claimed, expires_at, subkey=rsa.local_public_key)

        # 2. The victim's own genuine record replayed under Mallory's subkey.
        raw = dht.get(CAPABILITY_KEY, latest=True).value  # the forger's own cache may hold its forgeries
        [(victim_subkey, genuine)] = [
            (k, v) for k, v in raw.items() if v.value["peer_id"] == status["peer_id"]
        ]
        assert not dht.store(
            CAPABILITY_KEY, genuine.value, genuine.expiration_time, subkey=rsa.local_public_key
        )

        # 3. Overwriting the victim's entry (its RSA subkey) without its RSA key.
        own = build_record(mallory, victim_subkey, expires_at=expires_at, **fields)
        assert not dht.store(CAPABILITY_KEY, own, expires_at, subkey=victim_subkey)

        # 4. A record that does not match the schema, even when correctly signed.
        malformed = build_record(mallory, rsa.local_public_key, expires_at=expires_at, **fields)
        malformed["roles"] = "trainer"
        assert not dht.store(CAPABILITY_KEY, malformed, expires_at, subkey=rsa.local_public_key)

        # A correctly signed record of Mallory's own is accepted: the rejections above are not blanket.
        honest = build_record(mallory, rsa.local_public_key, expires_at=expires_at, **fields)
        assert dht.store(CAPABILITY_KEY, honest, expires_at, subkey=rsa.local_public_key)
    finally:
        dht.shutdown()
    listed = {(r["account"], r["peer_id"]) for r in _listed(victim.maddrs[0], tmp_path)}
    assert listed == {(status["account"], status["peer_id"]), (mallory.account, "fake")}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_shut_down_cleanly_leaving_no_p2pd(swarm: PeerSwarm, sig: int) -> None:
    peer = swarm.start()
    members = group_members(peer.proc.pid)
    assert any(p.name() == "p2pd" for p in members), [p.name() for p in members]
    assert peer.stop(sig) == 0
    wait_until(lambda: not group_members(peer.proc.pid), 10, "the peer's p2pd to exit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("option", ["--listen", "--announce", "--initial-peers"])
def test_invalid_multiaddr(tmp_path: Path, option: str) -> None:
    result = run_cli("peer", "start", option, "/ip4/300.1.2.3/tcp/1", env=cli_env(tmp_path))
    _assert_one_line_error(result, option, "'/ip4/300.1.2.3/tcp/1'", "not a valid multiaddr")


def test_peers_with_an_invalid_multiaddr(tmp_path: Path) -> None:
    result = run_cli("peers", "--initial-peers", "not-a-maddr", env=cli_env(tmp_path))
    _assert_one_line_error(result, "--initial-peers", "'not-a-maddr'")


@pytest.mark.parametrize("command", [("peer", "start"), ("peers",)])
def test_unreachable_initial_peers_fail_within_a_bounded_time(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    nobody = f"/ip4/127.0.0.1/tcp/{_free_port()}/p2p/12D3KooWSLaNJXX2bjjjauqFjtUNGhTbjVbRMpnZgFntj6fzaKjL"
    started = time.monotonic()
    result = run_cli(*command, "--initial-peers", nobody, env=cli_env(tmp_path), timeout=45)
    assert time.monotonic() - started < 30
    _assert_one_line_error(result, "cannot reach any of the initial peers", nobody)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("peer", "start", "--listen", f"/ip4/127.0.0.1/tcp/{port}", env=cli_env(tmp_path))
    _assert_one_line_error(result, f"port {port} is already in use")


def test_explicit_missing_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    result = run_cli("peer", "start", "--identity", str(missing), env=cli_env(tmp_path))
    _assert_one_line_error(result, str(missing), "does not exist")


def test_malformed_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"\x00\x01garbage")
    result = run_cli("peer", "start", "--identity", str(bad), env=cli_env(tmp_path))
    _assert_one_line_error(result, str(bad), "malformed")
