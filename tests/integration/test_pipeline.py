"""The pipeline in-process against the real broker: consume, handle, commit, acknowledge."""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import pytest
import sample_handlers
from mayhem_testing import drain, oracle, publish, rows, wait_until

from mayhem.message import content_id


async def _applied(db_url: str) -> int:
    return (await rows(db_url, "SELECT count(*) FROM applied"))[0][0]


async def test_consume_handle_ack(amqp, make_config, db_url, run_daemon):
    """Messages are applied once each and acknowledged; the queue ends empty."""
    config = make_config(db_url=db_url, handler="sample_handlers:record")
    async with run_daemon(config) as daemon:
        ids = await publish(amqp, config.queue, [b"{}"] * 200)
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "acked"}) >= 200
        )
    verdict = await oracle(amqp, config.queue, db_url, ids)
    assert verdict.applied == 200
    assert verdict.duplicates == 0
    assert verdict.queued == 0


async def test_redelivered_id_is_acked_as_duplicate(amqp, make_config, run_daemon):
    """A message id already in the inbox is acked without running the handler again."""
    config = make_config(handler="sample_handlers:record")
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"], message_ids=["same-id"])
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "acked"}) == 1
        )
        await publish(amqp, config.queue, [b"{}"], message_ids=["same-id"])
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "duplicate"}) == 1
        )
    assert await _applied(config.db_url) == 1


async def test_failing_handler_is_dead_lettered_with_headers(amqp, make_config, run_daemon):
    """A handler that raises on its last attempt: writes roll back, <queue>.dead says why."""
    config = make_config(handler="sample_handlers:failing", max_attempts=1)
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"fail", b"reject", b"{}"], message_ids=["f", "r", "ok"])
        await wait_until(
            lambda: (
                sum(
                    daemon.metrics.value("mayhem_messages_total", {"outcome": o})
                    for o in ("acked", "dead_lettered", "rejected")
                )
                == 3
            )
        )
        assert daemon.metrics.value("mayhem_messages_total", {"outcome": "dead_lettered"}) == 1
        assert daemon.metrics.value("mayhem_messages_total", {"outcome": "rejected"}) == 1
    dead = {m.message_id: m for m in await drain(amqp, config.dead_queue)}
    assert set(dead) == {"f", "r"}
    assert dead["f"].headers["x-mayhem-reason"] == "failed"
    assert dead["f"].headers["x-mayhem-error"] == "ValueError: boom"
    assert dead["f"].headers["x-mayhem-attempts"] == 1
    assert dead["f"].body == b"fail"
    assert dead["r"].headers["x-mayhem-reason"] == "rejected"
    assert dead["r"].headers["x-mayhem-error"] == "Reject: not for us"
    assert await rows(config.db_url, "SELECT message_id FROM applied") == [("ok",)]


@pytest.mark.parametrize(
    ("body", "properties", "message_id", "why"),
    [
        (b"", {}, "empty", "empty body"),
        (b"{not json", {}, "bad-json", "not valid JSON"),
        (b"\xff\xfe", {}, "bad-utf8", "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, {"content_type": "application/json"}, "deep", "nested"),
        (b"1" * 100_000, {}, "digits", "JSON"),
        (b'{"a": 1}', {"content_type": "text/plain"}, "text", "not JSON"),
    ],
)
async def test_hostile_input_is_dead_lettered_at_once(
    amqp, make_config, run_daemon, body, properties, message_id, why, caplog
):
    """Undecodable input: dead-lettered with a reason, payload never logged.

    A body over max_message_bytes goes to the broker's dead-letter exchange instead, unread
    (test_poison.py).
    """
    config = make_config(handler="sample_handlers:failing", max_message_bytes=400_000)
    caplog.set_level(logging.DEBUG, logger="mayhem")
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [body], message_ids=[message_id], **properties)
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "rejected"}) == 1
        )
        assert not daemon.not_ready()
    dead = await drain(amqp, config.dead_queue)
    assert len(dead) == 1
    assert why in dead[0].headers["x-mayhem-error"]
    assert dead[0].body == body
    if len(body) > 8:
        assert body[:64].decode(errors="replace") not in caplog.text


async def test_message_id_with_nul_is_rejected_at_once(amqp, make_config, db_url, run_daemon):
    """A message_id with a NUL (which PostgreSQL's text cannot hold) on either backend.

    1. It is published between two ordinary messages, with retries allowed.
    2. It is dead-lettered at once as ``rejected``, saying why; the handler never runs for it,
       nothing is retried, and the others are applied.
    """
    config = make_config(db_url=db_url, handler="sample_handlers:record", max_attempts=3)
    settled = ("acked", "retried", "dead_lettered", "rejected")
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"] * 3, message_ids=["before", "nul\x00id", "after"])
        await wait_until(
            lambda: (
                sum(daemon.metrics.value("mayhem_messages_total", {"outcome": o}) for o in settled)
                >= 3
            )
        )
        counts = {o: daemon.metrics.value("mayhem_messages_total", {"outcome": o}) for o in settled}
        assert not daemon.not_ready()
    assert counts == {"acked": 2, "retried": 0, "dead_lettered": 0, "rejected": 1}
    dead = await drain(amqp, config.dead_queue)
    assert [m.message_id for m in dead] == ["nul\x00id"]
    assert dead[0].headers["x-mayhem-reason"] == "rejected"
    assert "NUL" in dead[0].headers["x-mayhem-error"]
    applied = await rows(config.db_url, "SELECT message_id FROM applied ORDER BY message_id")
    assert applied == [("after",), ("before",)]


async def test_missing_message_id_is_dead_lettered(amqp, make_config, run_daemon):
    """A message without message_id cannot be applied exactly once: dead-lettered at once."""
    from mayhem_testing import publish_without_id  # noqa: PLC0415

    config = make_config(handler="sample_handlers:record")
    async with run_daemon(config) as daemon:
        await publish_without_id(config.queue, b'{"a": 1}')
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "rejected"}) == 1
        )
    dead = await drain(amqp, config.dead_queue)
    assert "missing message_id" in dead[0].headers["x-mayhem-error"]
    # Its copy keeps the content id, not a random one: replaying it twice applies it once.
    assert dead[0].message_id == content_id(b'{"a": 1}')
    assert await _applied(config.db_url) == 0


async def test_missing_message_id_hashed_when_configured(amqp, make_config, run_daemon):
    """With missing_id = content-hash, equal bodies without ids are one message: applied once."""
    from mayhem_testing import publish_without_id  # noqa: PLC0415

    config = make_config(handler="sample_handlers:record", missing_id="content-hash")
    async with run_daemon(config) as daemon:
        await publish_without_id(config.queue, b'{"a": 1}')
        await publish_without_id(config.queue, b'{"a": 1}')
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "duplicate"}) == 1
        )
    found = await rows(config.db_url, "SELECT message_id FROM applied")
    assert len(found) == 1
    assert found[0][0].startswith("sha256:")


async def test_sync_handler_runs_in_a_thread_with_blocking_db(
    amqp, make_config, db_url, run_daemon
):
    """A plain def handler runs off the loop and writes through the blocking ctx.db."""
    config = make_config(db_url=db_url, handler="sample_handlers:sync_record")
    async with run_daemon(config) as daemon:
        ids = await publish(amqp, config.queue, [b"{}"] * 20)
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "acked"}) == 20
        )
    assert sorted(r[0] for r in await rows(db_url, "SELECT message_id FROM applied")) == sorted(ids)


async def test_demo_handler_and_demo_publisher(make_config, db_url, run_daemon):
    """--demo: the daemon publishes demo messages to itself and the demo handler records them."""
    config = make_config(db_url=db_url, demo=True, demo_rate=200, demo_max_delay=0.01)
    async with run_daemon(config) as daemon:
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "acked"}) >= 50
        )
    restarts = await rows(db_url, "SELECT count(*), count(DISTINCT message_id) FROM restarts")
    assert restarts[0][0] == restarts[0][1] >= 50


async def test_readiness_follows_the_broker_connection(make_config, run_daemon):
    """Not ready from the moment the connection drops, and ready again once it is restored."""
    import os  # noqa: PLC0415

    from mayhem_testing import close_connections_of, http_get  # noqa: PLC0415

    config = make_config()
    async with run_daemon(config) as daemon:
        status, _ = await http_get(daemon.health.bound, "/readyz")
        assert status == 200
        reconnects = daemon.metrics.value("mayhem_broker_reconnects_total")
        while_down: list[list[str]] = []
        daemon.broker.connection.close_callbacks.add(
            lambda *_: while_down.append(daemon.not_ready())
        )
        assert await asyncio.to_thread(close_connections_of, os.getpid()) >= 1
        await wait_until(
            lambda: daemon.metrics.value("mayhem_broker_reconnects_total") > reconnects,
            timeout=30,
        )
        await wait_until(lambda: not daemon.not_ready(), timeout=30)
        assert while_down
        assert "broker disconnected" in while_down[0]
        status, _ = await http_get(daemon.health.bound, "/readyz")
        assert status == 200


async def test_sighup_reloads_log_level_and_concurrency(make_config, tmp_path, run_daemon):
    """SIGHUP re-reads the config file: the log level and the number of workers change."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    config_file = tmp_path / "mayhem.toml"
    config_file.write_text('log_level = "INFO"\nconcurrency = 4\n')
    config = make_config()
    async with run_daemon(
        config,
        config_file=str(config_file),
        flags={
            "amqp_url": config.amqp_url,
            "queue": config.queue,
            "exchange": config.exchange,
            "db_url": config.db_url,
            "metrics_addr": "127.0.0.1:0",
            "prefetch": 32,
        },
    ) as daemon:
        config_file.write_text('log_level = "WARNING"\nconcurrency = 8\n')
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(lambda: daemon.config.log_level == "WARNING", timeout=10)
        assert logging.getLogger().level == logging.WARNING
        assert daemon.config.concurrency == 8
        assert len([t for t in daemon._worker_tasks if not t.done()]) == 8
    logging.getLogger().setLevel(logging.WARNING)


async def test_publish_command_confirms(amqp, make_config):
    """`mayhem publish` publishes with confirms and reports what was confirmed."""
    from mayhem.publisher import publish as publish_command  # noqa: PLC0415

    config = make_config()
    report = await publish_command(config, count=25, rate=None, file=None)
    assert (report.published, report.confirmed, report.failed) == (25, 25, 0)
    queued = await drain(amqp, config.queue)
    assert len(queued) == 25
    assert len({m.message_id for m in queued}) == 25
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in queued)
    assert all(sample_handlers is not None for _ in queued)


async def test_batched_acks_never_cover_a_message_in_flight(amqp, make_config, pg_url, run_daemon):
    """Acks of later messages never acknowledge an earlier one still being handled.

    1. The first delivery (tag 1) blocks in its handler; 50 later ones are applied and acked.
    2. The daemon stops with a short drain: the blocked one is cancelled and requeued.
    3. It is back in the queue: no multiple ack covered it.
    """
    # PostgreSQL: on SQLite the blocked handler would hold the single writer.
    config = make_config(handler="sample_handlers:stuck", drain_timeout=0.5, db_url=pg_url)
    async with run_daemon(config) as daemon:
        stuck = await publish(amqp, config.queue, [b"stuck"])
        await wait_until(lambda: daemon.workers.in_flight == 1)
        others = await publish(amqp, config.queue, [b"{}"] * 50)
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "acked"}) == 50
        )
    verdict = await oracle(amqp, config.queue, config.db_url, stuck + others)
    assert verdict.queued == 1
    assert verdict.applied == 50
    assert verdict.lost == frozenset()


async def test_reloads_while_workers_are_due_to_exit(amqp, make_config, run_daemon):
    """Reloads down and up while every worker is busy leave the configured number of workers.

    1. 4 workers (prefetch 4), each busy with a message that waits.
    2. Concurrency goes 1, 4, 1, 4, 1, 4 meanwhile (what a SIGHUP applies, resize_workers).
    3. No reload fails: the exit sentinels used to pile up past the buffer's room (QueueFull,
       and a SIGHUP crashed the daemon). Once the messages are done, 4 workers take the next
       4 at once: a reload up used to count the workers due to exit as staying.
    """
    sample_handlers.GATE = first = asyncio.Event()
    sample_handlers.STARTED.clear()
    config = make_config(handler="sample_handlers:gated", concurrency=4, prefetch=4)

    def acked() -> float:
        return daemon.metrics.value("mayhem_messages_total", {"outcome": "acked"})

    try:
        async with run_daemon(config) as daemon:
            await publish(amqp, config.queue, [b"{}"] * 4, message_ids=["a0", "a1", "a2", "a3"])
            await wait_until(lambda: len(sample_handlers.STARTED) == 4)
            for count in (1, 4, 1, 4, 1, 4):
                daemon.resize_workers(count)
            sample_handlers.GATE = second = asyncio.Event()
            first.set()
            await wait_until(lambda: acked() == 4)
            await publish(amqp, config.queue, [b"{}"] * 4, message_ids=["b0", "b1", "b2", "b3"])
            await wait_until(lambda: len(sample_handlers.STARTED) == 8, timeout=10)
            assert daemon.workers.in_flight == 4
            second.set()
            await wait_until(lambda: acked() == 8)
    finally:
        sample_handlers.GATE = None
        sample_handlers.STARTED.clear()
