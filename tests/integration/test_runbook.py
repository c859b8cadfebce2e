"""One runbook: a start-up that fails half way runs the shutdown's steps, in the same order."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import sample_handlers
from mayhem_testing import drain, publish, records_of, wait_until

from mayhem.daemon import SHUTDOWN, Daemon
from mayhem.exceptions import ConfigError, StartupError, StoreUnavailable

RUNBOOK = [step.name for step in SHUTDOWN]


def _steps(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int]]:
    """The shutdown steps logged, as (structured ``step`` field, level)."""
    return [(r.step, r.levelno) for r in records_of(caplog.records, "shutdown_step")]


async def test_stop_runs_the_runbook(make_config, run_daemon, caplog):
    """A daemon stopped as by SIGTERM logs each step of SHUTDOWN once, in order, at INFO."""
    caplog.set_level(logging.DEBUG, logger="mayhem")
    async with run_daemon(make_config()):
        pass
    assert _steps(caplog) == [(name, logging.INFO) for name in RUNBOOK]


@pytest.fixture
def taken_port():
    """A port this test listens on, so that the daemon's metrics endpoint cannot."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "failure",
    [
        "metrics port taken",  # nothing opened yet
        "store cannot open",  # after the metrics endpoint started
        "broker refuses",  # after the store opened
        "queue missing",  # after the publishing connection opened
    ],
)
async def test_failed_startup_runs_the_same_steps_and_leaves_nothing_open(
    request, make_config, db_url, tmp_path, caplog, failure
):
    """1. Start a daemon whose start-up fails at ``failure``.

    2. It raises the start-up error, after running every step of SHUTDOWN in order (quietly,
       at DEBUG: the error is the news).
    3. Nothing is left open: no task, no listening endpoint, no database connection, no
       broker connection.
    """
    caplog.set_level(logging.DEBUG, logger="mayhem")
    overrides: dict[str, object] = {"db_url": db_url}
    if failure == "metrics port taken":
        overrides["metrics_addr"] = f"127.0.0.1:{request.getfixturevalue('taken_port')}"
    elif failure == "store cannot open":
        (tmp_path / "a-file").write_text("")
        overrides["db_url"] = f"sqlite:///{tmp_path / 'a-file' / 'mayhem.db'}"
    elif failure == "broker refuses":
        overrides["amqp_url"] = "amqp://guest:wrong-password@127.0.0.1:5672/"
    else:
        overrides["declare"] = False
    daemon = Daemon(make_config(**overrides), environ={})
    with pytest.raises((StartupError, ConfigError)):
        await daemon.run()
    assert _steps(caplog) == [(name, logging.DEBUG) for name in RUNBOOK]
    assert asyncio.all_tasks() == {asyncio.current_task()}
    if daemon.health.bound is not None:
        host, _, port = daemon.health.bound.rpartition(":")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(host, int(port))
    with pytest.raises(StoreUnavailable):
        await daemon.store.ping()
    assert daemon.broker.connection is None
    assert not daemon.consumer.connected


async def test_handler_swallowing_its_cancellation_does_not_hang_the_shutdown(amqp, make_config):
    """A handler that swallows CancelledError is left behind; the shutdown still ends, exit 0.

    1. The handler waits and swallows every CancelledError; drain_timeout 0.5 s.
    2. Stop: the drain gives up on it after cancelling it, and the runbook goes on; the
       message is back in the queue once the consuming connection closes. (The task group's
       exit used to wait for that worker for ever, even after a second signal.)
    """
    sample_handlers.STARTED.clear()
    config = make_config(handler="sample_handlers:swallows_cancel", drain_timeout=0.5)
    daemon = Daemon(config, environ={})
    task = asyncio.create_task(daemon.run())
    try:
        await wait_until(lambda: daemon._started, timeout=20)
        await publish(amqp, config.queue, [b"{}"], message_ids=["swallower"])
        await wait_until(lambda: sample_handlers.STARTED == ["swallower"], timeout=20)
        daemon.signals.stop_requested.set()
        assert await asyncio.wait_for(asyncio.shield(task), timeout=30) == 0
        assert len(daemon.abandoned) == 1
        [back] = await drain(amqp, config.queue)
        assert back.message_id == "swallower"
    finally:
        sample_handlers.SWALLOW_CANCEL = False
        for left in [*daemon._worker_tasks, task]:
            left.cancel()
        await asyncio.gather(*daemon._worker_tasks, task, return_exceptions=True)
        sample_handlers.SWALLOW_CANCEL = True
        sample_handlers.STARTED.clear()
