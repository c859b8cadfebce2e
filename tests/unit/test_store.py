"""The SQLite store on a real file: schema, inbox, transactions, pruning, the blocking facade."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mayhem.exceptions import ConfigError, StartupError, StoreUnavailable
from mayhem.store import BlockingTransaction, open_store, sqlite_path
from mayhem.store.inbox import INBOX_TABLE, SCHEMA_VERSION
from mayhem.store.postgres import PostgresStore
from mayhem.store.sqlite import SQLiteStore, to_sqlite

QUEUE = "jobs"


def direct(path: Path) -> contextlib.closing[sqlite3.Connection]:
    """A plain sqlite3 connection of the test's own, to look at committed data."""
    return contextlib.closing(sqlite3.connect(path))


def count_rows(path: Path, table: str) -> int:
    with direct(path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


async def make_table(store: SQLiteStore) -> None:
    async with store.transaction() as tx:
        await tx.execute("CREATE TABLE effects (v TEXT NOT NULL, n INTEGER)")


async def wait_until(condition, *, tries: int = 10_000) -> None:
    """Yield to the loop until ``condition()`` holds (bounded, no fixed sleep)."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0)
    pytest.fail("condition never became true")


# -- to_sqlite ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT $1", "SELECT ?1"),
        ("VALUES ($1, $2, $10)", "VALUES (?1, ?2, ?10)"),
        ("WHERE a = $1 AND b = $1", "WHERE a = ?1 AND b = ?1"),
        ("SELECT '$1'", "SELECT '$1'"),
        ('SELECT "$1"', 'SELECT "$1"'),
        ("SELECT 'it''s $1', $2", "SELECT 'it''s $1', ?2"),
        ('SELECT "a""$1", $1', 'SELECT "a""$1", ?1'),
        ("SELECT '$1' || $2 || \"$3\" || $3", "SELECT '$1' || ?2 || \"$3\" || ?3"),
        ("SELECT 'a', $1, 'b'", "SELECT 'a', ?1, 'b'"),
        ("SELECT $ , $a", "SELECT $ , $a"),
        ("SELECT 1", "SELECT 1"),
    ],
)
def test_to_sqlite(sql, expected):
    """$N placeholders become ?N, except inside single- or double-quoted text."""
    assert to_sqlite(sql) == expected


async def test_placeholders_bind_by_number(store):
    """$2 binds the second argument and $1 the first, through a real SQLite statement."""
    async with store.transaction() as tx:
        row = await tx.fetchrow("SELECT $2 AS second, $1 AS first, '$1' AS text", "a", "b")
    assert row == {"second": "b", "first": "a", "text": "$1"}


# -- open_store and paths -------------------------------------------------------------------


def test_sqlite_path_relative_and_absolute():
    """sqlite:///rel.db is relative to the working directory, sqlite:////abs.db absolute."""
    assert sqlite_path("sqlite:///mayhem.db") == Path("mayhem.db")
    assert sqlite_path("sqlite:///data/mayhem.db") == Path("data/mayhem.db")
    assert sqlite_path("sqlite:////var/lib/mayhem/m.db") == Path("/var/lib/mayhem/m.db")


def test_open_store_picks_the_backend(tmp_path):
    """open_store returns the SQLite or PostgreSQL backend by scheme, without connecting."""
    sqlite = open_store(f"sqlite:///{tmp_path}/m.db", pool_size=4)
    assert isinstance(sqlite, SQLiteStore)
    assert sqlite.path == tmp_path / "m.db"
    assert not sqlite.path.exists()
    for url in ("postgresql://u:secret@h/db", "postgres://u@h/db"):
        assert isinstance(open_store(url, pool_size=4), PostgresStore)


def test_open_store_unsupported_scheme():
    """A db_url naming another database is a ConfigError."""
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        open_store("mysql://h/db", pool_size=1)


def test_postgres_store_masks_its_url():
    """The PostgreSQL backend keeps a masked URL for its messages."""
    pg = PostgresStore("postgresql://u:secret@h/db?search_path=s", pool_size=2)
    assert pg._shown == "postgresql://u:***@h/db?search_path=s"


# -- open and schema ------------------------------------------------------------------------


async def test_open_creates_directory_and_schema(store):
    """open() creates the file's directory, the inbox table, its index and the schema version."""
    assert store.path.is_file()
    with direct(store.path) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        versions = db.execute("SELECT version FROM mayhem_schema").fetchall()
    assert {INBOX_TABLE, f"{INBOX_TABLE}_processed_at", "mayhem_schema"} <= names
    assert versions == [(SCHEMA_VERSION,)]


async def test_reopen_keeps_one_schema_version(store):
    """Opening an existing database again does not add a second schema version row."""
    again = SQLiteStore(store.path)
    await again.open()
    await again.close(5.0)
    assert count_rows(store.path, "mayhem_schema") == 1


async def test_open_refuses_a_newer_schema(tmp_path):
    """A schema newer than this mayhem's is a StartupError, and nothing stays open."""
    path = tmp_path / "newer.db"
    with direct(path) as db:
        db.execute("CREATE TABLE mayhem_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO mayhem_schema VALUES (?)", (SCHEMA_VERSION + 1,))
        db.commit()
    sqlite = SQLiteStore(path)
    with pytest.raises(StartupError, match="newer than"):
        await sqlite.open()
    assert sqlite._writer is None
    assert sqlite._reader is None


async def test_open_failure_is_a_startup_error(tmp_path):
    """A path that cannot be a database file is a StartupError naming it."""
    before = set(threading.enumerate())
    sqlite = SQLiteStore(tmp_path)  # a directory
    with pytest.raises(StartupError) as info:
        await sqlite.open()
    assert str(info.value).startswith(f"cannot open SQLite database {tmp_path}: ")
    assert sqlite._writer is None
    # aiosqlite stops its worker thread without waiting after a failed connect; the thread
    # must finish while this test's loop is open, or it raises "Event loop is closed".
    for thread in set(threading.enumerate()) - before:
        if "_connection_worker_thread" not in thread.name:
            continue  # the executor's own threads, one of which runs the join below
        await asyncio.to_thread(thread.join, 5)
        assert not thread.is_alive()


async def test_wal_and_synchronous_full(store):
    """Both connections run in WAL mode with synchronous=FULL and a busy timeout."""
    for db in (store._writer, store._reader):
        assert db is not None
        async with db.execute("PRAGMA journal_mode") as cursor:
            assert (await cursor.fetchone())[0] == "wal"
        async with db.execute("PRAGMA synchronous") as cursor:
            assert (await cursor.fetchone())[0] == 2  # FULL
        async with db.execute("PRAGMA busy_timeout") as cursor:
            assert (await cursor.fetchone())[0] == 5000
    with direct(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- the inbox ------------------------------------------------------------------------------


async def test_seen_claim_commit(store):
    """An id is not seen, is claimed, is still not seen before commit, and is seen after."""
    assert await store.seen(QUEUE, "m-1") is False
    async with store.transaction() as tx:
        assert await tx.claim(QUEUE, "m-1") is True
        assert await store.seen(QUEUE, "m-1") is False
    assert await store.seen(QUEUE, "m-1") is True
    assert await store.seen("other-queue", "m-1") is False


async def test_second_claim_of_the_same_id_is_false(store):
    """A second transaction's claim of a committed id returns False; another queue's is True."""
    async with store.transaction() as tx:
        assert await tx.claim(QUEUE, "m-1") is True
    async with store.transaction() as tx:
        assert await tx.claim(QUEUE, "m-1") is False
        assert await tx.claim("other-queue", "m-1") is True
    assert count_rows(store.path, INBOX_TABLE) == 2


async def test_concurrent_claim_waits_and_loses(store):
    """1. A transaction claims an id and stays open.

    2. A second transaction's claim of the same id waits for the writer.
    3. The first commits; the second's claim returns False.
    """
    lock = store._group.write_lock

    async def second() -> bool:
        async with store.transaction() as tx:
            return await tx.claim(QUEUE, "m-1")

    async with asyncio.TaskGroup() as tg, store.transaction() as tx:
        assert await tx.claim(QUEUE, "m-1") is True
        task = tg.create_task(second())
        await wait_until(lambda: bool(lock._waiters))
        assert not task.done()
    assert task.result() is False
    assert not lock.locked()


async def test_exception_rolls_back_effects_and_claim(store):
    """An exception inside the transaction rolls back the handler's writes and the claim."""
    await make_table(store)

    async def failing_handler() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO effects (v) VALUES ($1)", "x")
            assert await tx.claim(QUEUE, "m-1") is True
            assert await tx.fetchval("SELECT count(*) FROM effects") == 1
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await failing_handler()
    assert await store.seen(QUEUE, "m-1") is False
    assert count_rows(store.path, "effects") == 0
    assert count_rows(store.path, INBOX_TABLE) == 0
    # The writer is free again: the same id can be claimed and committed.
    async with asyncio.timeout(5), store.transaction() as tx:
        assert await tx.claim(QUEUE, "m-1") is True
    assert await store.seen(QUEUE, "m-1") is True


async def test_commit_keeps_effects_and_claim(store):
    """A transaction that ends normally commits the handler's writes and the claim together."""
    await make_table(store)
    async with store.transaction() as tx:
        await tx.execute("INSERT INTO effects (v, n) VALUES ($1, $2)", "x", 1)
        await tx.claim(QUEUE, "m-1")
    with direct(store.path) as db:
        assert db.execute("SELECT v, n FROM effects").fetchall() == [("x", 1)]
    assert await store.seen(QUEUE, "m-1") is True


async def test_cancelled_transaction_rolls_back_and_frees_the_writer(store):
    """A task cancelled inside a transaction rolls it back and releases the writer."""
    await make_table(store)
    wrote = asyncio.Event()

    async def handler() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO effects (v) VALUES ($1)", "x")
            await tx.claim(QUEUE, "m-1")
            wrote.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(handler())
    await wrote.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The group committer ends the shared transaction, then the writer is free.
    async with asyncio.timeout(5):
        await store._group.write_lock.acquire()
    store._group.write_lock.release()
    assert count_rows(store.path, "effects") == 0
    assert await store.seen(QUEUE, "m-1") is False


async def test_writer_is_taken_at_the_first_statement(store):
    """A transaction holds the writer from its first statement until it ends, not before."""
    lock = store._group.write_lock
    async with store.transaction() as tx:
        assert not lock.locked()
        await tx.fetchval("SELECT 1")
        assert lock.locked()
    assert not lock.locked()


async def test_fetch_fetchrow_fetchval(store):
    """Rows are dicts: fetch gives all, fetchrow the first or None, fetchval its first column."""
    await make_table(store)
    async with store.transaction() as tx:
        await tx.execute("INSERT INTO effects (v, n) VALUES ($1, $2), ($3, $4)", "a", 1, "b", 2)
        assert await tx.fetch("SELECT v, n FROM effects ORDER BY n") == [
            {"v": "a", "n": 1},
            {"v": "b", "n": 2},
        ]
        assert await tx.fetch("SELECT v FROM effects WHERE n > $1", 5) == []
        assert await tx.fetchrow("SELECT n, v FROM effects ORDER BY n DESC") == {"n": 2, "v": "b"}
        assert await tx.fetchrow("SELECT v FROM effects WHERE n = $1", 9) is None
        assert await tx.fetchval("SELECT v FROM effects WHERE n = $1", 1) == "a"
        assert await tx.fetchval("SELECT v FROM effects WHERE n = $1", 9) is None
        assert await tx.fetchval("SELECT count(*) FROM effects") == 2


async def test_sql_error_propagates_and_rolls_back(store):
    """A wrong statement raises sqlite3's error, not StoreUnavailable, and rolls back."""
    await make_table(store)
    tx = store.transaction()

    async def handler() -> None:
        async with tx:
            await tx.execute("INSERT INTO effects (v) VALUES ($1)", "x")
            await tx.execute("INSERT INTO nope (v) VALUES ($1)", "x")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await handler()
    assert tx.lost is False
    assert count_rows(store.path, "effects") == 0


@pytest.mark.parametrize("name", ["locked", "busy", "disk_usage"])
async def test_sql_error_naming_outage_words_is_not_an_outage(store, name):
    """A SQL error about a column named like an outage word is still a SQL error."""
    await make_table(store)
    async with store.transaction() as tx:
        with pytest.raises(sqlite3.OperationalError):
            await tx.execute(f"SELECT {name} FROM effects")
    assert tx.lost is False


async def test_prune_deletes_old_inbox_rows(store):
    """prune(older_than) deletes inbox rows processed before it and returns how many."""
    async with store.transaction() as tx:
        for message_id, at in (("old-1", 100.0), ("old-2", 200.0), ("new", 300.0)):
            await tx.execute(
                f"INSERT INTO {INBOX_TABLE} (queue, message_id, processed_at) VALUES ($1, $2, $3)",
                QUEUE,
                message_id,
                at,
            )
    assert await store.prune(250.0) == 2
    assert await store.seen(QUEUE, "old-1") is False
    assert await store.seen(QUEUE, "old-2") is False
    assert await store.seen(QUEUE, "new") is True
    assert await store.prune(250.0) == 0


async def test_prune_keeps_fresh_claims(store):
    """A claim made now is not pruned by a cutoff a minute ago."""
    async with store.transaction() as tx:
        await tx.claim(QUEUE, "m-1")
    async with store.transaction() as tx:
        processed_at = await tx.fetchval(f"SELECT processed_at FROM {INBOX_TABLE}")
    assert await store.prune(processed_at - 60) == 0
    assert await store.prune(processed_at + 1) == 1


async def test_run_setup_commits(store):
    """run_setup runs a handler's setup in its own committed transaction."""

    async def setup(db) -> None:
        await db.execute("CREATE TABLE made_by_setup (x INTEGER)")

    await store.run_setup(setup)
    assert count_rows(store.path, "made_by_setup") == 0


# -- closing --------------------------------------------------------------------------------


async def test_ping_then_close(tmp_path):
    """Ping works while open; after close() every use is StoreUnavailable; closing twice is fine."""
    sqlite = SQLiteStore(tmp_path / "m.db")
    await sqlite.open()
    await sqlite.ping()
    await sqlite.close(5.0)
    assert sqlite._writer is None
    assert sqlite._reader is None
    with pytest.raises(StoreUnavailable):
        await sqlite.ping()
    with pytest.raises(StoreUnavailable):
        await sqlite.seen(QUEUE, "m-1")
    with pytest.raises(StoreUnavailable):
        async with sqlite.transaction() as tx:
            await tx.execute("SELECT 1")
    assert not sqlite._group.write_lock.locked()
    await sqlite.close(5.0)


async def test_close_leaves_committed_data(tmp_path):
    """Data committed before close() is there when the file is opened again."""
    sqlite = SQLiteStore(tmp_path / "m.db")
    await sqlite.open()
    async with sqlite.transaction() as tx:
        await tx.claim(QUEUE, "m-1")
    await sqlite.close(5.0)
    again = SQLiteStore(tmp_path / "m.db")
    await again.open()
    try:
        assert await again.seen(QUEUE, "m-1") is True
    finally:
        await again.close(5.0)


async def test_close_ends_the_group_committer_and_answers_every_message(tmp_path):
    """close() while a group of quiet messages waits for its commit.

    1. Messages whose handlers wrote nothing wait for the group committer to claim their ids.
    2. The store closes before the committer has run.
    3. close() returns only once the committer has ended; each message has its answer
       (committed, or StoreUnavailable), none is left waiting, and no store task is left.
    """
    sqlite = SQLiteStore(tmp_path / "m.db")
    await sqlite.open()
    before = asyncio.all_tasks()

    async def quiet(_tx) -> None:
        await asyncio.sleep(0)

    messages = [asyncio.create_task(sqlite.apply(QUEUE, f"m-{n}", quiet)) for n in range(5)]
    await wait_until(lambda: sqlite._group.committer is not None)
    await sqlite.close(5.0)
    assert asyncio.all_tasks() - before - set(messages) == set()
    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(*messages, return_exceptions=True)
    for outcome in outcomes:
        assert outcome is True or isinstance(outcome, StoreUnavailable), outcome
    committed = sum(outcome is True for outcome in outcomes)
    assert count_rows(sqlite.path, INBOX_TABLE) == committed


# -- files ----------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    """The umask most shells have: files come out world-readable unless made otherwise."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def file_modes(path: Path) -> dict[str, int]:
    """The permission bits of the database and of its -wal and -shm files."""
    return {
        name: stat.S_IMODE(Path(f"{path}{name}").stat().st_mode) for name in ("", "-wal", "-shm")
    }


async def test_database_files_are_created_owner_only(tmp_path, umask_022):
    """Under umask 022, the database, its -wal and -shm are created 0600, not 0644."""
    sqlite = SQLiteStore(tmp_path / "data" / "m.db")
    await sqlite.open()
    try:
        async with sqlite.transaction() as tx:
            await tx.claim(QUEUE, "m-1")
        assert file_modes(sqlite.path) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        assert stat.S_IMODE(sqlite.path.parent.stat().st_mode) == 0o700
    finally:
        await sqlite.close(5.0)


async def test_existing_database_keeps_its_group_mode(tmp_path, umask_022):
    """A database the operator made 0640 for a group stays so; -wal and -shm follow it."""
    path = tmp_path / "m.db"
    path.touch()
    path.chmod(0o640)
    sqlite = SQLiteStore(path)
    await sqlite.open()
    try:
        async with sqlite.transaction() as tx:
            await tx.claim(QUEUE, "m-1")
        assert file_modes(path) == {"": 0o640, "-wal": 0o640, "-shm": 0o640}
    finally:
        await sqlite.close(5.0)


async def test_world_readable_database_is_reported(tmp_path, caplog):
    """An existing database every user can read (an older mayhem's 0644) is warned about."""
    path = tmp_path / "m.db"
    path.touch()
    path.chmod(0o644)
    sqlite = SQLiteStore(path)
    await sqlite.open()
    await sqlite.close(5.0)
    assert f"{path} has mode 0644: every user can read" in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_import_mayhem_loads_no_database_driver():
    """A handler module's ``import mayhem`` (and the handler API's modules) load no driver."""
    code = (
        "import sys, mayhem, mayhem.message, mayhem.handlers, mayhem.store\n"
        "print(sorted(m for m in ('asyncpg', 'aiosqlite') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# -- BlockingTransaction --------------------------------------------------------------------


async def test_blocking_transaction_from_a_thread(store):
    """A plain-def handler's calls from a worker thread run in the message's open transaction."""
    await make_table(store)
    loop_thread = threading.get_ident()
    async with store.transaction() as tx:
        blocking = BlockingTransaction(tx)

        def handler() -> tuple[object, ...]:
            assert threading.get_ident() != loop_thread
            blocking.execute("INSERT INTO effects (v, n) VALUES ($1, $2)", "t", 7)
            return (
                blocking.fetch("SELECT v, n FROM effects"),
                blocking.fetchrow("SELECT n FROM effects"),
                blocking.fetchval("SELECT v FROM effects WHERE n = $1", 7),
            )

        rows, row, value = await asyncio.to_thread(handler)
        assert rows == [{"v": "t", "n": 7}]
        assert row == {"n": 7}
        assert value == "t"
        # Visible in the transaction on the loop, not yet committed for anyone else.
        assert await tx.fetchval("SELECT count(*) FROM effects") == 1
        assert count_rows(store.path, "effects") == 0
        await tx.claim(QUEUE, "m-1")
    assert count_rows(store.path, "effects") == 1


async def test_blocking_transaction_rolls_back_with_the_message(store):
    """Writes made from a thread roll back when the message's transaction does."""
    await make_table(store)

    async def handler() -> None:
        async with store.transaction() as tx:
            blocking = BlockingTransaction(tx)
            await asyncio.to_thread(blocking.execute, "INSERT INTO effects (v) VALUES ($1)", "t")
            raise RuntimeError("after the thread")

    with pytest.raises(RuntimeError, match="after the thread"):
        await handler()
    assert count_rows(store.path, "effects") == 0


async def test_blocking_transaction_raises_in_the_thread(store):
    """A failing statement from a thread raises sqlite3's error in that thread."""
    async with store.transaction() as tx:
        blocking = BlockingTransaction(tx)
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await asyncio.to_thread(blocking.fetch, "SELECT * FROM nope")
