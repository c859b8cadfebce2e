"""The consuming connection: a lean AMQP 0-9-1 client with one channel that only consumes.

Why not aio-pika here: on the hot path aio-pika (over aiormq) reads every frame with three
``readexactly`` calls under a lock, passes it through two queues, and creates two tasks and an
``IncomingMessage`` per delivery; that alone costs more CPU per message than mayhem's whole
budget (``bench/RESULTS.md``). This module reads frames straight from the transport's buffer,
hands each delivery to a plain callback, and writes acks without awaiting. Frames are decoded
and encoded by pamqp, the codec aiormq itself uses; only ``basic.deliver`` and ``basic.ack``,
two fixed layouts on the hot path, are packed by hand.

Everything else on the broker (topology, publishing with confirms, the dead-letter tools)
stays on aio-pika, in :mod:`mayhem.broker`. Reconnecting is the consumer's job
(:mod:`mayhem.consumer`): a :class:`Link` is one connection, closed for good once lost.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from pamqp import commands, constants, decode, frame
from pamqp.exceptions import PAMQPException

from mayhem.exceptions import BrokerRefused, LinkLost

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from datetime import datetime

log = logging.getLogger(__name__)

CHANNEL: Final = 1
FRAME_MAX: Final = 131_072
DEFAULT_HEARTBEAT: Final = 60
CONNECT_TIMEOUT: Final = 10.0
REPLY_TIMEOUT: Final = 10.0
_FRAME_HEAD: Final = struct.Struct(">BHI")  # type, channel, size; then payload and 0xCE
_FRAME_MIN: Final = 8
_DELIVER_INDEX: Final = 0x003C003C  # basic.deliver: class 60, method 60
_ACK: Final = struct.Struct(">BHIIQBB")  # method frame, basic.ack, tag, multiple, 0xCE
_ACK_INDEX: Final = 0x003C0050
_FRAME_END: Final = bytes((constants.FRAME_END,))
_HEARTBEAT_FRAME: Final = _FRAME_HEAD.pack(constants.FRAME_HEARTBEAT, 0, 0) + _FRAME_END
_ACCESS_REFUSED: Final = 403
_CLOSED: Final = "the consuming connection is closed"


@attrs.frozen
class Endpoint:
    """Where and as whom to connect, from an ``amqp://`` or ``amqps://`` URL.

    Attributes:
        host: the broker's host.
        port: its port (5672, or 5671 for amqps).
        tls: connect with TLS (``amqps``).
        vhost: the virtual host (``/`` when the URL has no path).
        username: PLAIN user name.
        password: PLAIN password.
        heartbeat: the heartbeat we ask for (``?heartbeat=`` in the URL), seconds; 0 is off.
    """

    host: str
    port: int
    tls: bool
    vhost: str
    username: str
    password: str
    heartbeat: int = DEFAULT_HEARTBEAT

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """Parse the URL as aio-pika does: percent-decoded parts, ``guest`` by default."""
        parts = urlsplit(url)
        tls = parts.scheme == "amqps"
        path = parts.path.removeprefix("/")
        query = parse_qs(parts.query)
        heartbeat = query.get("heartbeat", [str(DEFAULT_HEARTBEAT)])[0]
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if tls else 5672),
            tls=tls,
            vhost=unquote(path) or "/",
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            heartbeat=int(heartbeat) if heartbeat.isdigit() else DEFAULT_HEARTBEAT,
        )


class Delivery:
    """One ``basic.deliver`` with its properties and body, tied to the link it came on.

    Its tag means something only on that link: once the link is closed the broker has
    requeued the message, and the delivery is stale.
    """

    __slots__ = ("body", "delivery_tag", "exchange", "link", "properties", "redelivered",
                 "routing_key")  # fmt: skip

    def __init__(  # noqa: PLR0917 -- built positionally, once per message
        self,
        link: Link,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: Properties,
        body: bytes,
    ) -> None:
        self.link = link
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        self.body = body

    @property
    def stale(self) -> bool:
        """The link it came on is closed: its tag is void, the broker redelivers it."""
        return self.link.closed

    @property
    def malformed(self) -> str | None:
        """What in its properties could not be decoded, if anything."""
        return self.properties.malformed

    @property
    def message_id(self) -> str | None:
        """The ``message_id`` property."""
        return self.properties.message_id

    @property
    def headers(self) -> dict[str, Any]:
        """The ``headers`` property (empty when absent)."""
        return self.properties.headers or {}

    @property
    def content_type(self) -> str | None:
        """The ``content_type`` property."""
        return self.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        """The ``content_encoding`` property."""
        return self.properties.content_encoding

    @property
    def correlation_id(self) -> str | None:
        """The ``correlation_id`` property."""
        return self.properties.correlation_id

    @property
    def timestamp(self) -> datetime | None:
        """The ``timestamp`` property."""
        return self.properties.timestamp

    @property
    def type(self) -> str | None:
        """The ``type`` property (pamqp's ``message_type``)."""
        return self.properties.message_type

    @property
    def app_id(self) -> str | None:
        """The ``app_id`` property."""
        return self.properties.app_id


def _short_string(data: bytes, offset: int) -> tuple[str, int]:
    size = data[offset]
    end = offset + 1 + size
    return data[offset + 1 : end].decode("utf-8", "replace"), end


class Properties:
    """A delivery's AMQP basic properties; ``None`` where absent.

    ``malformed`` says what could not be decoded (a short string that is not UTF-8, a
    headers table pamqp refuses, a timestamp out of range): such a delivery is dead-lettered,
    never allowed to break the connection over and over.
    """

    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime | None = None
    message_type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    cluster_id: str | None = None
    malformed: str | None = None


# The basic properties in wire order, by flag bit (15 first), with their kind.
_SHORT, _OCTET, _TABLE, _TIMESTAMP = range(4)
_PROPERTIES: Final = (
    (1 << 15, "content_type", _SHORT),
    (1 << 14, "content_encoding", _SHORT),
    (1 << 13, "headers", _TABLE),
    (1 << 12, "delivery_mode", _OCTET),
    (1 << 11, "priority", _OCTET),
    (1 << 10, "correlation_id", _SHORT),
    (1 << 9, "reply_to", _SHORT),
    (1 << 8, "expiration", _SHORT),
    (1 << 7, "message_id", _SHORT),
    (1 << 6, "timestamp", _TIMESTAMP),
    (1 << 5, "message_type", _SHORT),
    (1 << 4, "user_id", _SHORT),
    (1 << 3, "app_id", _SHORT),
    (1 << 2, "cluster_id", _SHORT),
)
_CONTENT_HEADER: Final = struct.Struct(">HHQH")  # class, weight, body size, property flags


def decode_content_header(data: bytes) -> tuple[int, Properties]:
    """The body size and properties of a content header frame's payload.

    Raises:
        ValueError: the frame is cut short (a protocol error: the connection is dropped).
    """
    _, _, body_size, flags = _CONTENT_HEADER.unpack_from(data)
    properties = Properties()
    offset = _CONTENT_HEADER.size
    for bit, name, kind in _PROPERTIES:
        if flags & bit:
            if offset >= len(data):
                msg = "content header cut short"
                raise ValueError(msg)
            value, offset = _decode_property(data, offset, name, kind, properties)
            if offset > len(data):
                msg = "content header cut short"
                raise ValueError(msg)
            setattr(properties, name, value)
    return body_size, properties


def _decode_property(
    data: bytes, offset: int, name: str, kind: int, properties: Properties
) -> tuple[Any, int]:
    """One property's value and where the next begins; notes what cannot be decoded."""
    value: Any
    if kind == _SHORT:
        end = offset + 1 + data[offset]
        raw = data[offset + 1 : end]
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            properties.malformed = f"property {name} is not valid UTF-8"
            value = raw.decode("utf-8", "replace")
    elif kind == _OCTET:
        value, end = data[offset], offset + 1
    elif kind == _TABLE:
        end = offset + 4 + int.from_bytes(data[offset : offset + 4])
        try:
            value = decode.field_table(data[offset:end])[1]
        except (ValueError, UnicodeDecodeError, struct.error) as exc:
            properties.malformed = f"headers cannot be decoded: {exc}"
            value = {}
    else:
        end = offset + 8
        try:
            value = decode.timestamp(data[offset:end])[1]
        except (ValueError, OverflowError, OSError):
            properties.malformed = "timestamp out of range"
            value = None
    return value, end


class Link(asyncio.Protocol):
    """One connection to the broker, with channel 1 for consuming; not reopened once closed.

    Args:
        on_delivery: called with each :class:`Delivery`, in tag order, on the loop.
        on_lost: called once when the link closes, with the cause (``None`` when we closed it).
    """

    def __init__(
        self,
        on_delivery: Callable[[Delivery], None],
        on_lost: Callable[[Link, BaseException | None], None],
    ) -> None:
        self._on_delivery = on_delivery
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # Replies to our synchronous methods, in the order asked (the broker answers in order).
        self._replies: deque[tuple[tuple[type, ...], asyncio.Future[Any]]] = deque()
        self.closed = False
        self._start = self._expect(commands.Connection.Start)
        self._deliver: tuple[int, bool, str, str] | None = None
        self._properties: Properties | None = None
        self._body: list[bytes] = []
        self._body_left = 0
        self._heartbeat = 0
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._last_received = self._loop.time()
        self._closing = False
        self.consumer_tag: str | None = None
        self.server: dict[str, Any] = {}

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        # A stream transport (uvloop's does not derive from asyncio.Transport).
        self._transport = stream = cast("asyncio.Transport", transport)
        stream.write(constants.AMQP + bytes((0, 0, 9, 1)))

    def data_received(self, data: bytes) -> None:  # noqa: D102
        buffer = self._buffer
        buffer += data
        self._last_received = self._loop.time()
        offset, size = 0, len(buffer)
        try:
            while size - offset >= _FRAME_MIN:
                kind, channel, length = _FRAME_HEAD.unpack_from(buffer, offset)
                end = offset + 7 + length
                if end >= size:
                    break
                if buffer[end] != constants.FRAME_END:
                    msg = f"frame of type {kind} does not end with 0xCE"
                    raise LinkLost(msg)
                if kind == constants.FRAME_BODY:
                    self._on_body(bytes(buffer[offset + 7 : end]))
                elif kind == constants.FRAME_METHOD:
                    self._on_method(channel, bytes(buffer[offset + 7 : end]))
                elif kind == constants.FRAME_HEADER:
                    self._on_header(bytes(buffer[offset + 7 : end]))
                offset = end + 1  # a heartbeat frame only refreshes _last_received
                if self.closed:
                    break  # the broker closed it: what follows is void
        except (
            PAMQPException,
            LinkLost,
            ValueError,
            IndexError,
            struct.error,
            UnicodeDecodeError,
        ) as exc:
            self._fail(exc if isinstance(exc, LinkLost) else LinkLost(f"bad frame: {exc}"))
            return
        finally:
            del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        cause = exc or (None if self._closing else LinkLost("the broker closed the connection"))
        self._closed(cause)

    # -- frames ------------------------------------------------------------------------------

    def _on_method(self, channel: int, data: bytes) -> None:
        if int.from_bytes(data[:4]) == _DELIVER_INDEX:
            # consumer tag, delivery tag, redelivered, exchange, routing key
            _, offset = _short_string(data, 4)
            tag = int.from_bytes(data[offset : offset + 8])
            redelivered = bool(data[offset + 8] & 1)
            exchange, offset = _short_string(data, offset + 9)
            routing_key, _ = _short_string(data, offset)
            self._deliver = (tag, redelivered, exchange, routing_key)
            return
        _, _, method = frame.unmarshal(
            _FRAME_HEAD.pack(constants.FRAME_METHOD, channel, len(data)) + data + _FRAME_END
        )
        match method:
            case commands.Connection.Close():
                self._write(commands.Connection.CloseOk(), 0)
                self._fail(_refusal(method), answered=True)
            case commands.Channel.Close():
                self._write(commands.Channel.CloseOk(), CHANNEL)
                self._fail(_refusal(method))
            case commands.Basic.Cancel():
                self._fail(LinkLost("the broker cancelled the consumer (queue deleted?)"))
            case commands.Connection.Blocked():
                log.warning("broker blocked the consuming connection: %s", method.reason)
            case commands.Connection.Unblocked():
                log.info("broker unblocked the consuming connection")
            case _:
                self._reply(method)

    def _reply(self, method: object) -> None:
        if not self._replies:
            log.debug("unexpected %s from the broker", type(method).__name__)
            return
        expected, waiter = self._replies.popleft()
        if waiter.done():
            return
        if isinstance(method, expected):
            waiter.set_result(method)
        else:
            msg = f"expected {expected[0].__name__}, the broker sent {type(method).__name__}"
            waiter.set_exception(LinkLost(msg))

    def _on_header(self, data: bytes) -> None:
        self._body_left, self._properties = decode_content_header(data)
        if not self._body_left:
            self._delivered(b"")

    def _on_body(self, data: bytes) -> None:
        self._body_left -= len(data)
        if self._body_left > 0:
            self._body.append(data)
            return
        if self._body:
            self._body.append(data)
            data = b"".join(self._body)
            self._body.clear()
        self._delivered(data)

    def _delivered(self, body: bytes) -> None:
        deliver, properties = self._deliver, self._properties
        self._deliver = self._properties = None
        if deliver is None or properties is None:
            msg = "content without a basic.deliver"
            raise LinkLost(msg)
        tag, redelivered, exchange, routing_key = deliver
        self._on_delivery(Delivery(self, tag, redelivered, exchange, routing_key, properties, body))

    # -- the hot path: settling ---------------------------------------------------------------

    def ack(self, multiple_up_to: int, singles: Iterable[int] = ()) -> None:
        """``basic.ack`` frames, written now in one go (not awaited).

        Args:
            multiple_up_to: acknowledge every delivery up to this tag (``multiple=True``);
                0 for none.
            singles: tags to acknowledge one by one.

        Raises:
            LinkLost: the link is closed; the broker has requeued the deliveries.
        """
        if self.closed or self._transport is None:
            raise LinkLost(_CLOSED)
        pack, method, end = _ACK.pack, constants.FRAME_METHOD, constants.FRAME_END
        frames = [pack(method, CHANNEL, 13, _ACK_INDEX, tag, 0, end) for tag in singles]
        if multiple_up_to:
            frames.append(pack(method, CHANNEL, 13, _ACK_INDEX, multiple_up_to, 1, end))
        self._transport.write(b"".join(frames))

    def nack(self, tag: int, *, requeue: bool = True) -> None:
        """``basic.nack`` of one delivery (written now, not awaited).

        Raises:
            LinkLost: the link is closed; the broker has requeued the delivery.
        """
        if self.closed:
            raise LinkLost(_CLOSED)
        self._write(commands.Basic.Nack(delivery_tag=tag, requeue=requeue), CHANNEL)

    # -- opening, consuming, closing ------------------------------------------------------------

    async def handshake(
        self, endpoint: Endpoint, client_properties: dict[str, Any], prefetch: int
    ) -> None:
        """Authenticate, tune, open the vhost and channel 1, and set the prefetch window.

        Raises:
            BrokerRefused: the broker refused the credentials or the vhost.
            LinkLost: the connection failed on the way.
        """
        start = await self._wait(self._start)
        self.server = dict(start.server_properties or {})
        if "PLAIN" not in start.mechanisms.split():
            msg = f"broker offers no PLAIN authentication ({start.mechanisms})"
            raise BrokerRefused(msg)
        tune_reply = self._expect(commands.Connection.Tune)
        self._write(
            commands.Connection.StartOk(
                client_properties={
                    **client_properties,
                    "product": "mayhem",
                    "capabilities": {
                        "authentication_failure_close": True,
                        "consumer_cancel_notify": True,
                        "connection.blocked": True,
                    },
                },
                mechanism="PLAIN",
                response=f"\0{endpoint.username}\0{endpoint.password}",
            ),
            0,
        )
        tune = await self._wait(tune_reply)
        # 0 in the URL turns heartbeats off; otherwise the shorter interval of the two.
        self._heartbeat = endpoint.heartbeat and _negotiate(endpoint.heartbeat, tune.heartbeat)
        frame_max = _negotiate(FRAME_MAX, tune.frame_max)
        open_reply = self._expect(commands.Connection.OpenOk)
        self._write(
            commands.Connection.TuneOk(
                channel_max=CHANNEL, frame_max=frame_max, heartbeat=self._heartbeat
            ),
            0,
        )
        self._write(commands.Connection.Open(virtual_host=endpoint.vhost), 0)
        await self._wait(open_reply)
        if self._heartbeat:
            self._heartbeat_timer = self._loop.call_later(self._heartbeat / 2, self._beat)
        channel_reply = self._expect(commands.Channel.OpenOk)
        self._write(commands.Channel.Open(), CHANNEL)
        await self._wait(channel_reply)
        qos_reply = self._expect(commands.Basic.QosOk)
        self._write(commands.Basic.Qos(prefetch_count=prefetch), CHANNEL)
        await self._wait(qos_reply)

    async def consume(self, queue: str) -> str:
        """``basic.consume`` on the queue; return the consumer tag.

        Raises:
            LinkLost: the broker refused (no such queue, say) or the link failed.
        """
        reply = self._expect(commands.Basic.ConsumeOk)
        self._write(commands.Basic.Consume(queue=queue), CHANNEL)
        consumed = await self._wait(reply)
        self.consumer_tag = consumed.consumer_tag
        return str(consumed.consumer_tag)

    async def cancel(self) -> None:
        """``basic.cancel``; deliveries sent before the broker saw it still arrive.

        Raises:
            LinkLost: the link failed.
        """
        tag, self.consumer_tag = self.consumer_tag, None
        if tag is None or self.closed:
            return
        reply = self._expect(commands.Basic.CancelOk)
        self._write(commands.Basic.Cancel(consumer_tag=tag), CHANNEL)
        await self._wait(reply)

    async def close(self, timeout: float = REPLY_TIMEOUT) -> None:
        """Close the connection politely (the broker requeues what was not acked)."""
        if self.closed or self._transport is None:
            return
        self._closing = True
        reply = self._expect(commands.Connection.CloseOk)
        self._write(
            commands.Connection.Close(
                reply_code=200, reply_text="mayhem stops", class_id=0, method_id=0
            ),
            0,
        )
        try:
            async with asyncio.timeout(timeout):
                await reply
        except (TimeoutError, LinkLost) as exc:
            log.debug("the broker did not confirm the close: %s", exc)
        self._transport.close()
        # connection_lost follows on a later turn of the loop; the link is closed already.
        self._closed(None)

    def abort(self) -> None:
        """Drop the connection at once (a handshake that failed half-way)."""
        self._closing = True
        self._closed(None)
        if self._transport is not None:
            self._transport.abort()

    # -- inner workings ---------------------------------------------------------------------

    def _expect(self, *types: type) -> asyncio.Future[Any]:
        waiter: asyncio.Future[Any] = self._loop.create_future()
        if self.closed:
            waiter.set_exception(LinkLost(_CLOSED))
        else:
            self._replies.append((types, waiter))
        return waiter

    async def _wait(self, waiter: asyncio.Future[Any]) -> Any:  # noqa: ANN401 -- a reply
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await asyncio.shield(waiter)
        except TimeoutError:
            silent = LinkLost(f"no reply from the broker in {REPLY_TIMEOUT:g} s")
            self._fail(silent)
            raise silent from None

    def _write(self, method: Any, channel: int) -> None:  # noqa: ANN401 -- a pamqp method
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame.marshal(method, channel))

    def _beat(self) -> None:
        if self.closed:
            return
        silence = self._loop.time() - self._last_received
        if silence > 2 * self._heartbeat:
            self._fail(LinkLost(f"no frame from the broker in {silence:.0f} s (heartbeat)"))
            return
        if self._transport is not None:
            self._transport.write(_HEARTBEAT_FRAME)
        self._heartbeat_timer = self._loop.call_later(self._heartbeat / 2, self._beat)

    def _fail(self, exc: BaseException, *, answered: bool = False) -> None:
        """Close the link because of ``exc`` (the broker's close, or a protocol problem)."""
        if self.closed:
            return
        transport = self._transport
        if transport is not None and not answered and not isinstance(exc, BrokerRefused):
            self._write(
                commands.Connection.Close(
                    reply_code=200, reply_text=str(exc)[:200], class_id=0, method_id=0
                ),
                0,
            )
        self._closed(exc)
        if transport is not None:
            transport.close()

    def _closed(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        failure = exc or LinkLost(_CLOSED)
        # Connection.Start's waiter among them, until the broker sends it.
        while self._replies:
            _, waiter = self._replies.popleft()
            if not waiter.done():
                waiter.set_exception(failure)
                # Retrieved here so that an abandoned waiter never logs "never retrieved".
                waiter.exception()
        self._on_lost(self, exc)


def _negotiate(ours: int, theirs: int) -> int:
    """The smaller of two limits where 0 means "no limit"."""
    if not ours or not theirs:
        return ours or theirs
    return min(ours, theirs)


def _refusal(method: commands.Connection.Close | commands.Channel.Close) -> LinkLost:
    text = f"{method.reply_code} {method.reply_text}"
    if method.reply_code == _ACCESS_REFUSED:
        return BrokerRefused(text)
    return LinkLost(text)


async def open_link(
    endpoint: Endpoint,
    *,
    client_properties: dict[str, Any],
    prefetch: int,
    on_delivery: Callable[[Delivery], None],
    on_lost: Callable[[Link, BaseException | None], None],
) -> Link:
    """Connect, authenticate and open the consuming channel with its prefetch window.

    Raises:
        BrokerRefused: the broker refused the credentials or the vhost.
        LinkLost: the broker could not be reached, or closed the connection on the way.
    """
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if endpoint.tls else None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, link = await loop.create_connection(
                lambda: Link(on_delivery, on_lost),
                endpoint.host,
                endpoint.port,
                ssl=context,
            )
    except (OSError, TimeoutError) as exc:
        msg = str(exc) or type(exc).__name__
        raise LinkLost(msg) from None
    try:
        await link.handshake(endpoint, client_properties, prefetch)
    except BaseException:
        link.abort()
        raise
    return link
