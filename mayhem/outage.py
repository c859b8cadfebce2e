"""The database outage: pause consumption while the database is down, resume when it answers.

A worker that finds the database unreachable decides "outage"; the settle stage requeues the
message and calls :meth:`Outage.report`. :meth:`Outage.watch` then runs the states in order:
*detected* → *paused* (``basic.cancel``, the buffer requeued, so no message is taken that
cannot be applied) → *probing* (a ping with backoff) → *resumed* (subscribed again). Nothing
is dead-lettered for an outage: it is not the message's fault.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from mayhem.exceptions import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayhem.buffer import Buffer
    from mayhem.consumer import Consumer
    from mayhem.metrics import Metrics
    from mayhem.store import Store

log = logging.getLogger(__name__)

FIRST_RETRY: Final = 0.25
RETRY_MAX: Final = 30.0


class Outage:
    """Whether the database is up, and the watch that pauses and resumes consumption.

    Args:
        store: the database to probe.
        metrics: ``mayhem_store_up`` and ``mayhem_store_outages_total``.

    Attributes:
        available: false from the pause until the database answers again (``/readyz``).
    """

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._detected = asyncio.Event()
        self.available = True

    @property
    def detected(self) -> bool:
        """A worker reported the outage and the database has not answered since."""
        return self._detected.is_set()

    def report(self, why: str) -> None:
        """A worker could not reach the database (the settle stage's ``on_outage``)."""
        if not self._detected.is_set():
            log.warning("database outage detected: %s", why, extra={"event": "database_outage"})
            self._detected.set()

    async def watch(self, consumer: Consumer, buffer: Buffer, stopping: Callable[[], bool]) -> None:
        """Pause ``consumer`` during each outage and resume it after; runs until cancelled.

        Args:
            consumer: what to pause and resume.
            buffer: handed back to the broker when consuming pauses.
            stopping: whether shutdown has begun, after which consuming never resumes.
        """
        while True:
            await self._detected.wait()
            began = time.monotonic()
            self.available = False
            self._metrics.store_up.set(0)
            self._metrics.store_outages.inc()
            await consumer.cancel()
            requeued = buffer.requeue()
            log.warning(
                "consumption paused: database unavailable ◆ %d buffered requeued",
                requeued,
                extra={"event": "consumption_paused", "requeued": requeued},
            )
            await self._probe()
            self._detected.clear()
            self.available = True
            self._metrics.store_up.set(1)
            await _resume(consumer, stopping)
            outage = time.monotonic() - began
            log.info(
                "database back after %.1f s: consuming again",
                outage,
                extra={"event": "database_back", "outage": round(outage, 3)},
            )

    async def _probe(self) -> None:
        """Return once the database answers a ping, trying with backoff."""
        delay = FIRST_RETRY
        while True:
            try:
                await self._store.ping()
            except StoreUnavailable as exc:
                log.info(
                    "database still unavailable (%s); next try in %.1f s",
                    exc,
                    delay,
                    extra={"event": "database_still_unavailable", "retry_in": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            else:
                return


async def _resume(consumer: Consumer, stopping: Callable[[], bool]) -> None:
    """Subscribe again, trying with backoff, unless shutdown has begun."""
    delay = FIRST_RETRY
    while not stopping():
        try:
            await consumer.start()
        except Exception as exc:
            log.warning("resuming the consumer failed (%s); next try in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        else:
            return
