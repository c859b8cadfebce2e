"""The database under the daemon fails: outages pause consumption, nothing is lost or doubled."""

from __future__ import annotations

import asyncpg
import pytest
from conftest import PG_URL
from mayhem_testing import (
    applied_at_least,
    declare,
    http_get,
    oracle,
    pg_ctl,
    pg_ready,
    publish,
    wait_until,
)

pytestmark = pytest.mark.postgres


def _args(config, handler: str = "sample_handlers:record", *extra: str) -> list[str]:
    return [
        "--amqp-url", config.amqp_url,
        "--queue", config.queue,
        "--exchange", config.exchange,
        "--db-url", config.db_url,
        "--handler", handler,
        *extra,
    ]  # fmt: skip


async def _sessions_of(pid: int) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(PG_URL)
    try:
        found = await conn.fetch(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = $1",
            f"mayhem pid={pid}",
        )
    finally:
        await conn.close()
    return [(r["pid"], r["state"]) for r in found]


async def test_postgres_down_mid_stream(amqp, make_config, pg_url, spawn):
    """PostgreSQL stops mid-stream, then comes back.

    1. Publish 1,500 messages; the daemon applies a few hundred into PostgreSQL.
    2. Stop PostgreSQL (fast shutdown): the daemon requeues, pauses, turns not ready.
    3. Keep it down while the daemon retries a few times; start it again.
    4. The daemon resumes by itself; every id applied once, nothing dead-lettered.
    """
    config = make_config(db_url=pg_url)
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b"{}"] * 1500)
    daemon = spawn(_args(config), env={"SAMPLE_HANDLER_DELAY": "0.01"})
    await daemon.start()
    await wait_until(lambda: applied_at_least(pg_url, 200), timeout=30)
    try:
        pg_ctl("stop")
        await daemon.wait_for_event("consumption_paused", 30)
        status, body = await http_get(daemon.metrics_addr, "/readyz")
        assert status == 503
        assert "database unavailable" in body
        # The outage lasts while the daemon probes with backoff (0.25 s, 0.5 s, 1 s, 2 s ...).
        await wait_until(lambda: len(daemon.events("database_still_unavailable")) >= 5, timeout=60)
    finally:
        pg_ctl("start")
        await wait_until(lambda: pg_ready(PG_URL), timeout=60)
    await daemon.wait_for_event("database_back", 60)
    await wait_until(lambda: applied_at_least(pg_url, 1500), timeout=60)
    status, _ = await http_get(daemon.metrics_addr, "/readyz")
    assert status == 200
    assert await daemon.stop() == 0
    verdict = await oracle(amqp, config.queue, pg_url, ids)
    assert verdict.lost == frozenset()
    assert verdict.duplicates == 0
    assert verdict.dead == 0
    assert verdict.applied == 1500


async def test_connection_killed_mid_transaction(amqp, make_config, pg_url, spawn):
    """pg_terminate_backend on the daemon's sessions while handlers hold open transactions.

    1. A handler that writes its row and then waits 300 ms inside the transaction.
    2. Terminate every PostgreSQL session of the daemon while messages are in flight.
    3. Those transactions roll back; the messages are requeued, applied once, none dead.
    """
    config = make_config(db_url=pg_url)
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b"{}"] * 100)
    daemon = spawn(
        _args(config, "sample_handlers:slow_after_write"), env={"SAMPLE_HANDLER_DELAY": "0.3"}
    )
    await daemon.start()
    await wait_until(lambda: applied_at_least(pg_url, 16), timeout=30)

    async def idle_in_transaction() -> bool:
        return any(state == "idle in transaction" for _, state in await _sessions_of(daemon.pid))

    await wait_until(idle_in_transaction, timeout=10)
    admin = await asyncpg.connect(PG_URL)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            f"mayhem pid={daemon.pid}",
        )
    finally:
        await admin.close()
    assert killed >= 1
    await wait_until(lambda: applied_at_least(pg_url, 100), timeout=60)
    assert daemon.events("database_outage")
    assert await daemon.stop() == 0
    verdict = await oracle(amqp, config.queue, pg_url, ids)
    assert verdict.lost == frozenset()
    assert verdict.duplicates == 0
    assert verdict.dead == 0
    assert verdict.applied == 100


async def test_no_session_left_after_sigterm(amqp, make_config, pg_url, spawn):
    """After SIGTERM, no PostgreSQL session of the daemon remains."""
    config = make_config(db_url=pg_url)
    await declare(amqp, config)
    await publish(amqp, config.queue, [b"{}"] * 50)
    daemon = spawn(_args(config, "sample_handlers:record", "--concurrency", "8"))
    await daemon.start()
    await wait_until(lambda: applied_at_least(pg_url, 50), timeout=30)
    assert await _sessions_of(daemon.pid) != []
    pid = daemon.pid
    assert await daemon.stop() == 0
    assert await _sessions_of(pid) == []
