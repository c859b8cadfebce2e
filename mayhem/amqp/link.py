"""The consuming connection: one AMQP connection with channel 1, which only consumes.

A :class:`Link` is an :class:`asyncio.Protocol`: its reading half
(:class:`~mayhem.amqp.reader.FrameReader`) takes frames straight from the transport's buffer
and hands each delivery to a plain callback; this half opens the connection, answers the
broker's methods and writes acks without awaiting. It is one connection, closed for good once
lost; reconnecting is the consumer's job (:mod:`mayhem.consumer`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

from pamqp import commands, constants, frame

from mayhem.amqp.framing import ACK, ACK_INDEX, FRAME_MAX, HEADER_SLACK, HEARTBEAT_FRAME
from mayhem.amqp.reader import CHANNEL, FrameReader
from mayhem.exceptions import BrokerRefused, LinkLost, QueueMissing

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from mayhem.amqp.delivery import Delivery
    from mayhem.amqp.url import Endpoint

# FRAME_MAX stays importable from here: what this link agrees to in Connection.Tune.
__all__ = [
    "CHANNEL",
    "FRAME_MAX",
    "HEADER_SLACK",
    "Link",
    "describe_failure",
    "open_any",
    "open_link",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 10.0
REPLY_TIMEOUT: Final = 10.0
_ACCESS_REFUSED: Final = 403
_NOT_FOUND: Final = 404
_CLOSED: Final = "the consuming connection is closed"


class Link(FrameReader):
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
        super().__init__(on_delivery)
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        # Replies to our synchronous methods, in the order asked (the broker answers in order).
        self._replies: deque[tuple[tuple[type, ...], asyncio.Future[Any]]] = deque()
        self._start = self._expect(commands.Connection.Start)
        self._heartbeat = 0
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self.consumer_tag: str | None = None
        self.server: dict[str, Any] = {}
        self.endpoint: Endpoint | None = None  # where it connected (set by open_link)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        # A stream transport (uvloop's does not derive from asyncio.Transport).
        self._transport = stream = cast("asyncio.Transport", transport)
        stream.write(constants.AMQP + bytes((0, 0, 9, 1)))

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        # Always LinkLost to the waiters and on_lost: an OSError or ssl.SSLError (a reset, a
        # TLS alert such as "certificate required") must not escape the reconnect loop.
        if exc is not None:
            cause: LinkLost | None = LinkLost(describe_failure(exc))
        else:
            cause = None if self._closing else LinkLost("the broker closed the connection")
        self._closed(cause)

    # -- methods ------------------------------------------------------------------------------

    def _on_control(self, method: object) -> None:
        match method:
            case commands.Connection.Close():
                self._write(commands.Connection.CloseOk(), 0)
                self._fail(_refusal(method), answered=True)
            case commands.Channel.Close():
                self._write(commands.Channel.CloseOk(), CHANNEL)
                self._fail(_refusal(method))
            case commands.Basic.Cancel():
                # RabbitMQ sends it when the queue is deleted (or, for a mirrored classic
                # queue, fails over): the consumer names it "queue missing" until a
                # subscription succeeds again.
                self._fail(QueueMissing("the broker cancelled the consumer (queue deleted?)"))
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
        pack, method, end = ACK.pack, constants.FRAME_METHOD, constants.FRAME_END
        frames = [pack(method, CHANNEL, 13, ACK_INDEX, tag, 0, end) for tag in singles]
        if multiple_up_to:
            frames.append(pack(method, CHANNEL, 13, ACK_INDEX, multiple_up_to, 1, end))
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
        mechanism = endpoint.auth
        if mechanism not in start.mechanisms.split():
            msg = f"broker offers no {mechanism} authentication ({start.mechanisms})"
            raise BrokerRefused(msg)
        # EXTERNAL: the broker takes the user from the client certificate; the response is
        # empty (as aiormq sends it).
        response = "" if mechanism == "EXTERNAL" else f"\0{endpoint.username}\0{endpoint.password}"
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
                mechanism=mechanism,
                response=response,
            ),
            0,
        )
        tune = await self._wait(tune_reply)
        # 0 in the URL turns heartbeats off; otherwise the shorter interval of the two.
        self._heartbeat = endpoint.heartbeat and _negotiate(endpoint.heartbeat, tune.heartbeat)
        frame_max = _negotiate(FRAME_MAX, tune.frame_max)
        self._payload_max = frame_max - 8
        self._header_max = max(frame_max, tune.frame_max) + HEADER_SLACK - 8
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

    async def consume(self, queue: str, *, max_body: int | None = None) -> str:
        """``basic.consume`` on the queue; return the consumer tag.

        Args:
            queue: the queue.
            max_body: a delivery whose content header declares a larger body is handed on
                without it (:attr:`Delivery.body_dropped`): its body frames are skipped as
                they arrive, never buffered.

        Raises:
            LinkLost: the broker refused (no such queue, say) or the link failed.
        """
        self.max_body = max_body
        reply = self._expect(commands.Basic.ConsumeOk)
        self._write(commands.Basic.Consume(queue=queue), CHANNEL)
        consumed = await self._wait(reply)
        self.consumer_tag = consumed.consumer_tag
        return str(consumed.consumer_tag)

    async def get(self, queue: str) -> bool:
        """``basic.get`` without auto-ack: whether a message follows (to ``on_delivery``).

        The message stays unacknowledged until :meth:`ack`, and goes back to the queue when
        the link closes.

        Raises:
            LinkLost: the broker refused (no such queue, say) or the link failed.
        """
        reply = self._expect(commands.Basic.GetOk, commands.Basic.GetEmpty)
        self._write(commands.Basic.Get(queue=queue), CHANNEL)
        return isinstance(await self._wait(reply), commands.Basic.GetOk)

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
            self._transport.write(HEARTBEAT_FRAME)
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
    if method.reply_code == _NOT_FOUND and isinstance(method, commands.Channel.Close):
        # Channel 1 only declares nothing and consumes one queue: 404 is that queue.
        return QueueMissing(text)
    return LinkLost(text)


def describe_failure(exc: BaseException) -> str:
    """One line on why a connection could not be made, TLS failures in plain words."""
    text = (str(exc) or type(exc).__name__).replace("\n", " ")
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message
    elif "CERTIFICATE_VERIFY_FAILED" in text:
        # aiormq re-raises it as AMQPConnectionError with the text only.
        why = text.partition("certificate verify failed: ")[2].partition(" (_ssl")[0]
    elif isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or text}"
    else:
        return text
    return (
        f"TLS: the broker's certificate was not accepted ({why or 'verify failed'}); "
        "is cafile= the CA that signed it?"
    )


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
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, link = await loop.create_connection(
                lambda: Link(on_delivery, on_lost),
                endpoint.host,
                endpoint.port,
                # The context the URL's TLS options made, the same aio-pika's connection uses.
                ssl=endpoint.ssl_context,
            )
    except (OSError, TimeoutError) as exc:
        raise LinkLost(describe_failure(exc)) from None
    try:
        await link.handshake(endpoint, client_properties, prefetch)
    except BaseException:
        link.abort()
        raise
    link.endpoint = endpoint
    return link


async def open_any(
    endpoints: Sequence[Endpoint],
    *,
    after: Endpoint | None = None,
    client_properties: dict[str, Any],
    prefetch: int,
    on_delivery: Callable[[Delivery], None],
    on_lost: Callable[[Link, BaseException | None], None],
) -> Link:
    """:func:`open_link` to the first of a cluster's nodes that answers.

    The nodes are tried in order, starting with the one after ``after`` (the node whose
    connection was just lost, or that failed last), so that a reconnect goes to another
    node first and the node that failed is tried last.

    Raises:
        BrokerRefused: a node refused the credentials or the vhost (the nodes of a cluster
            share them, so the others would too).
        LinkLost: no node could be reached; the message names the last node's failure.
    """
    # By identity: a list may name one node twice, and "after" is the very one that failed.
    start = next((i + 1 for i, each in enumerate(endpoints) if each is after), 0)
    order = [*endpoints[start:], *endpoints[:start]]
    failure = LinkLost("no broker host to connect to")
    for endpoint in order:
        try:
            return await open_link(
                endpoint,
                client_properties=client_properties,
                prefetch=prefetch,
                on_delivery=on_delivery,
                on_lost=on_lost,
            )
        except BrokerRefused:
            raise
        except LinkLost as exc:
            if len(order) > 1:
                log.info(
                    "broker node %s:%d did not answer: %s; trying the next",
                    endpoint.host,
                    endpoint.port,
                    exc,
                )
            failure = exc
    if len(order) > 1:
        msg = f"none of the {len(order)} broker hosts answered; the last: {failure}"
        raise LinkLost(msg)
    raise failure
