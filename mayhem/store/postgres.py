"""The PostgreSQL backend, through an asyncpg pool sized to the concurrency."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from mayhem.exceptions import StartupError, StoreUnavailable, TransactionAborted, TransactionClosed
from mayhem.redact import mask_url
from mayhem.store.api import (
    TRANSACTION_ENDED,
    AlreadyAppliedError,
    Row,
    Store,
    Transaction,
    describe,
    out_of_descriptors,
)
from mayhem.store.inbox import (
    CLAIM,
    CLAIM_TEXT,
    SCHEMA,
    SCHEMA_LOCK,
    SCHEMA_VERSION,
    SEEN,
    check_message_id,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from asyncpg.pool import PoolConnectionProxy

    PoolConnection = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger(__name__)


def application_name() -> str:
    """How mayhem's PostgreSQL sessions show in ``pg_stat_activity``: with the process id."""
    return f"mayhem pid={os.getpid()}"


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
                for statement in SCHEMA:
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
            return await self._require_pool().fetchval(SEEN, queue, message_id) is not None
        except _PG_OUTAGE as exc:
            raise StoreUnavailable(describe(exc)) from exc

    def transaction(self) -> Transaction:
        """A transaction on a pooled connection, taken at its first statement."""
        return _PostgresTransaction(self._require_pool())

    async def apply(
        self, queue: str, message_id: str, work: Callable[[Transaction], Awaitable[None]]
    ) -> bool:
        """Claim the id first, then run ``work``, in one transaction (see :meth:`Store.apply`).

        PostgreSQL holds the new inbox row's lock until the commit, so a concurrent delivery
        of the same id waits, then finds it and skips the handler; and it saves a round trip.

        Raises:
            StoreUnavailable: the database cannot be reached.
            DecodeError: the id holds a NUL character (see :func:`check_message_id`).
        """
        check_message_id(message_id)

        async def claim_then_work(tx: Transaction) -> None:
            if not await tx.claim(queue, message_id):
                raise AlreadyAppliedError
            await work(tx)

        return await self._in_transaction(claim_then_work)

    async def ping(self) -> None:
        """Run ``SELECT 1`` on a pooled connection."""
        try:
            await self._require_pool().fetchval("SELECT 1", timeout=5)
        except _PG_OUTAGE as exc:
            raise StoreUnavailable(describe(exc)) from exc


# Errors of a statement that mean its connection is gone, whatever the connection reports.
_PG_CONNECTION_LOST: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
)


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
            if out_of_descriptors(exc):
                # A socket this process cannot open: not the database's outage, nor one
                # that pausing would mend (see out_of_descriptors).
                log.warning(
                    "cannot open a database connection, out of file descriptors (%s): not a "
                    "database outage; the message is retried (raise LimitNOFILE or find what "
                    "holds them)",
                    describe(exc),
                )
                raise
            self.lost = True
            raise StoreUnavailable(describe(exc)) from exc
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
                    raise StoreUnavailable(describe(exc)) from exc
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
            opening = CLAIM_TEXT.format(_literal(queue), _literal(message_id), repr(at))
        status = await self._call(
            lambda conn: conn.execute(CLAIM, queue, message_id, at), opening=opening
        )
        return bool(status == "INSERT 0 1")

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
                log.debug("rollback failed: %s", describe(error))
            elif isinstance(error, _PG_OUTAGE) or conn.is_closed():
                self.lost = True
                raise StoreUnavailable(f"commit failed: {describe(error)}") from error
            else:
                raise
        if exc_type is None and self.aborted is not None:
            # The handler caught a failed statement and returned: nothing was committed.
            msg = (
                f"a statement failed and the transaction was rolled back: {describe(self.aborted)}"
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
