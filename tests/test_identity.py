"""`hivemarket identity`: key files, their mode, and the errors users see."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from peer.cli import main
from peer.protocol.identity import Identity, IdentityError, load_identity, save_identity
from tests.harness import cli_env, run_cli


def test_new_writes_pkcs8_pem_with_mode_0600_and_show_prints_the_account(tmp_path: Path) -> None:
    env = {**cli_env(tmp_path), "HIVEMARKET_HOME": str(tmp_path / "home")}
    created = run_cli("identity", "new", env=env)
    assert created.returncode == 0, created.stderr
    key_file = tmp_path / "home" / "identity.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # unencrypted PKCS8
    public = serialization.load_pem_private_key(pem, None).public_key()
    expected = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    assert created.stdout.strip() == expected

    shown = run_cli("identity", "show", env=env)
    assert shown.stdout.strip() == expected
    as_json = json.loads(run_cli("identity", "show", "--json", env=env).stdout)
    assert as_json["account"] == expected and len(expected) == 64


def test_new_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    key_file = tmp_path / "me.pem"
    first = run_cli("identity", "new", "--path", str(key_file), env=env).stdout.strip()
    refused = run_cli("identity", "new", "--path", str(key_file), env=env)
    assert refused.returncode == 2
    assert "already exists" in refused.stderr and "--force" in refused.stderr
    assert run_cli("identity", "show", "--path", str(key_file), env=env).stdout.strip() == first
    forced = run_cli("identity", "new", "--path", str(key_file), "--force", env=env)
    assert forced.returncode == 0 and forced.stdout.strip() != first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_show_missing_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    result = run_cli("identity", "show", "--path", str(missing), env=cli_env(tmp_path))
    _assert_one_line_error(result, str(missing), "does not exist")


def test_show_malformed_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    result = run_cli("identity", "show", "--path", str(bad), env=cli_env(tmp_path))
    _assert_one_line_error(result, str(bad), "malformed")


def test_show_key_of_the_wrong_type(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "ec.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    result = run_cli("identity", "show", "--path", str(other), env=cli_env(tmp_path))
    _assert_one_line_error(result, "not an Ed25519 key")


def _run_cli_as_nobody(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a forked child that dropped root (root reads any file, whatever its mode)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            sys.stderr = os.fdopen(write_end, "w")  # pytest replaced sys.stderr in this process
            os.setgid(65534)
            os.setuid(65534)
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as err:
        stderr = err.read()
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), "", stderr)


def test_show_unreadable_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "me.pem"
    save_identity(Identity.generate(), key_file)
    key_file.chmod(0)
    if os.geteuid() == 0:
        tmp_path.chmod(0o755)
        result = _run_cli_as_nobody("identity", "show", "--path", str(key_file))
    else:
        result = run_cli("identity", "show", "--path", str(key_file), env=cli_env(tmp_path))
    _assert_one_line_error(result, str(key_file), "permission denied")


def test_load_rejects_encrypted_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "enc.pem"
    key_file.write_bytes(
        Identity.generate().private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(IdentityError, match="encrypted"):
        load_identity(key_file)


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    identity = Identity.generate()
    save_identity(identity, tmp_path / "a" / "b.pem")
    assert load_identity(tmp_path / "a" / "b.pem").account == identity.account
