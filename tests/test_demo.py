"""``hivemarket demo`` end to end, as a user runs it: one command, one JSON object, nothing left behind.

It runs with the four cheats of ``--adversaries`` (the plain demo is the same run without them): the
swarm trains through a drop and through the cheats' noise, every cheat is caught and banned, and nobody is
paid for an epoch that failed its audits. ``--example adapt_minilm`` runs the LoRA adaptation of MiniLM
through a drop the same way. ``--example`` offers every spec of examples/."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import psutil
import pytest

from peer.adversary import KINDS
from tests.harness import DemoProcess, cli_env, group_members, kill_group, marked, wait_until

ROOT = Path(__file__).resolve().parents[1]
MARK = "DEMO_TEST_RUN"  # inherited by every process the demo starts, p2pd included


def run_demo_json(home: Path, *args: str, timeout: float) -> dict:
    """``hivemarket demo --json ARGS`` to its end: its result, once the test checked that it left no
    process and no p2pd daemon behind (its peers have sessions of their own: they are found by a mark in
    the environment they inherit, not by a diff of every p2pd, which tests running beside it change)."""
    value = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer", "demo", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(home, **{MARK: value}),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc.pid)
    assert proc.returncode == 0, err[-4000:]
    assert not group_members(proc.pid), "the demo left processes behind"
    assert not marked(MARK, value), "the demo left processes behind (p2pd daemons included)"
    return json.loads(out)


def check_drop_and_ledger(result: dict) -> list[dict]:
    """The killed peer is not paid after its drop, the survivors are paid, and every unit the launcher
    spent reached a peer or a validator; the honest peers' ledger rows."""
    assert len(result["dropped"]) == 1
    ledger = result["ledger"]
    assert ledger["conserved"] is True
    peers = [a for a in ledger["accounts"] if a["role"] == "peer"]
    cheats = [a for a in ledger["accounts"] if a["role"] == "cheat"]
    (launcher,) = [a for a in ledger["accounts"] if a["role"] == "launcher"]
    (dropped,) = [a for a in peers if a["account"] in result["dropped"]]
    assert Decimal(dropped["paid_after_drop"]) == 0, dropped
    survivors = [a for a in peers if a is not dropped]
    assert all(a["samples"] > 0 and Decimal(a["paid"]) > 0 for a in survivors), survivors
    assert sum(a["samples"] for a in peers + cheats) == result["samples"]  # voided samples do not count
    paid = sum(Decimal(a["paid"]) + Decimal(a["fees"]) for a in peers + cheats)
    assert paid == Decimal(launcher["spent"])  # every unit the launcher spent reached a peer or a validator
    assert Decimal(launcher["spent"]) + Decimal(launcher["refunded"]) == Decimal(launcher["budget"])
    return peers


@pytest.mark.timeout(600)
def test_demo_trains_through_a_drop_and_four_cheats_and_settles_the_ledger(tmp_path: Path):
    result = run_demo_json(tmp_path, "--adversaries", ",".join(KINDS), timeout=540)

    assert result["accuracy"] >= 0.85, result
    assert result["final_loss"] < result["initial_loss"] / 5, result
    assert result["peers"] == 3
    assert result["round_bytes"] == result["model_bytes"] > 0  # digits averages every parameter
    check_drop_and_ledger(result)

    assert sorted(a["kind"] for a in result["adversaries"]) == sorted(KINDS)
    for cheat in result["adversaries"]:
        assert cheat["caught"], cheat  # banned too, once a second failed epoch is confirmed (most runs)
        assert Decimal(cheat["paid_for_failed_epochs"]) == 0, cheat
        if cheat["kind"] in ("free-rider", "random-gradient"):  # nothing of theirs can pass an audit
            assert Decimal(cheat["paid"]) == 0, cheat
        # the replay's first epoch is honest work; an inflated report whose draw missed its made-up
        # micro-batches passes (probability about 1/4 per report): both are paid for those epochs only
    assert result["audits"]["passed"] > 0 and result["audits"]["failed"] >= len(KINDS)


@pytest.mark.timeout(600)
def test_the_adaptation_example_trains_through_a_drop_averaging_only_its_adapters(tmp_path: Path):
    """``demo --example adapt_minilm``: MiniLM with LoRA on the python-code pairs, 3 peers, one killed. The
    held-out loss falls, the work is audited and paid, and a round carries the adapters only."""
    result = run_demo_json(tmp_path, "--example", "adapt_minilm", "--samples", "640", timeout=560)

    assert result["spec"] == "adapt_minilm.toml" and result["dataset"] == "python-code"
    assert result["final_loss"] < result["initial_loss"], result
    assert 0 < result["round_bytes"] < 0.05 * result["model_bytes"], result  # 0.5% with layers = 2
    assert result["audits"]["passed"] > 0 and result["audits"]["failed"] == 0, result["audits"]
    check_drop_and_ledger(result)


def test_the_demo_offers_every_example_spec() -> None:
    from peer.cli import demo

    (option,) = [p for p in demo.params if p.name == "example"]
    assert sorted(option.type.choices) == sorted(p.stem for p in (ROOT / "examples").glob("*.toml"))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--adversaries", "free-rider,bogus"], "--adversaries: 'bogus' is not a cheat this demo knows"),
        (["--peers", "2"], "--peers 2: a demo that kills a peer needs at least 3"),
        (["--example", "mnist"], "'mnist' is not one of 'digits', 'bytes_lm', 'adapt_minilm', 'llama_tiny'"),
    ],
)
def test_demo_refuses_bad_options_before_starting_anything(
    tmp_path: Path, args: list[str], words: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "peer", "demo", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=60,
    )
    assert done.returncode == 2 and words in done.stderr, done.stderr


@pytest.mark.timeout(180)
def test_sigterm_stops_the_demo_and_everything_it_started(tmp_path: Path) -> None:
    """``kill``, a supervisor or a test's clean-up stop the demo the way Ctrl-C does: the coordinator and
    every peer (each in a process group of its own, so signalling the demo's group does not reach them)
    stop with it."""
    demo = DemoProcess(tmp_path, "--peers", "3")
    try:
        wait_until(lambda: len(demo.printed(r"^peer-\d+\s+metrics ")) == 3, 120, "three peers to start")
        started = psutil.Process(demo.proc.pid).children(recursive=True)
        assert len(started) >= 4, started  # the coordinator and three peers, with what they started
        os.kill(demo.proc.pid, signal.SIGTERM)  # the demo alone, as `kill PID` does
        demo.proc.wait(timeout=60)
    finally:
        kill_group(demo.proc.pid)
    assert demo.proc.returncode != 0
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"the demo left {alive} running after SIGTERM:\n{''.join(demo.lines)[-2000:]}"
