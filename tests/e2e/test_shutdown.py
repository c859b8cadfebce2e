"""The daemon as a process, stopped by signals: nothing lost, nothing applied twice."""

from __future__ import annotations

import signal
import time

import pytest
from mayhem_testing import (
    applied_at_least,
    daemon_args,
    declare,
    in_flight_at_least,
    oracle,
    publish,
    rows,
    wait_until,
)

from mayhem.daemon import SHUTDOWN


async def test_sigterm_under_load_loses_nothing(amqp, make_config, db_url, spawn):
    """SIGTERM with the prefetch window in flight and thousands ready.

    1. Publish 3,000 messages; run the daemon with 32 workers and a 20 ms handler.
    2. Once a few hundred are applied and the window is full, send SIGTERM.
    3. Exit 0; every confirmed id is applied once or back in the queue.
    """
    config = make_config(db_url=db_url)
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b'{"n": 1}'] * 3000)
    daemon = spawn(
        daemon_args(config, "--handler", "sample_handlers:record", "--concurrency", "32"),
        env={"SAMPLE_HANDLER_DELAY": "0.02"},
    )
    await daemon.start()
    try:
        await wait_until(lambda: applied_at_least(db_url, 300), timeout=30)
        await wait_until(lambda: in_flight_at_least(daemon, 16), timeout=10)
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
    verdict = await oracle(amqp, config.queue, db_url, ids)
    assert verdict.lost == frozenset()
    assert verdict.duplicates == 0
    assert verdict.queued > 0, "the stop came mid-stream"
    assert verdict.applied + verdict.queued == 3000
    assert len(daemon.events("shutdown_complete")) == 1
    assert [e["step"] for e in daemon.events("shutdown_step")] == [s.name for s in SHUTDOWN]
    assert daemon.tracebacks() == []


async def test_second_sigterm_stops_waiting(amqp, make_config, spawn):
    """A second SIGTERM during the drain: the stuck handler is cancelled, its message requeued.

    1. A handler that never returns; drain_timeout far away (60 s).
    2. SIGTERM, wait for the drain to begin, SIGTERM again.
    3. The daemon exits 0 within two seconds of the second signal; the message is queued.
    """
    config = make_config()
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b"stuck"])
    daemon = spawn(
        daemon_args(
            config,
            "--handler",
            "sample_handlers:stuck",
            "--drain-timeout",
            "60",
            "--loop",
            "asyncio",
        )
    )
    await daemon.start()
    try:
        await wait_until(lambda: in_flight_at_least(daemon, 1), timeout=10)
        daemon.signal(signal.SIGTERM)
        # Step 3 done: the drain (step 4) is waiting for the stuck handler.
        await daemon.wait_for_event("shutdown_step", timeout=10, step="buffer_requeued")
        second = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait(timeout=10) == 0
        took = time.monotonic() - second
    finally:
        await daemon.kill()
    assert took < 2.0, f"exit took {took:.2f} s after the second signal"
    verdict = await oracle(amqp, config.queue, config.db_url, ids)
    assert verdict.queued == 1
    assert verdict.rows == 0
    assert daemon.events("handlers_cancelled", why="second_signal", cancelled=1)


async def test_stuck_handler_cancelled_at_drain_deadline(amqp, make_config, db_url, spawn):
    """A handler that never returns is cancelled at drain_timeout; its transaction rolls back.

    1. A handler that writes a row, then blocks forever; drain_timeout 1 s.
    2. SIGTERM once.
    3. Exit 0; the row is not there (rolled back); the message is back in the queue.
    """
    config = make_config(db_url=db_url)
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b"stuck"])
    daemon = spawn(
        daemon_args(config, "--handler", "sample_handlers:stuck", "--drain-timeout", "1")
    )
    await daemon.start()
    await wait_until(lambda: in_flight_at_least(daemon, 1), timeout=10)
    assert await daemon.stop(timeout=20) == 0
    stuck_rows = "SELECT count(*) FROM applied WHERE message_id = 'stuck-started'"
    assert await rows(config.db_url, stuck_rows) == [(0,)]
    verdict = await oracle(amqp, config.queue, config.db_url, ids)
    assert verdict.lost == frozenset()
    assert verdict.queued == 1
    assert daemon.events("handlers_cancelled", why="drain_timeout", cancelled=1)


async def test_sigint_is_graceful_too(amqp, make_config, spawn):
    """SIGINT (Ctrl-C) starts the same graceful shutdown as SIGTERM."""
    config = make_config()
    daemon = spawn(daemon_args(config, "--handler", "sample_handlers:record"))
    await daemon.start()
    try:
        daemon.signal(signal.SIGINT)
        assert await daemon.wait(timeout=20) == 0
    finally:
        await daemon.kill()
    assert daemon.events("shutdown_begins", signal="SIGINT")
    assert daemon.tracebacks() == []


async def test_password_not_in_the_process_title(make_config, spawn):
    """The AMQP password given on the command line does not show in ps or /proc/PID/cmdline."""
    from pathlib import Path  # noqa: PLC0415

    config = make_config()
    daemon = spawn(daemon_args(config, "--handler", "sample_handlers:record"))
    await daemon.start()
    title = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()  # noqa: ASYNC240
    assert "guest:guest@" not in title
    assert "amqp://guest:***@127.0.0.1:5672/" in title
    assert await daemon.stop() == 0


@pytest.mark.parametrize(
    ("handler", "left", "stop_timeout"),
    [
        # A plain def handler sleeping for an hour in its thread.
        ("sample_handlers:sync_stuck", "handler_threads_left", 30),
        # An async handler that swallows every CancelledError.
        ("sample_handlers:swallows_cancel", "handler_tasks_left", 40),
    ],
)
async def test_a_handler_that_never_ends_does_not_hang_the_exit(
    amqp, make_config, spawn, handler, left, stop_timeout
):
    """A handler that never ends: the process still exits 0, its message requeued.

    1. The handler never returns (stuck in its thread, or swallowing its cancellation);
       drain_timeout 1 s.
    2. SIGTERM: at the deadline the drain cancels it, gives up on it, and the runbook goes on.
    3. The process exits 0 without waiting for it; the message is back in the queue.
    """
    config = make_config()
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b"{}"])
    daemon = spawn(daemon_args(config, "--handler", handler, "--drain-timeout", "1"))
    await daemon.start()
    await wait_until(lambda: in_flight_at_least(daemon, 1), timeout=10)
    assert await daemon.stop(timeout=stop_timeout) == 0
    assert daemon.events(left, count=1)
    verdict = await oracle(amqp, config.queue, config.db_url, ids)
    assert verdict.lost == frozenset()
    assert verdict.queued == 1
