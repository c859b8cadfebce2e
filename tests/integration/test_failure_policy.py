"""The failure policy against the real broker: retries through delay queues, dead letters, tools."""

from __future__ import annotations

from mayhem_testing import drain, oracle, publish, rows, wait_until

from mayhem.dead import dead_list, dead_purge, dead_replay
from mayhem.headers import parse_timestamp
from mayhem.message import content_id
from mayhem.topology import retry_queue, retry_tiers


def _count(daemon, outcome: str) -> float:
    return daemon.metrics.value("mayhem_messages_total", {"outcome": outcome})


async def _attempt_rows(db_url: str, where: str = "1 = 1") -> list[tuple]:
    return await rows(
        db_url,
        "SELECT message_id, attempt, at, first_failure, last_failure, error FROM attempts "
        f"WHERE {where}",
    )


async def test_fails_twice_then_succeeds(amqp, make_config, db_url, run_daemon):
    """A handler that fails on attempts 1 and 2 is applied once, on attempt 3.

    1. Retry delays 0.3 s then 0.6 s; the handler writes a row and raises twice.
    2. The message goes through the two delay queues and comes back each time.
    3. One row, attempt 3; the failed attempts' writes rolled back; the gaps between the
       attempts (from the failure timestamps in the headers) follow the delays.
    """
    config = make_config(
        db_url=db_url, handler="retry_handlers:fails_twice", retry_delays="0.3,0.6"
    )
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"], message_ids=["flaky"])
        await wait_until(lambda: _count(daemon, "acked") == 1, timeout=30)
        assert _count(daemon, "retried") == 2
    [(message_id, attempt, at, first, last, error)] = await _attempt_rows(db_url)
    assert (message_id, attempt) == ("flaky", 3)
    assert error == "RuntimeError: attempt 2 fails"
    # Jitter makes a retry wait 80-100 % of its tier's delay.
    assert 0.3 * 0.8 <= last - first < 10
    assert 0.6 * 0.8 <= at - last < 10


async def test_retry_copy_without_message_id_keeps_its_content_id(
    amqp, make_config, db_url, run_daemon
):
    """With missing_id = content-hash, a retried message stays one message to the inbox.

    1. A message without message_id fails twice, then succeeds (delays 0.1 s).
    2. Its retry copies carry the content id as message_id (aiormq would invent a random
       one), so a crash between publishing a copy and acking the original cannot apply
       the message under two ids.
    """
    from mayhem_testing import publish_without_id  # noqa: PLC0415

    config = make_config(
        db_url=db_url,
        handler="retry_handlers:fails_twice",
        retry_delays="0.1,0.1",
        missing_id="content-hash",
    )
    body = b'{"no": "id"}'
    async with run_daemon(config) as daemon:
        await publish_without_id(config.queue, body)
        await wait_until(lambda: _count(daemon, "acked") == 1, timeout=30)
    [(message_id, attempt, *_)] = await _attempt_rows(db_url)
    assert (message_id, attempt) == (content_id(body), 3)


async def test_poison_is_dead_lettered_while_others_flow(amqp, make_config, run_daemon):
    """A message that always fails is dead-lettered after max_attempts; others pass it by.

    1. One poison message, then 100 good ones; max_attempts 3, delays 1 s and 1 s.
    2. The good ones are applied while the poison waits in the delay queues.
    3. The poison lands in <queue>.dead with the reason, the error, 3 attempts and times.
    """
    config = make_config(
        handler="retry_handlers:poison_or_record", max_attempts=3, retry_delays="1,1"
    )
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"poison"], message_ids=["poison"])
        good = await publish(amqp, config.queue, [b"{}"] * 100)
        await wait_until(lambda: _count(daemon, "acked") == 100, timeout=30)
        assert _count(daemon, "dead_lettered") == 0, "good messages did not wait for it"
        await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        assert _count(daemon, "retried") == 2
    dead = await drain(amqp, config.dead_queue)
    assert [m.message_id for m in dead] == ["poison"]
    headers = dead[0].headers
    assert headers["x-mayhem-reason"] == "failed"
    assert headers["x-mayhem-error"] == "ValueError: poison pill"
    assert headers["x-mayhem-attempts"] == 3
    first = parse_timestamp(headers["x-mayhem-first-failure"])
    assert parse_timestamp(headers["x-mayhem-last-failure"]) - first >= 1.6
    assert headers["x-mayhem-queue"] == config.queue
    assert headers["x-mayhem-host"]
    assert dead[0].body == b"poison"
    verdict = await oracle(amqp, config.queue, config.db_url, good, table="attempts")
    assert verdict.applied == 100
    assert verdict.duplicates == 0


async def test_handler_timeout_cancels_and_retries(amqp, make_config, run_daemon):
    """A handler past handler_timeout is cancelled, rolled back, and retried."""
    config = make_config(
        handler="retry_handlers:slow_first", handler_timeout=0.3, retry_delays="0.1"
    )
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"], message_ids=["slow"])
        await wait_until(lambda: _count(daemon, "acked") == 1, timeout=30)
        assert not daemon.not_ready(), "the loop stayed responsive"
    found = await _attempt_rows(config.db_url)
    assert [(r[0], r[1]) for r in found] == [("slow", 2)]
    assert found[0][5] == "HandlerTimeout: handler ran past handler_timeout (0.3 s)"


async def test_retry_exception_with_delay(amqp, make_config, run_daemon):
    """mayhem.Retry(delay=...) goes to the smallest delay queue at least that long."""
    config = make_config(handler="retry_handlers:asks_retry", retry_delays="0.2,5")
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"], message_ids=["asked"])
        await wait_until(lambda: _count(daemon, "acked") == 1, timeout=30)
    [(_, attempt, at, _, last, error)] = await _attempt_rows(config.db_url)
    assert attempt == 2
    assert error.startswith("Retry: ")
    assert 0.2 * 0.8 <= at - last < 4, "the 0.2 s tier, not the 5 s one"


async def test_topology_has_one_delay_queue_per_tier(amqp, make_config, run_daemon):
    """Each distinct delay has its own queue, dead-lettering back to the work queue."""
    config = make_config(retry_delays="1,2,2,4")
    assert retry_tiers(config) == (1.0, 2.0, 4.0)
    async with run_daemon(config):
        channel = await amqp.channel()
        for tier in (1.0, 2.0, 4.0):
            declared = await channel.declare_queue(retry_queue(config.queue, tier), passive=True)
            assert declared.name == f"{config.queue}.retry.{int(tier * 1000)}"
        await channel.close()


async def test_dead_tools_list_replay_purge(amqp, make_config, tmp_path, monkeypatch, run_daemon):
    """`mayhem dead` lists without removing, replays with attempts reset, and purges.

    1. Three messages fail their only attempt and are dead-lettered.
    2. list shows all three with reason and attempts; they stay.
    3. The handler is fixed (a flag file); replay --id one: it is applied, attempt 1.
    4. purge --id another; purge --all the last; the dead-letter queue is empty.
    """
    flag = tmp_path / "fixed"
    monkeypatch.setenv("RETRY_FLAG", str(flag))
    config = make_config(handler="retry_handlers:fails_until_flag", max_attempts=1)
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"] * 3, message_ids=["d1", "d2", "d3"])
        await wait_until(lambda: _count(daemon, "dead_lettered") == 3, timeout=30)
        listed = await dead_list(config, limit=10)
        assert listed.total == 3
        assert sorted(letter.message_id for letter in listed.letters) == ["d1", "d2", "d3"]
        assert {(letter.reason, letter.attempts) for letter in listed.letters} == {("failed", 1)}
        assert (await dead_list(config, limit=10)).total == 3, "listing removed nothing"

        flag.touch()
        replayed = await dead_replay(config, ids={"d2"})
        assert (replayed.total, replayed.matched, replayed.done) == (3, 1, 1)
        await wait_until(lambda: _count(daemon, "acked") == 1, timeout=30)
    assert [(r[0], r[1]) for r in await _attempt_rows(config.db_url)] == [("d2", 1)]
    purged = await dead_purge(config, ids={"d1"})
    assert (purged.matched, purged.done) == (1, 1)
    assert [letter.message_id for letter in (await dead_list(config, limit=10)).letters] == ["d3"]
    assert (await dead_purge(config, ids=None)).done == 1
    assert (await dead_list(config, limit=10)).total == 0


async def test_sigterm_with_retries_pending_loses_nothing(amqp, make_config, run_daemon):
    """Messages waiting in a delay queue survive a stop and are applied after a restart.

    1. 20 messages fail their first attempt and wait 1 s in the delay queue.
    2. The daemon stops (as by SIGTERM) while they wait.
    3. A new daemon applies them all, once each.
    """
    config = make_config(handler="retry_handlers:fails_twice", retry_delays="1")
    ids = None
    async with run_daemon(config) as daemon:
        ids = await publish(amqp, config.queue, [b"{}"] * 20)
        await wait_until(lambda: _count(daemon, "retried") == 20, timeout=30)
        assert _count(daemon, "acked") == 0
    async with run_daemon(config) as daemon:
        await wait_until(lambda: _count(daemon, "acked") == 20, timeout=30)
    verdict = await oracle(amqp, config.queue, config.db_url, ids, table="attempts")
    assert verdict.lost == frozenset()
    assert verdict.applied == 20
    assert verdict.duplicates == 0


async def test_handler_awaiting_a_cancelled_task_keeps_its_worker(amqp, make_config, run_daemon):
    """A CancelledError from the handler's own await is a failure, not the worker's end.

    1. One worker; the handler awaits a task of its own that was cancelled, for "cancel".
    2. It is retried and dead-lettered like any failure (x-mayhem-error says CancelledError).
    3. The worker is still there: the next message is applied. (The CancelledError used to
       end the worker for good, the message requeued to no one: the queue stopped.)
    """
    config = make_config(
        handler="retry_handlers:awaits_cancelled_or_records",
        concurrency=1,
        max_attempts=2,
        retry_delays="0.05",
    )
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"cancel"], message_ids=["cancelled"])
        await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        await publish(amqp, config.queue, [b"{}"], message_ids=["next"])
        await wait_until(lambda: _count(daemon, "acked") == 1, timeout=30)
        assert _count(daemon, "retried") == 1
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.message_id == "cancelled"
    assert dead.headers["x-mayhem-attempts"] == 2
    assert dead.headers["x-mayhem-error"] == "CancelledError"
    assert [row[:2] for row in await _attempt_rows(config.db_url)] == [("next", 1)]
