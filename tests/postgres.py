"""A throwaway PostgreSQL server for tests and benches: initdb into a temporary folder, a free port,
run as an unprivileged user (PostgreSQL refuses to run as root), and everything removed on :meth:`stop`.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/<version>/bin``); the README's
test command installs it where it is missing. Each test takes a database of its own from the one server
(:meth:`PostgresServer.database`), which is far cheaper than a cluster per test (initdb takes seconds).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

USER = "hivemarket"  # the cluster's superuser (trust authentication on 127.0.0.1 only)


def binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest installed version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(os.path.realpath(pg_ctl)).parent if pg_ctl else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in a temporary folder; use as a context manager or call :meth:`stop`.

    ``durable=False`` turns off fsync (a test's data need not survive a power cut, and fsync dominates a
    small commit); benches that compare engines keep it on, as a production server would.
    """

    def __init__(self, *, durable: bool = False):
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="hivemarket-pg-"))
        self.port = _free_port()
        self._count = 0
        self._owner = self._unprivileged()
        os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
        data = self.root / "data"
        settings = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            "-c max_connections=200",
        ]
        if not durable:
            settings += ["-c fsync=off", "-c full_page_writes=off"]
        self._pg_ctl = bindir / "pg_ctl"
        self._settings = " ".join(settings)
        try:
            initdb = [str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--no-locale"]
            self._as_owner([*initdb, "-E", "UTF8"])
            self.start()
        except BaseException:
            self.stop()
            raise
        self.admin_url = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the server (again, after :meth:`halt`: same port and data)."""
        data, log = self.root / "data", self.root / "server.log"
        self._as_owner(
            [str(self._pg_ctl), "-D", str(data), "-l", str(log), "-o", self._settings, "-w", "start"]
        )

    def halt(self) -> None:
        """Stop the server, keeping its data (fast shutdown: it disconnects every client)."""
        if (self.root / "data" / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._as_owner([str(self._pg_ctl), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"])

    @staticmethod
    def _unprivileged() -> pwd.struct_passwd:
        if os.geteuid() != 0:
            return pwd.getpwuid(os.geteuid())
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")

    def _as_owner(self, command: list[str]) -> None:
        user = self._owner if os.geteuid() == 0 else None
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=self.root,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")

    def database(self, name: str | None = None, *, socket: bool = False) -> str:
        """The URL of a new, empty database: over TCP, or with ``socket`` through the server's Unix socket
        (what a client on the server's host uses by default)."""
        self._count += 1
        name = name or f"test_{self._count}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        if socket:
            return f"postgresql://{USER}@/{name}?host={self.root}&port={self.port}"
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
