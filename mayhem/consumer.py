"""The consumer: deliveries from the work queue into the buffer, over its own connection.

The first floor of a delivery's walk (the whole walk: :mod:`mayhem.worker`): each delivery's
tag is noted by the settle stage (a batched ack must know every tag), then the delivery goes
to the :class:`~mayhem.buffer.Buffer`, or straight back to the queue if it arrived after
``basic.cancel``.

The consuming connection is a :class:`~mayhem.amqp.Link`; when it is lost, the deliveries
still buffered are dropped (the broker requeues them) and :meth:`Consumer.keep_connected`
opens a new one, subscribing again if the consumer is meant to be consuming.

Stopping (at shutdown, or while the database is down) is ``cancel()`` — ``basic.cancel`` —
first and then :meth:`Buffer.requeue <mayhem.buffer.Buffer.requeue>`, because the broker does
not take back what it already sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Final

import attrs

from mayhem.amqp import Endpoint, Link, endpoints, open_any
from mayhem.amqp.url import UrlError
from mayhem.broker import connection_name
from mayhem.config import CONSUMER_TIMEOUT
from mayhem.exceptions import BrokerRefused, ConfigError, LinkLost, QueueMissing, StartupError
from mayhem.redact import mask_url

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayhem.amqp import Delivery
    from mayhem.buffer import Buffer
    from mayhem.config import Config
    from mayhem.metrics import Metrics
    from mayhem.settle import Settle

log = logging.getLogger(__name__)

CANCEL_TIMEOUT: Final = 5.0
RECONNECT_INTERVAL: Final = 1.0
RECONNECT_MAX: Final = 5.0
# A connection must stay up this long before the reconnect delay starts again from
# RECONNECT_INTERVAL: one that fails right after subscribing keeps the longer delay.
HEALTHY_AFTER: Final = 30.0


@attrs.define
class Backoff:
    """The delay before each reconnect attempt: doubling, and reset only after a healthy spell.

    A connection that is lost right after it came up (a queue deleted at once, a proxy that
    drops it after ``basic.consume-ok``) does not reset the delay, so a recurring fault is
    retried at most every ``most`` seconds rather than every second.

    Args:
        first: the first delay, seconds.
        most: the longest delay, seconds.
        healthy_after: how long a connection must stay up (and subscribed, if consuming)
            before the next loss starts again from ``first``.
        clock: monotonic seconds.
    """

    first: float = RECONNECT_INTERVAL
    most: float = RECONNECT_MAX
    healthy_after: float = HEALTHY_AFTER
    clock: Callable[[], float] = time.monotonic
    #: The delays chosen, oldest first (the last 64): for logs, metrics and tests.
    chosen: deque[float] = attrs.field(factory=lambda: deque(maxlen=64))
    _next: float | None = attrs.field(default=None, init=False)
    _up_since: float | None = attrs.field(default=None, init=False)

    def up(self) -> None:
        """The connection is up (and subscribed if it should be): the healthy spell starts."""
        self._up_since = self.clock()

    def down(self) -> None:
        """The connection is lost: start again from ``first`` only after a healthy spell."""
        if self._up_since is not None and self.healthy:
            self._next = None
        self._up_since = None

    @property
    def healthy(self) -> bool:
        """The connection has been up for at least ``healthy_after``."""
        up = self._up_since
        return up is not None and self.clock() - up >= self.healthy_after

    @property
    def next_delay(self) -> float:
        """The delay the next attempt will wait (what :meth:`delay` will return)."""
        return self.first if self._next is None else self._next

    def delay(self) -> float:
        """The delay before the next attempt (each call doubles the one after, up to most)."""
        chosen = self.next_delay
        self._next = min(chosen * 2, self.most)
        self.chosen.append(chosen)
        return chosen


class Consumer:
    """Subscribes to the work queue and feeds a bounded buffer; reconnects by itself.

    Args:
        config: the broker URL, the queue and the prefetch window.
        buffer: where deliveries wait for a worker.
        settle: notes every delivery, requeues what goes straight back, sends the last acks.
        metrics: where reconnects are counted.
        backoff: the delays between reconnect attempts.

    Raises:
        ConfigError: the broker URL does not parse (a TLS file gone since it was loaded).
    """

    def __init__(
        self,
        config: Config,
        buffer: Buffer,
        settle: Settle,
        metrics: Metrics,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self._config = config
        try:
            # A cluster's URL names several nodes; a reconnect tries the others first.
            self._endpoints = endpoints(config.amqp_url)
        except UrlError as exc:
            raise ConfigError(f"amqp_url: {exc}") from None
        self._failed: Endpoint | None = None
        self.backoff = backoff or Backoff()
        self._buffer = buffer
        self._settle = settle
        self._metrics = metrics
        self._link: Link | None = None
        self._lost = asyncio.Event()
        # Subscribing and unsubscribing one at a time, each deciding on the latest _wanted.
        self._subscription = asyncio.Lock()
        self._wanted = False
        self._closing = False
        self.delivered = 0
        # The broker cancelled the consumer or refused it with 404: /readyz says so.
        self.queue_missing = False

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
            self._link = link = await self._connect()
        except BrokerRefused as exc:
            msg = f"broker {url} refused the credentials or the vhost ({exc})"
            raise StartupError(msg) from None
        except LinkLost as exc:
            msg = f"cannot connect to broker {url}: {exc}"
            raise StartupError(msg) from None
        self.backoff.up()
        self._check_handler_timeout(link.server)

    def _check_handler_timeout(self, server: dict[str, object]) -> None:
        """Say what handler_timeout is checked against: the broker's consumer_timeout is unknown.

        RabbitMQ does not tell a client its consumer_timeout: not in the server properties,
        and the per-queue ``x-consumer-timeout`` of 3.12+ cannot be read over AMQP either.
        So the configuration holds handler_timeout to half the 30 min default
        (``MAX_HANDLER_TIMEOUT``), and this line tells the operator that a broker with a
        lower consumer_timeout is theirs to keep above handler_timeout.
        """
        version = server.get("version", "?")
        log.info(
            "the broker (RabbitMQ %s) does not report its consumer_timeout: handler_timeout "
            "%g s is checked against the default %g s; a broker set lower must stay above it",
            version.decode() if isinstance(version, bytes) else version,
            self._config.handler_timeout,
            CONSUMER_TIMEOUT,
            extra={"event": "consumer_timeout_unknown"},
        )

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
                # A body over max_message_bytes is refused by its declared size, never read.
                await link.consume(self._config.queue, max_body=self._config.max_message_bytes)
                self.queue_missing = False

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
        self._settle.delivered(delivery)
        if not self._wanted or delivery.link is not self._link:
            # Sent before our basic.cancel reached the broker: hand it straight back.
            self._settle.requeue(delivery)
            return
        self.delivered += 1
        self._buffer.put(delivery)

    def _on_lost(self, link: Link, exc: BaseException | None) -> None:
        if link is not self._link or self._closing:
            return
        self.backoff.down()
        self.queue_missing = isinstance(exc, QueueMissing)
        # A reconnect tries the cluster's other nodes first, this one last.
        self._failed = link.endpoint
        dropped = self._buffer.drop_stale()
        log.warning(
            "broker connection lost (consuming, %s): %s ◆ %d buffered deliveries dropped (the "
            "broker requeues them) ◆ reconnecting in %.1f s",
            _address(link.endpoint),
            exc or "closed",
            dropped,
            self.backoff.next_delay,
            extra={"event": "broker_connection_lost", "broker": _address(link.endpoint)},
        )
        self._lost.set()

    async def keep_connected(self) -> None:
        """Reopen the connection whenever it is lost, and subscribe again; runs until cancelled."""
        while True:
            await self._lost.wait()
            previous = self._link
            while not self._closing:
                # Not reset here: a connection lost soon after it came up keeps the longer
                # delay (Backoff), or a recurring fault would reconnect every second.
                delay = self.backoff.delay()
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
                    self.queue_missing = isinstance(exc, QueueMissing)
                    log.warning(
                        "reconnecting to broker %s failed (%s); next try in %.1f s",
                        mask_url(self._config.amqp_url),
                        exc,
                        self.backoff.next_delay,
                    )
                    continue
                self._lost.clear()
                if link.closed:  # lost again at once; the next round reconnects
                    self._lost.set()
                    break
                self.backoff.up()
                self._metrics.broker_reconnects.inc()
                broker = _address(link.endpoint)
                if self.active:
                    log.info(
                        "consuming again: broker connection re-established (%s)",
                        broker,
                        extra={"event": "consuming_again", "broker": broker},
                    )
                else:
                    log.info(
                        "broker connection re-established (%s); consumption stays paused", broker
                    )
                break
            if self._closing:
                return

    async def close(self) -> None:
        """Send the last acks and close the connection; the broker requeues anything unacked."""
        self._closing = True
        link, self._link = self._link, None
        if link is None:
            return
        self._settle.flush()
        await link.close()


def _address(endpoint: Endpoint | None) -> str:
    """The node a connection is to, ``host:port``, for logs."""
    if endpoint is None:
        return "unknown"
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{host}:{endpoint.port}"
