"""Where a failed message goes next: a delay queue for a later attempt, or the dead-letter queue.

Both are published with publisher confirms *before* the original delivery is acknowledged, so
a crash in between leaves a copy too many (absorbed by the inbox), never one too few.

A retry goes to ``<queue>.retry.<ms>``, one queue per delay tier: it has a TTL and dead-letters
back to the work queue when the TTL expires, so no message waits behind a longer delay and
the work queue is never blocked by a failing message.

**The handler never runs more than ``max_attempts`` times, whatever fails while settling.**

- A delivery runs as attempt *trusted x-mayhem-attempt* (see :mod:`mayhem.headers`) plus the
  runs of that attempt that may already have happened: the requeues after a failed settle that
  this process counted, and, on a quorum queue, the broker's ``x-delivery-count`` (mayhem
  cannot tell a redelivery after a run from one before it, so it counts them all, as the
  broker's own ``x-delivery-limit`` does). A delivery past ``max_attempts`` is not run: it is
  dead-lettered as failed (``AttemptsExhausted``), unless the inbox knows it (a duplicate).
  This also ends the crash loop of a message whose handler kills the daemon. The price: a
  message requeued for other reasons (a database outage, a restart with it prefetched) has
  that many attempts fewer.
- A copy that would not fit one frame goes to ``<queue>.dead`` without the original's headers,
  never to a retry (the handler would see other headers on its next attempt).
- When the copy cannot be published, the original is not requeued but rejected
  (``basic.nack``, no requeue), and the work queue's dead-letter exchange routes it to
  ``<queue>.dead`` with the broker's ``x-death`` trail in place of mayhem's headers: always for
  a dead letter, and for a retry the broker refused (a nack, returned as unroutable, a copy
  that cannot be encoded), which would fail the same way again.
- Only a retry whose publish failed on a publishing connection that is down or slow is
  requeued, with its run counted; the run that reaches ``max_attempts`` dead-letters.

What is left: on a classic queue the count of requeued runs is this process's memory (up to
``MAX_COUNTED`` messages), so a restart or a second daemon in that window may run a message
again; a quorum queue (the default) counts on the broker.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import random
import socket
from typing import TYPE_CHECKING, Any, Final

import aio_pika
import aiormq
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError
from pamqp.commands import Basic

from mayhem.amqp.link import FRAME_MAX as CONSUMER_FRAME_MAX
from mayhem.exceptions import Retry
from mayhem.headers import (
    ATTEMPT_HEADER,
    BROKER_DEATH_HEADERS,
    BROKER_RESERVE,
    ERROR_HEADER,
    FIRST_FAILURE_HEADER,
    MAX_ERROR_HEADER,
    MAYHEM_HEADERS,
    carried_headers,
    copy_message,
    delivery_count,
    describe,
    first_failure,
    fits,
    frame_limit,
    header_frame_size,
    mayhem_headers,
    parse_timestamp,
    publishing_user,
    strip_mayhem_headers,
    timestamp,
    trusted_attempt,
)
from mayhem.message import content_id

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel

    from mayhem.amqp import Delivery
    from mayhem.config import Config
    from mayhem.metrics import Metrics
    from mayhem.settler import Settler

__all__ = [
    "BROKER_DEATH_HEADERS",
    "MAX_ERROR_HEADER",
    "MAYHEM_HEADERS",
    "AttemptsExhausted",
    "Failures",
    "copy_message",
    "describe",
    "parse_timestamp",
    "retry_queue",
    "retry_tiers",
    "strip_mayhem_headers",
    "timestamp",
]

log = logging.getLogger(__name__)

HOST: Final = socket.gethostname()
PUBLISH_TIMEOUT: Final = 30.0
# A retry waits between JITTER and 1 times its tier's delay, so failures of one burst spread.
JITTER: Final = 0.8
# Messages whose requeued runs are remembered (oldest forgotten first).
MAX_COUNTED: Final = 10_000


# Publish failures that would recur: the broker said no to this message or this channel.
REFUSALS: Final = (
    DeliveryError,  # a nack; PublishError (returned) is one
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelPreconditionFailed,  # e.g. a user_id that is not ours
    aiormq.exceptions.ConnectionFrameError,  # e.g. a frame too large, had we measured wrong
)


class AttemptsExhausted(Exception):  # noqa: N818 -- reads as what it is in x-mayhem-error
    """The handler may already have run ``max_attempts`` times: it is not run again."""


class _Sent(enum.Enum):
    CONFIRMED = "confirmed"
    REFUSED = "refused"  # fails the same way again: reject to the broker's DLX
    DOWN = "down"  # the publishing connection is down or slow: may heal


def retry_tiers(config: Config) -> tuple[float, ...]:
    """The distinct retry delays, shortest first: one delay queue each."""
    return tuple(sorted(set(config.effective_retry_delays)))


def retry_queue(queue: str, delay: float) -> str:
    """The delay queue of one tier, named by its delay in milliseconds."""
    return f"{queue}.retry.{round(delay * 1000)}"


class Failures:
    """Sends failed deliveries to a retry tier or the dead-letter queue, then acks them.

    Also says which attempt a delivery runs as (:meth:`attempt_of`).

    Args:
        config: the daemon's configuration (queue, max_attempts, retry delays).
        channel: a channel with publisher confirms.
        settler: acks the original once the copy is confirmed, or rejects or requeues it.
        metrics: counts retried, dead_lettered and rejected.
    """

    def __init__(
        self, config: Config, channel: AbstractChannel, settler: Settler, metrics: Metrics
    ) -> None:
        self._config = config
        self._channel = channel
        self._settler = settler
        self._metrics = metrics
        self._tiers = retry_tiers(config)
        self._delays = config.effective_retry_delays
        self._user = publishing_user(config.amqp_url)
        self._quorum = config.queue_type == "quorum"
        # (message, attempt) -> runs of that attempt requeued after a failed publish.
        self._requeued_runs: collections.OrderedDict[tuple[str, int], int] = (
            collections.OrderedDict()
        )

    def attempt_of(self, delivery: Delivery) -> int:
        """The attempt ``delivery`` runs as: retries, plus earlier runs of this attempt."""
        config = self._config
        attempt = trusted_attempt(delivery, config.queue, config.max_attempts, self._user)
        if not delivery.redelivered:
            return attempt
        runs = delivery_count(delivery) if self._quorum else 0
        if self._requeued_runs:
            runs = max(runs, self._requeued_runs.get(self._run_key(delivery), 0))
        return attempt + runs

    def delay_for(self, attempt: int, requested: float | None) -> float:
        """The tier for a retry after ``attempt``; a requested delay rounds up to a tier."""
        if requested is not None:
            return next((tier for tier in self._tiers if tier >= requested), self._tiers[-1])
        return self._delays[min(attempt - 1, len(self._delays) - 1)]

    async def failed(self, delivery: Delivery, exc: BaseException, attempt: int) -> None:
        """A handler failed (or raised Retry): retry later, or dead-letter after max_attempts."""
        if attempt >= self._config.max_attempts:
            await self.dead_letter(delivery, exc, attempt, reason="failed")
            return
        limit = await self._frame_limit()
        if limit is None:
            self._requeue_run(delivery, exc, "the publishing connection is down")
            return
        requested = exc.delay if isinstance(exc, Retry) else None
        tier = self.delay_for(attempt, requested)
        wait = tier * random.uniform(JITTER, 1.0)
        now = timestamp()
        headers = carried_headers(delivery)
        headers.update(
            {
                ATTEMPT_HEADER: attempt + 1,
                FIRST_FAILURE_HEADER: first_failure(headers, now),
                "x-mayhem-last-failure": now,
                ERROR_HEADER: describe(exc),
            }
        )
        copy = copy_message(
            delivery,
            headers,
            expiration=wait if wait > 0 else None,
            user_id=self._user,
            # Without one, aiormq would invent a random id: the copy must stay the same message.
            message_id=delivery.message_id or content_id(delivery.body),
        )
        # Its header must still fit our consumer's frame once the broker adds its trail.
        retry_limit = min(limit, CONSUMER_FRAME_MAX) - BROKER_RESERVE
        if not fits(copy, retry_limit):
            size = header_frame_size(copy)
            why = (
                f"not retried: its header frame of {size} bytes would exceed {retry_limit} "
                f"(frame_max less {BROKER_RESERVE} for the broker's x-death)"
                if size is not None
                else "not retried: its headers cannot be encoded again"
            )
            await self.dead_letter(delivery, exc, attempt, reason="failed", shrink=why)
            return
        sent = await self._publish(copy, retry_queue(self._config.queue, tier))
        if sent is _Sent.DOWN:
            self._requeue_run(delivery, exc, "the retry could not be published")
            return
        self._forget_runs(delivery)
        if sent is _Sent.REFUSED:
            self._reject(delivery, exc, attempt, "failed")
            return
        log.info("attempt %d failed (%s): retry in %.2f s", attempt, describe(exc, 200), wait)
        if self._settler.ack(delivery):
            self._metrics.retried.inc()

    async def dead_letter(
        self,
        delivery: Delivery,
        exc: BaseException,
        attempt: int,
        *,
        reason: str,
        shrink: str | None = None,
    ) -> None:
        """Publish to ``<queue>.dead`` with the reason in its headers, then ack the original.

        The copy goes without the original's headers if it would not fit a frame, or if
        ``shrink`` says why it must not carry them. If it cannot be published at all, the
        original is rejected: the broker dead-letters it.
        """
        self._forget_runs(delivery)
        limit = await self._frame_limit()
        if limit is None:
            self._reject(delivery, exc, attempt, reason)
            return
        now = timestamp()
        headers = carried_headers(delivery)
        headers.update(
            {
                "x-mayhem-reason": reason,
                ERROR_HEADER: describe(exc),
                "x-mayhem-attempts": attempt,
                FIRST_FAILURE_HEADER: first_failure(headers, now),
                "x-mayhem-last-failure": now,
                "x-mayhem-host": HOST,
                "x-mayhem-queue": self._config.queue,
            }
        )
        full = copy_message(delivery, headers)
        copy = (
            full
            if shrink is None and fits(full, limit)
            else self._without_headers(delivery, exc, headers, limit, shrink)
        )
        if copy is None:
            self._reject(delivery, exc, attempt, reason)
            return
        if await self._publish(copy, self._config.dead_queue) is not _Sent.CONFIRMED:
            self._reject(delivery, exc, attempt, reason)
            return
        # The error text, never the payload: only its size.
        log.info(
            "dead-lettered (%s) after %d attempts: %s, %d bytes",
            reason,
            attempt,
            describe(exc, 200),
            len(delivery.body),
            extra={"event": "dead_lettered", "reason": reason, "attempts": attempt},
        )
        if self._settler.ack(delivery):
            metrics = self._metrics
            (metrics.rejected if reason == "rejected" else metrics.dead_lettered).inc()

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

    def _run_key(self, delivery: Delivery) -> tuple[str, int]:
        config = self._config
        trusted = trusted_attempt(delivery, config.queue, config.max_attempts, self._user)
        return _key(delivery), trusted

    def _requeue_run(self, delivery: Delivery, exc: BaseException, why: str) -> None:
        """Requeue a failed run, counting it: its redelivery runs as the next attempt."""
        key = self._run_key(delivery)
        runs = self._requeued_runs
        runs[key] = runs.get(key, 0) + 1
        runs.move_to_end(key)
        while len(runs) > MAX_COUNTED:
            runs.popitem(last=False)
        log.warning("%s (%s): requeueing, this run counted", why, describe(exc, 200))
        self._settler.requeue(delivery)

    def _forget_runs(self, delivery: Delivery) -> None:
        if self._requeued_runs:
            self._requeued_runs.pop(self._run_key(delivery), None)

    def _reject(self, delivery: Delivery, exc: BaseException, attempt: int, reason: str) -> None:
        """Leave it to the broker: the work queue's dead-letter exchange routes it to .dead."""
        log.warning(
            "cannot publish the dead letter or retry: rejected to the broker's dead-letter "
            "exchange instead (%s after %d attempts: %s)",
            reason,
            attempt,
            describe(exc, 200),
        )
        if self._settler.reject(delivery):
            metrics = self._metrics
            (metrics.rejected if reason == "rejected" else metrics.dead_lettered).inc()

    async def _frame_limit(self) -> int | None:
        """The largest frame the publishing connection may send, or ``None`` when it is down."""
        try:
            # A robust channel waits here until its connection is back: not for ever.
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                channel = await self._channel.get_underlay_channel()
            return frame_limit(channel.connection.connection_tune.frame_max)
        except (*CONNECTION_EXCEPTIONS, AttributeError, TimeoutError):
            return None

    async def _publish(self, message: aio_pika.Message, queue: str) -> _Sent:
        try:
            # The timeout covers the wait for a reconnecting channel too, unlike aio-pika's.
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                confirmed = await self._channel.default_exchange.publish(
                    message, routing_key=queue, mandatory=True, timeout=PUBLISH_TIMEOUT
                )
        except (*REFUSALS, ValueError) as exc:
            log.warning("publish to %s refused: %s", queue, describe(exc, 200))
            return _Sent.REFUSED
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            log.warning("publish to %s not confirmed: %s", queue, describe(exc, 200))
            return _Sent.DOWN
        if not isinstance(confirmed, Basic.Ack):
            # Returned as unroutable (mandatory): the queue is missing. Not confirmed.
            log.warning("publish to %s returned: no such queue", queue)
            return _Sent.REFUSED
        return _Sent.CONFIRMED


def _key(delivery: Delivery) -> str:
    """What identifies a message across its redeliveries."""
    return delivery.message_id or content_id(delivery.body)
