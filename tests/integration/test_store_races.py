"""Races at the inbox, reproduced against real SQLite files and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import sqlite3
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import asyncpg
import pytest
from mayhem_testing import wait_until

from mayhem.exceptions import StoreUnavailable, TransactionAborted
from mayhem.store import BlockingTransaction
from mayhem.store.postgres import PostgresStore
from mayhem.store.sqlite import SQLiteStore


async def _sqlite_store(tmp_path) -> SQLiteStore:
    store = SQLiteStore(tmp_path / "races.db")
    await store.open()
    async with store.transaction() as tx:
        await tx.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    return store


def _committed(store: SQLiteStore, sql: str) -> int:
    with sqlite3.connect(store.path) as db:
        return db.execute(sql).fetchone()[0]


async def test_sqlite_duplicate_reported_only_after_the_first_copy_commits(tmp_path):
    """Two copies of one id in one group commit: the second waits for the first's commit.

    It is a duplicate only after the first copy commits; before that, the first copy's
    commit may still fail, and the message would be lost.
    """
    store = await _sqlite_store(tmp_path)
    first_wrote, release_first = asyncio.Event(), asyncio.Event()

    async def first(tx):
        await tx.execute("INSERT INTO t VALUES ('first')")
        first_wrote.set()
        await release_first.wait()

    async def second(tx):
        await tx.execute("INSERT INTO t VALUES ('second')")

    seen_at_duplicate: list[int] = []

    async def second_copy() -> bool:
        applied = await store.apply("q", "m", second)
        # What is committed the moment the answer comes, before anything else runs.
        seen_at_duplicate.append(
            _committed(store, "SELECT count(*) FROM mayhem_inbox WHERE message_id = 'm'")
        )
        return applied

    one = asyncio.create_task(store.apply("q", "m", first))
    await first_wrote.wait()
    two = asyncio.create_task(second_copy())
    release_first.set()
    assert await one is True
    assert await two is False
    assert seen_at_duplicate == [1], "the duplicate was reported before the first commit"
    assert _committed(store, "SELECT count(*) FROM t") == 1
    await store.close(1)


async def test_sqlite_quiet_handlers_claim_together_each_id_once(tmp_path):
    """Handlers that write nothing have their ids claimed by the group commit.

    1. 40 messages with distinct ids and 3 copies of one more id finish together.
    2. Every distinct id is applied; of the copies exactly one, and the others are
       duplicates only once the applied copy's claim is committed.
    """
    store = await _sqlite_store(tmp_path)
    answers: list[tuple[str, bool, int]] = []

    async def quiet(_tx):
        await asyncio.sleep(0)

    async def one(message_id: str) -> None:
        applied = await store.apply("q", message_id, quiet)
        committed = _committed(
            store, f"SELECT count(*) FROM mayhem_inbox WHERE message_id = '{message_id}'"
        )
        answers.append((message_id, applied, committed))

    ids = [f"m{n}" for n in range(40)] + ["twin"] * 3
    await asyncio.gather(*(one(message_id) for message_id in ids))
    assert sorted(m for m, applied, _ in answers if applied) == sorted(set(ids))
    assert [committed for _, _, committed in answers] == [1] * len(ids)
    assert _committed(store, "SELECT count(*) FROM mayhem_inbox") == 41
    # A redelivery later finds the committed claim and skips the handler.
    assert await store.apply("q", "twin", quiet) is False
    await store.close(1)


async def test_sqlite_failed_group_commit_fails_every_quiet_claim(tmp_path):
    """A commit that fails fails every message waiting for it; none is reported applied."""
    store = await _sqlite_store(tmp_path)
    blocker = sqlite3.connect(store.path, timeout=0, isolation_level=None)
    await store.apply("q", "warm", lambda _tx: asyncio.sleep(0))
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the writer past busy_timeout
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.apply("q", "late", lambda _tx: asyncio.sleep(0)), 30)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _committed(store, "SELECT count(*) FROM mayhem_inbox WHERE message_id = 'late'") == 0
    assert await store.apply("q", "late", lambda _tx: asyncio.sleep(0)) is True
    await store.close(1)


async def test_sqlite_rollback_sql_fails_the_group_not_silently(tmp_path):
    """SQL that rolls the shared transaction back (INSERT OR ROLLBACK) cannot pass as done."""
    store = await _sqlite_store(tmp_path)
    async with store.transaction() as tx:
        await tx.execute("INSERT INTO t VALUES ('dup')")

    async def rolls_back(tx):
        with contextlib.suppress(sqlite3.IntegrityError):
            await tx.execute("INSERT OR ROLLBACK INTO t VALUES ('dup')")
        await tx.execute("INSERT INTO t VALUES ('after')")

    with pytest.raises(StoreUnavailable):
        await store.apply("q", "x", rolls_back)
    assert _committed(store, "SELECT count(*) FROM mayhem_inbox WHERE message_id = 'x'") == 0
    assert _committed(store, "SELECT count(*) FROM t WHERE k = 'after'") == 0
    await store.close(1)


async def test_sqlite_timed_out_thread_never_keeps_the_writer(tmp_path):
    """A plain def handler's ctx.db call outliving its timeout never keeps the writer.

    The call waits for the writer while the handler times out; it is refused when it gets
    the writer, and the next message goes through.
    """
    store = await _sqlite_store(tmp_path)
    holding, release = asyncio.Event(), asyncio.Event()

    async def holder(tx):
        await tx.execute("INSERT INTO t VALUES ('holder')")
        holding.set()
        await release.wait()

    def late(db: BlockingTransaction) -> None:
        db.execute("INSERT INTO t VALUES ('late')")

    async def sync_work(tx):
        call = functools.partial(contextvars.copy_context().run, late, BlockingTransaction(tx))
        await asyncio.get_running_loop().run_in_executor(None, call)

    held = asyncio.create_task(store.apply("q", "h", holder))
    await holding.wait()
    # The holder lets go after the timeout has fired, while the late call still waits.
    asyncio.get_running_loop().call_later(0.5, release.set)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await store.apply("q", "s", sync_work)
    assert await held is True

    async def following(tx):
        await tx.execute("INSERT INTO t VALUES ('next')")

    assert await asyncio.wait_for(store.apply("q", "n", following), 10) is True
    assert _committed(store, "SELECT count(*) FROM t WHERE k = 'late'") == 0
    assert not store._group.write_lock.locked()
    await store.close(1)


async def test_postgres_swallowed_sql_error_is_not_a_success(pg_url):
    """A handler that catches a failed statement and returns is not a success.

    PostgreSQL turns the COMMIT into a ROLLBACK without an error: nothing was committed.
    """
    store = PostgresStore(pg_url, pool_size=2)
    await store.open()
    async with store.transaction() as tx:
        await tx.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        await tx.execute("INSERT INTO t VALUES ('dup')")

    async def swallows(tx):
        await tx.execute("INSERT INTO t VALUES ('effect')")
        with contextlib.suppress(asyncpg.UniqueViolationError):
            await tx.execute("INSERT INTO t VALUES ('dup')")

    with pytest.raises(TransactionAborted):
        await store.apply("q", "m", swallows)
    async with store.transaction() as tx:
        assert await tx.fetchval("SELECT count(*) FROM t WHERE k = 'effect'") == 0
        assert await tx.fetchval("SELECT count(*) FROM mayhem_inbox WHERE message_id = 'm'") == 0
    await store.close(5)


async def test_postgres_handler_misuse_is_a_failure_not_an_outage(pg_url):
    """A wrong argument type is the handler's error, not a database outage."""
    store = PostgresStore(pg_url, pool_size=2)
    await store.open()
    async with store.transaction() as tx:
        await tx.execute("CREATE TABLE n (k TEXT, v INTEGER)")

    async def wrong_type(tx):
        await tx.execute("INSERT INTO n VALUES ($1, $2)", "x", "not-an-int")

    with pytest.raises(Exception) as raised:  # noqa: PT011 -- any error but an outage
        await store.apply("q", "m", wrong_type)
    assert not isinstance(raised.value, StoreUnavailable)
    await store.close(5)


TRICKY_IDS = (
    "plain",
    "it's",
    "$m$",
    "ends with $m",
    "$m1$ and $m$ and $m2",
    "back\\slash\\' and ''quotes''",
    "; DROP TABLE t; --",
    "ünïcødé ✓",
    "3fa85f64$3$2$1",
    "",
)


@pytest.mark.parametrize("message_id", TRICKY_IDS)
async def test_postgres_claim_keeps_any_message_id_verbatim(pg_url, message_id):
    """The claim sent as text with the BEGIN stores every id as it is, and only once."""
    store = PostgresStore(pg_url, pool_size=2)
    await store.open()
    try:

        async def work(tx):
            await tx.execute("SELECT 1")

        assert await store.apply("q'$m$$2", message_id, work) is True
        assert await store.apply("q'$m$$2", message_id, work) is False
        conn = await asyncpg.connect(pg_url)
        try:
            rows = await conn.fetch("SELECT queue, message_id FROM mayhem_inbox")
        finally:
            await conn.close()
        assert [(row["queue"], row["message_id"]) for row in rows] == [("q'$m$$2", message_id)]
    finally:
        await store.close(1)


async def test_postgres_session_state_never_leaks_to_the_next_message(pg_url):
    """A handler's session-level SET and advisory lock end with its transaction.

    1. With one pooled connection, message 1 runs `SET application_name` (not LOCAL) and
       takes a session advisory lock.
    2. Message 2, on the same connection, sees the pool's application_name; another session
       can take the lock.
    """
    store = PostgresStore(pg_url, pool_size=1)
    await store.open()
    try:
        seen: list[str] = []

        async def changes_the_session(tx):
            await tx.execute("SET application_name = 'leaked'")
            await tx.fetch("SELECT pg_advisory_lock(4242)")

        async def hides_a_set(tx):
            await tx.execute("SELECT 1; SET statement_timeout = 1")

        async def reads_the_session(tx):
            seen.append(await tx.fetchval("SELECT current_setting('application_name')"))
            seen.append(await tx.fetchval("SELECT current_setting('statement_timeout')"))

        assert await store.apply("q", "m-1", changes_the_session) is True
        assert await store.apply("q", "m-2", hides_a_set) is True
        assert await store.apply("q", "m-3", reads_the_session) is True
        assert seen[0].startswith("mayhem pid=")
        assert seen[1] == "0"
        other = await asyncpg.connect(pg_url)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock(4242)") is True
        finally:
            await other.close()
    finally:
        await store.close(1)


async def test_postgres_cancel_during_commit_is_a_cancel_and_frees_the_connection(pg_url):
    """Shutdown's cancel arriving while COMMIT runs stays a cancel; the pool stays usable.

    A deferred constraint trigger makes COMMIT take 0.5 s; the task is cancelled meanwhile.
    It must end with CancelledError (the worker then requeues the message), not another
    error that would count as a failed attempt, and the next message gets a connection.
    """
    store = PostgresStore(pg_url, pool_size=1)
    await store.open()
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(
            """
            CREATE TABLE slow (k TEXT);
            CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
            """
        )
        committing = asyncio.Event()

        async def write(tx):
            await tx.execute("INSERT INTO slow VALUES ('x')")
            committing.set()

        task = asyncio.create_task(store.apply("q", "m-1", write))
        await committing.wait()

        async def commit_running() -> bool:
            return bool(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE state = 'active' AND query LIKE 'COMMIT%'"
                )
            )

        await wait_until(commit_running, timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def quick(tx):
            await tx.execute("SELECT 1")

        async with asyncio.timeout(10):
            assert await store.apply("q", "m-2", quick) is True
    finally:
        await admin.close()
        await store.close(1)


async def test_sqlite_store_closed_under_an_open_group_fails_fast(tmp_path):
    """The store closes while a handler holds the writer: its message fails at once.

    StoreUnavailable, and the group committer does not leave the loop spinning.
    """
    store = await _sqlite_store(tmp_path)
    wrote, go_on = asyncio.Event(), asyncio.Event()

    async def write(tx):
        await tx.execute("INSERT INTO t VALUES ('x')")
        wrote.set()
        await go_on.wait()

    async def quiet(_tx):
        await asyncio.sleep(0)

    task = asyncio.create_task(store.apply("q", "m-1", write))
    await wrote.wait()
    # A handler that wrote nothing: its claim waits for the group committer, which waits
    # for the writer.
    other = asyncio.create_task(store.apply("q", "m-2", quiet))
    await wait_until(lambda: store._group.committer is not None, timeout=5)
    await store.close(1)
    go_on.set()
    async with asyncio.timeout(5):
        for pending in (task, other):
            with pytest.raises(StoreUnavailable):
                await pending


async def test_out_of_file_descriptors_is_not_a_database_outage(db_url):
    """A process out of file descriptors (EMFILE), with the database up.

    1. In a child process at its descriptor limit, a message needs a new PostgreSQL
       connection (the pool's one is busy), or SQLite a temporary file.
    2. The message fails (and follows the retry policy) with the local error, logged as not
       a database outage; it is not a StoreUnavailable, which would pause consuming.
    3. With descriptors free again, the same store applies it.
    """
    script = Path(__file__).parent.parent / "support" / "out_of_descriptors.py"
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), db_url, stdout=PIPE, stderr=PIPE
    )
    async with asyncio.timeout(60):
        out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["outcome"] == "failed", result
    sqlite = db_url.startswith("sqlite")
    why = "unable to open database file" if sqlite else "Too many open files"
    assert why in result["error"]
    assert "not a database outage" in err.decode()
    assert result["then"] is True
