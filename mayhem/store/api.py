"""The handler's transaction API and the contract every database backend keeps.

For every message the worker runs the handler inside a :class:`Transaction`, then claims the
message id in the inbox table in that same transaction and commits. A second delivery of the
same id finds the inbox row and is acknowledged without running the handler; a concurrent one
loses the claim and rolls its effects back.

This module imports no database driver: a handler module, ``import mayhem`` and the tests
that need only the API load neither asyncpg nor aiosqlite.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
from typing import TYPE_CHECKING, Any, Final, Self

from mayhem.exceptions import StartupError, StoreUnavailable, TransactionClosed
from mayhem.store.inbox import PRUNE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

Row = dict[str, Any]
TRANSACTION_ENDED: Final = "ctx.db used after the message's transaction ended"
_NO_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})


def out_of_descriptors(exc: BaseException | None = None) -> bool:
    """Whether this process (or the system) is out of file descriptors.

    That is a local failure, not a database outage: with the database up, pausing consumption
    would not help and would requeue every message in the buffer, and the operator would look
    for the fault in the wrong place. Such a message fails and follows the retry policy (its
    attempt is counted; repeated, it ends in the dead-letter queue, never lost), and the log
    says why. ``exc`` is checked first; without an errno (SQLite reports none), a probe tries
    to open one descriptor.
    """
    if isinstance(exc, OSError):
        return exc.errno in _NO_DESCRIPTORS
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        return error.errno in _NO_DESCRIPTORS
    os.close(fd)
    return False


class AlreadyAppliedError(Exception):
    """The inbox has the id: roll back and report a duplicate. Never leaves the store."""


def describe(exc: BaseException) -> str:
    """``Type: text`` of an error, or its type alone when it has no text."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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

    async def __aenter__(self) -> Self:
        return self

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
            DecodeError: the id holds a NUL character (see
                :func:`~mayhem.store.inbox.check_message_id`); ``work`` did not run.
        """

    async def _in_transaction(
        self, body: Callable[[Transaction], Awaitable[None]], tx: Transaction | None = None
    ) -> bool:
        tx = tx or self.transaction()
        try:
            async with tx:
                await body(tx)
        except AlreadyAppliedError:
            return False
        except StoreUnavailable:
            raise
        except Exception as exc:
            if tx.lost:
                raise StoreUnavailable(describe(exc)) from exc
            raise
        return True

    async def prune(self, older_than: float) -> int:
        """Delete inbox rows processed before ``older_than`` (epoch seconds); return how many."""
        async with self.transaction() as tx:
            rows = await tx.fetch(PRUNE, older_than)
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
