"""The consumer's reconnecting, against the real broker: backoff, and a queue deleted under it.

A recurring fault right after subscribing comes from a TCP proxy on 127.0.0.1 that forwards
to the broker and drops each connection as soon as the broker's ``basic.consume-ok`` has
passed: the subscription succeeds, then the connection is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import urllib.parse

import aiohttp
import pytest
from mayhem_testing import declare, records_of, wait_until

from mayhem.buffer import Buffer
from mayhem.consumer import Backoff, Consumer
from mayhem.metrics import Metrics
from mayhem.settle import Settle
from mayhem.settler import Settler


async def _consumer(amqp, config, metrics: Metrics, **kwargs: object) -> Consumer:
    """A consumer with the daemon's floors below it: the buffer and the settle stage."""
    channel = await amqp.channel(publisher_confirms=True)
    settle = Settle(config, Settler(metrics), channel, metrics)
    buffer = Buffer(config.effective_prefetch, settle, metrics)
    return Consumer(config, buffer, settle, metrics, **kwargs)


CONSUME_OK = struct.pack(">HH", 60, 21)  # basic.consume-ok: class 60, method 21


class DropAfterConsume:
    """A TCP proxy to the broker that closes each connection right after consume-ok.

    Attributes:
        dropping: while true, every connection is dropped after its consume-ok.
        consumed: how many consume-oks passed through.
    """

    def __init__(self, amqp_url: str) -> None:
        self._parts = urllib.parse.urlsplit(amqp_url)
        self._upstream = (self._parts.hostname or "127.0.0.1", self._parts.port or 5672)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropping = True
        self.consumed = 0
        self.port = 0

    @property
    def url(self) -> str:
        netloc = self._parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(self._parts._replace(netloc=netloc))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def drop_all(self) -> None:
        """Close every proxied connection (the proxy keeps listening)."""
        for writer in list(self._writers):
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.drop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._frames(up_reader, writer, up_writer)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for each in (writer, up_writer):
                each.close()
                self._writers.discard(each)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _frames(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Broker to client, frame by frame; after a consume-ok, close both sides."""
        while True:
            head = await reader.readexactly(7)
            kind, _, size = struct.unpack(">BHI", head)
            rest = await reader.readexactly(size + 1)
            writer.write(head + rest)
            await writer.drain()
            if kind == 1 and rest[:4] == CONSUME_OK:
                self.consumed += 1
                if self.dropping:
                    # Closing flushes what was written: the client gets consume-ok, then EOF.
                    writer.close()
                    upstream.close()
                    return


@pytest.fixture
async def dropping_proxy(amqp_url):
    proxy = DropAfterConsume(amqp_url)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_backoff_grows_when_the_connection_fails_right_after_subscribing(
    amqp, make_config, dropping_proxy
):
    """Lost right after each subscribe, the delays double up to the cap; not 1 s forever.

    1. The queue exists; the consumer connects through the proxy and subscribes; the proxy
       drops every connection right after consume-ok.
    2. The delays the consumer chose before each reconnect: first, doubled, ... up to most,
       and they stay there (each reconnect did subscribe: the proxy saw the consume-oks).
    3. The proxy lets the next connection live; once it has been up healthy_after, a drop
       makes the consumer start again from the first delay.
    """
    config = make_config(amqp_url=dropping_proxy.url)
    await declare(amqp, config)
    metrics = Metrics()
    backoff = Backoff(first=0.05, most=0.4, healthy_after=2.0)
    consumer = await _consumer(amqp, config, metrics, backoff=backoff)
    await consumer.open()
    reconnecting = asyncio.create_task(consumer.keep_connected())
    try:
        await consumer.start()
        await wait_until(lambda: len(backoff.chosen) >= 6, timeout=30)
        assert list(backoff.chosen)[:6] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
        assert dropping_proxy.consumed >= 6

        dropping_proxy.dropping = False
        await wait_until(lambda: consumer.active and backoff.healthy, timeout=30)
        before = len(backoff.chosen)
        dropping_proxy.drop_all()
        await wait_until(lambda: len(backoff.chosen) > before and consumer.active, timeout=30)
        assert backoff.chosen[before] == 0.05
    finally:
        reconnecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reconnecting
        await consumer.close()


async def _readyz(session: aiohttp.ClientSession, addr: str) -> tuple[int, str]:
    async with session.get(f"http://{addr}/readyz") as response:
        return response.status, await response.text()


async def test_readyz_says_queue_missing_when_the_queue_is_deleted(amqp, make_config, run_daemon):
    """The work queue deleted under a running daemon: /readyz 503 "queue missing", then back.

    1. The daemon runs and is ready (/readyz 200, asked with aiohttp).
    2. The queue is deleted: the broker cancels the consumer; /readyz answers 503 with
       "queue missing" (the broker itself is there: not "broker disconnected").
    3. The queue is declared again: the daemon subscribes by itself; /readyz 200.
    """
    config = make_config()
    async with run_daemon(config) as daemon, aiohttp.ClientSession() as session:
        assert daemon.health is not None
        addr = daemon.health.bound
        assert addr is not None
        assert await _readyz(session, addr) == (200, "ready\n")

        channel = await amqp.channel()
        await channel.queue_delete(config.queue)
        await channel.close()
        seen: list[tuple[int, str]] = []

        async def says_missing() -> bool:
            seen.append(await _readyz(session, addr))
            return "queue missing" in seen[-1][1]

        await wait_until(says_missing, timeout=15, interval=0.05)
        status, body = seen[-1]
        assert status == 503
        assert "broker disconnected" not in body
        assert all("broker disconnected" not in text for _, text in seen)

        await declare(amqp, config)

        async def ready() -> bool:
            return await _readyz(session, addr) == (200, "ready\n")

        await wait_until(ready, timeout=30, interval=0.1)


async def test_start_says_what_handler_timeout_is_checked_against(amqp, make_config, caplog):
    """RabbitMQ does not report consumer_timeout: opening says so, with the default used.

    (The configuration refuses a handler_timeout above half that default.)
    """
    config = make_config(handler_timeout=600)
    await declare(amqp, config)
    metrics = Metrics()
    consumer = await _consumer(amqp, config, metrics)
    with caplog.at_level("INFO", logger="mayhem.consumer"):
        await consumer.open()
    await consumer.close()
    [line] = [r.getMessage() for r in records_of(caplog.records, "consumer_timeout_unknown")]
    assert line.startswith("the broker (RabbitMQ 3.")
    assert "does not report its consumer_timeout" in line
    assert "handler_timeout 600 s is checked against the default 1800 s" in line
