"""The ceiling: the fastest consumer this machine runs on a queue, for bench/run.py.

Usage: python bench/consumer_ceiling.py --queue NAME --count N [--prefetch 64]

An :class:`asyncio.Protocol` on uvloop that speaks just enough AMQP 0-9-1 through pamqp to
open a channel with QoS ``--prefetch`` and ``basic.consume``; then it does no more than
count: each read from the socket is scanned for complete messages (``basic.deliver``, content
header, body frames), and once per read a single ``basic.ack`` with ``multiple=True``
acknowledges everything up to the last complete message. No handler, no per-message
object, no await per message: whatever time is left is the broker's and the kernel's.

It measures itself as the other self-timed consumers do (bench/selftimed.py).
"""

from __future__ import annotations

import asyncio
import struct
from urllib.parse import unquote, urlsplit

import uvloop
from pamqp import commands, constants, frame
from selftimed import Tally, arguments

HEAD = struct.Struct(">BHI")
# basic.ack on channel 1 with multiple=True: frame head, class 60 method 80, tag, flags, end.
ACK = struct.Struct(">BHIHHQBB")
DELIVER = (60 << 16) | 60
CHANNEL = 1


class Ceiling(asyncio.Protocol):
    """Counts deliveries and acks them in one ``multiple=True`` frame per socket read."""

    def __init__(self, tally: Tally, queue: str, prefetch: int, url: str) -> None:
        self.tally, self.queue, self.prefetch = tally, queue, prefetch
        parts = urlsplit(url)
        self.user = unquote(parts.username or "guest")
        self.password = unquote(parts.password or "guest")
        self.vhost = unquote(parts.path.removeprefix("/")) or "/"
        self.transport: asyncio.Transport
        self.buffer = bytearray()
        self.consuming = asyncio.get_running_loop().create_future()
        self.tag = 0  # the last delivery tag seen
        self.body_left = 0
        self.acked = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self.transport = transport  # type: ignore[assignment]
        transport.write(constants.AMQP + bytes((0, 0, 9, 1)))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self.tally.connection_closed(exc)
        if not self.consuming.done():
            self.consuming.set_exception(exc or ConnectionError("closed"))

    def send(self, method: object, channel: int = 0) -> None:
        """Write one method frame."""
        self.transport.write(frame.marshal(method, channel))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:  # noqa: C901, D102 -- the hot loop, inline
        buffer = self.buffer
        buffer += data
        offset, size = 0, len(buffer)
        complete = 0
        while size - offset >= 8:
            kind, _, length = HEAD.unpack_from(buffer, offset)
            end = offset + 7 + length
            if end >= size:
                break
            if kind == constants.FRAME_BODY:
                self.body_left -= length
                if self.body_left <= 0:
                    complete += 1
            elif kind == constants.FRAME_HEADER:
                # class id (2), weight (2), body size (8)
                self.body_left = int.from_bytes(buffer[offset + 11 : offset + 19])
                if not self.body_left:
                    complete += 1
            elif kind == constants.FRAME_METHOD:
                if int.from_bytes(buffer[offset + 7 : offset + 11]) == DELIVER:
                    # consumer tag (short string), then the delivery tag
                    at = offset + 11
                    at += 1 + buffer[at]
                    self.tag = int.from_bytes(buffer[at : at + 8])
                else:
                    self.on_method(bytes(buffer[offset : end + 1]))
            offset = end + 1
        del buffer[:offset]
        if complete:
            if not self.acked:
                self.tally.first()
            # The last complete message's tag: a body still arriving is never acked early.
            tag = self.tag if self.body_left <= 0 else self.tag - 1
            self.transport.write(ACK.pack(1, CHANNEL, 13, 60, 80, tag, 1, constants.FRAME_END))
            for _ in range(complete):
                self.tally.finished()
            self.acked += complete

    def on_method(self, raw: bytes) -> None:
        """The handshake, one reply at a time; a close from the broker ends the run."""
        _, _, method = frame.unmarshal(raw)
        match method:
            case commands.Connection.Start():
                self.send(
                    commands.Connection.StartOk(
                        client_properties={"connection_name": "mayhem bench ceiling"},
                        mechanism="PLAIN",
                        response=f"\0{self.user}\0{self.password}",
                    )
                )
            case commands.Connection.Tune():
                self.send(
                    commands.Connection.TuneOk(
                        channel_max=1, frame_max=method.frame_max, heartbeat=0
                    )
                )
                self.send(commands.Connection.Open(virtual_host=self.vhost))
            case commands.Connection.OpenOk():
                self.send(commands.Channel.Open(), CHANNEL)
            case commands.Channel.OpenOk():
                self.send(commands.Basic.Qos(prefetch_count=self.prefetch), CHANNEL)
            case commands.Basic.QosOk():
                self.send(commands.Basic.Consume(queue=self.queue), CHANNEL)
            case commands.Basic.ConsumeOk():
                self.consuming.set_result(None)
            case commands.Connection.Close() | commands.Channel.Close():
                reason = ConnectionError(f"{method.reply_code} {method.reply_text}")
                self.tally.connection_closed(reason)
                if not self.consuming.done():
                    self.consuming.set_exception(reason)
            case _:
                pass


async def consume(url: str, queue: str, count: int, prefetch: int, stall: float) -> None:
    tally = Tally(count)
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: Ceiling(tally, queue, prefetch, url), parts.hostname, parts.port or 5672
    )
    await protocol.consuming
    await tally.wait(stall)
    tally.report()
    transport.close()


def main() -> None:
    args = arguments(__doc__)
    uvloop.run(consume(args.url, args.queue, args.count, args.prefetch, args.stall))


if __name__ == "__main__":
    main()
