"""The jobs that run beside the workers, each a loop until shutdown cancels it (step 2).

Queue depth, inbox pruning, systemd's status line and watchdog, and the ``--demo`` publisher.
None of them touches a message: stopping one at any point loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from mayhem.exceptions import StoreUnavailable
from mayhem.publisher import PublishReport, demo_stream, publish_bodies

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayhem.broker import Broker
    from mayhem.config import Config
    from mayhem.metrics import Metrics
    from mayhem.outage import Outage
    from mayhem.store import Store
    from mayhem.systemd import Notifier

log = logging.getLogger(__name__)

DEPTH_INTERVAL: Final = 5.0
STATUS_INTERVAL: Final = 5.0
PRUNE_INTERVAL: Final = 3600.0


async def poll_depth(broker: Broker, metrics: Metrics) -> None:
    """Set ``mayhem_queue_depth`` to the messages ready in the work queue, when known."""
    while True:
        depth = await broker.depth()
        if depth is not None:
            metrics.queue_depth.set(depth)
        await asyncio.sleep(DEPTH_INTERVAL)


async def prune_inbox(store: Store, outage: Outage, retention: float, metrics: Metrics) -> None:
    """Delete inbox rows older than ``retention`` seconds, while the database is up."""
    while True:
        if outage.available:
            try:
                pruned = await store.prune(time.time() - retention)
            except StoreUnavailable as exc:
                log.info("inbox prune skipped: %s", exc)
            else:
                metrics.inbox_pruned.inc(pruned)
                if pruned:
                    log.info("inbox pruned ◆ %d rows older than the retention", pruned)
        await asyncio.sleep(PRUNE_INTERVAL)


async def report_status(notifier: Notifier, status: Callable[[], str]) -> None:
    """Send systemd the status line (``STATUS=``) every few seconds."""
    while True:
        await asyncio.sleep(STATUS_INTERVAL)
        notifier.status(status())


async def watchdog(
    notifier: Notifier,
    interval: float,
    *,
    loop_healthy: Callable[[], bool],
    consuming: Callable[[], bool],
    outage: Outage,
) -> None:
    """Ping systemd's watchdog while the loop is healthy and the consumer is working.

    Paused for a database outage counts as working: the daemon waits for the database on
    purpose, and a restart would not bring it back.
    """
    while True:
        if loop_healthy() and (consuming() or outage.detected):
            notifier.watchdog()
        await asyncio.sleep(interval)


async def demo_publisher(broker: Broker, config: Config) -> PublishReport:
    """``--demo``: publish demo messages to our own queue at ``demo_rate``."""
    if broker.publish_channel is None:
        raise RuntimeError("the broker is not connected")
    exchange = await broker.publish_channel.get_exchange(config.exchange, ensure=False)
    report = PublishReport()
    log.info("demo publisher: %.1f messages/s to %s", config.demo_rate, config.queue)
    try:
        await publish_bodies(
            exchange, config.queue, demo_stream(), rate=config.demo_rate, report=report
        )
    finally:
        log.info("demo publisher stopped: %s", report.summary())
    return report
