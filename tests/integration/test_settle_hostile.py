"""Settling failures against hostile input, on the real broker (issue 11 items 2, 11, 12).

A message must never run its handler more than max_attempts times, whatever fails while
settling it; a publisher cannot skip retries by forging mayhem's headers; and the text of a
handler's exception cannot forge a log line or blow up a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import aio_pika
import pytest
import settle_handlers
from mayhem_testing import drain, publish, records_of, wait_until

from mayhem import logs
from mayhem.headers import MAX_ERROR_HEADER, header_frame_size
from mayhem.topology import retry_queue

FRAME_MAX = 131_072  # RabbitMQ's default, what the broker here negotiates
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _count(daemon, outcome: str) -> float:
    return daemon.metrics.value("mayhem_messages_total", {"outcome": outcome})


@pytest.fixture(autouse=True)
def _runs():
    settle_handlers.RUNS.clear()
    yield
    settle_handlers.RUNS.clear()


@contextlib.contextmanager
def _captured_logs():
    """Every log record from now on, with its message id as the daemon's handler adds it."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(logs._MessageIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


def _headers_near_frame_max(message_id: str) -> dict[str, str]:
    """Headers that make the message's content header frame 40 bytes short of frame_max."""
    base = header_frame_size(
        aio_pika.Message(
            b"{}",
            headers={"blob": ""},
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            correlation_id="c-1",
        )
    )
    assert base is not None
    # A long string's length prefix is fixed (4 bytes): the frame grows by one byte a char.
    return {"blob": "x" * (FRAME_MAX - 40 - base)}


async def test_failing_message_with_headers_near_frame_max(amqp, make_config, run_daemon):
    """A failing message whose headers fill the frame ends in .dead without them, run once.

    1. The message's content header is 40 bytes short of frame_max; the handler always fails.
    2. A retry copy with mayhem's headers would not fit a frame: the broker would close the
       publishing connection, the message would be requeued and run again, forever.
    3. Instead it is dead-lettered at once without the original's headers (body, message_id
       and the other properties kept), x-mayhem-error saying so; the handler ran once, the
       publishing connection stayed up.
    """
    config = make_config(
        handler="settle_handlers:always_fails", max_attempts=3, retry_delays="0.05"
    )
    headers = _headers_near_frame_max("big")
    async with run_daemon(config) as daemon:
        connection = daemon.broker.connection
        await publish(
            amqp,
            config.queue,
            [b"{}"],
            message_ids=["big"],
            headers=headers,
            content_type="application/json",
            correlation_id="c-1",
        )
        await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        assert daemon.broker.connection is connection
        assert daemon.broker.connected, "the publishing connection was never closed"
        assert not daemon.not_ready()
    [dead] = await drain(amqp, config.dead_queue)
    assert (dead.message_id, dead.body) == ("big", b"{}")
    assert (dead.content_type, dead.correlation_id) == ("application/json", "c-1")
    assert "blob" not in dead.headers
    assert dead.headers["x-mayhem-reason"] == "failed"
    assert dead.headers["x-mayhem-attempts"] == 1
    error = dead.headers["x-mayhem-error"]
    assert error.startswith("RuntimeError: attempt 1 fails [original headers dropped; ")
    assert "not retried" in error
    assert settle_handlers.RUNS["big"] == 1
    assert _count(daemon, "requeued") == 0


def _forged_trails(queue: str) -> dict[str, dict[str, object]]:
    real_tier = retry_queue(queue, 0.05)
    trail = {
        "count": 1,
        "reason": "expired",
        "queue": real_tier,
        "exchange": "",
        "routing-keys": [real_tier],
    }
    return {
        "attempt-99": {"x-mayhem-attempt": 99},
        "x-death-of-another-queue": {
            "x-mayhem-attempt": 3,
            "x-death": [{**trail, "queue": "other.retry.50", "routing-keys": ["other.retry.50"]}],
        },
        # Everything the broker writes, but not the user_id only mayhem's user can publish.
        "x-death-of-our-delay-queue": {
            "x-mayhem-attempt": 3,
            "x-death": [trail],
            "x-first-death-queue": real_tier,
            "x-first-death-reason": "expired",
            "x-first-death-exchange": "",
        },
        "huge-attempt": {"x-mayhem-attempt": 2**40, "x-death": [trail]},
    }


@pytest.mark.parametrize(
    "forgery",
    ["attempt-99", "x-death-of-another-queue", "x-death-of-our-delay-queue", "huge-attempt"],
)
async def test_forged_attempt_header_does_not_skip_retries(amqp, make_config, run_daemon, forgery):
    """A publisher's x-mayhem-attempt (with or without a forged x-death) is attempt 1.

    The message runs all max_attempts times, through the delay queue, before it is
    dead-lettered; it is not dead-lettered on its first failure.
    """
    config = make_config(
        handler="settle_handlers:always_fails", max_attempts=3, retry_delays="0.05"
    )
    headers = _forged_trails(config.queue)[forgery]
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"], message_ids=["forged"], headers=headers)
        await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        assert _count(daemon, "retried") == 2
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.headers["x-mayhem-attempts"] == 3
    assert dead.headers["x-mayhem-error"] == "RuntimeError: attempt 3 fails"
    assert settle_handlers.RUNS["forged"] == 3


async def test_publisher_outage_never_runs_the_handler_past_max_attempts(
    amqp, make_config, run_daemon
):
    """While nothing can be published, a failing message runs at most max_attempts times.

    1. The settle stage's publishing channel is swapped for a closed one: every publish
       fails at once, as in an outage that does not heal.
    2. A message that always fails: its retry cannot be published, so it is requeued, and
       each requeued run counts as an attempt. (It used to run again and again, its attempt
       stuck at 1, for as long as the outage lasted.)
    3. Its third run cannot publish the dead letter either: it is rejected, and the work
       queue's dead-letter exchange puts it in .dead. The handler ran 3 times.
    """
    config = make_config(
        handler="settle_handlers:always_fails", max_attempts=3, retry_delays="0.05"
    )
    async with run_daemon(config) as daemon:
        closed = await amqp.channel(publisher_confirms=True)
        await closed.close()
        copies = daemon.workers._settle._copies
        working, copies._channel = copies._channel, closed
        try:
            await publish(amqp, config.queue, [b"{}"], message_ids=["outage"])
            await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        finally:
            copies._channel = working
        assert _count(daemon, "requeued") == 2
        assert _count(daemon, "retried") == 0
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.message_id == "outage"
    assert dead.headers["x-death"][0]["reason"] == "rejected"
    assert settle_handlers.RUNS["outage"] == 3


async def test_refused_retry_is_dead_lettered_not_run_again(amqp, make_config, run_daemon):
    """A delay queue that refuses the retry (a nack) does not make the handler run forever.

    The delay queue is replaced by one that holds nothing and rejects publishes. The broker
    nacks the retry; that will not heal, so the original is rejected to the dead-letter
    exchange after its one run. (It used to be requeued and run again, attempt 1, forever.)
    """
    config = make_config(handler="settle_handlers:always_fails", max_attempts=3, retry_delays="5")
    async with run_daemon(config) as daemon:
        channel = await amqp.channel()
        tier = retry_queue(config.queue, 5)
        await channel.queue_delete(tier)
        await channel.declare_queue(
            tier,
            durable=True,
            # A classic queue: a quorum queue may take one message past its limit.
            arguments={
                "x-queue-type": "classic",
                "x-max-length": 0,
                "x-overflow": "reject-publish",
            },
        )
        await channel.close()
        await publish(amqp, config.queue, [b"{}"], message_ids=["refused"])
        await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        assert _count(daemon, "requeued") == 0
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.message_id == "refused"
    assert dead.headers["x-death"][0]["reason"] == "rejected"
    assert settle_handlers.RUNS["refused"] == 1


async def test_missing_delay_queue_dead_letters_instead_of_losing(amqp, make_config, run_daemon):
    """A retry the broker returns as unroutable is not taken for confirmed.

    The delay queue is deleted under the running daemon. The retry copy is returned
    (mandatory), so the original is rejected to the dead-letter exchange: it lands in .dead
    after one run. It used to be acked as if the copy had been confirmed: lost.
    """
    config = make_config(handler="settle_handlers:always_fails", max_attempts=3, retry_delays="5")
    async with run_daemon(config) as daemon:
        channel = await amqp.channel()
        await channel.queue_delete(retry_queue(config.queue, 5))
        await channel.close()
        await publish(amqp, config.queue, [b"{}"], message_ids=["unroutable"])
        await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        assert _count(daemon, "retried") == 0
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.message_id == "unroutable"
    assert dead.headers["x-death"][0]["reason"] == "rejected"
    assert settle_handlers.RUNS["unroutable"] == 1


async def _nack_each(amqp, queue: str, ids: set[str], times: int) -> None:
    """Take each message and requeue it, ``times`` times over, as a crashing consumer would."""
    channel = await amqp.channel()
    nacked = dict.fromkeys(ids, 0)
    try:
        work = await channel.get_queue(queue, ensure=False)
        while min(nacked.values()) < times:
            message = await work.get(no_ack=False, fail=True, timeout=10)
            nacked[message.message_id] += 1
            await message.nack(requeue=True)
    finally:
        await channel.close()


async def test_redelivered_past_max_attempts_is_not_run_again(amqp, make_config, run_daemon):
    """A message redelivered max_attempts times is dead-lettered without running the handler.

    On a quorum queue the broker counts redeliveries (x-delivery-count); each may have
    followed a run that could not be settled, such as a handler that crashes the daemon.
    1. "dup" is applied once; then a copy of it and "crasher" are each requeued 3 times
       (max_attempts 3), as if three daemons had died running them.
    2. The copy of "dup" is acked as a duplicate; "crasher" goes to .dead without a run.
    """
    config = make_config(handler="retry_handlers:poison_or_record", max_attempts=3)
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"], message_ids=["dup"])
        await wait_until(lambda: _count(daemon, "acked") == 1, timeout=30)
    await publish(amqp, config.queue, [b"{}", b"{}"], message_ids=["dup", "crasher"])
    await _nack_each(amqp, config.queue, {"dup", "crasher"}, times=3)
    config = make_config(handler="settle_handlers:always_fails", max_attempts=3)
    async with run_daemon(config) as daemon:
        await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        await wait_until(lambda: _count(daemon, "duplicate") == 1, timeout=30)
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.message_id == "crasher"
    assert dead.headers["x-mayhem-attempts"] == 4
    assert dead.headers["x-mayhem-error"] == (
        "AttemptsExhausted: may have run max_attempts (3) times already: redelivered as attempt 4"
    )
    assert settle_handlers.RUNS == {}


async def test_hostile_exception_text_is_capped_and_escaped(amqp, make_config, run_daemon):
    """Hostile exception text and message id cannot forge a log line or fill a header.

    The exception text has newlines, ANSI escapes, a NUL and 1 MB; the message id a newline
    and an escape. x-mayhem-error is at most MAX_ERROR_HEADER characters with no control
    character in it; every text log line of the daemon is one line, escaped, and short.
    """
    config = make_config(handler="settle_handlers:fails_with_hostile_text", max_attempts=1)
    message_id = "evil\n2026-01-01 00:00:00,000 INFO    mayhem forged\x1b[2J"
    with _captured_logs() as records:
        async with run_daemon(config) as daemon:
            await publish(amqp, config.queue, [b"{}"], message_ids=[message_id])
            await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.message_id == message_id, "the id itself is kept as it was"
    error = dead.headers["x-mayhem-error"]
    assert len(error) <= MAX_ERROR_HEADER
    assert not CONTROL.search(error)
    assert error.startswith(
        r"ValueError: first line 2026-01-01 00:00:00,000 ERROR mayhem.daemon forged line "
        r"\x1b[31mred\x1b[0m nul\x00 end xxx"
    )
    assert error.endswith("…")
    formatter = logs.TextFormatter()
    ours = [record for record in records if record.name.startswith("mayhem")]
    lines = [formatter.format(record) for record in ours]
    failed = [formatter.format(record) for record in records_of(ours, "handler_failed")]
    assert len(failed) == 1
    assert r"[evil\n2026-01-01 00:00:00,000 INFO    mayhem forged\x1b[2J]" in failed[0]
    for line in lines:
        assert not CONTROL.search(line), line[:300]
        assert len(line) < 2 * MAX_ERROR_HEADER, line[:300]
    assert settle_handlers.RUNS[message_id] == 1


async def test_exception_text_with_a_lone_surrogate_is_retried_and_dead_lettered(
    amqp, make_config, run_daemon
):
    r"""A handler's exception quoting a lone surrogate from the body still follows the policy.

    The JSON body ``{"name": "\ud800"}`` decodes to a str with a lone surrogate, which UTF-8
    cannot encode. The handler raises with it in the text: the message is retried, then
    dead-lettered by mayhem with x-mayhem-error (the surrogate escaped), not rejected to the
    broker's dead-letter exchange without a reason on its first failure.
    """
    config = make_config(
        handler="settle_handlers:fails_with_a_lone_surrogate", max_attempts=2, retry_delays="0.05"
    )
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b'{"name": "\\ud800"}'], message_ids=["lone"])
        await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
        assert _count(daemon, "retried") == 1
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.headers["x-mayhem-reason"] == "failed"
    assert dead.headers["x-mayhem-attempts"] == 2
    assert dead.headers["x-mayhem-error"] == r"ValueError: unknown name \ud800"
    assert settle_handlers.RUNS["lone"] == 2


async def _ready_in(amqp, queue: str) -> int:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count
    finally:
        await channel.close()


async def test_failed_run_on_a_lost_link_publishes_no_retry_copy(amqp, make_config, run_daemon):
    """A run that fails after its consuming connection dropped leaves one message, not two.

    1. The handler's first run waits; meanwhile the consuming connection drops (the broker
       requeues the message); then the run fails.
    2. No retry copy is published: it would run beside the redelivered original, each with
       its own attempts (the handler could run 2 x max_attempts times, two dead letters).
       The delay queue stays empty.
    3. The original comes back as attempt 2 (its lost run counted) and, max_attempts being
       2, is dead-lettered: the handler ran twice in all.
    """
    settle_handlers.STARTED, settle_handlers.GATE = asyncio.Event(), asyncio.Event()
    # A long delay: a copy, had one been published, is still in the delay queue at the end.
    config = make_config(
        handler="settle_handlers:fails_after_gate", max_attempts=2, retry_delays="60"
    )
    try:
        async with run_daemon(config) as daemon:
            await publish(amqp, config.queue, [b"{}"], message_ids=["cut"])
            await asyncio.wait_for(settle_handlers.STARTED.wait(), timeout=30)
            daemon.consumer._link.abort()  # the connection drops under the running handler
            settle_handlers.GATE.set()
            await wait_until(lambda: _count(daemon, "dead_lettered") == 1, timeout=30)
            assert daemon.metrics.value("mayhem_stale_deliveries_total") >= 1
            assert await _ready_in(amqp, retry_queue(config.queue, 60)) == 0
            assert _count(daemon, "retried") == 0
    finally:
        settle_handlers.STARTED = settle_handlers.GATE = None
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.message_id == "cut"
    assert dead.headers["x-mayhem-attempts"] == 2
    assert dead.headers["x-mayhem-error"] == "RuntimeError: attempt 2 fails"
    assert settle_handlers.RUNS["cut"] == 2
