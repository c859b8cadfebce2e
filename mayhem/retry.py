"""Where a failed message goes next: a delay queue for a later attempt, or the dead-letter queue.

Both are published with publisher confirms *before* the original delivery is acknowledged, so
a crash in between leaves a copy too many (absorbed by the inbox), never one too few.

A retry goes to ``<queue>.retry.<ms>``, one queue per delay tier: it has a TTL and dead-letters
back to the work queue when the TTL expires, so no message waits behind a longer delay and
the work queue is never blocked by a failing message.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import aio_pika
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError

from mayhem.exceptions import Retry
from mayhem.message import ATTEMPT_HEADER

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

    from mayhem.amqp import Delivery
    from mayhem.config import Config
    from mayhem.metrics import Metrics
    from mayhem.settler import Settler

log = logging.getLogger(__name__)

HOST: Final = socket.gethostname()
MAX_ERROR_HEADER: Final = 1000
PUBLISH_TIMEOUT: Final = 30.0
# A retry waits between JITTER and 1 times its tier's delay, so failures of one burst spread.
JITTER: Final = 0.8
# What the broker adds when a message expires from a delay queue.
BROKER_DEATH_HEADERS: Final = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
# Headers mayhem adds; a replay from the dead-letter queue strips them (and the broker's).
MAYHEM_HEADERS: Final = BROKER_DEATH_HEADERS | {
    ATTEMPT_HEADER,
    "x-mayhem-reason",
    "x-mayhem-error",
    "x-mayhem-attempts",
    "x-mayhem-first-failure",
    "x-mayhem-last-failure",
    "x-mayhem-host",
    "x-mayhem-queue",
}


def timestamp(at: float | None = None) -> str:
    """UTC time as ISO 8601 with milliseconds: AMQP floats are 32-bit, too coarse for epochs."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: object) -> float | None:
    """Epoch seconds from :func:`timestamp`'s text, or ``None``."""
    if not isinstance(text, str | bytes):
        return None
    raw = text.decode() if isinstance(text, bytes) else text
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        return None


def retry_tiers(config: Config) -> tuple[float, ...]:
    """The distinct retry delays, shortest first: one delay queue each."""
    return tuple(sorted(set(config.effective_retry_delays)))


def retry_queue(queue: str, delay: float) -> str:
    """The delay queue of one tier, named by its delay in milliseconds."""
    return f"{queue}.retry.{round(delay * 1000)}"


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Failures:
    """Sends failed deliveries to a retry tier or the dead-letter queue, then acks them.

    Args:
        config: the daemon's configuration (queue, max_attempts, retry delays).
        channel: a channel with publisher confirms.
        settler: acks the original once the copy is confirmed, or requeues it if not.
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
        requested = exc.delay if isinstance(exc, Retry) else None
        tier = self.delay_for(attempt, requested)
        wait = tier * random.uniform(JITTER, 1.0)
        now = timestamp()
        headers = _headers(delivery)
        headers.update(
            {
                ATTEMPT_HEADER: attempt + 1,
                "x-mayhem-first-failure": headers.get("x-mayhem-first-failure", now),
                "x-mayhem-last-failure": now,
                "x-mayhem-error": describe(exc)[:MAX_ERROR_HEADER],
            }
        )
        copy = copy_message(delivery, headers, expiration=wait if wait > 0 else None)
        if not await self._publish(copy, retry_queue(self._config.queue, tier)):
            self._settler.requeue(delivery)
            return
        log.info("attempt %d failed (%s): retry in %.2f s", attempt, describe(exc)[:200], wait)
        if self._settler.ack(delivery):
            self._metrics.retried.inc()

    async def dead_letter(
        self,
        delivery: Delivery,
        exc: BaseException,
        attempt: int,
        *,
        reason: str,
    ) -> None:
        """Publish to ``<queue>.dead`` with the reason in its headers, then ack the original."""
        now = timestamp()
        headers = _headers(delivery)
        headers.update(
            {
                "x-mayhem-reason": reason,
                "x-mayhem-error": describe(exc)[:MAX_ERROR_HEADER],
                "x-mayhem-attempts": attempt,
                "x-mayhem-first-failure": headers.get("x-mayhem-first-failure", now),
                "x-mayhem-last-failure": now,
                "x-mayhem-host": HOST,
                "x-mayhem-queue": self._config.queue,
            }
        )
        if not await self._publish(copy_message(delivery, headers), self._config.dead_queue):
            self._settler.requeue(delivery)
            return
        # The error text, never the payload: only its size.
        log.info(
            "dead-lettered (%s) after %d attempts: %s, %d bytes",
            reason,
            attempt,
            describe(exc)[:200],
            len(delivery.body),
        )
        if self._settler.ack(delivery):
            metrics = self._metrics
            (metrics.rejected if reason == "rejected" else metrics.dead_lettered).inc()

    async def _publish(self, message: aio_pika.Message, queue: str) -> bool:
        try:
            await self._channel.default_exchange.publish(
                message, routing_key=queue, mandatory=True, timeout=PUBLISH_TIMEOUT
            )
        except (DeliveryError, PublishError, *CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            log.warning("publish to %s not confirmed (%s): requeueing instead", queue, exc)
            return False
        return True


def _headers(delivery: Delivery) -> dict[str, Any]:
    # The broker's own trail from the delay queue goes: our headers say it better.
    return {
        key: value
        for key, value in (delivery.headers or {}).items()
        if key not in BROKER_DEATH_HEADERS
    }


def copy_message(
    delivery: Delivery | AbstractIncomingMessage,
    headers: dict[str, Any],
    expiration: float | None = None,
) -> aio_pika.Message:
    """The same message (body, id, properties) with new headers, persistent."""
    return aio_pika.Message(
        delivery.body,
        headers=headers,
        content_type=delivery.content_type,
        content_encoding=delivery.content_encoding,
        message_id=delivery.message_id,
        correlation_id=delivery.correlation_id,
        timestamp=delivery.timestamp,
        type=delivery.type,
        app_id=delivery.app_id,
        expiration=expiration,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def strip_mayhem_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers a message had before mayhem handled it (for a replay)."""
    return {key: value for key, value in headers.items() if key not in MAYHEM_HEADERS}
