"""The README's three user stories, run with the commands it shows, as three users on one machine:

- a GPU owner rents out its machine (``hivemarket rent --price-per-hour 1.20``),
- someone runs a peer node that volunteers for runs (``hivemarket peer start --coordinator URL``),
- a researcher launches ``examples/digits.toml`` and follows it to the end, then lists, shows and
  fetches the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from peer.model_file import load_model_file
from peer.protocol.identity import Identity
from tests.harness import cli_env, group_members, kill_group, run_cli, start_coordinator, wait_until

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
FAST = {
    "HIVEMARKET_HEARTBEAT_INTERVAL": "1",
    "HIVEMARKET_CLEARING_INTERVAL": "1",
    "HIVEMARKET_PROBE_SECONDS": "0.3",
}


def _cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_cli(*args, env=cli_env(home, **FAST), timeout=timeout)


def _spawn(args: list[str], home: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "peer", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(home, **FAST),
            start_new_session=True,
        )


@pytest.mark.timeout(300)
def test_rent_volunteer_and_launch_as_the_readme_shows(tmp_path: Path):
    digits = tmp_path / "digits"
    assert _cli(tmp_path / "admin", "data", "example", "digits", str(digits)).returncode == 0
    server = start_coordinator(
        tmp_path / "coordinator",
        Identity.generate(),
        env=cli_env(tmp_path / "coordinator", **FAST),
        args=["--dataset", str(digits)],
    )
    url = server.url
    launcher_home = tmp_path / "launcher"
    launcher = _cli(launcher_home, "identity", "show").stdout.strip()
    admin_key = server.home / "admin.pem"
    deposit = _cli(
        launcher_home, "deposit", launcher, "10", "--admin-key", str(admin_key), "--coordinator", url
    )
    assert deposit.returncode == 0, deposit.stderr

    renter_home, volunteer_home = tmp_path / "renter", tmp_path / "volunteer"
    renter_account = _cli(renter_home, "identity", "show").stdout.strip()
    volunteer_account = _cli(volunteer_home, "identity", "show").stdout.strip()
    peers = [
        _spawn(
            ["rent", "--coordinator", url, "--price-per-hour", "1.20", "--listen", LOOPBACK],
            renter_home,
            tmp_path / "renter.log",
        ),
        _spawn(
            ["peer", "start", "--listen", LOOPBACK, "--coordinator", url],
            volunteer_home,
            tmp_path / "volunteer.log",
        ),
    ]
    try:

        def offers() -> bool:
            listed = _cli(launcher_home, "offers", "--coordinator", url, "--json")
            return len(json.loads(listed.stdout or "[]")) == 2

        wait_until(offers, 90, "both offers to be posted")
        # Before paying: what the market would give the run and what it would cost (nothing is created).
        dry = _cli(
            launcher_home,
            *("launch", str(REPO / "examples" / "digits.toml"), "--max-price", "1000", "--peers", "2:2"),
            *("--coordinator", url, "--dry-run", "--json"),
        )
        assert dry.returncode == 0, dry.stderr
        estimate = json.loads(dry.stdout)
        assert (estimate["peers"], estimate["basis"], estimate["steps"]) == (2, "probe", 45)
        launched = _cli(
            launcher_home,
            *("launch", str(REPO / "examples" / "digits.toml"), "--budget", "5", "--max-price", "1000"),
            *("--peers", "2:2", "--coordinator", url, "--json"),
            timeout=240,
        )
        assert launched.returncode == 0, launched.stderr[-3000:]
        run = json.loads(launched.stdout)
        assert run["state"] == "finished", run["reason"]
        assert run["samples"] >= run["target_samples"] == 11504
        by_account = {p["account"]: p for p in run["peers"]}
        assert by_account[renter_account]["samples"] > 0 and Decimal(by_account[renter_account]["paid"]) > 0
        assert by_account[volunteer_account]["samples"] > 0
        # A volunteer asks 0 but, like every seller in a uniform-price round, is paid the clearing price.
        assert Decimal(by_account[volunteer_account]["paid"]) > 0
        assert Decimal(run["spent"]) + Decimal(run["refunded"]) == Decimal("5")
        # launch evaluates the model on the held-out split (fetched from the coordinator) against the start
        held_out = run["held_out"]
        assert held_out is not None and held_out["samples"] == 359, held_out  # every 5th of 1,797
        assert held_out["final_loss"] < held_out["initial_loss"], held_out
        assert held_out["accuracy"] > held_out["initial_accuracy"], held_out
        # The estimate's range holds what the run cost (docs/training.md states the error measured).
        low, mid, high = (Decimal(c) for c in estimate["cost"])
        print(f"dry-run cost {low} {mid} {high}, spent {run['spent']}")
        assert low <= Decimal(run["spent"]) <= high, (estimate, run["spent"])
        # Once this market has measured the task, the next estimate rests on the measurement.
        again = _cli(
            launcher_home,
            *("launch", str(REPO / "examples" / "digits.toml"), "--max-price", "1000", "--peers", "2:2"),
            *("--coordinator", url, "--dry-run", "--json"),
        )
        measured = json.loads(again.stdout)
        print(f"measured dry-run cost {measured['cost']}")
        assert measured["basis"] == "measured", again.stdout

        listed = json.loads(_cli(launcher_home, "runs", "--coordinator", url, "--json").stdout)
        assert [r["id"] for r in listed] == [run["id"]]
        shown = _cli(launcher_home, "runs", "show", run["id"], "--coordinator", url)
        assert "finished" in shown.stdout and renter_account[:12] in shown.stdout
        model = tmp_path / "model.pt"
        fetched = _cli(launcher_home, "runs", "fetch", run["id"], str(model), "--coordinator", url)
        assert fetched.returncode == 0 and run["model"]["sha256"] in fetched.stdout
        _, _, saved = load_model_file(model)
        assert saved["task"] == "digits-mlp" and saved["epoch"] >= 40

        detached = _cli(
            launcher_home,
            *("launch", str(REPO / "examples" / "digits.toml"), "--budget", "2", "--max-price", "1000"),
            *("--peers", "2:2", "--coordinator", url, "--detach", "--json"),
        )
        second = json.loads(detached.stdout)
        assert second["state"] == "recruiting" and Decimal(second["escrow"]) == 2
        cancelled = _cli(launcher_home, "runs", "cancel", second["id"], "--coordinator", url)
        assert cancelled.returncode == 0 and "refunded" in cancelled.stdout, cancelled.stderr
        shown = _cli(launcher_home, "runs", "show", second["id"], "--coordinator", url, "--json")
        second = json.loads(shown.stdout)
        assert second["state"] == "cancelled"
        assert Decimal(second["spent"]) + Decimal(second["refunded"]) == 2 and Decimal(second["escrow"]) == 0

        earned = json.loads(
            _cli(renter_home, "account", renter_account, "--coordinator", url, "--json").stdout
        )
        mine = by_account[renter_account]  # paid for its verified reports, and fees for auditing others
        assert Decimal(earned["earned"]) == Decimal(mine["paid"]) + Decimal(mine["fees"])
    finally:
        for proc in peers:
            kill_group(proc.pid)
            proc.wait(timeout=30)
        server.stop()
        left = [p for proc in peers for p in group_members(proc.pid)] + group_members(server.proc.pid)
        assert not left, f"processes left behind: {left}"
