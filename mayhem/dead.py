"""The dead-letter queue's tools: ``mayhem dead list | replay | purge``.

Each walks ``<queue>.dead`` with ``basic.get`` and holds what it takes unacknowledged until it
is done with it: a message is acknowledged (removed) only after its replay is confirmed by
the broker, and whatever is not acknowledged goes back to the queue when the channel closes.
An interrupted command therefore loses nothing; an interrupted replay may leave a message in
both queues, and the inbox applies it once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import aiormq
import attrs

from mayhem.broker import connect
from mayhem.exceptions import ConfigError
from mayhem.retry import copy_message, parse_timestamp, strip_mayhem_headers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection

    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

    from mayhem.config import Config


@attrs.frozen
class DeadLetter:
    """One message in the dead-letter queue, as ``mayhem dead list`` shows it."""

    message_id: str
    reason: str
    attempts: int
    age: float | None
    error: str
    size: int

    @classmethod
    def of(cls, message: AbstractIncomingMessage, now: float) -> DeadLetter:
        """Read the ``x-mayhem-*`` headers of a dead-lettered message."""
        headers: dict[str, Any] = dict(message.headers or {})
        last = parse_timestamp(headers.get("x-mayhem-last-failure"))
        attempts = headers.get("x-mayhem-attempts", 0)
        return cls(
            message_id=message.message_id or "-",
            reason=str(headers.get("x-mayhem-reason", "broker")),
            attempts=attempts if type(attempts) is int else 0,
            age=now - last if last is not None else None,
            error=str(headers.get("x-mayhem-error", "")),
            size=len(message.body),
        )


@attrs.define
class DeadReport:
    """What a ``mayhem dead`` command saw and did."""

    total: int = 0
    matched: int = 0
    done: int = 0
    letters: list[DeadLetter] = attrs.Factory(list)


async def _existing(channel: AbstractChannel, queue: str) -> AbstractQueue:
    try:
        return await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise ConfigError(f"queue {queue!r} does not exist on the broker") from None


async def _walk(channel: AbstractChannel, queue: str) -> AsyncIterator[AbstractIncomingMessage]:
    """Every message now in ``queue``, taken unacknowledged, once each."""
    declared = await _existing(channel, queue)
    count = declared.declaration_result.message_count or 0
    for _ in range(count):
        message = await declared.get(no_ack=False, fail=False)
        if message is None:
            return
        yield message


async def dead_list(config: Config, *, limit: int) -> DeadReport:
    """Describe up to ``limit`` dead-lettered messages; all stay in the queue."""
    report = DeadReport()
    connection = await connect(config, role="dead-list")
    try:
        channel = await connection.channel()
        now = time.time()
        async for message in _walk(channel, config.dead_queue):
            report.total += 1
            if len(report.letters) < limit:
                report.letters.append(DeadLetter.of(message, now))
        report.matched = len(report.letters)
    finally:
        # Closing the channel gives every unacknowledged message back to the queue.
        await connection.close()
    return report


async def dead_replay(config: Config, *, ids: Collection[str] | None) -> DeadReport:
    """Send dead-lettered messages (``ids``, or all) back to the work queue, attempts reset."""
    report = DeadReport()
    connection = await connect(config, role="dead-replay")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        async for message in _walk(channel, config.dead_queue):
            report.total += 1
            if ids is not None and message.message_id not in ids:
                continue
            report.matched += 1
            copy = copy_message(message, strip_mayhem_headers(dict(message.headers or {})))
            # Confirmed first, removed after: never in neither queue.
            await channel.default_exchange.publish(copy, routing_key=config.queue, mandatory=True)
            await message.ack()
            report.done += 1
    finally:
        await connection.close()
    return report


async def dead_purge(config: Config, *, ids: Collection[str] | None) -> DeadReport:
    """Drop dead-lettered messages: those with ``ids``, or all of them."""
    report = DeadReport()
    connection = await connect(config, role="dead-purge")
    try:
        channel = await connection.channel()
        if ids is None:
            queue = await _existing(channel, config.dead_queue)
            purged = await queue.purge()
            report.total = report.matched = report.done = purged.message_count or 0
            return report
        async for message in _walk(channel, config.dead_queue):
            report.total += 1
            if message.message_id in ids:
                report.matched += 1
                await message.ack()
                report.done += 1
    finally:
        await connection.close()
    return report


def format_letters(report: DeadReport, queue: str) -> str:
    """``mayhem dead list`` output: a table, then a count line."""
    lines = [f"{'MESSAGE_ID':<34} {'REASON':<9} {'ATTEMPTS':>8} {'AGE':>9}  ERROR"]
    for letter in report.letters:
        age = f"{letter.age:.0f}s" if letter.age is not None else "-"
        error = " ".join(letter.error.split())[:80]
        lines.append(
            f"{letter.message_id:<34} {letter.reason:<9} {letter.attempts:>8} {age:>9}  {error}"
        )
    lines.append(f"{report.total} messages in {queue}, {len(report.letters)} listed")
    return "\n".join(lines)
