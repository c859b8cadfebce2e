"""The SQLite backend, through aiosqlite: WAL, ``synchronous=FULL``, one writer at a time.

The writer and its group commit live in :mod:`mayhem.store.group_commit`; this module holds
the store (schema, look-ups on a reader connection, pings) and one message's transaction.

Files: a new database is created owner-only, ``0600`` whatever the umask (which can only take
more away), in a directory created ``0700``. A database file that exists keeps its mode (a
warning says so when every user can read it), and SQLite gives its ``-wal`` and ``-shm`` files
the database file's mode. So for a group to read it (a backup job, say), ``chgrp`` and
``chmod 0640`` it once: mayhem never widens a mode, under systemd or not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sqlite3
import stat
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import aiosqlite

from mayhem.exceptions import StartupError, StoreUnavailable, TransactionClosed
from mayhem.store.api import (
    TRANSACTION_ENDED,
    AlreadyAppliedError,
    Row,
    Store,
    Transaction,
    out_of_descriptors,
)
from mayhem.store.group_commit import CLOSED, GroupCommit, existing
from mayhem.store.inbox import CLAIM, SCHEMA, SCHEMA_VERSION, check_message_id

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

log = logging.getLogger(__name__)
T = TypeVar("T")

# The database file's mode when mayhem creates it (the umask may take more away).
FILE_MODE: Final = 0o600


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
# Codes that a process out of file descriptors gets too (a temporary file it cannot open).
_SQLITE_MAYBE_LOCAL: Final = ("SQLITE_CANTOPEN", "SQLITE_IOERR")
LOCKED_RETRY_SECONDS: Final = 10.0


def sqlite_outage(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` means the database cannot be used now (not wrong SQL, not our process).

    A file SQLite cannot open while this process is out of descriptors is the process's
    failure, not the database's: the message is retried, consuming goes on (see
    :func:`~mayhem.store.api.out_of_descriptors`).
    """
    name = str(getattr(exc, "sqlite_errorname", ""))
    if not name.startswith(_SQLITE_OUTAGE):
        return False
    if name.startswith(_SQLITE_MAYBE_LOCAL) and out_of_descriptors():
        log.warning(
            "SQLite %s while this process is out of file descriptors: not a database "
            "outage; the message is retried (raise LimitNOFILE or find what holds them)",
            name,
        )
        return False
    return True


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


def _create_private(path: Path) -> None:
    """Create the database file owner-only, unless it exists; warn if others can read it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        mode = path.stat().st_mode
        if stat.S_ISREG(mode) and mode & stat.S_IRWXO:
            log.warning(
                "%s has mode %04o: every user can read the messages' effects (chmod 0600)",
                path,
                stat.S_IMODE(mode),
            )
        return
    os.close(fd)  # an empty file is an empty SQLite database


class SQLiteStore(Store):
    """SQLite through aiosqlite: WAL, ``synchronous=FULL``, one writer at a time.

    SQLite has one writer per database, so transactions are serialized: a transaction starts
    at the handler's first statement (or at the inbox claim), not when the handler starts, so
    a handler that waits before it writes does not hold up the others.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._group = GroupCommit()
        self._reader: aiosqlite.Connection | None = None
        # Inbox look-ups of one turn of the loop, answered together by one query.
        self._lookups: list[tuple[str, str, asyncio.Future[bool]]] = []
        self._lookup_tasks: set[asyncio.Task[None]] = set()

    @property
    def _writer(self) -> aiosqlite.Connection | None:
        return self._group.writer

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
            DecodeError: the id holds a NUL character (see :func:`check_message_id`).
        """
        check_message_id(message_id)
        if await self.seen(queue, message_id):
            return False
        tx = SQLiteTransaction(self._group)

        async def work_then_claim(_: Transaction) -> None:
            await work(tx)
            if not tx.wrote:
                tx.deferred_claim = (queue, message_id)
            elif not await tx.claim(queue, message_id):
                raise AlreadyAppliedError

        return await self._in_transaction(work_then_claim, tx)

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
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_private(self.path)
            writer = self._group.writer = await self._connect()
            self._reader = await self._connect()
            for statement in SCHEMA:
                await _retry_locked(functools.partial(writer.execute, statement))
            await _retry_locked(lambda: _check_version_sqlite(writer))
        except (OSError, sqlite3.Error) as exc:
            await self.close(1.0)
            raise StartupError(f"cannot open SQLite database {self.path}: {exc}") from None
        log.info("store open: SQLite %s (WAL, synchronous=FULL)", self.path)

    async def close(self, timeout: float) -> None:
        """Commit what can be, close both connections, and wait for the store's tasks."""
        await self._group.close(timeout)
        reader, self._reader = self._reader, None
        if self._lookup_tasks:
            # Look-ups still on the reader: they end before it closes.
            await asyncio.wait(set(self._lookup_tasks), timeout=timeout)
        if reader is not None:
            try:
                await asyncio.wait_for(reader.close(), timeout)
            except (TimeoutError, sqlite3.Error, ValueError) as exc:
                log.warning("closing SQLite connection failed: %s", exc)

    async def seen(self, queue: str, message_id: str) -> bool:
        """Look the id up on the reader connection, which sees only committed rows.

        The look-ups of one turn of the loop go to the reader's thread as one query.
        """
        if self._reader is None:
            raise StoreUnavailable(CLOSED)
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
            reader = self._reader
            if reader is None:
                raise StoreUnavailable(CLOSED)
            found = await existing(reader, [(q, m) for q, m, _ in lookups])
        except (sqlite3.Error, StoreUnavailable) as exc:
            error: Exception = exc
            if isinstance(exc, sqlite3.Error) and sqlite_outage(exc):
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
        return SQLiteTransaction(self._group)

    async def ping(self) -> None:
        """Run ``SELECT 1`` on the reader."""
        if self._reader is None:
            raise StoreUnavailable(CLOSED)
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


class SQLiteTransaction(Transaction):
    """One message's work: a savepoint inside the store's shared (group-commit) transaction."""

    def __init__(self, group: GroupCommit) -> None:
        self._group = group
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
        self._db = await self._group.enter()
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
            await asyncio.shield(self._group.leave(keep=False, savepoint=False))
            raise TransactionClosed(TRANSACTION_ENDED)
        try:
            if not alone and not self._savepoint:
                # The handler's statements can be undone apart from the other messages'.
                # A lone claim needs no savepoint: one statement is atomic by itself.
                await db.execute("SAVEPOINT message")
                self._savepoint = True
            rows = await db.execute_fetchall(to_sqlite(sql), args)
        except sqlite3.Error as exc:
            if sqlite_outage(exc):
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
        rows = await self._run(CLAIM + " RETURNING 1", (queue, message_id, time.time()), alone=True)
        if not rows:
            # The row may be another message's, not yet committed in this same group:
            # report the duplicate only once that commit is done.
            self._conflict = True
        return len(rows) == 1

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
            if exc_type is None and claim and not await self._group.claim(*claim):
                raise AlreadyAppliedError
            return
        # Shielded: a cancelled worker must still close its savepoint and hand the connection
        # on; the group commit then goes ahead without it.
        committed = await asyncio.shield(
            self._group.leave(keep=exc_type is None, savepoint=self._savepoint, wait=self._conflict)
        )
        if committed is not None:
            await committed
