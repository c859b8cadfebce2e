"""The copies of a failed message: a retry to a delay queue, a dead letter to ``<queue>.dead``.

This module only builds and publishes them, with publisher confirms, and says how it went
(:class:`Sent`); :mod:`mayhem.settle` decides what that means for the original delivery (ack,
reject, requeue) and counts it.

A retry goes to ``<queue>.retry.<ms>``, one queue per delay tier: it has a TTL and dead-letters
back to the work queue when the TTL expires, so no message waits behind a longer delay and
the work queue is never blocked by a failing message. The retry copy carries the attempt it
runs as next (``x-mayhem-attempt``), the error, the first and last failure times, and the
``user_id`` mayhem publishes as (see :mod:`mayhem.headers` for why it is trusted).

Every copy is measured before it is published: its content header must fit one frame of the
publishing connection's ``frame_max``, and a retry copy must also fit our consumer's frame once
the broker adds its ``x-death`` trail. A retry that would not fit is not published
(:class:`Unfit`); a dead letter that would not fit goes without the original's headers.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
from typing import TYPE_CHECKING, Any, Final, final

import aiormq
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError
from pamqp.commands import Basic

from mayhem.amqp.link import FRAME_MAX as CONSUMER_FRAME_MAX
from mayhem.headers import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    BROKER_RESERVE,
    ERROR_HEADER,
    FIRST_FAILURE_HEADER,
    HOST_HEADER,
    LAST_FAILURE_HEADER,
    MAX_ERROR_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    carried_headers,
    copy_message,
    describe,
    first_failure,
    fits,
    frame_limit,
    header_frame_size,
    mayhem_headers,
    publishing_user,
    timestamp,
)
from mayhem.topology import dead_queue, retry_queue

if TYPE_CHECKING:
    import aio_pika
    from aio_pika.abc import AbstractChannel

    from mayhem.amqp import Delivery
    from mayhem.config import Config

log = logging.getLogger(__name__)

HOST: Final = socket.gethostname()
PUBLISH_TIMEOUT: Final = 30.0

# Publish failures that would recur: the broker said no to this message or this channel.
REFUSALS: Final = (
    DeliveryError,  # a nack; PublishError (returned) is one
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelPreconditionFailed,  # e.g. a user_id that is not ours
    aiormq.exceptions.ConnectionFrameError,  # e.g. a frame too large, had we measured wrong
)


class Sent(enum.Enum):
    """How publishing a copy went."""

    CONFIRMED = "confirmed"
    REFUSED = "refused"  # would fail the same way again (or no copy fits a frame)
    DOWN = "down"  # the publishing connection is down: nothing was sent; may heal
    UNCONFIRMED = "unconfirmed"  # sent on a connection that failed or was slow; may heal
    STALE = "stale"  # the original's link is gone (the broker has it back): nothing was sent


@final
class Unfit:
    """A retry copy that would not fit a frame, so it was not published; ``why`` says so."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


class Copies:
    """Publishes retry copies and dead letters with confirms.

    Args:
        config: the work queue's name.
        channel: a channel with publisher confirms.
    """

    def __init__(self, config: Config, channel: AbstractChannel) -> None:
        self._queue = config.queue
        self._dead_queue = dead_queue(config.queue)
        self._channel = channel
        self._user = publishing_user(config.amqp_url)

    async def retry(
        self, delivery: Delivery, exc: BaseException, attempt: int, tier: float, wait: float
    ) -> Sent | Unfit:
        """Publish the copy that runs as ``attempt + 1`` to ``tier``'s queue, after ``wait`` s."""
        limit = await self._frame_limit()
        if limit is None:
            return Sent.DOWN
        if delivery.stale:
            # The broker has requeued the original already: a copy now would be a second
            # message, run beside the redelivered original.
            return Sent.STALE
        now = timestamp()
        headers = carried_headers(delivery)
        headers.update(
            {
                ATTEMPT_HEADER: attempt + 1,
                FIRST_FAILURE_HEADER: first_failure(headers, now),
                LAST_FAILURE_HEADER: now,
                ERROR_HEADER: describe(exc),
            }
        )
        copy = copy_message(
            delivery,
            headers,
            expiration=wait if wait > 0 else None,
            user_id=self._user,
        )
        # Its header must still fit our consumer's frame once the broker adds its trail.
        retry_limit = min(limit, CONSUMER_FRAME_MAX) - BROKER_RESERVE
        if not fits(copy, retry_limit):
            size = header_frame_size(copy)
            return Unfit(
                f"not retried: its header frame of {size} bytes would exceed {retry_limit} "
                f"(frame_max less {BROKER_RESERVE} for the broker's x-death)"
                if size is not None
                else "not retried: its headers cannot be encoded again"
            )
        return await self._publish(copy, retry_queue(self._queue, tier))

    async def dead_letter(
        self,
        delivery: Delivery,
        exc: BaseException,
        attempt: int,
        reason: str,
        shrink: str | None = None,
    ) -> Sent:
        """Publish to ``<queue>.dead`` with the reason, the error and the attempts in its headers.

        The copy goes without the original's headers if it would not fit a frame, or if
        ``shrink`` says why it must not carry them; :attr:`Sent.REFUSED` if even that would not
        fit.
        """
        limit = await self._frame_limit()
        if limit is None:
            return Sent.DOWN
        if delivery.stale:
            return Sent.STALE  # as for a retry: the redelivered original is dead-lettered
        now = timestamp()
        headers = carried_headers(delivery)
        headers.update(
            {
                REASON_HEADER: reason,
                ERROR_HEADER: describe(exc),
                ATTEMPTS_HEADER: attempt,
                FIRST_FAILURE_HEADER: first_failure(headers, now),
                LAST_FAILURE_HEADER: now,
                HOST_HEADER: HOST,
                QUEUE_HEADER: self._queue,
            }
        )
        full = copy_message(delivery, headers)
        copy = (
            full
            if shrink is None and fits(full, limit)
            else self._without_headers(delivery, exc, headers, limit, shrink)
        )
        if copy is None:
            return Sent.REFUSED
        return await self._publish(copy, self._dead_queue)

    @staticmethod
    def _without_headers(
        delivery: Delivery,
        exc: BaseException,
        headers: dict[str, Any],
        limit: int,
        why: str | None,
    ) -> aio_pika.Message | None:
        """The dead letter with only mayhem's headers, saying why; ``None`` if still too big."""
        if why is None:
            size = header_frame_size(copy_message(delivery, headers))
            why = (
                f"its header frame of {size} bytes would exceed frame_max ({limit})"
                if size is not None
                else "they cannot be encoded again"
            )
        note = f" [original headers dropped; {why}]"
        kept = mayhem_headers(headers)
        kept[ERROR_HEADER] = describe(exc, MAX_ERROR_HEADER - len(note)) + note
        log.warning("dead letter goes without the original's headers: %s", why)
        copy = copy_message(delivery, kept)
        return copy if fits(copy, limit) else None

    async def _frame_limit(self) -> int | None:
        """The largest frame the publishing connection may send, or ``None`` when it is down."""
        try:
            # A robust channel waits here until its connection is back: not for ever.
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                channel = await self._channel.get_underlay_channel()
            return frame_limit(channel.connection.connection_tune.frame_max)
        except (*CONNECTION_EXCEPTIONS, AttributeError, TimeoutError):
            return None

    async def _publish(self, message: aio_pika.Message, queue: str) -> Sent:
        try:
            # The timeout covers the wait for a reconnecting channel too, unlike aio-pika's.
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                confirmed = await self._channel.default_exchange.publish(
                    message, routing_key=queue, mandatory=True, timeout=PUBLISH_TIMEOUT
                )
        except (*REFUSALS, ValueError) as exc:
            log.warning("publish to %s refused: %s", queue, describe(exc, 200))
            return Sent.REFUSED
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            log.warning("publish to %s not confirmed: %s", queue, describe(exc, 200))
            return Sent.UNCONFIRMED
        if not isinstance(confirmed, Basic.Ack):
            # Returned as unroutable (mandatory): the queue is missing. Not confirmed.
            log.warning("publish to %s returned: no such queue", queue)
            return Sent.REFUSED
        return Sent.CONFIRMED
