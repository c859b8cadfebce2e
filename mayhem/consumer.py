"""The consumer: deliveries from the work queue into a bounded buffer, over its own connection.

The consuming connection is a :class:`~mayhem.amqp.Link`; when it is lost, the deliveries
still buffered are dropped (the broker requeues them) and :meth:`Consumer.keep_connected`
opens a new one, subscribing again if the consumer is meant to be consuming.

Stopping (at shutdown, or while the database is down) is ``cancel()`` — ``basic.cancel`` —
first and then ``requeue_buffered()``, because the broker does not take back what it already
sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from mayhem.amqp import Endpoint, Link, open_any, split_hosts
from mayhem.broker import connection_name
from mayhem.config import mask_url
from mayhem.exceptions import BrokerRefused, LinkLost, StartupError

if TYPE_CHECKING:
    from mayhem.amqp import Delivery
    from mayhem.config import Config
    from mayhem.metrics import Metrics
    from mayhem.settler import Settler

log = logging.getLogger(__name__)

CANCEL_TIMEOUT: Final = 5.0
RECONNECT_INTERVAL: Final = 1.0
RECONNECT_MAX: Final = 5.0


class Consumer:
    """Subscribes to the work queue and feeds a bounded buffer; reconnects by itself.

    Args:
        config: the broker URL, the queue and the prefetch window.
        buffer: where deliveries wait for a worker; bounded by the prefetch window.
        settler: notes every delivery, and settles what goes straight back.
        metrics: where reconnects and stale deliveries are counted.
    """

    def __init__(
        self,
        config: Config,
        buffer: asyncio.Queue[Delivery | None],
        settler: Settler,
        metrics: Metrics,
    ) -> None:
        self._config = config
        # A cluster URL names several nodes; a reconnect tries the others first.
        self._endpoints = [Endpoint.from_url(url) for url in split_hosts(config.amqp_url)]
        self._failed: Endpoint | None = None
        self._buffer = buffer
        self._settler = settler
        self._metrics = metrics
        self._link: Link | None = None
        self._lost = asyncio.Event()
        # Subscribing and unsubscribing one at a time, each deciding on the latest _wanted.
        self._subscription = asyncio.Lock()
        self._wanted = False
        self._closing = False
        self.delivered = 0

    @property
    def connected(self) -> bool:
        """The consuming connection is open."""
        return self._link is not None and not self._link.closed

    @property
    def active(self) -> bool:
        """Subscribed to the queue on an open connection."""
        return self._wanted and self.connected and bool(self._link and self._link.consumer_tag)

    async def open(self) -> None:
        """Open the consuming connection.

        Raises:
            StartupError: the broker refused us or could not be reached.
        """
        url = mask_url(self._config.amqp_url)
        try:
            self._link = await self._connect()
        except BrokerRefused as exc:
            msg = f"broker {url} refused the credentials or the vhost ({exc})"
            raise StartupError(msg) from None
        except LinkLost as exc:
            msg = f"cannot connect to broker {url}: {exc}"
            raise StartupError(msg) from None

    async def _connect(self) -> Link:
        config = self._config
        return await open_any(
            self._endpoints,
            after=self._failed,
            client_properties={"connection_name": connection_name(config.queue)},
            prefetch=config.effective_prefetch,
            on_delivery=self._on_delivery,
            on_lost=self._on_lost,
        )

    async def start(self) -> None:
        """Subscribe (``basic.consume``); while disconnected, subscribe on reconnect.

        Raises:
            LinkLost: the broker refused the subscription or the connection failed.
        """
        self._wanted = True
        await self._subscribe()

    async def _subscribe(self) -> None:
        async with self._subscription:
            link = self._link
            if self._wanted and link is not None and not link.closed and not link.consumer_tag:
                await link.consume(self._config.queue)

    async def cancel(self) -> None:
        """Unsubscribe (``basic.cancel``); on a closed connection log it and carry on."""
        self._wanted = False
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT), self._subscription:
                link = self._link
                if link is not None and not link.closed and link.consumer_tag:
                    await link.cancel()
        except (LinkLost, TimeoutError) as exc:
            log.info("basic.cancel failed (%s): the connection is gone, so is the consumer", exc)

    def _on_delivery(self, delivery: Delivery) -> None:
        # Noted first, even if it goes straight back: a multiple ack must know every tag.
        self._settler.delivered(delivery)
        if not self._wanted or delivery.link is not self._link:
            # Sent before our basic.cancel reached the broker: hand it straight back.
            self._settler.requeue(delivery)
            return
        self.delivered += 1
        try:
            # Never full: the broker sends at most prefetch unacked deliveries.
            self._buffer.put_nowait(delivery)
        except asyncio.QueueFull:
            self._settler.requeue(delivery)

    def _on_lost(self, link: Link, exc: BaseException | None) -> None:
        if link is not self._link or self._closing:
            return
        self._failed = link.endpoint
        dropped = self.drop_stale()
        if dropped:
            self._metrics.stale_deliveries.inc(dropped)
        log.warning(
            "broker connection lost (consuming): %s ◆ %d buffered deliveries dropped (the "
            "broker requeues them)",
            exc or "closed",
            dropped,
            extra={"broker_host": _address(link.endpoint)},
        )
        self._lost.set()

    async def keep_connected(self) -> None:
        """Reopen the connection whenever it is lost, and subscribe again; runs until cancelled."""
        while True:
            await self._lost.wait()
            previous = self._link
            delay = RECONNECT_INTERVAL
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    self._link = link = await self._connect()
                    # Paused meanwhile (or paused while this subscribes)? _subscribe decides
                    # under the lock, and cancel() waits for it.
                    await self._subscribe()
                except asyncio.CancelledError:
                    if self._link is not None and self._link is not previous:
                        self._link.abort()
                    raise
                except LinkLost as exc:
                    log.warning(
                        "reconnecting to broker %s failed (%s); next try in %.0f s",
                        mask_url(self._config.amqp_url),
                        exc,
                        delay,
                    )
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                self._lost.clear()
                if link.closed:  # lost again at once; the next round reconnects
                    self._lost.set()
                    break
                self._metrics.broker_reconnects.inc()
                host = _address(link.endpoint)
                if self.active:
                    log.info("consuming again: broker connection re-established (%s)", host)
                else:
                    log.info(
                        "broker connection re-established (%s); consumption stays paused", host
                    )
                break
            if self._closing:
                return

    async def requeue_buffered(self) -> int:
        """Requeue every delivery waiting in the buffer; return how many went back."""
        requeued = 0
        while True:
            try:
                delivery = self._buffer.get_nowait()
            except asyncio.QueueEmpty:
                return requeued
            if delivery is not None and self._settler.requeue(delivery):
                requeued += 1

    def drop_stale(self) -> int:
        """Remove deliveries of a closed connection from the buffer.

        The broker requeued them when the connection closed; running their handlers now would
        only find them again later as duplicates.
        """
        keep: list[Delivery | None] = []
        dropped = 0
        while not self._buffer.empty():
            delivery = self._buffer.get_nowait()
            if delivery is not None and delivery.stale:
                dropped += 1
            else:
                keep.append(delivery)
        for delivery in keep:
            self._buffer.put_nowait(delivery)
        return dropped

    async def close(self) -> None:
        """Send the last acks and close the connection; the broker requeues anything unacked."""
        self._closing = True
        link, self._link = self._link, None
        if link is None:
            return
        self._settler.flush()
        await link.close()


def _address(endpoint: Endpoint | None) -> str:
    return f"{endpoint.host}:{endpoint.port}" if endpoint else "unknown"
