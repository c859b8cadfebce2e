"""mayhem.amqp, the lean consuming client, against the real broker: no part of it is mocked.

Each test declares its own queue (the ``queue_name`` fixture deletes it afterwards), opens
its links through the ``links`` fixture (every link is closed at the end) and waits on what
the callbacks report, never on a fixed delay.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import aio_pika
import attrs
import pytest
from mayhem_testing import publish, wait_until
from pamqp import commands, frame, header

from mayhem.amqp import Delivery, Endpoint, Link, decode_content_header, open_link
from mayhem.exceptions import BrokerRefused, LinkLost, QueueMissing

WAIT = 5.0  # seconds any one condition may take on a healthy broker
FRAME_PAYLOAD = 131_072 - 8  # the largest body frame payload at the frame_max we negotiate


class Recorder:
    """The callbacks of one link: what was delivered and how the link ended."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.lost: list[tuple[Link, BaseException | None]] = []
        self._lost = asyncio.Event()
        self._arrived = asyncio.Event()

    def on_delivery(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self._arrived.set()

    def on_lost(self, link: Link, exc: BaseException | None) -> None:
        self.lost.append((link, exc))
        self._lost.set()

    async def deliveries_at_least(self, n: int, timeout: float = WAIT) -> list[Delivery]:
        async with asyncio.timeout(timeout):
            while len(self.deliveries) < n:
                self._arrived.clear()
                await self._arrived.wait()
        return self.deliveries

    async def lost_with(self, timeout: float = WAIT) -> BaseException | None:
        """Wait for on_lost; return the cause it was called with (it is called once)."""
        async with asyncio.timeout(timeout):
            await self._lost.wait()
        [(_, exc)] = self.lost
        return exc


@pytest.fixture
def endpoint(amqp_url: str) -> Endpoint:
    return Endpoint.from_url(amqp_url)


@pytest.fixture
async def links(endpoint: Endpoint):
    """Open links (with a Recorder each) to the test's broker; all are closed afterwards."""
    opened: list[Link] = []

    async def open_(
        *, prefetch: int = 100, name: str | None = None, at: Endpoint | None = None
    ) -> tuple[Link, Recorder]:
        recorder = Recorder()
        link = await open_link(
            at or endpoint,
            client_properties={"connection_name": name or f"mayhem-test {uuid.uuid4().hex}"},
            prefetch=prefetch,
            on_delivery=recorder.on_delivery,
            on_lost=recorder.on_lost,
        )
        opened.append(link)
        return link, recorder

    yield open_
    for link in opened:
        await link.close(timeout=2)


async def _declare(amqp: aio_pika.abc.AbstractConnection, queue: str) -> None:
    channel = await amqp.channel()
    await channel.declare_queue(queue, durable=True)
    await channel.close()


async def _counts(amqp: aio_pika.abc.AbstractConnection, queue: str) -> tuple[int, int]:
    """The queue's (ready messages, consumers), by a passive declare."""
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return result.message_count, result.consumer_count
    finally:
        await channel.close()


async def _until_counts(
    amqp: aio_pika.abc.AbstractConnection, queue: str, expected: tuple[int, int]
) -> None:
    """Poll the broker's counts of the queue until they are ``expected``."""

    async def reached() -> bool:
        return await _counts(amqp, queue) == expected

    await wait_until(reached, timeout=WAIT, interval=0.02)


async def _rabbitmqctl(*args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout


async def _broker_connection(name: str) -> list[str]:
    """The broker's listing of the one connection named ``name``: pid, timeout, properties."""
    listing = await _rabbitmqctl("list_connections", "pid", "timeout", "client_properties")
    [line] = [line for line in listing.splitlines() if name in line]
    return line.split("\t")


# -- decode_content_header (pure) --------------------------------------------------------------


def _content_header(body_size: int, **properties: object) -> bytes:
    marshalled = frame.marshal(
        header.ContentHeader(0, body_size, commands.Basic.Properties(**properties)), 1
    )
    return marshalled[7:-1]  # the payload, without the frame head and the frame end


def test_decode_content_header_round_trip():
    """Properties pamqp encodes come back as they were, absent ones as None."""
    stamp = datetime(2024, 5, 17, 12, 30, 5, tzinfo=UTC)
    size, props = decode_content_header(
        _content_header(
            42,
            content_type="text/plain",
            headers={"a": 1, "b": "two", "c": [1, "x"], "d": {"e": True}},
            delivery_mode=2,
            priority=5,
            message_id="m-1",
            timestamp=stamp,
            app_id="tests",
        )
    )
    assert size == 42
    assert props.content_type == "text/plain"
    assert props.headers == {"a": 1, "b": "two", "c": [1, "x"], "d": {"e": True}}
    assert (props.delivery_mode, props.priority) == (2, 5)
    assert (props.message_id, props.timestamp, props.app_id) == ("m-1", stamp, "tests")
    assert props.correlation_id is None
    assert props.malformed is None


def test_decode_content_header_flags_bad_utf8_and_refuses_a_cut_header():
    """A property that is not UTF-8 is flagged as malformed; a cut-short header is a ValueError.

    The ValueError (not an IndexError) is what the link turns into LinkLost: every
    property kind cut at its first byte is refused the same way.
    """
    data = _content_header(3, message_id="m-é")
    bad = data.replace("m-é".encode(), b"m-\xff\xfe")
    size, props = decode_content_header(bad)
    assert size == 3
    assert props.malformed == "property message_id is not valid UTF-8"
    assert props.message_id is not None
    assert props.message_id.startswith("m-")
    for flags in (1 << 15, 1 << 13, 1 << 12, 1 << 6):  # short string, table, octet, timestamp
        cut = (60).to_bytes(2) + bytes(2) + (3).to_bytes(8) + flags.to_bytes(2)
        with pytest.raises(ValueError, match="cut short"):
            decode_content_header(cut)
    with pytest.raises(ValueError, match="cut short"):
        decode_content_header(data[:-2])


async def test_a_malformed_frame_ends_the_link_with_link_lost():
    """A frame cut short inside (a basic.deliver, a content header) is LinkLost for on_lost.

    Fed straight to the protocol, no broker needed: the parse error must not escape
    ``data_received`` (asyncio would log it as fatal and report an IndexError).
    """
    deliver = frame.marshal(
        commands.Basic.Deliver(
            consumer_tag="c", delivery_tag=1, redelivered=False, exchange="", routing_key="q"
        ),
        1,
    )
    cut_deliver = bytes((1, 0, 1, 0, 0, 0, 4)) + (0x003C003C).to_bytes(4) + b"\xce"
    cut_header = (60).to_bytes(2) + bytes(2) + (3).to_bytes(8) + (1 << 15).to_bytes(2)
    header_frame = bytes((2, 0, 1)) + len(cut_header).to_bytes(4) + cut_header + b"\xce"
    for data in (cut_deliver, deliver + header_frame):
        recorder = Recorder()
        link = Link(recorder.on_delivery, recorder.on_lost)
        link.data_received(data)
        exc = await recorder.lost_with()
        assert isinstance(exc, LinkLost)
        assert str(exc).startswith("bad frame")
        assert link.closed
        assert recorder.deliveries == []


# -- consuming --------------------------------------------------------------------------------


async def test_consumes_in_order_with_properties_then_one_multiple_ack(amqp, queue_name, links):
    """Deliveries come in order with their properties and body; one multiple ack settles all.

    1. 20 messages published with message_id, headers and content_type (and one with every
       other property).
    2. They arrive in order, tags 1..21, not redelivered, from the default exchange with the
       queue as routing key.
    3. ``link.ack(21)`` (multiple) then close: the queue is empty, nobody consumes.
    """
    await _declare(amqp, queue_name)
    headers = {"kind": "test", "n": 7, "flag": True, "list": [1, "a"], "nested": {"x": 1}}
    bodies = [f"body {i}".encode() for i in range(20)]
    ids = await publish(amqp, queue_name, bodies, headers=headers, content_type="text/plain")
    stamp = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    await publish(
        amqp,
        queue_name,
        [b"{}"],
        message_ids=["full"],
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id="corr",
        reply_to="replies",
        expiration=60,
        timestamp=stamp,
        type="kind.of",
        user_id="guest",
        app_id="tests",
        priority=3,
    )
    link, recorder = await links()
    assert link.server["product"] == "RabbitMQ"
    consumer_tag = await link.consume(queue_name)
    assert consumer_tag
    assert link.consumer_tag == consumer_tag
    deliveries = await recorder.deliveries_at_least(21)
    assert [d.body for d in deliveries[:20]] == bodies
    assert [d.message_id for d in deliveries[:20]] == ids
    assert [d.delivery_tag for d in deliveries] == list(range(1, 22))
    for delivery in deliveries:
        assert (delivery.exchange, delivery.routing_key) == ("", queue_name)
        assert not delivery.redelivered
        assert delivery.link is link
        assert not delivery.stale
        assert delivery.malformed is None
    first = deliveries[0]
    assert first.headers == headers
    assert first.content_type == "text/plain"
    assert first.properties.delivery_mode == 2
    full = deliveries[20]
    assert full.body == b"{}"
    assert full.message_id == "full"
    assert full.headers == {}
    assert (full.content_type, full.content_encoding) == ("application/json", "utf-8")
    assert (full.correlation_id, full.properties.reply_to) == ("corr", "replies")
    assert full.properties.expiration == "60000"
    assert full.timestamp == stamp
    assert (full.type, full.properties.user_id, full.app_id) == ("kind.of", "guest", "tests")
    assert full.properties.priority == 3
    assert await _counts(amqp, queue_name) == (0, 1)

    link.ack(21)
    await link.close()
    assert link.closed
    assert recorder.lost == [(link, None)]
    assert all(d.stale for d in deliveries)
    assert await _counts(amqp, queue_name) == (0, 0)


async def test_prefetch_window_holds_back_the_rest_until_acked(amqp, queue_name, links):
    """With prefetch 3, the broker sends 3 deliveries and keeps the rest until they are acked.

    Single acks (the ``singles`` argument) open the window as much as multiple ones.
    """
    await _declare(amqp, queue_name)
    await publish(amqp, queue_name, [str(i).encode() for i in range(8)])
    link, recorder = await links(prefetch=3)
    await link.consume(queue_name)
    await recorder.deliveries_at_least(3)
    await _until_counts(amqp, queue_name, (5, 1))
    assert len(recorder.deliveries) == 3  # the broker holds the other 5 back

    link.ack(0, [1, 2])
    await recorder.deliveries_at_least(5)
    await _until_counts(amqp, queue_name, (3, 1))
    assert [d.body for d in recorder.deliveries] == [b"0", b"1", b"2", b"3", b"4"]

    link.ack(5)
    await recorder.deliveries_at_least(8)
    link.ack(0, [6, 7, 8])
    await link.close()
    assert await _counts(amqp, queue_name) == (0, 0)


async def test_large_and_empty_bodies_arrive_whole(amqp, queue_name, links):
    """Bodies over frame_max come whole from several body frames; an empty body is b"".

    A body of exactly two full frames, and a small one after the large ones, check that
    frames are cut and joined at the right places.
    """
    await _declare(amqp, queue_name)
    large = os.urandom(300_000)
    two_frames = os.urandom(2 * FRAME_PAYLOAD)
    bodies = [b"", large, two_frames, b"after", b""]
    await publish(amqp, queue_name, bodies)
    link, recorder = await links()
    await link.consume(queue_name)
    deliveries = await recorder.deliveries_at_least(len(bodies))
    assert [len(d.body) for d in deliveries] == [len(b) for b in bodies]
    assert [d.body for d in deliveries] == bodies
    assert all(isinstance(d.body, bytes) for d in deliveries)
    link.ack(len(bodies))
    await link.close()
    assert await _counts(amqp, queue_name) == (0, 0)


async def test_closing_without_ack_requeues(amqp, queue_name, links):
    """What a closed link did not ack comes back, redelivered, on the next link.

    Only the unacked ones: the first two were acked before the close.
    """
    await _declare(amqp, queue_name)
    ids = await publish(amqp, queue_name, [b"a", b"b", b"c", b"d", b"e"])
    first, first_recorder = await links()
    await first.consume(queue_name)
    await first_recorder.deliveries_at_least(5)
    first.ack(2)
    await first.close()
    assert await _counts(amqp, queue_name) == (3, 0)

    second, recorder = await links()
    await second.consume(queue_name)
    deliveries = await recorder.deliveries_at_least(3)
    assert [d.message_id for d in deliveries] == ids[2:]
    assert [d.body for d in deliveries] == [b"c", b"d", b"e"]
    assert all(d.redelivered for d in deliveries)
    assert [d.delivery_tag for d in deliveries] == [1, 2, 3]  # tags are per channel
    second.ack(3)
    await second.close()
    assert await _counts(amqp, queue_name) == (0, 0)


async def test_nack_requeue_puts_the_message_back(amqp, queue_name, links):
    """nack(requeue=True) sends the message back; it returns, redelivered, on the same link.

    nack(requeue=False) drops it (the queue has no dead-letter exchange).
    """
    await _declare(amqp, queue_name)
    [mid] = await publish(amqp, queue_name, [b"again"])
    link, recorder = await links(prefetch=1)
    await link.consume(queue_name)
    [first] = await recorder.deliveries_at_least(1)
    assert not first.redelivered
    link.nack(first.delivery_tag, requeue=True)
    again = (await recorder.deliveries_at_least(2))[1]
    assert (again.message_id, again.body) == (mid, b"again")
    assert again.redelivered
    assert again.delivery_tag == 2
    link.nack(again.delivery_tag, requeue=False)
    await link.close()  # after the nack: had it requeued, the close would leave it queued
    assert len(recorder.deliveries) == 2
    assert await _counts(amqp, queue_name) == (0, 0)


# -- refusals and failures ------------------------------------------------------------------


async def _open_bare(
    at: Endpoint, on_lost: Callable[[Link, BaseException | None], None] = lambda *_: None
) -> Link:
    """open_link with no deliveries expected (a handshake that should fail)."""
    return await open_link(
        at, client_properties={}, prefetch=1, on_delivery=lambda _: None, on_lost=on_lost
    )


async def test_wrong_password_is_refused_quickly(endpoint):
    """A wrong password is BrokerRefused (ACCESS_REFUSED), at once, not after a timeout."""
    wrong = Endpoint.from_url(
        f"amqp://{endpoint.username}:not-{endpoint.password}@{endpoint.host}:{endpoint.port}/"
    )
    lost: list[BaseException | None] = []
    started = time.monotonic()
    with pytest.raises(BrokerRefused, match="ACCESS_REFUSED"):
        await _open_bare(wrong, on_lost=lambda _, exc: lost.append(exc))
    assert time.monotonic() - started < 3


async def test_unknown_vhost_is_refused_with_a_clear_message(endpoint):
    """A vhost the broker does not have ends the handshake with a message that names it."""
    vhost = f"no-such-vhost-{uuid.uuid4().hex[:8]}"
    unknown = Endpoint.from_url(
        f"amqp://{endpoint.username}:{endpoint.password}@{endpoint.host}:{endpoint.port}/{vhost}"
    )
    with pytest.raises(LinkLost) as raised:
        await _open_bare(unknown)
    message = str(raised.value)
    assert vhost in message
    assert "NOT_ALLOWED" in message or "ACCESS_REFUSED" in message


async def test_nothing_listening_is_link_lost():
    """Nothing listening on the port: LinkLost (not BrokerRefused), with the OS's reason."""
    nowhere = Endpoint.from_url("amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(LinkLost) as raised:
        await _open_bare(nowhere)
    assert not isinstance(raised.value, BrokerRefused)
    assert str(raised.value)


async def test_consume_on_a_missing_queue_loses_the_link(queue_name, links):
    """basic.consume on a queue that does not exist: LinkLost (404), on_lost, link closed."""
    link, recorder = await links()
    with pytest.raises(LinkLost, match="NOT_FOUND"):
        await link.consume(queue_name)
    exc = await recorder.lost_with()
    assert isinstance(exc, QueueMissing)
    assert "NOT_FOUND" in str(exc)
    assert queue_name in str(exc)
    assert link.closed
    assert link.consumer_tag is None
    with pytest.raises(LinkLost):
        link.ack(1)
    with pytest.raises(LinkLost):
        await link.consume(queue_name)


async def test_broker_closing_the_connection_is_reported(amqp, queue_name, links, endpoint):
    """``rabbitmqctl close_connection`` on the link: on_lost with the broker's reason.

    1. A link named uniquely, with ``?heartbeat=5``; the broker lists it with that name and
       the heartbeat we asked for.
    2. One delivery, unacked; the broker closes the connection (CONNECTION_FORCED).
    3. on_lost is called with LinkLost, the link is closed, the delivery is stale, acking
       or nacking raises LinkLost, and the message is back in the queue.
    """
    await _declare(amqp, queue_name)
    await publish(amqp, queue_name, [b"x"])
    name = f"mayhem-test {uuid.uuid4().hex}"
    link, recorder = await links(name=name, at=attrs.evolve(endpoint, heartbeat=5))
    await link.consume(queue_name)
    [delivery] = await recorder.deliveries_at_least(1)

    pid, timeout, properties = await _broker_connection(name)
    assert timeout == "5"
    assert "mayhem" in properties
    await _rabbitmqctl("close_connection", pid, "closed by test_amqp")

    exc = await recorder.lost_with()
    assert isinstance(exc, LinkLost)
    assert not isinstance(exc, BrokerRefused)
    assert "CONNECTION_FORCED" in str(exc)
    assert "closed by test_amqp" in str(exc)
    assert link.closed
    assert delivery.stale
    with pytest.raises(LinkLost):
        link.ack(delivery.delivery_tag)
    with pytest.raises(LinkLost):
        link.nack(delivery.delivery_tag)
    await _until_counts(amqp, queue_name, (1, 0))


async def test_deleting_the_queue_cancels_the_consumer(amqp, queue_name, links):
    """The queue deleted while consumed: the broker's basic.cancel ends the link."""
    await _declare(amqp, queue_name)
    link, recorder = await links()
    await link.consume(queue_name)
    channel = await amqp.channel()
    await channel.queue_delete(queue_name)
    await channel.close()
    exc = await recorder.lost_with()
    assert isinstance(exc, QueueMissing)  # the consumer reports "queue missing", not a broker
    assert "cancelled" in str(exc)
    assert link.closed


async def test_acking_an_unknown_tag_closes_the_channel(amqp, queue_name, links):
    """An ack of a tag never delivered: PRECONDITION_FAILED from the broker ends the link.

    It ends it at once (on_lost is called, the link is closed), and the messages it held
    go back to the queue.
    """
    await _declare(amqp, queue_name)
    await publish(amqp, queue_name, [b"held"])
    link, recorder = await links()
    await link.consume(queue_name)
    await recorder.deliveries_at_least(1)
    link.ack(0, [999_999])
    exc = await recorder.lost_with()
    assert isinstance(exc, LinkLost)
    assert "PRECONDITION_FAILED" in str(exc)
    assert "999999" in str(exc)
    assert link.closed
    with pytest.raises(LinkLost):
        link.ack(1)
    await _until_counts(amqp, queue_name, (1, 0))


async def test_cancel_stops_deliveries(amqp, queue_name, links):
    """After cancel() the broker has no consumer: new messages stay in the queue.

    What was delivered before the cancel can still be acked on the open link.
    """
    await _declare(amqp, queue_name)
    await publish(amqp, queue_name, [b"1", b"2"])
    link, recorder = await links()
    await link.consume(queue_name)
    await recorder.deliveries_at_least(2)
    await link.cancel()
    assert link.consumer_tag is None
    assert await _counts(amqp, queue_name) == (0, 0)  # two unacked, no consumer

    await publish(amqp, queue_name, [b"3", b"4", b"5"])
    assert await _counts(amqp, queue_name) == (3, 0)
    assert [d.body for d in recorder.deliveries] == [b"1", b"2"]
    link.ack(2)
    await link.cancel()  # a second cancel does nothing
    await link.close()
    assert recorder.lost == [(link, None)]
    assert [d.body for d in recorder.deliveries] == [b"1", b"2"]
    assert await _counts(amqp, queue_name) == (3, 0)
