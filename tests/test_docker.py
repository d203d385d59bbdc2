"""The Docker images (docker/Dockerfile.*) and the compose market (docker/compose.yml), checked without a
docker engine.

No engine runs here, so nothing is built. What can go wrong without a build is checked instead: each
image's command is read out of its Dockerfile the way docker reads it (ENV defaults, exec-form JSON),
must name a real `hivemarket` command whose options click accepts, and is then *run* in this
virtualenv with a temporary folder standing in for the image's volume: the coordinator image's command
must answer /healthz (and the images' health checks must pass against it), the peer image's command must
post an offer to it, and both must come back as the same coordinator and account from the same volume.
The coordinator image's command also runs as compose.yml's two replicas do: twice at once on one volume
and one PostgreSQL database (a throwaway server, tests/postgres.py). compose.yml and the README's `docker`
commands are checked against the same commands, with their environment.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock
from urllib.parse import urlsplit

import click
import pytest
import yaml

from coordinator.settings import ServerSettings
from peer.cli import main
from peer.protocol.client import CoordinatorClient, parse_coordinator_urls
from peer.protocol.identity import Identity, load_identity
from peer.protocol.money import parse_money
from tests.harness import FAST_ENV, REPO, group_members, kill_group, marked, wait_until
from tests.postgres import PostgresServer

T = TypeVar("T")
DOCKER = REPO / "docker"
PEER_IMAGE = DOCKER / "Dockerfile.peer"
COORDINATOR_IMAGE = DOCKER / "Dockerfile.coordinator"
COMPOSE = DOCKER / "compose.yml"
COMPOSE_GPU = DOCKER / "compose.gpu.yml"
#: The programs that may wrap the command as PID 1; the test runs what they start.
INIT_WRAPPERS = (["tini", "--"],)
#: What each image installs of this project: the coordinator also its PostgreSQL driver.
PROJECT_INSTALLED = {PEER_IMAGE: ".", COORDINATOR_IMAGE: ".[postgres]"}


# -------------------------------------------------------------------------------------------- Dockerfile


@dataclass
class Image:
    """What a Dockerfile's final stage leaves in its image: the parts that decide what the container runs."""

    base: str = ""
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    user: str | None = None
    copies: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        """What docker executes: ENTRYPOINT followed by CMD."""
        return [*self.entrypoint, *self.cmd]


def logical_lines(text: str) -> Iterator[str]:
    """Instructions with their backslash continuations joined; comments (parser directives included, as
    `# syntax=` is one) and blank lines dropped, also between continued lines, as docker does."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    assert not pending, f"the Dockerfile ends inside a continued line: {pending!r}"


def exec_form(value: str, where: str) -> list[str]:
    """A JSON list of strings: the only form in which docker runs the command itself, with no `/bin/sh -c`
    in front that would be PID 1 and swallow `docker stop`'s SIGTERM."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{where} is not in exec form (a JSON list): {value!r}: {e}") from None
    assert isinstance(parsed, list) and parsed, f"{where} is not a non-empty JSON list: {value!r}"
    assert all(isinstance(word, str) for word in parsed), f"{where} holds a non-string: {value!r}"
    return parsed


def parse_dockerfile(path: Path) -> Image:
    """The final stage of a Dockerfile. Enough of the format for these images: ENV only in its
    `KEY=VALUE ...` form (the legacy `ENV KEY VALUE` is refused: one variable, value up to the line's end),
    commands only in exec form, and ENV values expanded from earlier ENV lines like docker does (a
    variable of the base image, such as $PATH, is left as written)."""
    image = Image()
    for line in logical_lines(path.read_text()):
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        where = f"{path.name}: {instruction}"
        if instruction == "FROM":
            image = Image(base=rest.split()[0])
        elif instruction == "ENV":
            for word in shlex.split(rest):
                key, equals, value = word.partition("=")
                assert equals, f"{where} {rest!r}: use KEY=VALUE"
                image.env[key] = expand(value, image.env, unset="keep")
        elif instruction == "ENTRYPOINT":
            image.entrypoint = exec_form(rest, where)
            image.cmd = []  # as docker does: a new ENTRYPOINT resets an inherited CMD
        elif instruction == "CMD":
            image.cmd = exec_form(rest, where)
        elif instruction == "HEALTHCHECK":
            words = rest.split(None)
            while words and words[0].startswith("--"):
                words.pop(0)
            assert words and words[0].upper() == "CMD", f"{where} {rest!r}: expected CMD"
            image.healthcheck = exec_form(rest.split("CMD", 1)[1].strip(), where)
        elif instruction == "EXPOSE":
            image.expose += rest.split()
        elif instruction == "VOLUME":
            image.volumes += exec_form(rest, where) if rest.startswith("[") else rest.split()
        elif instruction == "USER":
            image.user = rest
        elif instruction == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            image.copies += words[:-1]
        elif instruction == "RUN":
            image.runs.append(rest)
    return image


# ------------------------------------------------------------------------------------------ sh -c scripts

VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)(?::(?P<op>[-?+])(?P<word>[^}]*))?\}|(?P<plain>\w+))")


class ShellExit(Exception):
    """`${VAR:?message}` on an unset or empty VAR: the shell prints the message and exits."""


def expand(text: str, env: Mapping[str, str], *, unset: str = "empty") -> str:
    """$VAR, ${VAR}, ${VAR:-default}, ${VAR:+alternative} and ${VAR:?message}, as sh expands them inside
    double quotes; ``unset="keep"`` leaves unknown variables as written (docker's ENV of a base image's
    variable)."""

    def one(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        value = env.get(name)
        if match["op"] == "-":
            return value or expand(match["word"], env)
        if match["op"] == "+":
            return expand(match["word"], env) if value else ""
        if match["op"] == "?" and not value:
            raise ShellExit(f"{name}: {match['word']}")
        if value is None:
            return match[0] if unset == "keep" else ""
        return value

    return VARIABLE.sub(one, text)


def unquoted_expansions(script: str) -> list[str]:
    """The `$...` outside double quotes: sh would split their values into several words, which
    :func:`shell_commands` does not model (and a path with a space would break the command)."""
    found, inside, i = [], False, 0
    while i < len(script):
        char = script[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            inside = not inside
        elif char == "$" and not inside:
            found.append(script[i : i + 20])
        i += 1
    return found


@dataclass(frozen=True)
class ShellCommand:
    """One simple command of a script, variables expanded."""

    argv: list[str]
    exec: bool  # `exec ...`: the command replaces the shell, so it receives the container's signals


def shell_commands(script: str, env: Mapping[str, str]) -> list[ShellCommand]:
    """The simple commands of an `sh -c` script, joined by `;`, `&&` or `||`, with variables expanded.

    Only what the images use: no single quotes, pipes, redirections or subshells (refused, not guessed
    at), and every variable double-quoted (so one word stays one word)."""
    assert "'" not in script, f"single quotes are not modelled: {script!r}"
    assert not unquoted_expansions(script), f"unquoted variables: {unquoted_expansions(script)}"
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[ShellCommand] = []
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token in (";", "&&", "||"):
            if words:
                is_exec = words[0] == "exec" and len(words) > 1
                argv = [expand(word, env) for word in words[1 if is_exec else 0 :]]
                commands.append(ShellCommand(argv, is_exec))
            words = []
        else:
            assert not set(token) <= set("();<>|&"), f"{token!r} is not modelled: {script!r}"
            words.append(token)
    return commands


def without_init(argv: Sequence[str]) -> list[str]:
    """The command an init wrapper (tini) starts: what this machine, which has no tini, can run."""
    for wrapper in INIT_WRAPPERS:
        if list(argv[: len(wrapper)]) == wrapper:
            return list(argv[len(wrapper) :])
    return list(argv)


def hivemarket_invocations(argv: Sequence[str], env: Mapping[str, str]) -> list[ShellCommand]:
    """The `hivemarket` commands a container runs, from its ENTRYPOINT + CMD and its environment: directly
    (exec form, where docker expands no variables) or through `sh -c SCRIPT`."""
    argv = without_init(argv)
    if argv[:2] == ["sh", "-c"]:
        assert len(argv) == 3, f"sh -c takes one script here, not {argv[2:]}"
        return [c for c in shell_commands(argv[2], env) if c.argv[0] == "hivemarket"]
    assert argv[0] == "hivemarket", f"not a hivemarket command: {argv}"
    return [ShellCommand(list(argv), exec=True)]


# ----------------------------------------------------------------------------------------------- the CLI


@contextmanager
def container_environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ as the container has it, while click resolves defaults that read it (`rent
    --coordinator` defaults to $HIVEMARKET_COORDINATOR)."""
    with mock.patch.dict(os.environ, dict(env), clear=True):
        yield


def parse_cli(args: Sequence[str], env: Mapping[str, str]) -> click.Context:
    """Resolve ``hivemarket ARGS`` to its command and parse every option as the real CLI would (no
    resilient parsing: a wrong option, choice or range raises click's usage error); nothing is run."""
    assert args and args[0] == "hivemarket", args
    with container_environment(env):
        ctx = main.make_context("hivemarket", list(args[1:]), resilient_parsing=False)
        command: click.Command = main
        while isinstance(command, click.Group):
            # click 8 keeps the subcommand's name apart, in _protected_args; click 9 keeps all in args
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            name, sub, rest = command.resolve_command(ctx, rest)
            assert name and sub is not None, f"no command in {args}"
            ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=False)
            command = sub
    return ctx


def check_values(ctx: click.Context) -> None:
    """What click leaves as strings and the commands check when they run: money and multiaddrs."""
    from peer.node import parse_maddrs

    if ctx.command_path == "hivemarket rent":
        parse_money(ctx.params["price_per_hour"])
        parse_maddrs(ctx.params["listen"], "--listen")


def long_running(argv: Sequence[str], env: Mapping[str, str]) -> click.Context:
    """The command the container is for, parsed: the last `hivemarket` command of ENTRYPOINT + CMD
    ``argv``, which must be `exec`ed so that it, not a shell, gets `docker stop`'s SIGTERM. Every earlier
    one must parse too."""
    invocations = hivemarket_invocations(argv, env)
    assert invocations, f"no hivemarket command in {argv}"
    assert invocations[-1].exec, f"the last command is not exec'ed: {invocations[-1].argv}"
    contexts = [parse_cli(c.argv, env) for c in invocations]
    for ctx in contexts:
        check_values(ctx)
    return contexts[-1]


# ------------------------------------------------------------------------------------------- .dockerignore


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the repository) out of the build context: a
    pattern matches the path or a folder above it, `**/` any depth, the last matching rule wins (`!`
    re-includes). Enough for the patterns this repository uses; Python's `*` also crosses `/`, so a pattern
    here matches at least what docker's does."""
    ignore_file = REPO / ".dockerignore"
    rules = [r.strip() for r in ignore_file.read_text().splitlines()] if ignore_file.exists() else []
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for rule in rules:
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
        names = prefixes
        if pattern.startswith("**/"):
            pattern, names = pattern[3:], [*prefixes, *parts]
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            ignored = not negate
    return ignored


def python_version(image: Image) -> tuple[int, int]:
    """The Python the image runs: the base's tag (python:3.11-slim) or the one its venv is made with."""
    found = re.match(r"python:(\d+)\.(\d+)", image.base) or next(
        (m for run in image.runs if (m := re.search(r"python(\d+)\.(\d+) -m venv", run))), None
    )
    assert found, f"cannot tell the Python version of {image.base}"
    return int(found[1]), int(found[2])


def required_python() -> tuple[int, int]:
    """pyproject.toml's requires-python floor: the images must not fall below what the project supports."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    found = re.fullmatch(r">=(\d+)\.(\d+)", spec)
    assert found, spec
    return int(found[1]), int(found[2])


# ------------------------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("path", [PEER_IMAGE, COORDINATOR_IMAGE], ids=lambda p: p.name)
def test_dockerfile_installs_like_the_readme_and_runs_a_real_command(path: Path) -> None:
    """Everything about an image that does not need a build: a Python the project supports, no root, its
    state on the volume only, the README's install from files that reach the build context, and a
    command that the real CLI parses."""
    image = parse_dockerfile(path)
    assert python_version(image) >= required_python()
    assert image.user and image.user not in ("root", "0"), "the image must not run as root"
    # the state lives on the volume, and only there: a test that moves HIVEMARKET_HOME moves all of it
    home = image.env["HIVEMARKET_HOME"]
    assert image.volumes == [home]
    assert home not in json.dumps(image.argv), f"{home} named directly instead of as $HIVEMARKET_HOME"
    # `pip install -c constraints.txt .` as the README does (the coordinator with the postgres extra, which
    # pyproject.toml must define), from files that reach the build context
    assert "constraints.txt" in image.copies
    installs = [shlex.split(run) for run in image.runs if re.search(r"\bpip install\b", run)]
    assert [words[-3:] for words in installs] == [["-c", "constraints.txt", PROJECT_INSTALLED[path]]]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert all(extra in extras for extra in re.findall(r"\w+", PROJECT_INSTALLED[path].strip(".[]")))
    for source in image.copies:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert not dockerignored(source), f"COPY {source}: left out of the build context by .dockerignore"
    assert dockerignored(".venv") and dockerignored(".git") and dockerignored("build")

    coordinator = "http://203.0.113.7:8470"  # the peer image has no default: see the test below
    ctx = long_running(image.argv, {**image.env, "HIVEMARKET_COORDINATOR": coordinator})
    if path == PEER_IMAGE:
        assert image.base.startswith("nvidia/cuda:"), "the peer's base must carry the NVIDIA runtime setup"
        assert ctx.command_path == "hivemarket rent"
        assert ctx.params["coordinator"] == coordinator
        assert ctx.params["price_per_hour"] == image.env["PRICE_PER_HOUR"]
        assert f"{image.env['DHT_PORT']}/tcp" in image.expose
    else:
        assert ctx.command_path == "hivemarket coordinator serve"
        assert (ctx.params["host"], ctx.params["port"]) == ("0.0.0.0", 8470)
        assert f"{ctx.params['port']}/tcp" in image.expose
        assert image.healthcheck, "the coordinator image has no HEALTHCHECK"
        # SQLite on the volume by default; DATABASE_URL, when set, is the database instead
        assert ctx.params["db_url"] == f"sqlite:///{image.env['HIVEMARKET_HOME']}/coordinator.db"
        database = "postgresql://market:secret@db.example:5432/market"
        assert long_running(image.argv, {**image.env, "DATABASE_URL": database}).params["db_url"] == database


def test_the_peer_refuses_to_start_without_a_coordinator(tmp_path: Path) -> None:
    """The CLI's default coordinator, 127.0.0.1, is the container itself: a peer that forgot
    HIVEMARKET_COORDINATOR would retry forever against nothing; it must stop and say why."""
    image = parse_dockerfile(PEER_IMAGE)
    env = {**container_env(image, tmp_path / "data", tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        without_init(image.argv), cwd=env["HOME"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0
    assert "set HIVEMARKET_COORDINATOR" in done.stderr
    with pytest.raises(ShellExit, match="HIVEMARKET_COORDINATOR"):
        hivemarket_invocations(image.argv, image.env)


def services_and_images(compose: dict[str, Any]) -> dict[str, tuple[dict[str, Any], Path]]:
    """Each service built from this repository, with the Dockerfile it is built from, which must exist;
    the services that run a published image instead (PostgreSQL) are left out."""
    found = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None and name in PUBLISHED_IMAGES:
            continue
        assert isinstance(build, dict), f"{name}: build must name the context and the Dockerfile"
        context = (COMPOSE.parent / build["context"]).resolve()
        dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
        assert context == REPO, f"{name}: the build context must be the repository, not {context}"
        assert dockerfile.is_file(), f"{name}: no Dockerfile at {dockerfile}"
        found[name] = (service, dockerfile)
    return found


def service_env(image: Image, service: dict[str, Any]) -> dict[str, str]:
    """The container's environment: the image's ENV, then the service's `environment` (map or list)."""
    return {**image.env, **compose_env(service)}


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment` (map or list) as strings."""
    given = service.get("environment") or {}
    if isinstance(given, list):
        given = dict(item.split("=", 1) for item in given)
    return {k: str(v) for k, v in given.items()}


def service_argv(image: Image, service: dict[str, Any]) -> list[str]:
    """ENTRYPOINT + CMD after the service's `entrypoint` and `command` overrides (a new entrypoint drops
    the image's CMD, as in compose)."""
    words = lambda value: shlex.split(value) if isinstance(value, str) else list(value)  # noqa: E731
    if "entrypoint" in service:
        return [*words(service["entrypoint"]), *words(service.get("command", []))]
    return [*image.entrypoint, *words(service.get("command", image.cmd))]


def service_networks(service: dict[str, Any]) -> set[str]:
    """The networks a service joins (list or map form); compose puts a service with none on `default`."""
    return set(service.get("networks") or ["default"])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes: the path in the container -> the named volume (or host path) mounted there."""
    return {target: source for source, target, *_ in (v.split(":") for v in service.get("volumes", []))}


#: The services of compose.yml that run a published image rather than one built here.
PUBLISHED_IMAGES = {"postgres"}


def test_compose_is_postgresql_two_coordinator_replicas_and_three_peers_that_find_them() -> None:
    """compose.yml: PostgreSQL (the official image, healthy once pg_isready answers, its data on a named
    volume, on a network that only the coordinators join), two replicas of the coordinator image on its
    database (the same URL, whose user, password and database are the ones the postgres service creates)
    sharing one volume (the admin key and the models), and three peers of the peer image, each with a
    volume of its own, that name both replicas by service name and port and start once both are healthy.
    Each built service's command (the image's, with the service's environment) parses with the real CLI."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = services_and_images(compose)
    coordinators = [n for n, (_, df) in services.items() if df == COORDINATOR_IMAGE]
    peers = [n for n, (_, df) in services.items() if df == PEER_IMAGE]
    assert coordinators == ["coordinator-1", "coordinator-2"] and len(peers) == 3
    assert set(compose["services"]) == {*coordinators, *peers, *PUBLISHED_IMAGES}, "an unexpected service"
    named_volumes = set(compose.get("volumes") or {})

    # PostgreSQL: a database, a user and a password of its own, data on a volume, not reachable by peers
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:1[5-9](\.\d+)*", postgres["image"]), postgres["image"]
    pg_env = compose_env(postgres)
    assert {"POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD"} <= set(pg_env)
    assert mounts(postgres).get("/var/lib/postgresql/data") in named_volumes, "the ledger is on no volume"
    check = postgres["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"], check
    assert "ports" not in postgres, "the database must not be published on the host"
    database_networks = service_networks(postgres)
    assert all(compose["networks"][n].get("internal") for n in database_networks), (
        "the database's network must be internal"
    )

    volumes_used: list[str] = []
    contexts: dict[str, click.Context] = {}
    for name, (service, dockerfile) in services.items():
        image = parse_dockerfile(dockerfile)
        env = service_env(image, service)
        unknown = set(env) - set(image.env) - settings_variables()
        assert not unknown, f"{name}: neither the image nor hivemarket reads {sorted(unknown)}"
        contexts[name] = ctx = long_running(service_argv(image, service), env)
        assert ctx.command_path == ("hivemarket rent" if name in peers else "hivemarket coordinator serve")
        # each service's state on a named volume, mounted where its HIVEMARKET_HOME is
        volume = mounts(service).get(env["HIVEMARKET_HOME"])
        assert volume in named_volumes, f"{name}: no named volume at {env['HIVEMARKET_HOME']}"
        volumes_used.append(volume)
        joins_database = bool(service_networks(service) & database_networks)
        assert joins_database == (name in coordinators), (
            f"{name}: only coordinators join the database's network"
        )
        assert "default" in service_networks(service), f"{name}: not on the network the market shares"
    # the replicas share one volume (one admin key, one model folder); every peer has one of its own
    assert len(set(volumes_used[:2])) == 1 and len(set(volumes_used)) == len(peers) + 1, volumes_used

    # the replicas: one database, the postgres service's, and one admin key and model folder
    urls = {contexts[n].params["db_url"] for n in coordinators}
    assert len(urls) == 1, f"the replicas use different databases: {urls}"
    database = urlsplit(urls.pop())
    assert database.scheme == "postgresql" and (database.hostname, database.port) == ("postgres", 5432)
    assert (database.username, database.password, database.path) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        f"/{pg_env['POSTGRES_DB']}",
    ), "DATABASE_URL names another user, password or database than the postgres service creates"
    coordinator_image = parse_dockerfile(COORDINATOR_IMAGE)
    for name in coordinators:
        env = service_env(coordinator_image, services[name][0])
        with container_environment(env):
            model_dir = ServerSettings().model_dir
        for path in (Path(contexts[name].params["admin_key"]), model_dir):
            assert path.is_relative_to(env["HIVEMARKET_HOME"]), f"{name}: {path} is not on the shared volume"
    published: list[int] = []
    for name in coordinators:
        service, _ = services[name]
        port = contexts[name].params["port"]
        ports = [str(p) for p in service.get("ports", [])]
        assert len(ports) == 1 and ports[0].startswith("127.0.0.1:") and ports[0].endswith(f":{port}"), ports
        published.append(int(ports[0].split(":")[1]))
        assert service["healthcheck"]["test"][0] == "CMD"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert published == [8470, 8471], published

    # the peers: both replicas, by service name and the port they listen on, once both are healthy
    replicas = [("coordinator-1", contexts["coordinator-1"].params["port"])]
    replicas.append(("coordinator-2", contexts["coordinator-2"].params["port"]))
    for name in peers:
        service, _ = services[name]
        urls_given, _ = parse_coordinator_urls(contexts[name].params["coordinator"])
        assert [(urlsplit(u).hostname, urlsplit(u).port) for u in urls_given] == replicas, urls_given
        for coordinator in coordinators:
            assert service["depends_on"][coordinator]["condition"] == "service_healthy", name

    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(gpu["services"]) == set(peers)
    for name, service in gpu["services"].items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices), name


def readme_docker_commands() -> list[list[str]]:
    """The `docker ...` lines of the README's Docker section, continuations joined, comments dropped."""
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Docker\n(.*?)^## ", readme, re.S | re.M)
    assert section, "the README has no Docker section"
    block = re.search(r"```sh\n(.*?)```", section[1], re.S)
    assert block, "the README's Docker section shows no commands"
    return [shlex.split(line, comments=True) for line in block[1].replace("\\\n", " ").splitlines()]


def settings_variables() -> set[str]:
    """Every HIVEMARKET_* variable the peer, the coordinator and the client read."""
    from peer.protocol.client import ClientSettings
    from peer.settings import PeerSettings

    return {
        f"{model.model_config.get('env_prefix', '')}{name}".upper()
        for model in (PeerSettings, ServerSettings, ClientSettings)
        for name in model.model_fields
    }


def test_the_readmes_docker_commands_name_these_files_and_settings() -> None:
    """The README's commands build from the Dockerfiles here, tag what they run, mount the volume where
    the image keeps its state, and set variables with which the image's command parses."""
    commands = readme_docker_commands()
    built: dict[str, Image] = {}
    for words in commands:
        if words[:2] == ["docker", "build"]:
            dockerfile, tag = words[words.index("-f") + 1], words[words.index("-t") + 1]
            assert (REPO / dockerfile).is_file() and words[-1] == ".", words
            built[tag] = parse_dockerfile(REPO / dockerfile)
        elif words[:3] == ["docker", "compose", "-f"]:
            assert (REPO / words[3]).is_file(), words
    assert {image.base.split(":")[0] for image in built.values()} == {"nvidia/cuda", "python"}
    runs = [words for words in commands if words[:2] == ["docker", "run"]]
    assert {words[-1] for words in runs} == set(built), "a `docker run` of an image the README never built"
    for words in runs:
        image = built[words[-1]]
        options = list(itertools.pairwise(words[2:-1]))
        given = dict(v.split("=", 1) for flag, v in options if flag == "-e")
        unknown = set(given) - set(image.env) - settings_variables()
        assert not unknown, f"{words}: neither the image nor hivemarket reads {sorted(unknown)}"
        env = {**image.env, **given}
        volumes = [v.split(":")[1] for flag, v in options if flag == "-v"]
        assert volumes == [image.env["HIVEMARKET_HOME"]], words
        for flag, value in options:
            if flag == "-p":
                assert f"{value.split(':')[-1]}/tcp" in image.expose, words
        long_running(image.argv, env)


# ------------------------------------------------------------------------------------ running the images


def container_env(image: Image, volume: Path, home: Path, **overrides: str) -> dict[str, str]:
    """The environment the container's command gets, here: the image's ENV with the volume moved to
    ``volume`` and this virtualenv's `hivemarket` first on PATH; nothing else from the test's own
    environment (a HIVEMARKET_* variable of the developer's shell must not leak in)."""
    volume.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "hivemarket").exists(), f"no hivemarket next to {sys.executable}"
    return {
        **image.env,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "HIVEMARKET_HOME": str(volume),
        **overrides,
    }


class Containers:
    """The images' commands as local processes, each in its own process group, all killed at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.mark = uuid.uuid4().hex  # every process they start inherits it, re-parented or not
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def run(self, image: Image, env: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.root / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                without_init(image.argv),
                cwd=env["HOME"],  # the images' WORKDIR is their user's home: a relative path lands there
                env={**env, "HIVEMARKET_TEST_DOCKER": self.mark},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((proc, log))
        return proc, log

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()}" for _, log in self.started)

    def wait(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        """:func:`wait_until`, failing at once (with the logs) when a process that should run has exited."""

        def check() -> T | None:
            for proc, log in self.started:
                if proc.returncode is None and proc.poll() is not None:
                    raise AssertionError(f"{log.name} exited with {proc.returncode}\n{self.logs()}")
            return predicate()

        try:
            return wait_until(check, timeout, what, interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """SIGTERM, as `docker stop` sends it, and the exit status once the process is gone."""
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        finally:
            kill_group(proc.pid)

    def close(self) -> list[str]:
        """Kill every process group; return whatever is still alive, by group or by mark."""
        survivors = []
        for proc, _ in self.started:
            kill_group(proc.pid)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            survivors += [f"{p.name()} ({p.pid})" for p in group_members(proc.pid)]
        return survivors + marked("HIVEMARKET_TEST_DOCKER", self.mark)


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[Containers]:
    """Processes for the images' commands; the test fails if one of them, or of their children, is left."""
    running = Containers(tmp_path)
    try:
        yield running
    finally:
        survivors = running.close()
        assert not survivors, f"processes left behind: {survivors}"


def get_json(url: str) -> tuple[int, Any]:
    """The status and JSON body of GET ``url``; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def start_coordinator_image(
    containers: Containers, volume: Path, name: str = "coordinator", **env_overrides: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The coordinator image's command on port 0; returns the process and the URL it listens on."""
    proc, log = run_coordinator_image(containers, volume, name, **env_overrides)
    return proc, wait_listening(containers, log)


def run_coordinator_image(
    containers: Containers, volume: Path, name: str, **env_overrides: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """The coordinator image's command on port 0, started; its process and log."""
    image = parse_dockerfile(COORDINATOR_IMAGE)
    env = container_env(image, volume, containers.root / f"{name}-home", PORT="0", **env_overrides)
    return containers.run(image, env, name)


def wait_listening(containers: Containers, log: Path) -> str:
    """The URL a coordinator started by :func:`run_coordinator_image` listens on, once it does."""

    def listening() -> str | None:
        found = re.search(r"listening on http://0\.0\.0\.0:(\d+)", log.read_text())
        return f"http://127.0.0.1:{found[1]}" if found else None

    return containers.wait(listening, 60, "the coordinator image's command to listen")


def offers(url: str) -> list[dict[str, Any]]:
    """GET /v1/offers, unsigned, as anyone may."""
    status, body = get_json(f"{url}/v1/offers")
    assert status == 200, f"GET /v1/offers: {status}"
    return body["offers"]


def wait_for_offer(containers: Containers, url: str, identity: Path, after: float = 0.0) -> dict[str, Any]:
    """The open offer of the account in ``identity`` (which `rent` creates on first use), updated after
    ``after``."""

    def posted() -> dict[str, Any] | None:
        if not identity.exists():
            return None
        account = load_identity(identity).account
        return next(
            (
                o
                for o in offers(url)
                if o["account"] == account and o["state"] == "open" and o["updated_at"] > after
            ),
            None,
        )

    return containers.wait(posted, 90, "the peer image's offer to be listed")


def health_checks() -> list[list[str]]:
    """The coordinator's health check as the image declares it and as compose.yml's replicas do."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    compose_tests: list[list[str]] = []
    for name in ("coordinator-1", "coordinator-2"):
        compose_test = services[name]["healthcheck"]["test"]
        assert compose_test[0] == "CMD", compose_test
        if compose_test[1:] not in compose_tests:  # the same (one anchor) need not run twice
            compose_tests.append(compose_test[1:])
    return [parse_dockerfile(COORDINATOR_IMAGE).healthcheck, *compose_tests]


def run_health_checks(env: dict[str, str]) -> list[int]:
    """The exit status of each health check, run as docker runs it: in the container's environment."""
    return [
        subprocess.run(check, cwd=env["HOME"], env=env, capture_output=True, timeout=30).returncode
        for check in health_checks()
    ]


@pytest.mark.timeout(240)
def test_the_images_commands_make_a_market_that_survives_restarts(
    containers: Containers, tmp_path: Path
) -> None:
    """The images' commands, run here as they would run in their containers: the coordinator serves and
    is healthy, the peer posts its offer, both stop on `docker stop`'s SIGTERM, and restarted on the same
    volumes they are the same coordinator (admin key, ledger) and the same account."""
    coordinator_volume, peer_volume = tmp_path / "coordinator-data", tmp_path / "peer-data"

    coordinator, url = start_coordinator_image(containers, coordinator_volume)
    status, body = get_json(f"{url}/healthz")
    assert (status, body) == (200, {"status": "ok"})
    port = urlsplit(url).port
    assert port
    check_env = container_env(
        parse_dockerfile(COORDINATOR_IMAGE), coordinator_volume, tmp_path, PORT=str(port)
    )
    assert run_health_checks(check_env) == [0, 0], "a health check failed against a live coordinator"
    admin_key = (coordinator_volume / "admin.pem").read_bytes()  # created by the first start
    assert (coordinator_volume / "coordinator.db").exists()

    peer_image = parse_dockerfile(PEER_IMAGE)
    peer_env = container_env(
        peer_image,
        peer_volume,
        tmp_path / "peer-home",
        **FAST_ENV,  # a 0.2 s probe instead of 2 s
        HIVEMARKET_COORDINATOR=url,
        DHT_PORT="0",  # never bound unless matched to a run; 0 all the same, so tests never collide
    )
    peer, _ = containers.run(peer_image, peer_env, "peer")
    offer = wait_for_offer(containers, url, peer_volume / "identity.pem")
    identity = (peer_volume / "identity.pem").read_bytes()  # created by the first start
    assert parse_money(offer["price_per_hour"]) == parse_money(peer_image.env["PRICE_PER_HOUR"])
    assert len(offers(url)) == 1

    # `docker stop`: both stop cleanly on SIGTERM
    assert containers.stop(peer) == 0, containers.logs()
    assert containers.stop(coordinator) == 0, containers.logs()
    assert 0 not in run_health_checks(check_env), "a health check passes with no coordinator"

    # restarted on the same volumes: the same admin key, ledger and account
    coordinator, url = start_coordinator_image(containers, coordinator_volume)
    assert (coordinator_volume / "admin.pem").read_bytes() == admin_key
    assert [o["account"] for o in offers(url)] == [offer["account"]], "the database did not survive"
    peer, _ = containers.run(peer_image, {**peer_env, "HIVEMARKET_COORDINATOR": url}, "peer")
    again = wait_for_offer(containers, url, peer_volume / "identity.pem", after=offer["updated_at"])
    assert again["account"] == offer["account"], "the peer's identity did not survive a restart"
    assert (peer_volume / "identity.pem").read_bytes() == identity
    assert len(offers(url)) == 1
    assert containers.stop(peer) == 0, containers.logs()
    assert containers.stop(coordinator) == 0, containers.logs()


def leader_gauge(url: str) -> float | None:
    """`hivemarket_leader` from a replica's /metrics: 1 while it clears and sweeps; None if it is silent."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    found = re.search(r"^hivemarket_leader (\S+)$", text, re.M)
    return float(found[1]) if found else None


async def deposit_through_each(urls: Sequence[str], admin_key: Path, account: str) -> list[Any]:
    """Deposit 1 into ``account`` through each replica in turn, signed with ``admin_key``; then the balance
    each replica reads (GET /v1/accounts, unsigned)."""
    admin = load_identity(admin_key)
    for url in urls:
        async with CoordinatorClient(url, admin) as client:
            await client.deposit(account, "1")
    return [get_json(f"{url}/v1/accounts/{account}")[1]["balance"] for url in urls]


@pytest.mark.timeout(240)
def test_the_coordinator_image_makes_replicas_on_postgresql(
    containers: Containers, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """compose.yml's replicas without docker: two of the coordinator image's commands, started at once on
    one new volume and one new PostgreSQL database (DATABASE_URL), both come up, with no SQLite file and
    the one admin key that the first start creates (each accepts a deposit signed with it), on one ledger
    (each reads what both wrote), one of them leading; each stops on SIGTERM."""
    volume = tmp_path / "coordinator-data"
    database = postgres_server.database()
    started = [
        run_coordinator_image(containers, volume, f"coordinator-{i}", DATABASE_URL=database) for i in (1, 2)
    ]
    urls = [wait_listening(containers, log) for _, log in started]
    for url in urls:
        assert get_json(f"{url}/healthz") == (200, {"status": "ok"})
    # the race for the admin key made one key (and its node key, made with it); the ledger is in
    # PostgreSQL, not on the volume
    files = sorted(p.name for p in volume.iterdir() if p.is_file())
    assert files == ["admin.p2p.key", "admin.pem"], list(volume.iterdir())
    account = Identity.generate().account
    balances = asyncio.run(deposit_through_each(urls, volume / "admin.pem", account))
    assert [parse_money(b) for b in balances] == [parse_money("2")] * 2, "the replicas share no ledger"

    def one_leader() -> list[float] | None:
        gauges = [g for g in (leader_gauge(url) for url in urls) if g is not None]
        return gauges if sorted(gauges) == [0.0, 1.0] else None

    containers.wait(one_leader, 30, "one replica, and only one, to lead")
    for proc, _ in started:
        assert containers.stop(proc) == 0, containers.logs()
