"""Every command of the CLI: --help shows an example, and --json is there wherever it lists or reports.

The commands are found by walking the real click tree, so a new command is checked without being listed
here; only the commands that serve until Ctrl-C (and so report nothing at the end) are named, as the
ones without --json.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from peer.cli import main

#: Commands that run until stopped; they print their addresses as they start, not a report.
SERVERS = {"coordinator serve", "data serve", "peer start", "rent"}


def _commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    ctx = click.Context(group)
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        path = (*prefix, name)
        found.append((path, command))
        if isinstance(command, click.Group):
            found += _commands(command, path)
    return found


COMMANDS = _commands(main)
LEAVES = [(path, c) for path, c in COMMANDS if not isinstance(c, click.Group)]


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(path) for path, _ in LEAVES}
    assert {"rent", "launch", "runs show", "runs fetch", "offers", "demo", "data pack", "peer start"} <= names
    assert names >= SERVERS


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_shows_an_example(path: tuple[str, ...], command: click.Command) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output, f"hivemarket {' '.join(path)} --help has no example"
    example = result.output.split("Example:", 1)[1]
    assert f"hivemarket {path[0]}" in example or "python" in example, example


@pytest.mark.parametrize(("path", "command"), LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_json_wherever_a_command_reports(path: tuple[str, ...], command: click.Command) -> None:
    options = {opt for param in command.params if isinstance(param, click.Option) for opt in param.opts}
    if " ".join(path) in SERVERS:
        assert "--json" not in options
    else:
        assert "--json" in options, f"hivemarket {' '.join(path)} has no --json"


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "show"],  # a missing argument
        ["offers", "--sort"],  # an option without its value
        ["launch", "no-such-spec.toml", "--budget", "1", "--max-price", "1"],
        ["rent", "--price-per-hour", "-1", "--coordinator", "http://127.0.0.1:9"],
        ["rent", "--price-per-hour", "1", "--coordinator", "http://x:9", "--announce", "/ip4/300.1.2.3"],
        ["peer", "start", "--client-mode"],  # nobody to be dialed through
        ["peer", "start", "--metrics-port", "70000"],
        ["peers", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"],  # no /p2p/ID: an address, not a peer
    ],
    ids=lambda args: " ".join(args[:2] + args[-1:]),
)
def test_usage_errors_exit_2_with_one_line(args: list[str], tmp_path) -> None:
    result = CliRunner().invoke(main, args, env={"HIVEMARKET_HOME": str(tmp_path)})
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert "Error" in result.output
