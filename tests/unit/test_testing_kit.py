"""mayhem.testing: the harness, its outcomes, Delivery.of, and the pytest plugin's fixture."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import mayhem
import mayhem.testing
from mayhem.amqp import Delivery
from mayhem.exceptions import ConfigError, HandlerTimeout, StartupError
from mayhem.message import content_id


async def _setup(db) -> None:
    await db.execute("CREATE TABLE IF NOT EXISTS seen (message_id TEXT NOT NULL, attempt INTEGER)")


async def record(message: mayhem.Message, ctx: mayhem.Context) -> None:
    await ctx.db.execute(
        "INSERT INTO seen (message_id, attempt) VALUES ($1, $2)",
        message.message_id,
        message.attempt,
    )


record.setup = _setup  # type: ignore[attr-defined]


async def fails(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Writes, then raises: the write must roll back."""
    await record(message, ctx)
    raise ValueError(f"attempt {message.attempt} fails")


fails.setup = _setup  # type: ignore[attr-defined]


async def test_acked_then_duplicate_and_the_setup_ran():
    """setup(db) runs at open; one id delivered twice is applied once."""
    async with mayhem.testing.Harness(record) as h:
        assert await h.fetch("SELECT * FROM seen") == []  # the table exists: setup ran
        first = await h.deliver(b"{}", message_id="m-1")
        again = await h.deliver(b"{}", message_id="m-1")
        assert (first.status, first.attempt, first.message_id) == ("acked", 1, "m-1")
        assert (again.status, again.attempt) == ("duplicate", 0)
        assert first.error is first.reason is first.tier is None
        assert first.settled
        assert again.settled
        assert await h.fetch("SELECT message_id, attempt FROM seen") == [
            {"message_id": "m-1", "attempt": 1}
        ]
        assert await h.seen("m-1")
        assert not await h.seen("m-2")
        assert h.outcomes == [first, again]


async def test_a_fresh_message_id_by_default():
    async with mayhem.testing.Harness(record) as h:
        one, two = await h.deliver(b"{}"), await h.deliver(b"{}")
    assert one.status == two.status == "acked"
    assert one.message_id != two.message_id


async def test_concurrent_deliveries_of_one_id_apply_once():
    """As in the daemon's workers: two at once, one applied, one duplicate."""

    async def slow(message, ctx):
        await record(message, ctx)
        await asyncio.sleep(0.05)

    slow.setup = _setup
    async with mayhem.testing.Harness(slow) as h:
        outcomes = await asyncio.gather(*(h.deliver(b"{}", message_id="same") for _ in range(4)))
        assert sorted(o.status for o in outcomes) == [
            "acked",
            "duplicate",
            "duplicate",
            "duplicate",
        ]
        assert await h.fetchval("SELECT count(*) FROM seen") == 1


async def test_failures_walk_the_attempts_to_the_dead_letter_queue():
    """A handler that always raises: retried at each tier, dead-lettered at max_attempts."""
    async with mayhem.testing.Harness(fails, max_attempts=3, retry_delays="1,5") as h:
        outcomes = await h.deliver_until_settled(b"{}", message_id="p")
        assert [(o.status, o.attempt, o.tier) for o in outcomes] == [
            ("retried", 1, 1.0),
            ("retried", 2, 5.0),
            ("dead_lettered", 3, None),
        ]
        assert [o.retry_queue for o in outcomes] == ["mayhem.retry.1000", "mayhem.retry.5000", None]
        dead = outcomes[-1]
        assert (dead.reason, dead.error) == ("failed", "ValueError: attempt 3 fails")
        assert isinstance(dead.exception, ValueError)
        assert not outcomes[0].settled
        assert dead.settled
        assert await h.fetch("SELECT * FROM seen") == [], "every attempt's write rolled back"
        assert not await h.seen("p")


async def test_the_retry_copy_carries_what_the_daemon_puts_in_it():
    """Attempt 2 sees x-mayhem-attempt, x-mayhem-error, the failure times and x-death."""
    seen: list[mayhem.Message] = []

    async def fails_once(message, ctx):
        seen.append(message)
        if message.attempt == 1:
            raise RuntimeError("first")

    async with mayhem.testing.Harness(fails_once, queue="orders") as h:
        outcomes = await h.deliver_until_settled(
            b"{}", message_id="r", headers={"tenant": "acme", "CC": ["elsewhere"]}
        )
    assert [o.status for o in outcomes] == ["retried", "acked"]
    retry = seen[1]
    assert retry.attempt == 2
    assert retry.message_id == "r"
    assert retry.headers["tenant"] == "acme"
    assert "CC" not in retry.headers
    assert retry.headers["x-mayhem-attempt"] == 2
    assert retry.headers["x-mayhem-error"] == "RuntimeError: first"
    assert retry.headers["x-mayhem-first-failure"] == retry.headers["x-mayhem-last-failure"]
    assert retry.headers["x-death"][0]["queue"] == "orders.retry.1000"


async def test_retry_with_a_delay_rounds_up_to_a_tier():
    async def asks(message, ctx):
        if message.attempt == 1:
            raise mayhem.Retry(delay=3)

    async with mayhem.testing.Harness(asks, retry_delays="1,5,60") as h:
        first, second = await h.deliver_until_settled(b"{}")
    assert (first.status, first.tier, first.error) == (
        "retried",
        5.0,
        "Retry: retry requested (delay=3)",
    )
    assert (second.status, second.attempt) == ("acked", 2)


async def test_deliver_as_a_given_attempt():
    """attempt=N delivers the retry copy of attempt N; the last one dead-letters on failure."""
    async with mayhem.testing.Harness(fails, max_attempts=4) as h:
        assert (await h.deliver(b"{}", attempt=2)).status == "retried"
        last = await h.deliver(b"{}", attempt=4)
        assert (last.status, last.attempt, last.reason) == ("dead_lettered", 4, "failed")
        for wrong in (0, 5):
            with pytest.raises(ValueError, match="attempt must be from 1 to max_attempts"):
                await h.deliver(b"{}", attempt=wrong)


async def test_a_forged_attempt_header_is_not_trusted():
    """A publisher's own x-mayhem-attempt runs as attempt 1, as in the daemon."""
    async with mayhem.testing.Harness(fails, max_attempts=3) as h:
        outcome = await h.deliver(b"{}", headers={"x-mayhem-attempt": 3})
    assert (outcome.status, outcome.attempt) == ("retried", 1)


async def test_redelivered_past_max_attempts_is_dead_lettered_unrun():
    """A quorum queue's x-delivery-count counts runs that may have happened."""
    async with mayhem.testing.Harness(record, max_attempts=2) as h:
        outcome = await h.deliver(b"{}", redelivered=True, headers={"x-delivery-count": 2})
        assert (outcome.status, outcome.reason, outcome.attempt) == ("dead_lettered", "failed", 3)
        assert outcome.error.startswith("AttemptsExhausted: may have run max_attempts (2)")
        assert await h.fetch("SELECT * FROM seen") == []


async def test_handler_timeout_is_a_failure():
    async def hangs(message, ctx):
        await asyncio.Event().wait()

    async with mayhem.testing.Harness(hangs, handler_timeout=0.05, max_attempts=1) as h:
        outcome = await h.deliver(b"{}")
    assert (outcome.status, outcome.reason) == ("dead_lettered", "failed")
    assert isinstance(outcome.exception, HandlerTimeout)


@pytest.mark.parametrize(
    ("body", "kwargs", "error"),
    [
        (b"", {}, "Reject: empty body"),
        (b"{}", {"message_id": None}, "Reject: missing message_id: cannot be applied exactly once"),
        (b"{}", {"message_id": ""}, "Reject: missing message_id: cannot be applied exactly once"),
        (b"\xff", {}, "DecodeError: body is not valid UTF-8"),
        (b"{", {}, "DecodeError: body is not valid JSON: Expecting property name enclosed"),
        (b"[1e400]", {}, "DecodeError: number 1e400 is too large for a float"),
        (b"{}", {"content_type": "text/plain"}, "DecodeError: content_type 'text/plain' is not"),
        (b"{}", {"message_id": "a\x00b"}, "DecodeError: message_id contains a NUL character"),
        (b"{}", {"headers": {"x": {"y": {}}}, "app_id": "ok"}, None),
    ],
)
async def test_hostile_input_is_rejected_as_in_the_daemon(body, kwargs, error):
    async def decodes(message, ctx):
        message.json()

    async with mayhem.testing.Harness(decodes) as h:
        outcome = await h.deliver(body, **kwargs)
    if error is None:
        assert outcome.status == "acked"
        return
    assert (outcome.status, outcome.reason) == ("rejected", "rejected")
    assert outcome.error.startswith(error)
    assert isinstance(outcome.exception, mayhem.Reject)


async def test_headers_nested_too_deeply_are_rejected():
    deep: dict = {}
    for _ in range(80):
        deep = {"d": deep}
    async with mayhem.testing.Harness(record) as h:
        outcome = await h.deliver(b"{}", headers=deep)
    assert outcome.status == "rejected"
    assert "nested deeper than 64 levels" in outcome.error


async def test_a_body_over_max_message_bytes_is_rejected_unread():
    """As the link does: refused by its size, never read, never run; the broker dead-letters it."""
    async with mayhem.testing.Harness(record, max_message_bytes=10) as h:
        outcome = await h.deliver(b"x" * 11, message_id="big")
        assert (outcome.status, outcome.reason, outcome.attempt) == ("rejected", "rejected", 0)
        assert outcome.error == "body of 11 bytes over max_message_bytes (10): rejected unread"
        assert outcome.delivery.body_dropped
        assert (await h.deliver(b"x" * 10)).status == "acked"


async def test_missing_id_by_content_hash():
    async with mayhem.testing.Harness(record, missing_id="content-hash") as h:
        first = await h.deliver(b'{"a": 1}', message_id=None)
        again = await h.deliver(b'{"a": 1}', message_id=None)
        assert (first.status, again.status) == ("acked", "duplicate")
        assert first.message_id == content_id(b'{"a": 1}')
        assert await h.fetchval("SELECT message_id FROM seen") == first.message_id


async def test_bodies_as_text_and_json():
    got: list[mayhem.Message] = []

    async def keep(message, ctx):
        got.append(message)

    async with mayhem.testing.Harness(keep) as h:
        await h.deliver("héllo")
        await h.deliver({"id": "A-1", "total": 3})
        await h.deliver({"x": 1}, content_type="text/json")
    assert (got[0].body, got[0].content_type) == ("héllo".encode(), None)
    assert got[1].json() == {"id": "A-1", "total": 3}
    assert got[1].content_type == "application/json"
    assert got[2].content_type == "text/json"


async def test_a_plain_def_handler_runs_in_the_thread_pool_with_a_blocking_db():
    threads: list[threading.Thread] = []

    def plain(message: mayhem.Message, ctx: mayhem.SyncContext) -> None:
        threads.append(threading.current_thread())
        ctx.db.execute("INSERT INTO seen (message_id, attempt) VALUES ($1, $2)", "sync", 1)
        assert ctx.db.fetchval("SELECT count(*) FROM seen") == 1

    plain.setup = _setup  # type: ignore[attr-defined]
    async with mayhem.testing.Harness(plain) as h:
        assert (await h.deliver(b"{}")).status == "acked"
        assert await h.fetchval("SELECT message_id FROM seen") == "sync"
    assert threads[0] is not threading.main_thread()


async def test_a_handler_by_import_path():
    async with mayhem.testing.Harness("retry_handlers:fails_twice", retry_delays="0.1") as h:
        outcomes = await h.deliver_until_settled(b"{}", message_id="x")
        assert [o.status for o in outcomes] == ["retried", "retried", "acked"]
        assert await h.fetchval("SELECT attempt FROM attempts WHERE message_id = 'x'") == 3


def test_settings_are_validated_as_the_daemon_validates_them():
    with pytest.raises(ConfigError, match="unknown setting 'max_attemps'"):
        mayhem.testing.Harness(record, max_attemps=3)
    with pytest.raises(ConfigError, match="max_attempts must be"):
        mayhem.testing.Harness(record, max_attempts=0)
    with pytest.raises(ConfigError, match="db_url must be"):
        mayhem.testing.Harness(record, db_url="mysql://x")
    with pytest.raises(ConfigError, match="cannot import"):
        mayhem.testing.Harness("no_such_module_here:handle")


def test_settings_from_a_config_file_and_not_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "mayhem.toml"
    path.write_text('[mayhem]\nmax_attempts = 2\nqueue = "shop"\ndb_url = "sqlite:///prod.db"\n')
    monkeypatch.setenv("MAYHEM_RETRY_DELAYS", "9")
    monkeypatch.setenv("MAYHEM_CONFIG", str(path))
    assert mayhem.testing.Harness(record).config.max_attempts == 5  # the environment is not read
    h = mayhem.testing.Harness(record, config_file=str(path), queue="other")
    assert (h.config.max_attempts, h.config.queue) == (2, "other")
    assert h.config.db_url == "sqlite:///:memory:"
    assert h.config.effective_retry_delays == (1.0,)


async def test_memory_database_is_a_temporary_file_removed_on_close(tmp_path, monkeypatch):
    """Not SQLite's :memory: (two connections would see two databases), and no file left."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    async with mayhem.testing.Harness(record) as one, mayhem.testing.Harness(record) as two:
        await one.deliver(b"{}", message_id="m")
        assert (await two.deliver(b"{}", message_id="m")).status == "acked", "isolated"
        assert len(list((tmp_path / "tmp").iterdir())) == 2
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / ":memory:").exists()


async def test_a_failing_setup_is_a_startup_error_and_leaves_nothing(tmp_path, monkeypatch):
    async def bad_setup(db):
        await db.execute("CREATE TABLE broken (")

    async def handle(message, ctx):
        return None

    handle.setup = bad_setup  # type: ignore[attr-defined]
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(StartupError, match="handler setup failed"):
        async with mayhem.testing.Harness(handle):
            pass
    assert list(tmp_path.iterdir()) == []


async def test_a_file_database_is_kept(tmp_path):
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    async with mayhem.testing.Harness(record, db_url=url) as h:
        await h.deliver(b"{}", message_id="m")
    async with mayhem.testing.Harness(record, db_url=url) as h:
        assert (await h.deliver(b"{}", message_id="m")).status == "duplicate"


async def test_not_open():
    h = mayhem.testing.Harness(record)
    with pytest.raises(RuntimeError, match="not open"):
        await h.deliver(b"{}")


def test_the_blocking_harness():
    with mayhem.testing.BlockingHarness(fails, max_attempts=2) as h:
        assert [o.status for o in h.deliver_until_settled(b"{}")] == ["retried", "dead_lettered"]
        h.execute("INSERT INTO seen (message_id) VALUES ($1)", "arranged")
        assert h.fetchrow("SELECT message_id FROM seen") == {"message_id": "arranged"}
        assert h.config.max_attempts == 2
        assert len(h.outcomes) == 2


def test_the_blocking_harness_with_a_plain_def_handler():
    """The handler's thread blocks on ctx.db while the harness's loop runs the statement."""
    with mayhem.testing.BlockingHarness("sample_handlers:sync_record") as h:
        assert h.deliver(b"{}", message_id="s").status == "acked"
        assert h.deliver(b"{}", message_id="s").status == "duplicate"
        assert h.fetchval("SELECT message_id FROM applied") == "s"


async def test_the_blocking_harness_refuses_a_running_loop():
    with pytest.raises(RuntimeError, match="in an async test, use"):
        mayhem.testing.BlockingHarness(record).open()


# -- Delivery.of ----------------------------------------------------------------------------


def test_delivery_of_decodes_as_the_link():
    at = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    delivery = Delivery.of(
        b"body",
        routing_key="q",
        message_id="m",
        content_type="application/json",
        headers={"n": 1, "nested": {"a": [1, "b", {"c": 2.5}]}, "at": at},
        message_type="order",
        app_id="shop",
    )
    assert (delivery.message_id, delivery.content_type, delivery.type) == (
        "m",
        "application/json",
        "order",
    )
    assert delivery.headers["nested"] == {"a": [1, "b", {"c": 2.5}]}
    assert delivery.headers["at"].replace(tzinfo=dt.UTC) == at
    assert (delivery.routing_key, delivery.body, delivery.body_size) == ("q", b"body", 4)
    assert not delivery.stale
    assert not delivery.malformed
    dropped = Delivery.of(b"12345", max_body=4)
    assert (dropped.body, dropped.body_size, dropped.body_dropped) == (b"", 5, True)


def test_delivery_of_refuses_what_no_publisher_could_send():
    with pytest.raises(TypeError):
        Delivery.of(b"x", headers={"s": {1, 2}})


# -- the pytest plugin ----------------------------------------------------------------------


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def test_importing_the_kit_and_plugin_loads_no_driver():
    """The plugin loads with every pytest run: it imports no driver, not even the kit."""
    assert (
        _run(
            "import sys, mayhem.testing, mayhem.testing.pytest_plugin\n"
            "print(sorted(m for m in ('asyncpg', 'aiosqlite', 'aio_pika', 'mayhem.testing.harness')"
            " if m in sys.modules))"
        )
        == "[]"
    )
    assert (
        _run(
            "import sys\nfrom mayhem.testing import Harness\n"
            "print(sorted(m for m in ('asyncpg', 'aiosqlite') if m in sys.modules))"
        )
        == "[]"
    )


def test_the_plugin_is_registered_and_its_fixture_works(tmp_path):
    """A project of a user's: plain pytest (no asyncio plugin), the fixture from the entry point."""
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import mayhem

            async def setup(db):
                await db.execute("CREATE TABLE t (v TEXT)")

            async def handle(message, ctx):
                if message.body == b"bad":
                    raise mayhem.Reject("bad")
                await ctx.db.execute("INSERT INTO t (v) VALUES ($1)", message.body.decode())

            handle.setup = setup

            def test_it(mayhem_harness):
                h = mayhem_harness(handle)
                assert h.deliver(b"good", message_id="1").status == "acked"
                assert h.deliver(b"good", message_id="1").status == "duplicate"
                bad = h.deliver(b"bad")
                assert (bad.status, bad.error) == ("rejected", "Reject: bad")
                assert h.fetch("SELECT v FROM t") == [{"v": "good"}]
                other = mayhem_harness(handle, max_attempts=1)
                assert other.fetch("SELECT v FROM t") == []
            """
        )
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:asyncio",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "test_user.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert Path(tmp_path).is_dir()
