"""The dead-letter queue's tools: ``mayhem dead list | replay | purge``.

Each walks ``<queue>.dead`` with ``basic.get`` and holds what it takes unacknowledged until it
is done with it: a message is acknowledged (removed) only after its replay is confirmed by
the broker, and whatever is not acknowledged goes back to the queue when the channel closes.
An interrupted command therefore loses nothing; an interrupted replay may leave a message in
both queues, and the inbox applies it once.

Messages are read through mayhem's own client (:mod:`mayhem.amqp`), which decodes hostile
properties per message (headers it cannot decode become ``{}`` and ``malformed`` says why)
where aio-pika's reader would drop the connection; aio-pika declares, purges and publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import aiormq
import attrs

from mayhem.amqp import endpoints, open_any
from mayhem.broker import connect, connection_name
from mayhem.exceptions import ConfigError, LinkLost, StartupError
from mayhem.headers import (
    ATTEMPTS_HEADER,
    DEATH_HEADER,
    ERROR_HEADER,
    FIRST_DEATH_QUEUE_HEADER,
    FIRST_DEATH_REASON_HEADER,
    LAST_FAILURE_HEADER,
    REASON_HEADER,
    copy_message,
    fits,
    frame_limit,
    header_frame_size,
    parse_timestamp,
    strip_mayhem_headers,
)
from mayhem.redact import mask_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection

    import aio_pika
    from aio_pika.abc import AbstractChannel, AbstractQueue

    from mayhem.amqp import Delivery, Link
    from mayhem.config import Config

log = logging.getLogger(__name__)

# C0 and C1 controls, and the Unicode line separators and bidirectional overrides that can
# make a terminal show something other than what the message holds.
_CONTROL: Final = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)

_LATIN1: Final = 0xFF


def printable(text: str) -> str:
    r"""``text`` with control characters escaped (``\x1b``, ``\u202e``), safe on a terminal."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= _LATIN1 else f"\\u{code:04x}"


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
    def of(cls, message: Delivery, now: float, max_bytes: int | None = None) -> DeadLetter:
        """Read the ``x-mayhem-*`` headers of a dead-lettered message.

        One the broker dead-lettered (with ``x-death``: a body over ``max_message_bytes``
        that mayhem rejected unread, say) is described from ``x-death``, whatever ``x-mayhem-*``
        headers its publisher gave it.
        Properties that cannot be decoded are shown as ``<undecodable: ...>``.
        """
        headers: dict[str, Any] = dict(message.headers)
        last = parse_timestamp(headers.get(LAST_FAILURE_HEADER))
        attempts = headers.get(ATTEMPTS_HEADER, 0)
        reason = headers.get(REASON_HEADER)
        error = str(headers.get(ERROR_HEADER, ""))
        size = len(message.body)
        if reason is None or DEATH_HEADER in headers:
            # The broker dead-lettered it: mayhem's own dead letters never carry x-death (it
            # is stripped from every copy), so any x-mayhem-* here are the publisher's.
            reason, error, last = _broker_death(headers, size, max_bytes)
            attempts = 0
        if message.malformed:
            error = f"<undecodable: {message.malformed}> {error}".rstrip()
        return cls(
            message_id=message.message_id or "-",
            reason=str(reason),
            attempts=attempts if type(attempts) is int else 0,
            age=now - last if last is not None else None,
            error=error,
            size=size,
        )


def _broker_death(
    headers: dict[str, Any], size: int, max_bytes: int | None
) -> tuple[str, str, float | None]:
    """Reason, error and time of a message the broker dead-lettered, from ``x-death``."""
    deaths = headers.get(DEATH_HEADER)
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    reason = death.get("reason") or headers.get(FIRST_DEATH_REASON_HEADER)
    if not isinstance(reason, str):
        return "broker", "", None
    queue = death.get("queue") or headers.get(FIRST_DEATH_QUEUE_HEADER) or "?"
    at = death.get("time")
    when = at.timestamp() if isinstance(at, datetime) else None
    if reason == "rejected" and max_bytes is not None and size > max_bytes:
        error = f"body of {size} bytes over max_message_bytes ({max_bytes}): rejected unread"
    else:
        error = f"dead-lettered by the broker from {queue} ({reason})"
    return reason, error, when


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


class _Reader:
    """Takes the messages of one queue through a :class:`~mayhem.amqp.Link`, one at a time."""

    def __init__(self) -> None:
        self.link: Link | None = None
        self._arrived: asyncio.Queue[Delivery | None] = asyncio.Queue()

    def on_delivery(self, delivery: Delivery) -> None:
        self._arrived.put_nowait(delivery)

    def on_lost(self, _: Link, exc: BaseException | None) -> None:
        if exc is not None:
            self._arrived.put_nowait(None)  # wakes a get() waiting for its content

    async def get(self, queue: str) -> Delivery | None:
        """The next message, unacknowledged, or ``None`` when the queue is empty.

        Raises:
            LinkLost: the connection failed.
        """
        if self.link is None or not await self.link.get(queue):
            return None
        delivery = await self._arrived.get()
        if delivery is None:
            raise LinkLost("the connection was lost while a message was read")
        return delivery


@contextlib.asynccontextmanager
async def _walk(
    config: Config, channel: AbstractChannel, role: str
) -> AsyncIterator[AsyncIterator[Delivery]]:
    """Every message now in the dead-letter queue, taken unacknowledged, once each.

    Raises:
        ConfigError: the queue does not exist.
        StartupError: the reading connection could not be opened, or failed.
    """
    declared = await _existing(channel, config.dead_queue)
    count = declared.declaration_result.message_count or 0
    reader = _Reader()
    url = mask_url(config.amqp_url)
    try:
        reader.link = await open_any(
            endpoints(config.amqp_url),
            client_properties={"connection_name": connection_name(config.queue, role)},
            prefetch=1,
            on_delivery=reader.on_delivery,
            on_lost=reader.on_lost,
        )
    except LinkLost as exc:
        raise StartupError(f"cannot connect to broker {url}: {exc}") from None

    async def messages() -> AsyncIterator[Delivery]:
        for _ in range(count):
            delivery = await reader.get(config.dead_queue)
            if delivery is None:
                return
            yield delivery

    try:
        yield messages()
    except LinkLost as exc:
        raise StartupError(
            f"broker {url} failed while reading {config.dead_queue}: {exc}"
        ) from None
    finally:
        # Closing gives every unacknowledged message back to the queue.
        await reader.link.close()


def _ack(delivery: Delivery) -> None:
    # Sent before the link's close, which the broker answers only after it: never lost.
    delivery.link.ack(0, (delivery.delivery_tag,))


async def dead_list(config: Config, *, limit: int) -> DeadReport:
    """Describe up to ``limit`` dead-lettered messages; all stay in the queue."""
    report = DeadReport()
    connection = await connect(config, role="dead-list")
    try:
        channel = await connection.channel()
        now = time.time()
        async with _walk(config, channel, "dead-list-reader") as messages:
            async for message in messages:
                report.total += 1
                if len(report.letters) < limit:
                    report.letters.append(DeadLetter.of(message, now, config.max_message_bytes))
        report.matched = len(report.letters)
    finally:
        await connection.close()
    return report


async def dead_replay(config: Config, *, ids: Collection[str] | None) -> DeadReport:
    """Send dead-lettered messages (``ids``, or all) back to the work queue, attempts reset.

    Headers that cannot be decoded are left behind (``x-mayhem-error`` on the copy says so);
    a message whose ``message_id`` or another text property is not UTF-8 stays in the
    dead-letter queue (its id could not be kept) and is counted as not done.
    """
    report = DeadReport()
    connection = await connect(config, role="dead-replay")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await channel.get_underlay_channel()
        limit = frame_limit(underlay.connection.connection_tune.frame_max)
        async with _walk(config, channel, "dead-replay-reader") as messages:
            async for message in messages:
                report.total += 1
                if ids is not None and message.message_id not in ids:
                    continue
                report.matched += 1
                headers = strip_mayhem_headers(dict(message.headers))
                if message.malformed:
                    if "not valid UTF-8" in message.malformed:
                        log.warning(
                            "not replayed: %s (message_id %s)",
                            message.malformed,
                            printable(message.message_id or "-"),
                        )
                        continue
                    why = f"replayed without what could not be decoded: {message.malformed}"
                    headers[ERROR_HEADER] = why
                    log.warning("%s (message_id %s)", why, printable(message.message_id or "-"))
                copy = _replayable(message, headers, limit)
                if copy is None:
                    continue
                # Confirmed first, removed after: never in neither queue.
                await channel.default_exchange.publish(
                    copy, routing_key=config.queue, mandatory=True
                )
                _ack(message)
                report.done += 1
    finally:
        await connection.close()
    return report


def _replayable(message: Delivery, headers: dict[str, Any], limit: int) -> aio_pika.Message | None:
    """The copy to replay; without the headers if they cannot be encoded again or fit no frame.

    Headers pamqp decodes are not always ones it can encode (a long string that is not UTF-8,
    a double beyond a 32-bit float): such a copy would raise in the publish, and stop the
    replay of every message after it. ``None`` (logged) if even the bare copy does not fit.
    """
    copy = copy_message(message, headers)
    if fits(copy, limit):
        return copy
    size = header_frame_size(copy)
    why = (
        f"its header frame of {size} bytes would exceed frame_max ({limit})"
        if size is not None
        else "they cannot be encoded again"
    )
    note = f"replayed without its headers: {why}"
    message_id = printable(message.message_id or "-")
    bare = copy_message(message, {ERROR_HEADER: note})
    if not fits(bare, limit):
        log.warning("not replayed: its properties cannot be published (message_id %s)", message_id)
        return None
    log.warning("%s (message_id %s)", note, message_id)
    return bare


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
        async with _walk(config, channel, "dead-purge-reader") as messages:
            async for message in messages:
                report.total += 1
                if message.message_id in ids:
                    report.matched += 1
                    _ack(message)
                    report.done += 1
    finally:
        await connection.close()
    return report


def format_letters(report: DeadReport, queue: str) -> str:
    """``mayhem dead list`` output: a table, then a count line."""
    lines = [f"{'MESSAGE_ID':<34} {'REASON':<9} {'ATTEMPTS':>8} {'AGE':>9}  ERROR"]
    for letter in report.letters:
        age = f"{letter.age:.0f}s" if letter.age is not None else "-"
        error = printable(" ".join(letter.error.split())[:80])
        message_id, reason = printable(letter.message_id), printable(letter.reason)
        lines.append(f"{message_id:<34} {reason:<9} {letter.attempts:>8} {age:>9}  {error}")
    lines.append(f"{report.total} messages in {queue}, {len(report.letters)} listed")
    return "\n".join(lines)
