"""The database engines under the store: one writer connection on one thread, migrations, group commit.

Writes are queued and committed in batches: each write runs in its own SAVEPOINT inside one
transaction, so a write that fails is rolled back alone, and every caller learns its result only after
the COMMIT is durable. Many concurrent requests then cost one commit (one fsync) instead of one each,
and a SIGKILL can lose only requests that were never acknowledged.

The hottest writes (heartbeats: every peer, every heartbeat interval) can go further: a :data:`Batched`
function takes every pending request of its kind at once and decides each as if it ran alone, in a few
statements for all of them (:meth:`Database.write_batched`). On PostgreSQL a statement costs a round trip
and the server's parsing and planning, so the statements per request, not the commits, bound a replica.

Two engines share that loop: :class:`SQLiteDatabase` (a file, the embedded default) and
:class:`coordinator.postgres.PostgresDatabase` (a server that several coordinator replicas share). Each is
split in two: the :class:`Database` on the event loop queues the writes and hands them over a batch at a
time; its :class:`Writer` runs them on one connection. SQLite's writer runs on a thread (sqlite3 releases
the interpreter while its engine works); PostgreSQL's runs in a process of its own, since its driver's work
holds the interpreter (measured: 135 us a heartbeat against SQLite's 20, which cost a replica a third of
its throughput; see :mod:`coordinator.postgres`). So that the same code serves both, a write is a
:class:`Call`, which pickles, never a closure. The
store modules' SQL is written in the dialect both accept (``?`` placeholders, ``ON CONFLICT``,
``RETURNING``, ``IS DISTINCT FROM``; no JSON functions), and every write transaction is serialised
(SQLite's single writer; a transaction-scoped advisory lock on PostgreSQL), so a store function reads
the state it decides on and writes its decision without another write in between, on either engine.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from coordinator.errors import Unavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")
Operation = Callable[[Any], T]  # takes the engine's connection (sqlite3.Connection or its PostgreSQL twin)
ErrorHook = Callable[[Any, Exception], None]  # (the connection, what the operation raised)
Migration = tuple[int, str]  # (the schema version once applied, its script)
# Takes the connection and the pending requests of one kind; returns one outcome per request, in order: its
# result, or the exception that refuses it (having recorded what a refusal records, such as its nonce).
Batched = Callable[[Any, list[Any]], list[Any]]


class Call:
    """An operation (or an error hook, or a batched kind) that pickles: a module-level function and the
    arguments bound after the ones it is called with. ``Call(f, a, b)(conn)`` is ``f(conn, a, b)``.

    A closure does not pickle, and a write may run in the writer's process (PostgreSQL); ``functools.partial``
    would bind its arguments before the connection. The requests of a batched kind share one Call, and a
    batch is pickled as a whole, so pickle's memo keeps them one kind in the writer's process."""

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any):
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self, *leading: Any) -> Any:
        return self.fn(*leading, *self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"Call({getattr(self.fn, '__qualname__', self.fn)}, ...)"

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.fn, self.args, self.kwargs)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.fn, self.args, self.kwargs = state


class _Part:
    """One request of a :data:`Batched` kind, waiting in the writer's queue."""

    __slots__ = ("item", "kind")

    def __init__(self, kind: Batched, item: Any):
        self.kind = kind
        self.item = item

    def __getstate__(self) -> tuple[Any, Any]:
        return (self.kind, self.item)

    def __setstate__(self, state: tuple[Any, Any]) -> None:
        self.kind, self.item = state


class StoreUnavailable(Unavailable):
    """The database cannot be opened, migrated or reached; the message names it and the reason. A request
    that meets it is answered 503 (clients go to another replica, or retry), never a 500."""

    def __init__(self, message: str):
        super().__init__(message, field="database")


class Writer(ABC):
    """The half of a database that writes: one connection, used from one thread (neither driver's
    connections are thread-safe), that runs a batch of writes in one transaction. It holds only its
    settings until :meth:`open`, so that it pickles into the process it may run in. Subclasses connect
    and begin a serialised write transaction."""

    database_error: type[Exception]  # what the engine's driver raises for a failed statement

    def __init__(self, name: str, migrations: Sequence[Migration]):
        self.name = name  # what errors and logs call this database (a path, or a URL without password)
        self._migrations = migrations
        self.conn: Any = None

    @abstractmethod
    def _connect(self) -> Any:
        """A new writer connection (raises :class:`StoreUnavailable` naming the database and why)."""

    @abstractmethod
    def _begin(self, conn: Any) -> None:
        """Begin a write transaction that no other write (of any process) runs beside."""

    def _settle(self, conn: Any) -> None:  # noqa: B027 (SQLite runs each statement as it is issued)
        """Make the statements an operation issued take effect before its savepoint is released (a
        pipelined engine sends them without waiting; its errors must surface inside the operation)."""

    def _recover(self, conn: Any, *, deferred: bool) -> None:  # noqa: B027 (SQLite takes statements after an error)
        """Make the connection take statements again after an operation raised (a pipelined engine
        discards every statement that follows an error until it syncs; ``deferred``, it raises that error,
        which may be an earlier operation's)."""

    def open(self) -> None:
        """Connect, and apply the migrations this database lacks."""
        self.conn = self._connect()
        self._migrate(self.conn)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def _migrate(self, conn: Any) -> None:
        """Apply the migrations this database lacks, all in one serialised transaction (replicas that
        open one database at once migrate it once)."""
        self._begin(conn)
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            for number, script in self._migrations:
                if number <= version:
                    continue
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
                version = number
                logger.info(f"Applied schema migration {number} to {self.name}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def commit_batch(
        self, ops: list[tuple[Operation[Any], ErrorHook | None]], *, deferred: bool = False
    ) -> list[tuple[bool, Any]]:
        """Run ``ops`` in one transaction and commit it; each op's outcome, in order.

        ``deferred`` (an engine that pipelines statements) settles no step on its own: what a step sends
        goes to the server with a later step's read or with the COMMIT, a round trip less a step. A
        database error can then surface in a later step than the one that caused it, so it refuses no
        step: it ends the batch with nothing applied, and the engine runs the batch again with every step
        settled (:class:`coordinator.postgres.PostgresWriter`), where each error refuses its own step."""
        conn = self.conn
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(ops)
        kinds: dict[Batched, list[int]] = {}
        singles: list[int] = []
        for i, (op, _) in enumerate(ops):
            if isinstance(op, _Part):
                kinds.setdefault(op.kind, []).append(i)
            else:
                singles.append(i)
        self._begin(conn)
        try:
            for i in singles:
                op, on_error = ops[i]
                outcomes[i] = self._apply(conn, op, on_error, deferred=deferred)
            for kind, positions in kinds.items():
                items = [ops[i][0].item for i in positions]  # type: ignore[attr-defined]
                results = self._apply_kind(conn, kind, items, deferred=deferred)
                for i, result in zip(positions, results, strict=True):
                    outcomes[i] = (not isinstance(result, Exception), result)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    def _apply_kind(self, conn: Any, kind: Batched, items: list[Any], *, deferred: bool) -> list[Any]:
        """Every pending item of ``kind`` in one savepoint; should ``kind`` raise, each item alone."""
        ok, results = self._apply(conn, lambda c: kind(c, items), None, deferred=deferred)
        if ok:
            return results
        if len(items) == 1:
            return [results]
        alone = [self._apply(conn, lambda c, i=item: kind(c, [i]), None, deferred=deferred) for item in items]
        return [result[0] if ok else result for ok, result in alone]

    def _apply(
        self, conn: Any, op: Operation[Any], on_error: ErrorHook | None, *, deferred: bool
    ) -> tuple[bool, Any]:
        """Run one operation in its own savepoint: (True, its result) or (False, what it raised), its
        changes rolled back and ``on_error`` run. ``deferred``: see :meth:`commit_batch` (a database
        error is raised, not taken as the operation's refusal)."""
        conn.execute("SAVEPOINT op")
        try:
            result = op(conn)
            if not deferred:
                self._settle(conn)
            outcome = (True, result)
        except Exception as e:
            if deferred and isinstance(e, self.database_error):
                raise
            self._recover(conn, deferred=deferred)
            conn.execute("ROLLBACK TO op")
            if on_error is not None:
                on_error(conn, e)
            outcome = (False, e)
        conn.execute("RELEASE op")
        return outcome


class Database(ABC):
    """Group commit: writes queue on the event loop and go to the :class:`Writer` a batch at a time.
    Subclasses say where the writer runs and how reads run."""

    def __init__(self, writer: Writer, *, batch_max: int):
        self.name = writer.name
        self.writer = writer
        self._batch_max = batch_max
        self._queue: asyncio.Queue[tuple[Operation[Any], ErrorHook | None, asyncio.Future]] = asyncio.Queue()
        self._write_task: asyncio.Task | None = None

    @abstractmethod
    async def _call_writer(self, method: str, *args: Any) -> Any:
        """Run the writer's ``method`` where the writer lives; return what it returned, or raise."""

    @abstractmethod
    async def read(self, op: Operation[T]) -> T:
        """Run a read-only operation (it sees every write acknowledged so far)."""

    async def open(self) -> None:
        await self._call_writer("open")
        self._write_task = asyncio.create_task(self._write_loop(), name="db-writer")

    async def close(self) -> None:
        if self._write_task is not None:
            self._write_task.cancel()
            await asyncio.gather(self._write_task, return_exceptions=True)
        await self._call_writer("close")

    async def write(self, op: Operation[T], on_error: ErrorHook | None = None) -> T:
        """Run ``op`` in a transaction; return once it is committed, or raise what it raised.

        When ``op`` raises, its changes are rolled back and ``on_error(conn, error)`` may record the refusal
        in the same transaction (the store remembers the nonces of refused requests that way). Both must
        pickle (a :class:`Call`): the writer may run in a process of its own.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, on_error, future))
        return await future

    async def write_batched(self, kind: Batched, item: Any) -> Any:
        """Run ``item`` with every other request of ``kind`` in the same batch, in one savepoint: one call of
        ``kind(conn, items)``. Return its result once committed, or raise the exception ``kind`` refused it
        with. Should ``kind`` itself raise (a database error), each item runs again alone, so one bad item
        cannot refuse the others."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((_Part(kind, item), None, future))
        return await future

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                outcomes = await self._call_writer("commit_batch", [(op, hook) for op, hook, _ in batch])
            except StoreUnavailable as e:  # nothing in the batch was applied; each request gets a 503
                logger.warning(str(e))
                outcomes = [(False, e)] * len(batch)
            except Exception as e:  # the COMMIT itself failed: nothing in the batch was applied
                logger.exception(f"Commit to {self.name} failed")
                outcomes = [(False, e)] * len(batch)
            for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)


class SQLiteWriter(Writer):
    """SQLite in WAL mode."""

    database_error = sqlite3.Error

    def __init__(self, path: Path, migrations: Sequence[Migration], *, synchronous: str):
        super().__init__(str(path), migrations)
        self.path = Path(path)
        self._synchronous = synchronous

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            return conn
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"cannot open the database {self.path}: {e}") from None

    def open(self) -> None:
        try:
            super().open()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot open the database {self.path}: {e}") from None

    def _begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")


class SQLiteDatabase(Database):
    """SQLite: the writer runs on a thread of its own, and reads run there too, on its connection, between
    batches (sqlite3 releases the interpreter while its engine works, so a thread costs the event loop
    little)."""

    def __init__(self, path: Path, migrations: Sequence[Migration], *, synchronous: str, batch_max: int):
        super().__init__(SQLiteWriter(path, migrations, synchronous=synchronous), batch_max=batch_max)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writer")

    async def _call_writer(self, method: str, *args: Any) -> Any:
        return await self._run(getattr(self.writer, method), *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def read(self, op: Operation[T]) -> T:
        return await self._run(op, self.writer.conn)

    async def close(self) -> None:
        await super().close()
        self._executor.shutdown(wait=True)
