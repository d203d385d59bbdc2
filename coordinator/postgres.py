"""The PostgreSQL engine: the store's SQL run through psycopg 3, for coordinator replicas that share a server.

Why psycopg 3 (synchronous, C build) and not asyncpg: the store modules are synchronous functions of a
connection, run by one writer (a process of its own: :class:`PostgresDatabase`), so that one function reads
the state it decides on and writes the decision in one transaction; psycopg's blocking API keeps that shape
(asyncpg would turn every store function into a coroutine). Measured before choosing (2 cores, loopback, 2,000
iterations, twice): the coordinator's write shape (BEGIN, the advisory lock, an INSERT, an UPDATE, a SELECT,
COMMIT) took 1,075-1,080 us a transaction with psycopg binding client-side and 1,295-1,431 us with asyncpg
(prepared statements and its transaction block: psycopg 0.75-0.83x the time); a one-row SELECT 209-211 us
against 204-205 us (1.02-1.04x). The engine against SQLite, one and two replicas: bench/coordinator_load.py.

How it keeps SQLite's guarantees:

- **Serialised writes.** Every write transaction first takes one transaction-scoped advisory lock
  (:data:`WRITE_LOCK`), so writes from all replicas run one at a time, as SQLite's single writer does: a
  store function that reads a balance and writes it back cannot lose an update. Group commit
  (:class:`coordinator.db.Database`) makes one lock and one commit serve a batch of requests; the batch
  runs in the replica's writer process, so the driver's work does not hold the event loop's interpreter.
- **Few round trips.** A batch runs in psycopg's pipeline mode: statements whose results nobody reads
  yet (savepoints, UPDATEs, INSERTs) go out without waiting, and a read or the end of an operation waits
  for them, so an operation's errors still surface inside it (one replica: 282 to 558 heartbeats/s).
  Heartbeats, the hot path, are batched besides (:meth:`coordinator.db.Database.write_batched`): those of
  one batch share one read, one insert and one update per table, so the statements and round trips per
  heartbeat fall with the load (the store alone: 568 to about 4,500 heartbeats/s; the server's CPU per
  heartbeat 480 to 101 us; bench/coordinator_load.py and docs/performance.md for the whole coordinator).
  A nonce claim travels in the round trip of the request's first read (:func:`coordinator.sql.send_claims`),
  and no step of a batch waits for its own writes: they reach the server with a later step's read or
  with the COMMIT (:meth:`coordinator.db.Database._commit_batch`; a failed statement runs the batch again
  with every step settled, so that it refuses only its own request). A batch of heartbeats is two round
  trips, its read and its commit, and an offer update among them adds one, its read.
- **Consistent reads.** Each read runs in a REPEATABLE READ, READ ONLY transaction on a pool of reader
  connections (reads do not queue behind writes, and a read sees one snapshot across its statements).
- **The same SQL.** :class:`Connection` takes the store's ``?`` placeholders (bound server-side: psycopg
  prepares a statement after its fifth use, which spares the server parsing and planning the hot ones),
  returns rows addressable by name and position like ``sqlite3.Row``, and loads NUMERIC (what
  PostgreSQL's SUM of BIGINT returns) as ``int`` or ``float``.
- **Leadership.** Work that must run once across replicas (clearing, sweeps) runs on the replica that
  holds the session advisory lock :data:`LEADER_LOCK` (:class:`Leadership`); PostgreSQL releases it the
  moment that replica's connection closes, which a SIGKILL does at once, and within about
  :data:`KEEPALIVE_SECONDS` when its host vanishes without closing it (TCP keepalives on that session).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.adapt import Loader
from psycopg.pq import TransactionStatus

from coordinator.db import Database, Migration, Operation, StoreUnavailable, T, Writer

logger = logging.getLogger(__name__)

WRITE_LOCK = 0x6869766501  # "hive" 1: held by every write transaction, across every replica
LEADER_LOCK = 0x6869766502  # "hive" 2: held by the replica that clears the market and sweeps leases
# The server probes the leader's connection after 5 s of silence, every 1 s, 3 times: a leader whose host
# vanished (no FIN) loses the lock after about this long.
KEEPALIVE = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 1, "tcp_keepalives_count": 3}
KEEPALIVE_SECONDS = 8
# The coordinator's tables are small and hot (every page cached): an index lookup costs about what reading a
# page in order does. At PostgreSQL's default (4, for spinning disks) the planner scanned all 2,000 leases and
# hashed them to update a heartbeat batch's 16 (0.43 ms a statement, measured); at this cost it looks the 16
# up (0.10 ms), and the gap grows with the table.
PLANNER = {"random_page_cost": 1.1}


def redact(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _one_line(error: Exception) -> str:
    """libpq's messages span lines (a hint on the second); errors here are one line each."""
    return " ".join(str(error).split())


@functools.lru_cache(maxsize=4096)
def _pyformat(query: str) -> str:
    """The store's ``?`` placeholders as psycopg's ``%s``; a literal ``%`` (in LIKE patterns) doubled."""
    out: list[str] = []
    quoted = False
    for ch in query:
        if ch == "'":
            quoted = not quoted
        if ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


class Row:
    """A result row addressable as ``row["column"]``, ``row[0]`` and by unpacking, as ``sqlite3.Row`` is."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: Sequence[Any]):
        self._index = index
        self._values = values

    def __getitem__(self, key: str | int) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: psycopg.Cursor) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(index, values)


class _NumberLoader(Loader):
    """NUMERIC as ``int`` when whole, else ``float``: SQLite has no decimals, and the store's code does
    integer arithmetic on SUMs of BIGINT columns (which PostgreSQL returns as NUMERIC)."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        return float(text) if any(c in text for c in ".eEN") else int(text)


class Connection:
    """A psycopg connection that speaks the store's SQL (the subset of ``sqlite3.Connection`` it uses)."""

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw
        self.pipeline: psycopg.Pipeline | None = None  # set while the writer commits a batch
        self._last: psycopg.Cursor | None = None  # the cursor of the statement sent last

    def execute(self, query: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        cursor = self._last = self.raw.cursor()
        if params:
            cursor.execute(_pyformat(query), params)
        else:
            cursor.execute(query)
        return cursor

    def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        cursor = self._last = self.raw.cursor()
        cursor.executemany(_pyformat(query), rows)

    def sync(self) -> None:
        """Wait for every statement sent so far (in pipeline mode they are sent without waiting), raising
        the first one's error; no round trip when the last one's result is already here (results come in
        order: an operation that ended with a read has nothing left to wait for)."""
        if self.pipeline is not None and (self._last is None or self._last.pgresult is None):
            self.pipeline.sync()

    def recover(self, *, deferred: bool) -> None:
        """Take statements again after an error: in pipeline mode the server discards what follows an
        error until a sync, which raises that error or ``PipelineAborted``. Settled, that error is the
        operation's own and already known; ``deferred``, it may be an earlier operation's: raised."""
        if self.pipeline is None:
            return
        if deferred:
            self.pipeline.sync()
            return
        with contextlib.suppress(psycopg.Error):
            self.pipeline.sync()

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:
        self.raw.close()


def connect(url: str) -> Connection:
    """A connection in autocommit mode (the engine issues BEGIN and COMMIT itself); :class:`StoreUnavailable`
    names the server (without its password) and why."""
    try:
        raw = psycopg.connect(url, autocommit=True, row_factory=_row_factory)
    except psycopg.Error as e:
        raise StoreUnavailable(f"cannot connect to the database {redact(url)}: {_one_line(e)}") from None
    raw.adapters.register_loader("numeric", _NumberLoader)
    for name, value in PLANNER.items():
        raw.execute(f"SET {name} = {value}")
    return Connection(raw)


class PostgresWriter(Writer):
    """The writer connection: group commit in pipeline mode, every transaction under :data:`WRITE_LOCK`.
    It runs in a process of its own (:class:`PostgresDatabase`)."""

    database_error = psycopg.Error

    def __init__(self, url: str, migrations: Sequence[Migration]):
        super().__init__(redact(url), migrations)
        self.url = url

    def _connect(self) -> Connection:
        return connect(self.url)

    def open(self) -> None:
        try:
            super().open()
        except psycopg.Error as e:
            raise StoreUnavailable(f"cannot migrate the database {self.name}: {_one_line(e)}") from None

    def _begin(self, conn: Connection) -> None:
        conn.execute("BEGIN")
        conn.execute(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    def commit_batch(
        self, ops: list[tuple[Operation[Any], Any]], *, deferred: bool = True
    ) -> list[tuple[bool, Any]]:
        if self.conn is None or self.conn.closed:  # the server restarted or the link broke: reconnect
            self.conn = self._connect()
        try:
            with self.conn.raw.pipeline() as self.conn.pipeline:
                return super().commit_batch(ops, deferred=deferred)
        except psycopg.Error as e:
            if self.conn.raw.broken or self.conn.closed:
                self.conn.close()
                raise StoreUnavailable(f"lost the database {self.name}: {_one_line(e)}") from None
            if not deferred:
                self.conn.close()  # its transaction may be left aborted
                raise
            # A deferred statement failed: nothing in the batch was applied. Run it again with every step
            # settled, so the error refuses only its own request, on a new connection (an aborted pipeline
            # leaves psycopg's prepared statements out of step with the server's: "prepared statement
            # _pg3_0 does not exist").
            logger.info(f"A batch's deferred statement failed ({_one_line(e)}); running the batch again")
            self.conn.close()
            return self.commit_batch(ops, deferred=False)
        finally:
            self.conn.pipeline = None

    def _settle(self, conn: Connection) -> None:
        conn.sync()

    def _recover(self, conn: Connection, *, deferred: bool) -> None:
        conn.recover(deferred=deferred)


_writer: PostgresWriter | None = None  # in a writer process: the writer it serves


def _adopt(writer: PostgresWriter) -> None:
    """A writer process's start: serve ``writer``. Ctrl-C, and a SIGTERM sent to the process group (a
    service manager's stop), reach the writer too; the replica shuts its writer down itself, after the
    batch in hand. A replica that dies (SIGKILL) cannot: the writer then exits at once (measured without
    this: an orphan blocked on its queue for good)."""
    global _writer
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    _writer = writer
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with, args=(parent.sentinel,), daemon=True, name="replica-watch"
        ).start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)  # a batch in hand is rolled back by the server as the connection closes


def _in_writer(method: str, *args: Any) -> Any:
    """Run the writer's ``method`` in its process. What crosses back must unpickle in the replica: an
    exception that would not (a driver's, say) comes back as a RuntimeError quoting it."""
    assert _writer is not None
    try:
        result = getattr(_writer, method)(*args)
    except Exception as e:
        raise _portable(e) from None
    if method == "commit_batch":
        result = [(ok, value if ok else _portable(value)) for ok, value in result]
    return result


def _portable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class PostgresDatabase(Database):
    """PostgreSQL: the writer in a process of its own, ``readers`` reader connections on threads.

    Why a process: psycopg holds the interpreter while it sends and parses (its C code) and in its
    per-statement Python, 135 us a heartbeat measured beside the event loop's 330 (py-spy ``--gil``),
    where SQLite's writer holds it 20 us. On a thread that time came out of the event loop's: one
    replica's ceiling was about 1,600 heartbeats/s; with the writer in a process it served 2,579/s at 128
    connections on 1.26 cores (2 cores, bench/coordinator_load.py; at 32 connections, where a replica
    waits on its batch's round trips, no change showed). A batch crosses as one pickle each way (every
    write is a :class:`Call`).

    Should the process die, the batch in hand is answered 503 (its requests may or may not have
    committed; a retry with the same bytes is applied at most once) and the next batch starts a new one.
    """

    def __init__(self, url: str, migrations: Sequence[Migration], *, batch_max: int, readers: int):
        super().__init__(PostgresWriter(url, migrations), batch_max=batch_max)
        self.url = url
        self._process: ProcessPoolExecutor | None = None
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="db-reader")
        self._local = threading.local()
        self._reader_conns: list[Connection] = []
        self._reader_lock = threading.Lock()

    async def _call_writer(self, method: str, *args: Any) -> Any:
        if self._process is None:
            self._process = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),  # a fork would copy the replica's threads
                initializer=_adopt,
                initargs=(self.writer,),
            )
        try:
            return await asyncio.get_running_loop().run_in_executor(self._process, _in_writer, method, *args)
        except BrokenProcessPool:
            self._process.shutdown(wait=False)
            self._process = None
            raise StoreUnavailable(f"the writer process of {self.name} died") from None

    async def read(self, op: Operation[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, op)

    def _read(self, op: Operation[T]) -> T:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect(self.url)
            with self._reader_lock:
                self._reader_conns.append(conn)
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                return op(conn)
            finally:
                if conn.in_transaction and not conn.closed:
                    conn.execute("ROLLBACK")
        except psycopg.OperationalError as e:
            conn.close()
            raise StoreUnavailable(f"lost the database {self.name}: {_one_line(e)}") from None

    async def close(self) -> None:
        if self._process is not None:
            try:
                await super().close()
            except StoreUnavailable as e:  # a writer that died took its connection with it
                logger.warning(str(e))
            if self._process is not None:
                self._process.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()


class Leadership:
    """Whether this replica leads: holds :data:`LEADER_LOCK` on a connection of its own.

    A session advisory lock lives as long as the connection that took it, so a replica that dies (its
    socket closes) hands leadership on without any timeout; :meth:`check` runs on a worker thread each
    time the replica's background jobs are due, and reconnects and retries when the connection is gone.
    """

    def __init__(self, url: str):
        self.url = url
        self._conn: Connection | None = None
        self._held = False

    def check(self) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self._conn, self._held = connect(self.url), False
                for name, value in KEEPALIVE.items():
                    self._conn.execute(f"SET {name} = {value}")
            if self._held:
                self._conn.execute("SELECT 1")
            else:
                self._held = bool(
                    self._conn.execute(f"SELECT pg_try_advisory_lock({LEADER_LOCK})").fetchone()[0]
                )
        except (psycopg.Error, StoreUnavailable) as e:
            logger.warning(f"Lost the leadership connection to {redact(self.url)}: {e}")
            if self._conn is not None:
                self._conn.close()
            self._conn, self._held = None, False
        return self._held

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn, self._held = None, False
