"""Fixtures: the real broker and databases on this machine, isolated by unique names.

Every test gets its own queue and exchange (deleted afterwards), its own SQLite file or
PostgreSQL schema (dropped afterwards). Nothing is mocked: the broker is RabbitMQ on
127.0.0.1:5672 and the database is PostgreSQL on 127.0.0.1:5432 or a real SQLite file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import aio_pika
import pytest
from mayhem_testing import DaemonProcess, pg_schema

from mayhem.config import Config
from mayhem.topology import (
    dead_letter_exchange,
    dead_queue,
    retry_queue,
    retry_tiers,
)

AMQP_URL = os.environ.get("MAYHEM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# The delay queues each test's configurations declare, deleted with the test's queue.
_DELAY_QUEUES: dict[str, set[str]] = {}
PG_URL = os.environ.get("MAYHEM_TEST_PG_URL", "postgresql://root@127.0.0.1:5432/test")


@pytest.fixture
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture
async def amqp():
    """A connection of the test's own, to publish and inspect with."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def queue_name():
    """A unique queue (and exchange) name; the queues and exchanges are deleted afterwards.

    The clean-up opens a connection of its own: the test may have restarted the broker.
    """
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for queue in (name, dead_queue(name), *_DELAY_QUEUES.pop(name, set())):
            await channel.queue_delete(queue, if_unused=False, if_empty=False)
        for exchange in (name, dead_letter_exchange(name)):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mayhem.db'}"


@pytest.fixture
async def pg_url():
    """A PostgreSQL URL whose search_path is a schema of this test's own (dropped after)."""
    async with pg_schema(PG_URL, "t") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that asks for it runs on both backends."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def make_config(amqp_url: str, queue_name: str, sqlite_url: str):
    """Build a Config for this test's queue, exchange and database."""

    def make(**overrides: object) -> Config:
        values: dict[str, object] = {
            "amqp_url": amqp_url,
            "queue": queue_name,
            "exchange": queue_name,
            "db_url": sqlite_url,
            "metrics_addr": "127.0.0.1:0",
            "log_format": "text",
            "loop": "asyncio",
        }
        values.update(overrides)
        config = Config.load(flags=values, environ={})
        _DELAY_QUEUES.setdefault(queue_name, set()).update(
            retry_queue(queue_name, tier) for tier in retry_tiers(config)
        )
        return config

    return make


@pytest.fixture
async def spawn():
    """Start ``mayhem run`` processes; kill any left at the end and print their logs."""
    started: list[DaemonProcess] = []

    def make(args: list[str], env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(args, env)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        await daemon.kill()
        print(f"--- daemon pid {daemon.proc.pid if daemon.proc else '-'} log ---")  # noqa: T201
        print("\n".join(daemon.raw[-80:]))  # noqa: T201


@pytest.fixture
def run_daemon():
    """Start a Daemon in this test's loop; use it as an async context manager.

    The daemon is started and ready inside the block, and stopped (as by SIGTERM) after it.
    """
    import asyncio  # noqa: PLC0415
    import contextlib  # noqa: PLC0415

    from mayhem.daemon import Daemon  # noqa: PLC0415

    @contextlib.asynccontextmanager
    async def run(config: Config, **kwargs: object):
        daemon = Daemon(config, environ={}, **kwargs)
        task = asyncio.create_task(daemon.run())
        ready = asyncio.create_task(_wait_ready(daemon))
        done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            await task  # raises the startup error
        try:
            yield daemon
        finally:
            daemon.signals.stop_requested.set()
            assert await task == 0

    return run


async def _wait_ready(daemon) -> None:
    from mayhem_testing import wait_until  # noqa: PLC0415

    await wait_until(lambda: not daemon.not_ready(), timeout=30, interval=0.01)
