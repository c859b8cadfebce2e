"""The consuming connection's reader: frames cut from the byte stream, deliveries assembled.

:class:`FrameReader` is the half of a :class:`~mayhem.amqp.link.Link` that reads. It takes the
bytes as they arrive, cuts them into frames (checking each frame's declared size before a byte
of it is buffered), and puts each delivery together from its method, content header and body
frames. What it cannot handle itself (every method that is not a delivery) it hands to
:meth:`FrameReader._on_control`, and any protocol error to :meth:`FrameReader._fail`: the
link's half, which writes and settles.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, cast

from pamqp import commands, constants, frame

from mayhem.amqp.delivery import Delivery, Properties
from mayhem.amqp.framing import (
    DELIVER_INDEX,
    FRAME_END_BYTE,
    FRAME_HEAD,
    FRAME_MAX,
    FRAME_MIN,
    GET_OK_INDEX,
    HEADER_SLACK,
    decode_content_header,
    short_string,
)
from mayhem.exceptions import LinkLost

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayhem.amqp.link import Link

log = logging.getLogger(__name__)

CHANNEL: Final = 1
_CONTENT_METHODS: Final = frozenset((DELIVER_INDEX, GET_OK_INDEX))
_GET_OK: Final = commands.Basic.GetOk()  # what get() waits for (the fields go to _deliver)


class FrameReader(asyncio.Protocol):
    """Reads frames from the transport's buffer and hands on each delivery, in tag order.

    Args:
        on_delivery: called with each :class:`Delivery`, on the loop.
    """

    def __init__(self, on_delivery: Callable[[Delivery], None]) -> None:
        self._on_delivery = on_delivery
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self.closed = False
        # The content being received: basic.deliver (or get-ok) read, then its header, then
        # its body frames. _deliver is set from the method to the last body frame.
        self._deliver: tuple[int, bool, str, str] | None = None
        self._properties: Properties | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_left = 0
        self._dropping = False  # this body is over max_body: its frames are skipped
        self.max_body: int | None = None
        # Until Connection.Tune, the most we would ever agree to.
        self._payload_max = FRAME_MAX - 8
        self._header_max = FRAME_MAX + HEADER_SLACK - 8
        self._last_received = self._loop.time()

    # -- what the link does with what is read ---------------------------------------------------

    def _on_control(self, method: object) -> None:
        """A method that is not a delivery: a reply, or the broker's close, cancel, block."""
        raise NotImplementedError

    def _fail(self, exc: BaseException, *, answered: bool = False) -> None:
        """Close the link because of ``exc`` (the broker's close, or a protocol problem)."""
        raise NotImplementedError

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:  # noqa: D102
        buffer = self._buffer
        buffer += data
        self._last_received = self._loop.time()
        offset, size = 0, len(buffer)
        try:
            # Once closed (the broker closed it, or a frame was refused) what follows is void.
            while size - offset >= FRAME_MIN and not self.closed:
                kind, channel, length = FRAME_HEAD.unpack_from(buffer, offset)
                if length > self._payload_max and (
                    kind != constants.FRAME_HEADER or length > self._header_max
                ):
                    # Checked on the frame head: never buffer up to what a peer declares.
                    raise _too_large(kind, length, self._payload_max)
                end = offset + 7 + length
                if end >= size:
                    break
                if buffer[end] != constants.FRAME_END:
                    msg = f"frame of type {kind} does not end with 0xCE"
                    raise LinkLost(msg)
                if kind == constants.FRAME_BODY:
                    self._on_body(channel, buffer, offset + 7, end)
                elif kind == constants.FRAME_METHOD:
                    self._on_method(channel, bytes(buffer[offset + 7 : end]))
                elif kind == constants.FRAME_HEADER:
                    self._on_header(channel, bytes(buffer[offset + 7 : end]))
                elif kind != constants.FRAME_HEARTBEAT:  # which only refreshes _last_received
                    msg = f"frame of unknown type {kind}"
                    raise LinkLost(msg)
                offset = end + 1
        except Exception as exc:
            # Hostile or broken bytes can make pamqp raise anything: none may escape into the
            # event loop.
            self._protocol_error(exc)
        finally:
            del buffer[:offset]

    # -- frames ------------------------------------------------------------------------------

    def _protocol_error(self, exc: Exception) -> None:
        if not isinstance(exc, LinkLost):
            exc = LinkLost(f"bad frame: {type(exc).__name__}: {exc}")
        if not self.closed:
            log.error("protocol error on the consuming connection, closing it: %s", exc)
        self._fail(exc)

    def _on_method(self, channel: int, data: bytes) -> None:
        if channel != CHANNEL or self._deliver is not None:
            _check_method_channel(channel)
        index = int.from_bytes(data[:4])
        if index in _CONTENT_METHODS:
            if channel != CHANNEL:
                raise _off_channel(constants.FRAME_METHOD, channel)
            # [consumer tag,] delivery tag, redelivered, exchange, routing key
            offset = short_string(data, 4)[1] if index == DELIVER_INDEX else 4
            tag = int.from_bytes(data[offset : offset + 8])
            redelivered = bool(data[offset + 8] & 1)
            exchange, offset = short_string(data, offset + 9)
            routing_key, _ = short_string(data, offset)
            self._deliver = (tag, redelivered, exchange, routing_key)
            if index == GET_OK_INDEX:
                self._on_control(_GET_OK)
            return
        _, _, method = frame.unmarshal(
            FRAME_HEAD.pack(constants.FRAME_METHOD, channel, len(data)) + data + FRAME_END_BYTE
        )
        self._on_control(method)

    def _on_header(self, channel: int, data: bytes) -> None:
        if channel != CHANNEL:
            raise _off_channel(constants.FRAME_HEADER, channel)
        if self._deliver is None or self._properties is not None:
            msg = "content header without a basic.deliver before it"
            raise LinkLost(msg)
        self._body_size, self._properties = decode_content_header(data)
        self._body_left = self._body_size
        # Over the limit: refused by its declared size, before a byte of it is buffered.
        self._dropping = self.max_body is not None and self._body_size > self.max_body
        if not self._body_left:
            self._delivered(b"")

    def _on_body(self, channel: int, buffer: bytearray, start: int, end: int) -> None:
        if channel != CHANNEL:
            raise _off_channel(constants.FRAME_BODY, channel)
        if self._dropping:
            self._drop_body(end - start)
            return
        data = bytes(buffer[start:end])
        self._body_left -= len(data)
        if self._body_left > 0:
            self._body.append(data)
            return
        if self._body_left < 0 or self._properties is None:
            raise _stray_body(self._properties)
        if self._body:
            self._body.append(data)
            data = b"".join(self._body)
            self._body.clear()
        self._delivered(data)

    def _drop_body(self, length: int) -> None:
        self._body_left -= length
        if self._body_left < 0:
            raise _stray_body(self._properties)
        if not self._body_left:
            self._dropping = False
            self._delivered(b"")

    def _delivered(self, body: bytes) -> None:
        deliver, properties = self._deliver, self._properties
        self._deliver = self._properties = None
        if deliver is None or properties is None:
            msg = "content without a basic.deliver"
            raise LinkLost(msg)
        tag, redelivered, exchange, routing_key = deliver
        # The reader is only ever a Link's half; the delivery is settled on that link.
        link = cast("Link", self)
        self._on_delivery(
            Delivery(
                link, tag, redelivered, exchange, routing_key, properties, body, self._body_size
            )
        )


def _too_large(kind: int, length: int, payload_max: int) -> LinkLost:
    if kind == constants.FRAME_HEADER:
        return LinkLost(f"content header frame of {length + 8} bytes, too large to read")
    return LinkLost(f"frame of {length + 8} bytes over frame_max ({payload_max + 8})")


def _off_channel(kind: int, channel: int) -> LinkLost:
    return LinkLost(f"frame of type {kind} on channel {channel}")


def _check_method_channel(channel: int) -> None:
    """Raise unless a method may come on ``channel`` now (on channel 1 no content is open)."""
    if channel == CHANNEL:
        # A channel's content frames are never interleaved with a method of that channel
        # (channel 0's may come between them).
        msg = "method frame in the middle of a delivery's content"
        raise LinkLost(msg)
    if channel:
        raise _off_channel(constants.FRAME_METHOD, channel)


def _stray_body(properties: Properties | None) -> LinkLost:
    if properties is None:
        return LinkLost("body frame without a content header before it")
    return LinkLost("body frames longer than the content header declared")
