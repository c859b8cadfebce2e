"""The daemon as a process against failures: the broker drops it, it is killed, it is doubled."""

from __future__ import annotations

import asyncio

from mayhem_testing import (
    applied_at_least,
    close_connections_of,
    declare,
    metric,
    oracle,
    publish,
    rows,
    wait_until,
)


def _args(config, *extra: str) -> list[str]:
    return [
        "--amqp-url", config.amqp_url,
        "--queue", config.queue,
        "--exchange", config.exchange,
        "--db-url", config.db_url,
        "--handler", "sample_handlers:record",
        *extra,
    ]  # fmt: skip


async def test_broker_closes_the_connection_mid_stream(amqp, make_config, db_url, spawn):
    """The broker closes the daemon's connections mid-stream.

    1. Publish 2,000 messages; the daemon consumes with a 5 ms handler.
    2. After 200 are applied, `rabbitmqctl close_connection` on the daemon's own connections.
    3. It reconnects by itself and applies the rest; no id is lost or applied twice.
    """
    config = make_config(db_url=db_url)
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b"{}"] * 2000)
    daemon = spawn(_args(config), env={"SAMPLE_HANDLER_DELAY": "0.005"})
    await daemon.start()
    await wait_until(lambda: applied_at_least(db_url, 200), timeout=30)
    assert close_connections_of(daemon.pid) >= 1
    await daemon.wait_for_event("consuming_again", timeout=30)
    await wait_until(lambda: applied_at_least(db_url, 2000), timeout=60)
    assert await metric(daemon.metrics_addr, "mayhem_broker_reconnects_total") >= 1
    assert await daemon.stop() == 0
    verdict = await oracle(amqp, config.queue, db_url, ids)
    assert verdict.lost == frozenset()
    assert verdict.duplicates == 0
    assert verdict.applied == 2000
    assert daemon.tracebacks() == []


async def test_sigkill_then_restart_applies_each_once(amqp, make_config, db_url, spawn):
    """SIGKILL mid-stream, then a new daemon: every id applied exactly once.

    1. Publish 2,000 messages; a daemon applies a few hundred; SIGKILL it.
    2. Start another daemon on the same queue and database; let it finish.
    3. Committed-but-unacked messages come back and are recognised by the inbox.
    """
    config = make_config(db_url=db_url)
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b"{}"] * 2000)
    first = spawn(_args(config, "--concurrency", "32"), env={"SAMPLE_HANDLER_DELAY": "0.002"})
    await first.start()
    await wait_until(lambda: applied_at_least(db_url, 300), timeout=30)
    await first.kill()
    second = spawn(_args(config))
    await second.start()
    await wait_until(lambda: applied_at_least(db_url, 2000), timeout=60)
    assert await second.stop() == 0
    verdict = await oracle(amqp, config.queue, db_url, ids)
    assert verdict.lost == frozenset()
    assert verdict.duplicates == 0
    assert verdict.applied == 2000


async def test_same_message_id_twice_two_daemons(amqp, make_config, db_url, spawn):
    """The same message_id published twice, two daemons consuming: applied once.

    1. Publish 300 ids, each twice (600 messages).
    2. Two daemons consume the queue until all 600 are settled.
    3. 300 rows; the second copy of each is acked as a duplicate.
    """
    config = make_config(db_url=db_url)
    await declare(amqp, config)
    unique = [f"twice-{n}" for n in range(300)]
    await publish(amqp, config.queue, [b"{}"] * 600, message_ids=unique + unique)
    daemons = [spawn(_args(config)), spawn(_args(config))]
    await asyncio.gather(*(d.start() for d in daemons))

    async def settled() -> bool:
        total = 0.0
        for d in daemons:
            for outcome in ("acked", "duplicate"):
                total += await metric(
                    d.metrics_addr, f'mayhem_messages_total{{outcome="{outcome}"}}'
                )
        return total >= 600

    await wait_until(settled, timeout=60)
    codes = await asyncio.gather(*(d.stop() for d in daemons))
    assert codes == [0, 0]
    assert await rows(db_url, "SELECT count(*), count(DISTINCT message_id) FROM applied") == [
        (300, 300)
    ]
    verdict = await oracle(amqp, config.queue, db_url, unique)
    assert verdict.lost == frozenset()
    assert verdict.queued == 0


async def test_broker_restart_mid_stream(amqp_url, make_config, spawn):
    """The broker application stops and starts again mid-stream.

    1. Publish 1,500 messages; the daemon applies a few hundred.
    2. `rabbitmqctl stop_app`: the daemon is not ready while the broker is away.
    3. `rabbitmqctl start_app`: it reconnects by itself and applies the rest, each once.
    """
    import aio_pika  # noqa: PLC0415
    from mayhem_testing import http_get, rabbitmqctl  # noqa: PLC0415

    config = make_config()
    connection = await aio_pika.connect(amqp_url)
    await declare(connection, config)
    ids = await publish(connection, config.queue, [b"{}"] * 1500)
    await connection.close()
    daemon = spawn(_args(config), env={"SAMPLE_HANDLER_DELAY": "0.01"})
    await daemon.start()
    await wait_until(lambda: applied_at_least(config.db_url, 200), timeout=30)
    try:
        rabbitmqctl("stop_app")
        await daemon.wait_for_event("broker_connection_lost", 30)
        status, body = await http_get(daemon.metrics_addr, "/readyz")
        assert status == 503
        assert "broker disconnected" in body
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
    await daemon.wait_for_event("consuming_again", 60)
    await wait_until(lambda: applied_at_least(config.db_url, 1500), timeout=60)
    assert await daemon.stop() == 0
    connection = await aio_pika.connect(amqp_url)
    try:
        verdict = await oracle(connection, config.queue, config.db_url, ids)
    finally:
        await connection.close()
    assert verdict.lost == frozenset()
    assert verdict.duplicates == 0
    assert verdict.applied == 1500
