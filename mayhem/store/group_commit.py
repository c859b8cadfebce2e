"""SQLite's writer connection, shared by every message and committed in groups.

SQLite has one writer per database. Each message that writes takes the writer for its own
savepoint inside one shared transaction; the transaction commits when no other message waits
for the writer, so the messages that finish together share one COMMIT (and one fsync).
Messages whose handler wrote nothing have their inbox rows inserted by that same commit.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any, Final

import aiosqlite

from mayhem.exceptions import StoreUnavailable
from mayhem.store.inbox import CLAIM_TEXT, INBOX_TABLE

log = logging.getLogger(__name__)

CLOSED: Final = "SQLite store is closed"
_CLAIM_SQLITE: Final = CLAIM_TEXT.format("?1", "?2", "?3")
_IN_CHUNK: Final = 500  # ids per IN (...) list: SQLite allows 32,766 parameters, be modest

Claim = tuple[str, str, float, "asyncio.Future[bool]"]


class GroupCommit:
    """The writer and its shared transaction: messages enter, leave, and are committed together.

    Attributes:
        writer: the writer connection, ``None`` before it is opened and once it is closed.
    """

    def __init__(self) -> None:
        self.writer: aiosqlite.Connection | None = None
        # Held by one message from its first statement to the end of its savepoint, and by
        # the committer while it commits.
        self.write_lock = asyncio.Lock()
        self.committer: asyncio.Task[None] | None = None
        self._committing = False
        self._closed = False
        self._batch_open = False
        self._batch: list[asyncio.Future[None]] = []
        # Inbox claims of messages whose handler wrote nothing: inserted by the group commit.
        self._claims: list[Claim] = []

    async def enter(self) -> aiosqlite.Connection:
        """Take the writer for one message: join (or begin) the shared transaction.

        Raises:
            StoreUnavailable: the store is closed or the transaction cannot begin.
        """
        await self.write_lock.acquire()
        db = self.writer
        if db is None:
            self.write_lock.release()
            raise StoreUnavailable(CLOSED)
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
            self.write_lock.release()
            raise StoreUnavailable(f"cannot begin: {exc}") from exc
        except BaseException:
            self.write_lock.release()
            raise
        return db

    async def _begin_batch(self, db: aiosqlite.Connection) -> None:
        await db.execute("BEGIN IMMEDIATE")
        self._batch_open = True

    def _release_after(self, begin: asyncio.Future[None]) -> None:
        if not begin.cancelled() and begin.exception() is not None:
            log.warning("SQLite BEGIN failed after its caller was cancelled: %s", begin.exception())
        self.write_lock.release()

    async def leave(
        self, *, keep: bool, savepoint: bool, wait: bool = False
    ) -> asyncio.Future[None] | None:
        """End one message's savepoint and hand the writer on.

        Args:
            keep: release the savepoint (``False``: roll it back first).
            savepoint: the message opened one.
            wait: return a commit to wait for even when nothing is kept (a claim that
                conflicted with a row of this same group).

        Returns:
            The future of the commit that makes the message durable, or ``None``.

        Raises:
            StoreUnavailable: the store is closed, or the savepoint to keep cannot be closed.
        """
        waiter: asyncio.Future[None] | None = None
        db = self.writer
        try:
            if db is None:
                raise StoreUnavailable(CLOSED)
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
            self.write_lock.release()
        self._kick()
        return waiter

    async def claim(self, queue: str, message_id: str) -> bool:
        """Claim the id with the next group commit; ``False`` if the inbox has it already.

        Raises:
            StoreUnavailable: the commit failed.
        """
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._claims.append((queue, message_id, time.time(), waiter))
        self._kick()
        return await waiter

    def _kick(self) -> None:
        """Make sure a committer runs: it commits as soon as it gets the writer."""
        if self._closed:
            self._fail_waiters(StoreUnavailable(CLOSED))
        elif self.committer is None:
            self.committer = asyncio.ensure_future(self._commit_while_pending())

    async def _commit_while_pending(self) -> None:
        """Commit the shared transaction and the pending claims until none is left.

        Group commit: the committer waits for the writer behind the messages already waiting
        for it, so they join the transaction first; what finishes during a commit goes with
        the next one. It is a task of its own, so no cancelled worker can strand the others.
        """
        try:
            while self._batch_open or self._claims:
                await self.write_lock.acquire()
                self._committing = True
                try:
                    await self._commit_locked()
                finally:
                    self._committing = False
                    self.write_lock.release()
                if self._closed:
                    break  # the last commit close() waited for
        finally:
            self.committer = None

    async def _commit_locked(self) -> None:
        db = self.writer
        if db is None:
            await self._fail_batch(db, StoreUnavailable(CLOSED))
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
        except asyncio.CancelledError:
            # Only close() cancels the committer, after its timeout: whether the COMMIT
            # still happens is unknown; the redelivery finds the inbox row if it did.
            _fail([*batch, *(claim[3] for claim in claims)], StoreUnavailable(CLOSED))
            raise
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

    async def _fail_batch(self, db: aiosqlite.Connection | None, error: StoreUnavailable) -> None:
        """Roll the shared transaction back and fail every message waiting for it."""
        waiters = self._take_waiters()
        was_open, self._batch_open = self._batch_open, False
        try:
            if was_open and db is not None:
                await _quiet_rollback(db)
        finally:
            _fail(waiters, error)

    def _take_waiters(self) -> list[asyncio.Future[Any]]:
        batch, self._batch = self._batch, []
        claims, self._claims = self._claims, []
        return [*batch, *(claim[3] for claim in claims)]

    def _fail_waiters(self, error: StoreUnavailable) -> None:
        """Fail every message waiting for a commit (the store is closed: none will come)."""
        self._batch_open = False
        _fail(self._take_waiters(), error)

    async def close(self, timeout: float) -> None:
        """Stop committing and close the writer; what still waits for a commit fails.

        The group whose messages have all left is committed first (within ``timeout``): they
        learn its outcome. A group that a message still writes in can never commit now: its
        messages fail with :class:`StoreUnavailable`, and closing the writer rolls it back.
        """
        self._closed = True
        committer = self.committer
        if committer is not None:
            if self.write_lock.locked() and not self._committing:
                committer.cancel()  # it waits for a writer that a message holds
            try:
                await asyncio.wait([committer], timeout=timeout)
            finally:
                if not committer.done():
                    committer.cancel()
                    await asyncio.wait([committer])
        db, self.writer = self.writer, None
        self._fail_waiters(StoreUnavailable(CLOSED))
        if db is not None:
            try:
                await asyncio.wait_for(db.close(), timeout)
            except (TimeoutError, sqlite3.Error, ValueError) as exc:
                log.warning("closing SQLite connection failed: %s", exc)


def _fail(waiters: list[asyncio.Future[Any]], error: StoreUnavailable) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)
            waiter.exception()  # retrieved here: a cancelled worker may not await it


async def _quiet_rollback(db: aiosqlite.Connection) -> None:
    try:
        await db.execute("ROLLBACK")
    except sqlite3.Error:
        log.debug("rollback after a failed commit failed too", exc_info=True)


async def existing(db: aiosqlite.Connection, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
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


async def _insert_claims(db: aiosqlite.Connection, claims: list[Claim]) -> list[bool]:
    """Insert the claims the inbox does not have yet; say for each whether it was fresh.

    Run in the writer's transaction: it sees the committed rows and this group's own.
    """
    found = await existing(db, [(queue, message_id) for queue, message_id, _, _ in claims])
    fresh: list[bool] = []
    rows: list[tuple[str, str, float]] = []
    for queue, message_id, at, _ in claims:
        if (queue, message_id) in found:
            fresh.append(False)  # a duplicate, reported once this commit is done
            continue
        found.add((queue, message_id))
        rows.append((queue, message_id, at))
        fresh.append(True)
    if rows:
        await db.executemany(_CLAIM_SQLITE, rows)
    return fresh
