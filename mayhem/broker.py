"""The broker: the topology, and a robust connection for publishing retries and dead letters.

aio-pika's robust connection does the reconnecting; this module watches it for logs and
readiness, and declares the exchange, the work queue, the delay queues and the dead-letter
queue, named and set up as :mod:`mayhem.topology` says. Consuming has a connection of its
own (:mod:`mayhem.consumer`, :mod:`mayhem.amqp`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Final

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from mayhem.amqp.link import describe_failure
from mayhem.amqp.url import endpoints, split_hosts
from mayhem.exceptions import ConfigError, StartupError
from mayhem.redact import mask_url
from mayhem.topology import (
    dead_letter_exchange,
    dead_queue,
    dead_queue_arguments,
    queue_arguments,
    retry_queue,
    retry_queue_arguments,
    retry_tiers,
)

if TYPE_CHECKING:
    from mayhem.config import Config

log = logging.getLogger(__name__)

CONNECTION_NAME_PREFIX: Final = "mayhem"
ROLE: Final = "publisher"
RECONNECT_INTERVAL: Final = 1.0


def connection_name(queue: str, role: str = "consumer") -> str:
    """The client-provided name operators and tests find mayhem's connections by."""
    host, pid = socket.gethostname(), os.getpid()
    return f"{CONNECTION_NAME_PREFIX} {role} host={host} pid={pid} queue={queue}"


async def connect(config: Config, role: str = "consumer") -> AbstractRobustConnection:
    """Open a robust connection; fail fast when the broker cannot be reached at start.

    A cluster's URL (``amqp://u:p@h1,h2,h3/``) names several nodes: the first that answers is
    used, and while the connection is down its reconnect attempts go round the other nodes
    (:class:`_Failover`; aio-pika's robust connection only ever retries the one URL it got).

    Raises:
        StartupError: the broker refused the credentials or no node could be reached.
    """
    # The URL was checked by the same parser when the configuration was loaded; aio-pika gets
    # each node's URL as it is, with the TLS context the consuming connection uses too.
    nodes = list(zip(split_hosts(config.amqp_url), endpoints(config.amqp_url), strict=True))
    failure: BaseException | None = None
    for url, endpoint in nodes:
        try:
            connection = await aio_pika.connect_robust(
                url,
                ssl_context=endpoint.ssl_context,
                client_properties={"connection_name": connection_name(config.queue, role)},
                reconnect_interval=RECONNECT_INTERVAL,
                timeout=10,
            )
        except aiormq.exceptions.ProbableAuthenticationError:
            msg = f"broker {mask_url(config.amqp_url)} refused the credentials"
            raise StartupError(msg) from None
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            if len(nodes) > 1:
                log.info(
                    "broker node %s:%d did not answer: %s; trying the next",
                    endpoint.host,
                    endpoint.port,
                    _describe(exc),
                )
            failure = exc
            continue
        if len(nodes) > 1 and isinstance(connection, aio_pika.RobustConnection):
            _Failover(connection, [url for url, _ in nodes], url)
        return connection
    shown = _describe(failure) if failure else "no host"
    msg = f"cannot connect to broker {mask_url(config.amqp_url)}: {shown}"
    raise StartupError(msg)


class _Failover:
    """Points a robust connection at the next node of a cluster while it is down.

    aio-pika reads the connection's ``url`` at each reconnect attempt; from the loss until the
    connection is back, this moves it to the next node every reconnect interval, starting
    with the node after the one that was lost. The TLS context stays: the nodes share the
    URL's options, so it is the one every node's endpoint makes, and the host name it checks
    is taken from the URL at each attempt. It lives as long as the connection's close
    callback; its task ends when the connection is back or closed.
    """

    def __init__(
        self, connection: aio_pika.RobustConnection, urls: list[str], current: str
    ) -> None:
        self._connection = connection
        self._urls = [URL(url) for url in urls]
        self._at = urls.index(current)
        self._task: asyncio.Task[None] | None = None
        connection.close_callbacks.add(self._lost)

    def _lost(self, _: Any, exc: BaseException | None = None) -> None:  # noqa: ANN401, ARG002
        connection = self._connection
        if connection.close_called or connection.is_closed:
            if self._task is not None:
                self._task.cancel()
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._rotate(), name="mayhem-broker-failover"
            )

    async def _rotate(self) -> None:
        connection = self._connection
        while not (connection.close_called or connection.is_closed):
            self._at = (self._at + 1) % len(self._urls)
            url = self._urls[self._at]
            # The robust connection reads this at its next attempt.
            connection.url = url
            log.info("broker (publishing): next connection attempt to %s:%s", url.host, url.port)
            try:
                async with asyncio.timeout(RECONNECT_INTERVAL * 1.5):
                    await connection.connected.wait()
            except TimeoutError:
                continue
            return


def _describe(exc: BaseException) -> str:
    return describe_failure(exc)


async def declare_topology(channel: aio_pika.abc.AbstractChannel, config: Config) -> None:
    """Declare the exchange, work queue, delay queues and dead-letter queue; idempotent.

    Raises:
        ConfigError: an entity exists with other arguments (say, a classic queue where a
            quorum one is configured).
    """
    try:
        exchange = await channel.declare_exchange(
            config.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        dlx = await channel.declare_exchange(
            dead_letter_exchange(config.exchange), aio_pika.ExchangeType.DIRECT, durable=True
        )
        dead_name = dead_queue(config.queue)
        dead = await channel.declare_queue(
            dead_name, durable=True, arguments=dead_queue_arguments(config)
        )
        await dead.bind(dlx, routing_key=dead_name)
        work = await channel.declare_queue(
            config.queue, durable=True, arguments=queue_arguments(config)
        )
        await work.bind(exchange, routing_key=config.queue)
        for delay in retry_tiers(config):
            await channel.declare_queue(
                retry_queue(config.queue, delay),
                durable=True,
                arguments=retry_queue_arguments(config, delay),
            )
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        msg = (
            f"topology of queue {config.queue!r} differs from the broker's: {_describe(exc)} "
            "(delete the queue, or set declare = false)"
        )
        raise ConfigError(msg) from None


class Broker:
    """The publishing connection, watched for readiness.

    Args:
        config: the daemon's configuration.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractRobustChannel | None = None
        self.publish_channel: AbstractRobustChannel | None = None
        self._closing = False
        self._up = True

    @property
    def connected(self) -> bool:
        """The connection is open and its channels are restored."""
        conn = self.connection
        # _up turns true again only once aio-pika has restored the channels.
        return bool(
            self._up
            and conn is not None
            and conn.connected.is_set()
            and not conn.is_closed
            and self.channel is not None
            and not self.channel.is_closed
        )

    async def start(self) -> None:
        """Connect, open the channels, declare the topology and check the work queue exists.

        Raises:
            StartupError: the broker cannot be reached or refuses us.
            ConfigError: the topology on the broker contradicts the configuration.
        """
        config = self._config
        self.connection = conn = await connect(config, role=ROLE)
        try:
            self.channel = await conn.channel(publisher_confirms=False)
            # Dead letters and retries are published on their own channel with confirms.
            self.publish_channel = await conn.channel(publisher_confirms=True)
            if config.declare:
                await declare_topology(self.channel, config)
            await self.channel.declare_queue(config.queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            msg = f"queue {config.queue!r} does not exist on the broker and declare is off"
            raise ConfigError(msg) from None
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            msg = f"broker {mask_url(config.amqp_url)} failed during setup: {_describe(exc)}"
            raise StartupError(msg) from None
        conn.close_callbacks.add(self._lost)
        conn.reconnect_callbacks.add(self._restored)
        log.info("broker connected: %s", mask_url(config.amqp_url))

    def _lost(self, _: Any, exc: BaseException | None = None) -> None:  # noqa: ANN401
        if self._closing or not self._up:
            return  # closing on purpose, or a reconnect attempt failed: aio-pika logs those
        self._up = False
        log.warning("broker connection lost (publishing): %s", _describe(exc) if exc else "closed")

    def _restored(self, _: Any) -> None:  # noqa: ANN401
        self._up = True
        conn = self.connection
        url = conn.url if isinstance(conn, aio_pika.RobustConnection) else None
        where = f" to {url.host}:{url.port}" if url is not None else ""
        log.info("broker connection re-established (publishing)%s", where)

    async def depth(self) -> int | None:
        """Messages ready in the work queue (a passive declare), or ``None`` if unknown."""
        if self.publish_channel is None or not self.connected:
            return None
        try:
            # On the raw channel: aio-pika answers a passive declare of a known queue from
            # its cache, without asking the broker.
            channel = await self.publish_channel.get_underlay_channel()
            declared = await channel.queue_declare(self._config.queue, passive=True, timeout=5)
        except (*CONNECTION_EXCEPTIONS, TimeoutError):
            return None
        return declared.message_count

    async def close(self) -> None:
        """Close the channels and the connection; the broker requeues anything unacked."""
        conn, self.connection = self.connection, None
        if conn is None:
            return
        self._closing = True
        try:
            await conn.close()
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            log.warning("closing the broker connection failed: %s", _describe(exc))
