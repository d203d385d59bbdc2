"""The SQLite engine under the store: one connection on one thread, migrations, and group commit.

Writes are queued and committed in batches: each write runs in its own SAVEPOINT inside one
transaction, so a write that fails is rolled back alone, and every caller learns its result only after
the COMMIT is durable. Many concurrent requests then cost one commit (one fsync) instead of one each,
and a SIGKILL can lose only requests that were never acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]
ErrorHook = Callable[[sqlite3.Connection, Exception], None]


class StoreUnavailable(RuntimeError):
    """The database file cannot be opened or migrated; the message names the file and the reason."""


class Database:
    """SQLite in WAL mode behind a single-thread executor (sqlite3 connections are not thread-safe)."""

    def __init__(self, path: Path, migrations: Sequence[str], *, synchronous: str, batch_max: int):
        self.path = Path(path)
        self._migrations = migrations
        self._synchronous = synchronous
        self._batch_max = batch_max
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[tuple[Operation[Any], ErrorHook | None, asyncio.Future]] = asyncio.Queue()
        self._writer: asyncio.Task | None = None

    async def open(self) -> None:
        await self._run(self._open)
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-writer")

    def _open(self) -> None:
        try:
            self._connect()
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"cannot open the database {self.path}: {e}") from None

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        for number, script in enumerate(self._migrations[version:], start=version + 1):
            conn.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            conn.execute("COMMIT")
            logger.info(f"Applied schema migration {number} to {self.path}")
        self._conn = conn

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._conn is not None:
            await self._run(self._conn.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def read(self, op: Operation[T]) -> T:
        """Run a read-only operation (it sees every write acknowledged so far)."""
        return await self._run(op, self._conn)

    async def write(self, op: Operation[T], on_error: ErrorHook | None = None) -> T:
        """Run ``op`` in a transaction; return once it is committed, or raise what it raised.

        When ``op`` raises, its changes are rolled back and ``on_error(conn, error)`` may record the refusal
        in the same transaction (the store remembers the nonces of refused requests that way).
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, on_error, future))
        return await future

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                outcomes = await self._run(self._commit_batch, [(op, hook) for op, hook, _ in batch])
            except Exception as e:  # the COMMIT itself failed: nothing in the batch was applied
                logger.exception("SQLite commit failed")
                outcomes = [(False, e)] * len(batch)
            for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _commit_batch(self, ops: list[tuple[Operation[Any], ErrorHook | None]]) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op, on_error in ops:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(conn)))
                except Exception as e:
                    conn.execute("ROLLBACK TO op")
                    if on_error is not None:
                        on_error(conn, e)
                    outcomes.append((False, e))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes
