"""The database: the inbox that makes effects exactly-once, on SQLite or PostgreSQL.

For every message the worker runs the handler inside a :class:`Transaction`, then claims the
message id in the inbox table in that same transaction and commits. A second delivery of the
same id finds the inbox row and is acknowledged without running the handler; a concurrent one
loses the claim and rolls its effects back. Both backends use PostgreSQL's ``$1`` placeholders.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import os
import re
import sqlite3
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar
from urllib.parse import urlsplit

import aiosqlite
import asyncpg

from mayhem.exceptions import (
    ConfigError,
    StartupError,
    StoreUnavailable,
    TransactionAborted,
    TransactionClosed,
)
from mayhem.redact import mask_url

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION: Final = 1
INBOX_TABLE: Final = "mayhem_inbox"
# The advisory lock that serializes schema changes of daemons starting together.
SCHEMA_LOCK: Final = 0x6D61796865
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS mayhem_schema (version INTEGER NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        processed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (queue, message_id)
    )""",
    f"CREATE INDEX IF NOT EXISTS {INBOX_TABLE}_processed_at ON {INBOX_TABLE} (processed_at)",
)
_SEEN: Final = f"SELECT 1 FROM {INBOX_TABLE} WHERE queue = $1 AND message_id = $2"
# With literals in place of the {} for _PostgresTransaction.claim, with $n for the rest.
_CLAIM_TEXT: Final = (
    f"INSERT INTO {INBOX_TABLE} (queue, message_id, processed_at) VALUES ({{}}, {{}}, {{}}) "
    "ON CONFLICT DO NOTHING"
)
_CLAIM: Final = _CLAIM_TEXT.format("$1", "$2", "$3")
_PRUNE: Final = f"DELETE FROM {INBOX_TABLE} WHERE processed_at < $1 RETURNING 1"

Row = dict[str, Any]
TRANSACTION_ENDED: Final = "ctx.db used after the message's transaction ended"
if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    PoolConnection = PoolConnectionProxy[asyncpg.Record]


class _AlreadyAppliedError(Exception):
    """The inbox has the id: roll back and report a duplicate. Never leaves this module."""


class Transaction(abc.ABC):
    """The handler's database handle (``ctx.db``): one transaction, begun on first use.

    Statements use ``$1, $2, ...`` placeholders on both backends. The transaction commits
    after the handler returns, together with the inbox row, or rolls back if it raises.

    Attributes:
        lost: a statement failed because the database could not be reached.
        ended: the transaction committed or rolled back; further statements raise
            :class:`TransactionClosed` (a handler thread that outlived its deadline).
    """

    lost: bool = False
    ended: bool = False
    _busy: int = 0
    _idle: asyncio.Event | None = None

    def _call_started(self) -> None:
        if self.ended:
            raise TransactionClosed(TRANSACTION_ENDED)
        self._busy += 1
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()

    def _call_done(self) -> None:
        self._busy -= 1
        if not self._busy and self._idle is not None:
            self._idle.set()

    async def _quiesce(self) -> None:
        """Refuse new statements, then wait for those in progress (a handler thread's)."""
        self.ended = True
        if self._busy and self._idle is not None:
            await self._idle.wait()

    @abc.abstractmethod
    async def execute(self, sql: str, *args: object) -> None:
        """Run a statement that returns no rows."""

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: object) -> list[Row]:
        """Run a query and return every row as a dict."""

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        """Run a query and return its first row, or ``None``."""
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: object) -> Any:  # noqa: ANN401 -- any column type
        """Run a query and return the first column of its first row, or ``None``."""
        row = await self.fetchrow(sql, *args)
        return next(iter(row.values())) if row else None

    @abc.abstractmethod
    async def claim(self, queue: str, message_id: str) -> bool:
        """Insert the inbox row; ``False`` if the message was already applied."""

    @abc.abstractmethod
    async def __aenter__(self) -> Self: ...

    @abc.abstractmethod
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit when the block succeeded, roll back otherwise."""


class BlockingTransaction:
    """``ctx.db`` for a plain ``def`` handler: the same calls, blocking its thread.

    Each call runs on the event loop, in the message's transaction, and waits for the result.
    """

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx
        self._loop = asyncio.get_running_loop()

    def _wait(self, call: Awaitable[Any]) -> Any:  # noqa: ANN401
        async def run() -> Any:  # noqa: ANN401
            return await call

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def execute(self, sql: str, *args: object) -> None:
        """Run a statement that returns no rows."""
        self._wait(self._tx.execute(sql, *args))

    def fetch(self, sql: str, *args: object) -> list[Row]:
        """Run a query and return every row as a dict."""
        rows: list[Row] = self._wait(self._tx.fetch(sql, *args))
        return rows

    def fetchrow(self, sql: str, *args: object) -> Row | None:
        """Run a query and return its first row, or ``None``."""
        row: Row | None = self._wait(self._tx.fetchrow(sql, *args))
        return row

    def fetchval(self, sql: str, *args: object) -> Any:  # noqa: ANN401
        """Run a query and return the first column of its first row, or ``None``."""
        return self._wait(self._tx.fetchval(sql, *args))


class Store(abc.ABC):
    """One database backend: the schema, the inbox and the connection lifecycle."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if it is missing.

        Raises:
            StartupError: the database cannot be reached or its schema is newer than ours.
        """

    @abc.abstractmethod
    async def close(self, timeout: float) -> None:
        """Close every connection, forcibly after ``timeout`` seconds."""

    @abc.abstractmethod
    async def seen(self, queue: str, message_id: str) -> bool:
        """Whether the inbox already has this message (committed)."""

    @abc.abstractmethod
    def transaction(self) -> Transaction:
        """A new transaction for one message: ``async with store.transaction() as tx``."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers."""

    @abc.abstractmethod
    async def apply(
        self, queue: str, message_id: str, work: Callable[[Transaction], Awaitable[None]]
    ) -> bool:
        """Run ``work(tx)`` and record ``message_id`` in the inbox, in one transaction.

        Returns:
            ``False`` when the inbox already has the id: ``work`` did not run, or a concurrent
            delivery of the same id committed first and ``work``'s effects were rolled back.

        Raises:
            StoreUnavailable: the database cannot be reached, also when ``work`` turned a
                lost connection into an error of its own.
        """

    async def _in_transaction(
        self, body: Callable[[Transaction], Awaitable[None]], tx: Transaction | None = None
    ) -> bool:
        tx = tx or self.transaction()
        try:
            async with tx:
                await body(tx)
        except _AlreadyAppliedError:
            return False
        except StoreUnavailable:
            raise
        except Exception as exc:
            if tx.lost:
                raise StoreUnavailable(_describe(exc)) from exc
            raise
        return True

    async def prune(self, older_than: float) -> int:
        """Delete inbox rows processed before ``older_than`` (epoch seconds); return how many."""
        async with self.transaction() as tx:
            rows = await tx.fetch(_PRUNE, older_than)
        return len(rows)

    async def run_setup(self, setup: Callable[[Transaction], Awaitable[None]]) -> None:
        """Run a handler's one-time setup (such as ``CREATE TABLE``) in its own transaction.

        Raises:
            StartupError: the setup failed.
        """
        try:
            async with self.transaction() as tx:
                await self._serialize_setup(tx)
                await setup(tx)
        except Exception as exc:
            raise StartupError(f"handler setup failed: {type(exc).__name__}: {exc}") from exc

    async def _serialize_setup(self, tx: Transaction) -> None:  # noqa: B027 -- SQLite: BEGIN IMMEDIATE serializes already
        """Keep daemons starting together from running their setups at the same time."""


def application_name() -> str:
    """How mayhem's PostgreSQL sessions show in ``pg_stat_activity``: with the process id."""
    return f"mayhem pid={os.getpid()}"


def open_store(db_url: str, *, pool_size: int) -> Store:
    """Pick the backend that ``db_url`` names.

    Raises:
        ConfigError: the URL names no supported database.
    """
    scheme = urlsplit(db_url).scheme
    if scheme == "sqlite":
        return SQLiteStore(sqlite_path(db_url))
    if scheme in {"postgresql", "postgres"}:
        return PostgresStore(db_url, pool_size=pool_size)
    raise ConfigError(f"db_url: unsupported database {scheme!r}")


def sqlite_path(db_url: str) -> Path:
    """``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db`` not."""
    return Path(urlsplit(db_url).path[1:])


@lru_cache(maxsize=1024)
def to_sqlite(sql: str) -> str:
    """Rewrite ``$1`` placeholders as SQLite's ``?1``, leaving quoted text alone."""
    return _PLACEHOLDER.sub(lambda m: f"?{m.group(1)}" if m.group(1) else m.group(0), sql)


_PLACEHOLDER: Final = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$(\d+)")

# SQLite result codes that mean the database cannot be used right now, not that the SQL is
# wrong (extended codes such as SQLITE_IOERR_FSYNC start with these).
_SQLITE_OUTAGE: Final = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
    "SQLITE_PROTOCOL",
)
LOCKED_RETRY_SECONDS: Final = 10.0


def _sqlite_outage(exc: sqlite3.Error) -> bool:
    return str(getattr(exc, "sqlite_errorname", "")).startswith(_SQLITE_OUTAGE)


async def _retry_locked(call: Callable[[], Awaitable[T]]) -> T:
    """Run ``call``, retrying while another process holds the database (daemons starting)."""
    deadline = time.monotonic() + LOCKED_RETRY_SECONDS
    delay = 0.01
    while True:
        try:
            return await call()
        except sqlite3.OperationalError as exc:
            name = str(getattr(exc, "sqlite_errorname", ""))
            if not name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


class SQLiteStore(Store):
    """SQLite through aiosqlite: WAL, ``synchronous=FULL``, one writer at a time.

    SQLite has one writer per database, so transactions are serialized: a transaction starts
    at the handler's first statement (or at the inbox claim), not when the handler starts, so
    a handler that waits before it writes does not hold up the others.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Held by one message from its first statement to the end of its savepoint.
        self._write_lock = asyncio.Lock()
        self._committer: asyncio.Task[None] | None = None
        self._batch_open = False
        self._batch: list[asyncio.Future[None]] = []
        # Inbox claims of messages whose handler wrote nothing: inserted by the group commit.
        self._claims: list[tuple[str, str, float, asyncio.Future[bool]]] = []
        # Inbox look-ups of one turn of the loop, answered together by one query.
        self._lookups: list[tuple[str, str, asyncio.Future[bool]]] = []
        self._lookup_tasks: set[asyncio.Task[None]] = set()

    async def apply(
        self, queue: str, message_id: str, work: Callable[[Transaction], Awaitable[None]]
    ) -> bool:
        """Run ``work(tx)`` and record ``message_id`` in the inbox, in one transaction.

        The inbox is checked first (on committed rows). A handler that wrote claims the id in
        its savepoint; one that wrote nothing has its id claimed by the group commit, with
        the ids of every other such message that finishes meanwhile, in one statement.

        Returns:
            ``False`` when the inbox already has the id: ``work`` did not run, or a concurrent
            delivery of the same id committed first and ``work``'s effects were rolled back.

        Raises:
            StoreUnavailable: the database cannot be reached.
        """
        if await self.seen(queue, message_id):
            return False
        tx = _SQLiteTransaction(self)

        async def work_then_claim(_: Transaction) -> None:
            await work(tx)
            if not tx.wrote:
                tx.deferred_claim = (queue, message_id)
            elif not await tx.claim(queue, message_id):
                raise _AlreadyAppliedError

        return await self._in_transaction(work_then_claim, tx)

    async def _enter(self) -> aiosqlite.Connection:
        """Take the writer for one message: join (or begin) the shared transaction."""
        await self._write_lock.acquire()
        db = self._writer
        if db is None:
            self._write_lock.release()
            raise StoreUnavailable("SQLite store is closed")
        if self._batch_open:
            return db
        begin = asyncio.ensure_future(self._begin_batch(db))
        try:
            await asyncio.shield(begin)
        except asyncio.CancelledError:
            # The BEGIN still runs in aiosqlite's thread: hand the writer on only after it.
            begin.add_done_callback(self._release_after)
            raise
        except sqlite3.Error as exc:
            self._write_lock.release()
            raise StoreUnavailable(f"cannot begin: {exc}") from exc
        except BaseException:
            self._write_lock.release()
            raise
        return db

    async def _begin_batch(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        self._batch_open = True

    def _release_after(self, begin: asyncio.Future[None]) -> None:
        if not begin.cancelled() and begin.exception() is not None:
            log.warning("SQLite BEGIN failed after its caller was cancelled: %s", begin.exception())
        self._write_lock.release()

    async def _leave(
        self, *, keep: bool, savepoint: bool, wait: bool = False
    ) -> asyncio.Future[None] | None:
        """End one message's savepoint; return the future of the commit that makes it durable.

        Group commit: the transaction commits when no other message waits for the writer,
        so the messages that finish together share one COMMIT (and one fsync).
        """
        waiter: asyncio.Future[None] | None = None
        db = self._writer
        try:
            if db is None:
                raise StoreUnavailable("SQLite store is closed")
            if savepoint:
                if not keep:
                    await db.execute("ROLLBACK TO message")
                await db.execute("RELEASE message")
            if keep or wait:
                waiter = asyncio.get_running_loop().create_future()
                self._batch.append(waiter)
        except sqlite3.Error as exc:
            # The savepoint cannot be closed: the whole shared transaction is lost.
            await self._fail_batch(db, StoreUnavailable(f"savepoint failed: {exc}"))
            if keep:
                raise StoreUnavailable(f"savepoint failed: {exc}") from exc
        finally:
            self._write_lock.release()
        self._kick()
        return waiter

    def _kick(self) -> None:
        """Make sure a committer runs: it commits as soon as it gets the writer."""
        if self._committer is None:
            self._committer = asyncio.ensure_future(self._commit_while_pending())

    async def _commit_while_pending(self) -> None:
        """Commit the shared transaction and the pending claims until none is left.

        Group commit: the committer waits for the writer behind the messages already waiting
        for it, so they join the transaction first; what finishes during a commit goes with
        the next one. It is a task of its own, so no cancelled worker can strand the others.
        """
        try:
            while self._batch_open or self._claims:
                await self._write_lock.acquire()
                try:
                    await self._commit_locked()
                finally:
                    self._write_lock.release()
        finally:
            self._committer = None

    async def _commit_locked(self) -> None:
        db = self._writer
        if db is None:
            await self._fail_batch(db, StoreUnavailable("SQLite store is closed"))
            return
        if self._batch_open and not db.in_transaction:
            # SQLite rolled the whole transaction back by itself (an I/O error, say).
            await self._fail_batch(db, StoreUnavailable("transaction was lost"))
            return
        batch, claims = self._batch, self._claims
        self._batch, self._claims = [], []
        try:
            if not self._batch_open:
                await db.execute("BEGIN IMMEDIATE")
                self._batch_open = True
            claimed = await _insert_claims(db, claims) if claims else []
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._batch, self._claims = batch + self._batch, claims + self._claims
            await self._fail_batch(db, StoreUnavailable(f"commit failed: {exc}"))
            return
        self._batch_open = False
        for waiter in batch:
            if not waiter.done():
                waiter.set_result(None)
        for (_, _, _, claim_waiter), fresh in zip(claims, claimed, strict=True):
            if not claim_waiter.done():
                claim_waiter.set_result(fresh)

    async def claim_at_commit(self, queue: str, message_id: str) -> bool:
        """Claim the id with the next group commit; ``False`` if the inbox has it already.

        Raises:
            StoreUnavailable: the commit failed.
        """
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._claims.append((queue, message_id, time.time(), waiter))
        self._kick()
        return await waiter

    async def _fail_batch(self, db: aiosqlite.Connection | None, error: StoreUnavailable) -> None:
        """Roll the shared transaction back and fail every message waiting for it."""
        batch, self._batch = self._batch, []
        claims, self._claims = self._claims, []
        was_open, self._batch_open = self._batch_open, False
        if was_open and db is not None:
            await _quiet_rollback(db)
        waiters: list[asyncio.Future[Any]] = [*batch, *(claim[3] for claim in claims)]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved here: a cancelled worker may not await it

    async def _connect(self) -> aiosqlite.Connection:
        connection = aiosqlite.connect(self.path, isolation_level=None)
        try:
            db = await connection
        except BaseException:
            # aiosqlite stops its thread without joining it (aiosqlite#241); join it here,
            # or it outlives the loop and prints a traceback at exit.
            await asyncio.to_thread(connection._thread.join, 5)  # noqa: SLF001
            raise
        try:
            db.row_factory = sqlite3.Row
            await db.execute("PRAGMA busy_timeout = 5000")
            await _retry_locked(lambda: db.execute("PRAGMA journal_mode = WAL"))
            await db.execute("PRAGMA synchronous = FULL")
        except BaseException:
            await db.close()
            raise
        return db

    async def open(self) -> None:
        """Open the writer and reader connections and create the schema."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await self._connect()
            self._reader = await self._connect()
            writer = self._writer
            for statement in _SCHEMA:
                await _retry_locked(functools.partial(writer.execute, statement))
            await _retry_locked(lambda: _check_version_sqlite(writer))
        except (OSError, sqlite3.Error) as exc:
            await self.close(1.0)
            raise StartupError(f"cannot open SQLite database {self.path}: {exc}") from None
        log.info("store open: SQLite %s (WAL, synchronous=FULL)", self.path)

    async def close(self, timeout: float) -> None:
        """Close both connections."""
        for db in (self._reader, self._writer):
            if db is not None:
                try:
                    await asyncio.wait_for(db.close(), timeout)
                except (TimeoutError, sqlite3.Error, ValueError) as exc:
                    log.warning("closing SQLite connection failed: %s", exc)
        self._reader = self._writer = None

    async def seen(self, queue: str, message_id: str) -> bool:
        """Look the id up on the reader connection, which sees only committed rows.

        The look-ups of one turn of the loop go to the reader's thread as one query.
        """
        if self._reader is None:
            raise StoreUnavailable("SQLite store is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._lookups.append((queue, message_id, waiter))
        if len(self._lookups) == 1:
            loop.call_soon(self._look_up)
        return await waiter

    def _look_up(self) -> None:
        lookups, self._lookups = self._lookups, []
        task = asyncio.ensure_future(self._look_up_batch(lookups))
        self._lookup_tasks.add(task)
        task.add_done_callback(self._lookup_tasks.discard)

    async def _look_up_batch(self, lookups: list[tuple[str, str, asyncio.Future[bool]]]) -> None:
        try:
            if self._reader is None:
                raise StoreUnavailable("SQLite store is closed")
            found = await _existing(self._reader, [(q, m) for q, m, _ in lookups])
        except (sqlite3.Error, StoreUnavailable) as exc:
            error: Exception = exc
            if isinstance(exc, sqlite3.Error) and _sqlite_outage(exc):
                error = StoreUnavailable(str(exc))
            for _, _, waiter in lookups:
                if not waiter.done():
                    waiter.set_exception(error)
                    waiter.exception()
            return
        for queue, message_id, waiter in lookups:
            if not waiter.done():
                waiter.set_result((queue, message_id) in found)

    def transaction(self) -> Transaction:
        """A transaction on the single writer connection."""
        return _SQLiteTransaction(self)

    async def ping(self) -> None:
        """Run ``SELECT 1`` on the reader."""
        if self._reader is None:
            raise StoreUnavailable("SQLite store is closed")
        try:
            await self._reader.execute("SELECT 1")
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc


async def _check_version_sqlite(db: aiosqlite.Connection) -> None:
    async with db.execute("SELECT max(version) FROM mayhem_schema") as cursor:
        row = await cursor.fetchone()
    version = row[0] if row else None
    if version is None:
        await db.execute("INSERT INTO mayhem_schema (version) VALUES (?)", (SCHEMA_VERSION,))
    elif version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema version {version} is newer than {SCHEMA_VERSION}")


_IN_CHUNK: Final = 500  # ids per IN (...) list: SQLite allows 32,766 parameters, be modest


async def _existing(db: aiosqlite.Connection, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which (queue, message_id) pairs the inbox has, as ``db`` sees it; few statements."""
    by_queue: dict[str, list[str]] = {}
    for queue, message_id in keys:
        by_queue.setdefault(queue, []).append(message_id)
    found: set[tuple[str, str]] = set()
    for queue, ids in by_queue.items():
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _IN_CHUNK):
            chunk = unique[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = await db.execute_fetchall(
                f"SELECT message_id FROM {INBOX_TABLE} "  # only ? marks are added
                f"WHERE queue = ? AND message_id IN ({marks})",
                (queue, *chunk),
            )
            found.update((queue, row[0]) for row in rows)
    return found


async def _insert_claims(
    db: aiosqlite.Connection, claims: list[tuple[str, str, float, asyncio.Future[bool]]]
) -> list[bool]:
    """Insert the claims the inbox does not have yet; say for each whether it was fresh.

    Run in the writer's transaction: it sees the committed rows and this group's own.
    """
    existing = await _existing(db, [(queue, message_id) for queue, message_id, _, _ in claims])
    fresh: list[bool] = []
    rows: list[tuple[str, str, float]] = []
    for queue, message_id, at, _ in claims:
        if (queue, message_id) in existing:
            fresh.append(False)  # a duplicate, reported once this commit is done
            continue
        existing.add((queue, message_id))
        rows.append((queue, message_id, at))
        fresh.append(True)
    if rows:
        await db.executemany(to_sqlite(_CLAIM), rows)
    return fresh


class _SQLiteTransaction(Transaction):
    """One message's work: a savepoint inside the store's shared (group-commit) transaction."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._db: aiosqlite.Connection | None = None
        self._savepoint = False
        self._conflict = False
        self.deferred_claim: tuple[str, str] | None = None

    @property
    def wrote(self) -> bool:
        """The handler ran a statement: it holds the writer and a savepoint."""
        return self._db is not None

    async def _begin(self) -> aiosqlite.Connection:
        if self._db is not None:
            return self._db
        if self.ended:
            raise TransactionClosed(TRANSACTION_ENDED)
        self._db = await self._store._enter()  # noqa: SLF001 -- the store's own transaction
        return self._db

    async def _run(self, sql: str, args: tuple[object, ...], *, alone: bool = False) -> list[Row]:
        self._call_started()
        try:
            return await self._statement(sql, args, alone=alone)
        finally:
            self._call_done()

    async def _statement(self, sql: str, args: tuple[object, ...], *, alone: bool) -> list[Row]:
        db = await self._begin()
        if self.ended:
            # It ended while this call waited for the writer: hand the writer straight on.
            self._db = None
            await asyncio.shield(self._store._leave(keep=False, savepoint=False))  # noqa: SLF001
            raise TransactionClosed(TRANSACTION_ENDED)
        try:
            if not alone and not self._savepoint:
                # The handler's statements can be undone apart from the other messages'.
                # A lone claim needs no savepoint: one statement is atomic by itself.
                await db.execute("SAVEPOINT message")
                self._savepoint = True
            rows = await db.execute_fetchall(to_sqlite(sql), args)
        except sqlite3.Error as exc:
            if _sqlite_outage(exc):
                self.lost = True
                raise StoreUnavailable(str(exc)) from exc
            raise
        finally:
            if not db.in_transaction:
                # ROLLBACK-style SQL (or an I/O error) ended the shared transaction: the
                # other messages in it are lost too, and this one cannot go on.
                self.lost = True
                raise StoreUnavailable("the shared transaction was rolled back")
        return [dict(row) for row in rows]

    async def execute(self, sql: str, *args: object) -> None:
        """Run a statement in the transaction."""
        await self._run(sql, args)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        """Run a query in the transaction."""
        return await self._run(sql, args)

    async def claim(self, queue: str, message_id: str) -> bool:
        """Insert the inbox row unless it is there."""
        rows = await self._run(
            _CLAIM + " RETURNING 1", (queue, message_id, time.time()), alone=True
        )
        if not rows:
            # The row may be another message's, not yet committed in this same group:
            # report the duplicate only once that commit is done.
            self._conflict = True
        return len(rows) == 1

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._quiesce()
        db, self._db = self._db, None
        if db is None:
            claim = self.deferred_claim
            if exc_type is None and claim and not await self._store.claim_at_commit(*claim):
                raise _AlreadyAppliedError
            return
        # Shielded: a cancelled worker must still close its savepoint and hand the connection
        # on; the group commit then goes ahead without it.
        committed = await asyncio.shield(
            self._store._leave(  # noqa: SLF001
                keep=exc_type is None, savepoint=self._savepoint, wait=self._conflict
            )
        )
        if committed is not None:
            await committed


async def _quiet_rollback(db: aiosqlite.Connection) -> None:
    try:
        await db.execute("ROLLBACK")
    except sqlite3.Error:
        log.debug("rollback after a failed commit failed too", exc_info=True)


# asyncpg errors that mean the server or the connection is gone, not that the SQL is wrong.
_PG_OUTAGE: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # the protocol state broke with the connection
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    OSError,
    TimeoutError,
)


class PostgresStore(Store):
    """PostgreSQL through an asyncpg pool sized to the concurrency."""

    def __init__(self, dsn: str, *, pool_size: int) -> None:
        # asyncpg passes unknown query parameters as server settings (e.g. search_path).
        self._dsn = dsn
        self._shown = mask_url(dsn)
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Create the pool and the schema."""
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                server_settings={"application_name": application_name()},
                # Every transaction resets the session in its own COMMIT or ROLLBACK round
                # trip (see _PostgresTransaction); the pool's own reset would add one more.
                reset=_reset_in_transaction,
            )
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                for statement in _SCHEMA:
                    await conn.execute(statement)
                version = await conn.fetchval("SELECT max(version) FROM mayhem_schema")
                if version is None:
                    await conn.execute(
                        "INSERT INTO mayhem_schema (version) VALUES ($1)", SCHEMA_VERSION
                    )
                elif version > SCHEMA_VERSION:
                    msg = f"schema version {version} is newer than {SCHEMA_VERSION}"
                    raise asyncpg.PostgresError(msg)
        except (*_PG_OUTAGE, asyncpg.PostgresError) as exc:
            await self.close(1.0)
            raise StartupError(f"cannot open database {self._shown}: {exc}") from None
        log.info("store open: PostgreSQL %s (pool of %d)", self._shown, self._pool_size)

    async def close(self, timeout: float) -> None:
        """Close the pool; terminate it when connections are not released in time."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # asyncpg's close() waits forever for checked-out connections.
            await asyncio.wait_for(pool.close(), timeout)
        except (TimeoutError, *_PG_OUTAGE) as exc:
            log.warning("PostgreSQL pool did not close in %.1f s (%r): terminating", timeout, exc)
            pool.terminate()

    async def _serialize_setup(self, tx: Transaction) -> None:
        # Concurrent CREATE TABLE IF NOT EXISTS can fail in PostgreSQL (pg_type unique key).
        await tx.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("PostgreSQL store is closed")
        return self._pool

    async def seen(self, queue: str, message_id: str) -> bool:
        """Look the id up in the inbox."""
        try:
            return await self._require_pool().fetchval(_SEEN, queue, message_id) is not None
        except _PG_OUTAGE as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    def transaction(self) -> Transaction:
        """A transaction on a pooled connection, taken at its first statement."""
        return _PostgresTransaction(self._require_pool())

    async def apply(
        self, queue: str, message_id: str, work: Callable[[Transaction], Awaitable[None]]
    ) -> bool:
        """Claim the id first, then run ``work``, in one transaction (see :meth:`Store.apply`).

        PostgreSQL holds the new inbox row's lock until the commit, so a concurrent delivery
        of the same id waits, then finds it and skips the handler; and it saves a round trip.
        """

        async def claim_then_work(tx: Transaction) -> None:
            if not await tx.claim(queue, message_id):
                raise _AlreadyAppliedError
            await work(tx)

        return await self._in_transaction(claim_then_work)

    async def ping(self) -> None:
        """Run ``SELECT 1`` on a pooled connection."""
        try:
            await self._require_pool().fetchval("SELECT 1", timeout=5)
        except _PG_OUTAGE as exc:
            raise StoreUnavailable(_describe(exc)) from exc


# Errors of a statement that mean its connection is gone, whatever the connection reports.
_PG_CONNECTION_LOST: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_PLAIN_STATEMENT: Final = re.compile(
    r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH|VALUES|TABLE|MERGE)\b", re.IGNORECASE
)
# Functions that change the session from inside a plain statement.
_SESSION_FUNCTIONS: Final = re.compile(r"pg_advisory|set_config|dblink", re.IGNORECASE)


@lru_cache(maxsize=1024)
def _leaves_no_session_state(sql: str) -> bool:
    """Plain DML or a query that calls no session-changing function.

    Anything else (SET, LISTEN, DECLARE, PREPARE, a leading comment, several statements in
    one text...) makes the end of the transaction reset the session, as asyncpg's pool would.
    A function of the user's own that changes the session must do it transaction-locally
    (``SET LOCAL``).
    """
    one = sql.rstrip().rstrip(";")
    return (
        ";" not in one  # several statements in one text: any of them may change the session
        and bool(_PLAIN_STATEMENT.match(one))
        and not _SESSION_FUNCTIONS.search(one)
    )


def _literal(text: str) -> str:
    """``text`` as a PostgreSQL dollar-quoted literal: nothing in it is read as SQL.

    The tag is chosen so that its first occurrence after the opening one is the closing one.
    """
    number = 0
    tag = "$m$"
    while (text + tag).find(tag) != len(text):
        number += 1
        tag = f"$m{number}$"
    return f"{tag}{text}{tag}"


async def _reset_in_transaction(_: asyncpg.Connection) -> None:
    """The pool's reset: nothing left to do.

    A transaction whose statements may have changed the session ends with ``COMMIT;
    <asyncpg's reset query>`` in one round trip; plain DML leaves nothing to reset, nor do
    the other uses of the pool (the schema, look-ups, pings); and asyncpg still rolls back a
    transaction left open.
    """


class _PostgresTransaction(Transaction):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: PoolConnection | None = None
        self._begun = False
        # A handler statement may have left session state behind (SET, LISTEN, an advisory
        # lock...): the end of the transaction resets the session too.
        self._dirty = False
        self.aborted: BaseException | None = None

    async def _acquire(self) -> PoolConnection:
        if self.ended:
            raise TransactionClosed(TRANSACTION_ENDED)
        try:
            # No timeout: the pool has a connection for every worker, and asyncpg's
            # timeout costs a task per acquire.
            conn = await self._pool.acquire()
        except _PG_OUTAGE as exc:
            self.lost = True
            raise StoreUnavailable(_describe(exc)) from exc
        self._conn = conn
        return conn

    async def _call(
        self,
        call: Callable[[PoolConnection], Awaitable[Any]],
        *,
        opening: str | None = None,
    ) -> Any:  # noqa: ANN401 -- what the statement returns
        """Run ``call`` in the transaction, beginning it first if this is its first statement.

        ``opening`` is the same statement as SQL text, sent with the ``BEGIN`` in one round
        trip when it is the first.
        """
        self._call_started()
        try:
            conn = self._conn or await self._acquire()
            try:
                if not self._begun:
                    self._begun = True
                    if opening is not None:
                        return await conn.execute(f"BEGIN; {opening}")
                    await conn.execute("BEGIN")
                return await call(conn)
            except Exception as exc:
                # A lost connection is not the message's fault; an SQL error, a statement
                # timeout or a misuse of ctx.db on a live connection is the handler's.
                if conn.is_closed() or isinstance(exc, _PG_CONNECTION_LOST):
                    self.lost = True
                    raise StoreUnavailable(_describe(exc)) from exc
                # PostgreSQL has now failed the whole transaction: COMMIT would roll it
                # back without an error, so it must never be taken for a success.
                self.aborted = exc
                raise
        finally:
            self._call_done()

    async def execute(self, sql: str, *args: object) -> None:
        """Run a statement in the transaction."""
        self._dirty = self._dirty or not _leaves_no_session_state(sql)
        await self._call(lambda conn: conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        """Run a query in the transaction."""
        self._dirty = self._dirty or not _leaves_no_session_state(sql)
        records = await self._call(lambda conn: conn.fetch(sql, *args))
        return [dict(record) for record in records]

    async def claim(self, queue: str, message_id: str) -> bool:
        """Insert the inbox row unless it is there; waits for a concurrent claim to settle."""
        at = time.time()
        opening = None
        if "\0" not in queue + message_id:
            # As text, so that it goes with the BEGIN: one round trip less per message.
            opening = _CLAIM_TEXT.format(_literal(queue), _literal(message_id), repr(at))
        status = await self._call(
            lambda conn: conn.execute(_CLAIM, queue, message_id, at), opening=opening
        )
        return bool(status == "INSERT 0 1")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._quiesce()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        commit = exc_type is None and self.aborted is None
        try:
            # Cancelled meanwhile, _finish drops the connection: the server rolls back (or
            # has committed: then the redelivery finds the inbox row).
            await self._finish(conn, commit=commit)
        except Exception as error:
            if not commit:
                # The block failed already and the server rolls back a transaction whose
                # connection is gone: the first error is the one that counts.
                log.debug("rollback failed: %s", _describe(error))
            elif isinstance(error, _PG_OUTAGE) or conn.is_closed():
                self.lost = True
                raise StoreUnavailable(f"commit failed: {_describe(error)}") from error
            else:
                raise
        if exc_type is None and self.aborted is not None:
            # The handler caught a failed statement and returned: nothing was committed.
            msg = (
                f"a statement failed and the transaction was rolled back: {_describe(self.aborted)}"
            )
            raise TransactionAborted(msg) from self.aborted

    async def _finish(self, conn: PoolConnection, *, commit: bool) -> None:
        try:
            # The end of the transaction and the session reset in one round trip.
            end = "COMMIT" if commit else "ROLLBACK"
            await conn.execute(f"{end}; {conn.get_reset_query()}" if self._dirty else end)
        except BaseException:
            # Never give a connection in an unknown state back to the pool.
            conn.terminate()
            raise
        finally:
            await self._pool.release(conn)
