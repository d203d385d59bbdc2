"""The run spec: the example loads, every kind of mistake is one line naming the field, the reason and the
value, and ``hivemarket launch`` reports them (and bad ``--peers``) before it contacts anybody."""

from __future__ import annotations

import copy
import math
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from peer.launch import Progress, _peers_range
from peer.protocol.commands import InputError
from peer.protocol.identity import Identity
from peer.protocol.run_schemas import RunView
from peer.protocol.spec import RunSpec, SpecError, load_spec, validate_spec
from peer.tasks import load_task
from tests.harness import REPO, cli_env, minimal_spec, peer_view, run_cli, start_coordinator
from tests.harness import run_view as harness_run_view

EXAMPLE = REPO / "examples" / "digits.toml"
DIGITS_SAMPLES = 1797
VERSION = "0123456789abcdef" * 4


def example_data() -> dict[str, Any]:
    """The example spec as plain data, to be broken one field at a time."""
    return tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))


def changed(**sections: Any) -> dict[str, Any]:
    """The example with top-level keys replaced; a dict value is merged into that section, except for
    ``stop``, whose keys are alternatives: it is replaced whole."""
    data = example_data()
    for key, value in sections.items():
        if key != "stop" and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def spec_error(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        validate_spec(data)
    message = str(caught.value)
    assert "\n" not in message, "a spec error is one line"
    return message


# ------------------------------------------------------------------------------------------------ the example


def test_example_spec_loads_and_its_comments_are_right() -> None:
    spec = load_spec(EXAMPLE)
    assert (spec.name, spec.task, dict(spec.options)) == ("digits-mlp", "digits-mlp", {"hidden": 64})
    assert (spec.peers.min, spec.peers.max) == (2, 3)
    assert (spec.batch.target, spec.batch.per_peer) == (256, 32)
    assert spec.dataset.location == "coordinator" and spec.dataset.version is None
    # "passes over the training split (1,438 samples): 11,504 samples, 45 steps"
    train = sum(
        1 for i in range(DIGITS_SAMPLES) if i % spec.dataset.test_every != spec.dataset.test_every - 1
    )
    assert train == 1438
    assert spec.target_samples(train) == 11504
    assert math.ceil(spec.target_samples(train) / spec.batch.target) == 45
    # the task it names is installed and accepts its options
    assert load_task(spec.task, dict(spec.options)).values == {"hidden": 64}


# ----------------------------------------------------------------------------------------------- field errors

# (changes to the example, the message's dotted path, words of the reason, the quoted value or None)
FIELD_ERRORS = [
    pytest.param({"bogus": 1}, "spec.bogus", "Extra inputs are not permitted", "(got 1)", id="unknown-key"),
    pytest.param(
        {"batch": {"size": 64}},
        "spec.batch.size",
        "Extra inputs are not permitted",
        "(got 64)",
        id="unknown-key-in-section",
    ),
    pytest.param(
        {"batch": {"target": "lots"}}, "spec.batch.target", "valid integer", "(got 'lots')", id="wrong-type"
    ),
    pytest.param({"stop": 5}, "spec.stop", "valid dictionary", "(got 5)", id="section-not-a-table"),
    pytest.param(
        {"optimizer": {"name": "rmsprop"}},
        "spec.optimizer.name",
        "'sgd', 'adam' or 'adamw'",
        "(got 'rmsprop')",
        id="bad-choice",
    ),
    pytest.param(
        {"batch": {"target": 0}}, "spec.batch.target", "greater than or equal to 1", "(got 0)", id="too-small"
    ),
    pytest.param(
        {"optimizer": {"lr": 0}}, "spec.optimizer.lr", "greater than 0", "(got 0)", id="not-positive"
    ),
    pytest.param(
        {"verification": {"rate": 1.5}},
        "spec.verification.rate",
        "less than or equal to 1",
        "(got 1.5)",
        id="too-large",
    ),
    pytest.param(
        {"name": "bad name!"}, "spec.name", "should match pattern", "(got 'bad name!')", id="name-with-space"
    ),
    pytest.param(
        {"name": "-leading"}, "spec.name", "should match pattern", "(got '-leading')", id="name-leading-dash"
    ),
    pytest.param({"task": "a/b"}, "spec.task", "should match pattern", "(got 'a/b')", id="task-pattern"),
    pytest.param(
        {"dataset": {"version": "XYZ"}},
        "spec.dataset.version",
        "should match pattern",
        "(got 'XYZ')",
        id="version-not-hex",
    ),
    pytest.param(
        {"dataset": {"version": "A" * 64}},
        "spec.dataset.version",
        "should match pattern",
        "(got 'AAAA",
        id="version-uppercase",
    ),
    pytest.param(
        {"stop": {"samples": 100, "epochs": 2}},
        "spec.stop",
        "set exactly one of samples and epochs",
        None,
        id="stop-both",
    ),
    pytest.param({"stop": {}}, "spec.stop", "set exactly one of samples and epochs", None, id="stop-neither"),
    pytest.param(
        {"averaging": {"matchmaking_seconds": 5, "timeout_seconds": 5}},
        "spec.averaging",
        "timeout_seconds (5) must exceed matchmaking_seconds (5)",
        None,
        id="timeout-equal-matchmaking",
    ),
    pytest.param(
        {"averaging": {"matchmaking_seconds": 5, "timeout_seconds": 2.5}},
        "spec.averaging",
        "timeout_seconds (2.5) must exceed matchmaking_seconds (5)",
        None,
        id="timeout-below-matchmaking",
    ),
    pytest.param(
        {"peers": {"min": 3, "max": 2}},
        "spec.peers",
        "max (2) is below min (3)",
        None,
        id="peers-max-below-min",
    ),
]


@pytest.mark.parametrize(("changes", "path", "reason", "quoted"), FIELD_ERRORS)
def test_a_mistake_names_the_field_the_reason_and_the_value(
    changes: dict[str, Any], path: str, reason: str, quoted: str | None
) -> None:
    message = spec_error(changed(**changes))
    assert message.startswith(f"{path}: "), message
    assert reason in message
    if quoted is not None:
        assert quoted in message


def test_a_missing_field_is_named() -> None:
    data = example_data()
    del data["task"]
    assert spec_error(data) == "spec.task: Field required"
    data = example_data()
    del data["dataset"]["location"]
    assert spec_error(data) == "spec.dataset.location: Field required"


def test_per_peer_above_target_is_reported_under_batch() -> None:
    """Like every other mistake, it starts with its section's path (the API reports it as the field)."""
    message = spec_error(changed(batch={"target": 16, "per_peer": 32}))
    assert message == "spec.batch: per_peer (32) exceeds target (16)"


def test_a_long_value_is_cut_short() -> None:
    message = spec_error(changed(name="a" * 200))
    assert message.startswith("spec.name: ")
    assert "(got 'aaaa" in message and message.endswith("...)")
    assert len(message) < 200


def test_per_peer_equal_to_target_and_timeout_above_matchmaking_are_fine() -> None:
    spec = validate_spec(
        changed(
            batch={"target": 32, "per_peer": 32},
            averaging={"matchmaking_seconds": 5, "timeout_seconds": 5.5},
            peers={"min": 3, "max": 3},
        )
    )
    assert (spec.batch.per_peer, spec.averaging.timeout_seconds, spec.peers.max) == (32, 5.5, 3)


# ------------------------------------------------------------------------------------------------ files


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[batch\n', encoding="utf-8")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path} is not valid TOML")


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path} is not valid TOML")


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"cannot read spec {path}: ")
    assert "No such file" in str(caught.value)


def test_a_field_error_in_a_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(EXAMPLE.read_text(encoding="utf-8").replace("per_peer = 32", "per_peer = 0"))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: spec.batch.per_peer: Input should be greater than or equal")


# ------------------------------------------------------------------------------------------------ RunSpec


def test_target_samples() -> None:
    by_samples = validate_spec(minimal_spec("a", stop={"samples": 1000}))
    assert by_samples.target_samples(1438) == 1000
    assert by_samples.target_samples(1) == 1000  # the training split does not matter
    by_epochs = validate_spec(minimal_spec("b", stop={"epochs": 2.5}))
    assert by_epochs.target_samples(1438) == 3595
    assert by_epochs.target_samples(100) == 250
    tiny = validate_spec(minimal_spec("c", stop={"epochs": 0.001}))
    assert tiny.target_samples(100) == 1  # never a run of zero samples


def test_unresolved_names_what_launch_fills_in() -> None:
    neither = validate_spec(changed())
    assert neither.unresolved() is not None
    assert neither.unresolved().startswith("spec.dataset.version: required")
    with_version = validate_spec(changed(dataset={"version": VERSION}))
    assert with_version.unresolved().startswith("spec.stop.samples: required")
    resolved = validate_spec(changed(dataset={"version": VERSION}, stop={"samples": 11504}))
    assert resolved.unresolved() is None


def test_the_spec_round_trips_through_json() -> None:
    """What the launcher posts (model_dump) is what the coordinator and the peers validate again."""
    spec = validate_spec(changed(dataset={"version": VERSION}, stop={"samples": 11504}))
    again = validate_spec(copy.deepcopy(spec.model_dump(mode="json", exclude_none=True)))
    assert again == spec
    assert isinstance(again, RunSpec)


# ------------------------------------------------------------------------------------------------ launch


def test_peers_range() -> None:
    spec = load_spec(EXAMPLE)
    assert _peers_range(None, spec) == (2, 3)
    assert _peers_range("2:4", spec) == (2, 4)
    assert _peers_range("3", spec) == (3, 3)
    for bad in ("3:2", "0:2", "x", "2:y", ":3", ""):
        with pytest.raises(InputError) as caught:
            _peers_range(bad, spec)
        assert caught.value.message.startswith(f"--peers {bad!r}: "), bad


def _launch(tmp_path: Path, spec: Path, *extra: str) -> tuple[int, list[str], str]:
    """Run ``hivemarket launch`` against an address nobody listens on; (exit status, Error lines, all)."""
    result = run_cli(
        "launch",
        str(spec),
        "--budget",
        "1",
        "--max-price",
        "1",
        "--coordinator",
        "http://127.0.0.1:9",
        *extra,
        env=cli_env(tmp_path),
        timeout=30,
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    return result.returncode, errors, output


def test_launch_reports_a_bad_spec_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text(encoding="utf-8").replace("target = 256", "target = 0"))
    code, errors, output = _launch(tmp_path, bad)
    assert code == 2, output
    assert errors == [f"Error: {bad}: spec.batch.target: Input should be greater than or equal to 1 (got 0)"]
    assert "Traceback" not in output
    assert "127.0.0.1:9" not in output  # validation comes before any request


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("3:2", "need 1 <= MIN <= MAX"),
        ("x", "expected MIN:MAX"),
        ("1:1", "peers_min (1) must be at least 2 when spec.verification.rate > 0"),  # the server's rule
    ],
)
def test_launch_refuses_bad_peers_before_contacting_the_coordinator(
    tmp_path: Path, value: str, reason: str
) -> None:
    code, errors, output = _launch(tmp_path, EXAMPLE, "--peers", value)
    assert code == 2, output
    assert len(errors) == 1 and errors[0].startswith(("Error: --peers ", f"Error: --peers {value!r}: ")), (
        output
    )
    assert reason in errors[0]
    assert "Traceback" not in output
    assert "127.0.0.1:9" not in output  # resolving the dataset would have tried (and logged) the URL


def test_launch_at_a_coordinator_without_datasets_says_how_to_serve_one(tmp_path: Path) -> None:
    coordinator = start_coordinator(tmp_path / "coordinator", Identity.generate())
    try:
        result = run_cli(
            "launch",
            str(EXAMPLE),
            "--budget",
            "1",
            "--max-price",
            "1",
            "--coordinator",
            coordinator.url,
            env=cli_env(tmp_path),
            timeout=60,
        )
    finally:
        coordinator.stop()
    assert result.returncode == 2, result.stderr
    assert (
        f"Error: finding the dataset: spec.dataset: {coordinator.url} serves no dataset; start the "
        "coordinator with --dataset" in result.stderr
    )


def test_launch_names_an_unreachable_coordinator_before_anything_about_datasets(tmp_path: Path) -> None:
    result = run_cli(
        *("launch", str(EXAMPLE), "--budget", "1", "--max-price", "1", "--coordinator", "http://127.0.0.1:9"),
        env=cli_env(tmp_path, HIVEMARKET_RETRIES="1"),
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Error: reaching the coordinator: cannot reach the coordinator at http://127.0.0.1:9 after 2 attempts"
    ), result.stderr
    assert lines[0].endswith(
        "; check --coordinator (or $HIVEMARKET_COORDINATOR) and that `hivemarket coordinator serve` runs"
        " there"
    )
    assert "dataset" not in result.stderr


# ------------------------------------------------------------------------------------------------ progress

ACCOUNT = "ab" * 32


def run_view(samples: int, target: int = 1000, loss: float | None = None, active: int = 2) -> RunView:
    """A running run with ``active`` active peers and one that dropped."""
    peers = [peer_view(f"{i:02x}" * 32) for i in range(active)] + [peer_view(ACCOUNT, "dropped")]
    return harness_run_view(
        peers,
        owner=ACCOUNT,
        escrow="4",
        spent=Decimal("1.25"),
        target_samples=target,
        samples=samples,
        epoch=samples // 256,
        loss=loss,
    )


def test_progress_line_before_any_sample() -> None:
    line = Progress(started=100.0).line(run_view(0), now=105.0)
    assert "[" + "." * 24 + "] 0/1000 samples" in line
    assert "loss -" in line
    assert "peers 2" in line  # the dropped peer is not counted
    assert "spent 1.25" in line
    assert "eta -" in line
    assert line.endswith("running")


def test_progress_line_shows_loss_peers_and_an_eta_once_samples_advance() -> None:
    progress = Progress(started=100.0)
    first = progress.line(run_view(200, loss=2.25, active=3), now=110.0)
    assert "200/1000 samples" in first and "loss 2.2500" in first and "peers 3" in first
    assert "eta -" in first  # one observation gives no rate yet
    second = progress.line(run_view(400, loss=1.5, active=3), now=120.0)
    assert "400/1000 samples" in second and "loss 1.5000" in second
    assert "eta 30s" in second  # 200 samples in 10 s; 600 to go
    assert "[" + "#" * 9 + "." * 15 + "]" in second  # 40% of 24


def test_progress_line_never_shows_more_than_the_target() -> None:
    progress = Progress(started=0.0)
    progress.line(run_view(900), now=1.0)
    line = progress.line(run_view(1200), now=2.0)
    assert "1000/1000 samples" in line and "[" + "#" * 24 + "]" in line
    assert "eta 0s" in line


def test_every_example_spec_loads_and_its_task_accepts_its_options() -> None:
    for path in sorted(EXAMPLE.parent.glob("*.toml")):
        spec = load_spec(path)
        assert load_task(spec.task, dict(spec.options)).values == dict(spec.options), path
