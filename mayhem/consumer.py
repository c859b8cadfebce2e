"""The consumer: AMQP deliveries into a bounded buffer, and settling them (ack, requeue).

Stopping (at shutdown, or while the database is down) is ``cancel()`` — ``basic.cancel`` — first
and then ``requeue_buffered()``, because the broker does not take back what it already sent.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import deque
from typing import TYPE_CHECKING, Final

from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, ConsumerTag
    from aiormq.abc import AbstractChannel

    from mayhem.metrics import Metrics

log = logging.getLogger(__name__)

CANCEL_TIMEOUT: Final = 5.0


def is_stale(delivery: AbstractIncomingMessage) -> bool:
    """The delivery's channel is gone: its tag means nothing now, the broker redelivers it."""
    try:
        return bool(delivery.channel.is_closed)
    except ChannelInvalidStateError:  # aio-pika's way of saying the channel is closed
        return True


class _ChannelAcks:
    """One channel's delivered tags, so that acks in tag order go out as one frame."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.unsettled: deque[int] = deque()  # delivered, in tag order; settled ones pop lazily
        self.settled: set[int] = set()  # settled already, still somewhere in `unsettled`
        self.ackable: set[int] = set()  # acknowledged by a worker, frame not yet sent
        self.lowest = 0  # the lowest tag not yet covered, once the first tag is seen
        self.flushing = False


class Settler:
    """Acks and requeues deliveries, counting each, and drops the stale ones.

    Acks are batched without delaying any: a worker's ack joins the acks of every worker
    that finishes in the same loop iteration, and the longest run of settled tags from the
    lowest outstanding one goes out as a single ``basic.ack`` with ``multiple=True``. A tag is
    only ever covered after its own worker acknowledged it, that is after its commit.

    A delivery tag belongs to its channel: after a reconnect, settling an old tag fails; the
    broker has already requeued that message, so it is counted as stale and dropped.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._channels: dict[int, _ChannelAcks] = {}

    def _acks(self, channel: AbstractChannel) -> _ChannelAcks:
        acks = self._channels.get(id(channel))
        if acks is None or acks.channel is not channel:
            for key, old in list(self._channels.items()):
                if old.channel.is_closed:
                    del self._channels[key]
            acks = self._channels[id(channel)] = _ChannelAcks(channel)
        return acks

    def delivered(self, delivery: AbstractIncomingMessage) -> None:
        """Note a delivery's tag as outstanding (the consumer calls this as it buffers)."""
        tag = delivery.delivery_tag
        if tag is None or is_stale(delivery):
            return
        acks = self._acks(delivery.channel)
        unsettled = acks.unsettled
        if not acks.lowest:
            acks.lowest = tag
        if unsettled and tag < unsettled[-1]:
            bisect.insort(unsettled, tag)
        else:
            unsettled.append(tag)

    async def ack(self, delivery: AbstractIncomingMessage) -> bool:
        """Acknowledge; ``False`` if the delivery was stale."""
        tag = delivery.delivery_tag
        if tag is None or is_stale(delivery):
            self._metrics.stale_deliveries.inc()
            return False
        acks = self._acks(delivery.channel)
        acks.ackable.add(tag)
        if not acks.flushing:
            acks.flushing = True
            # Shielded: a worker cancelled mid-flush must not strand the others' acks.
            await asyncio.shield(self._flush(acks))
        return True

    async def _flush(self, acks: _ChannelAcks) -> None:
        try:
            # One turn of the loop: the workers finishing with this one add their tags.
            await asyncio.sleep(0)
            while acks.ackable:
                highest = None
                unsettled, settled, ackable = acks.unsettled, acks.settled, acks.ackable
                # Only a gap-free run of tags: a multiple ack must never cover a delivery that
                # this tracker has not seen (tags on a channel are consecutive).
                while (
                    unsettled
                    and unsettled[0] == acks.lowest
                    and (unsettled[0] in ackable or unsettled[0] in settled)
                ):
                    tag = unsettled.popleft()
                    acks.lowest = tag + 1
                    if tag in ackable:
                        ackable.discard(tag)
                        highest = tag
                    else:
                        settled.discard(tag)
                singles = sorted(ackable)
                ackable.clear()
                settled.update(singles)
                if highest is not None:
                    await acks.channel.basic_ack(highest, multiple=True)
                for tag in singles:
                    await acks.channel.basic_ack(tag)
        except Exception as exc:  # whatever it is, the broker will redeliver
            log.info("ack failed (%s): the broker will redeliver", exc)
            self._metrics.stale_deliveries.inc()
        finally:
            acks.flushing = False

    async def requeue(self, delivery: AbstractIncomingMessage) -> bool:
        """Negative-acknowledge with requeue; ``False`` if the delivery was stale."""
        tag = delivery.delivery_tag
        if tag is None or is_stale(delivery):
            self._metrics.stale_deliveries.inc()
            return False
        try:
            await delivery.channel.basic_nack(tag, requeue=True)
        except Exception as exc:  # whatever it is, the broker will redeliver
            log.info("requeue failed (%s): the broker will redeliver", exc)
            self._metrics.stale_deliveries.inc()
            return False
        self._acks(delivery.channel).settled.add(tag)
        self._metrics.requeued.inc()
        return True


class Consumer:
    """Subscribes to the work queue and feeds a bounded buffer.

    Args:
        queue: the work queue (a robust queue: the subscription survives reconnects).
        buffer: where deliveries wait for a worker; bounded by the prefetch window.
        settler: settles what ``requeue_buffered()`` and late deliveries hand back.
    """

    def __init__(
        self,
        queue: AbstractQueue,
        buffer: asyncio.Queue[AbstractIncomingMessage | None],
        settler: Settler,
    ) -> None:
        self._queue = queue
        self._buffer = buffer
        self._settler = settler
        self._tag: ConsumerTag | None = None
        self.delivered = 0

    @property
    def active(self) -> bool:
        """Subscribed to the queue."""
        return self._tag is not None

    async def start(self) -> None:
        """Subscribe (``basic.consume``)."""
        if self._tag is None:
            self._tag = await self._queue.consume(self._on_delivery)

    async def _on_delivery(self, delivery: AbstractIncomingMessage) -> None:
        # Noted first, even if it goes straight back: a gap in the tags would stop the acks
        # from ever being batched on this channel again.
        self._settler.delivered(delivery)
        if self._tag is None:
            # Sent before our basic.cancel reached the broker: hand it straight back.
            await self._settler.requeue(delivery)
            return
        self.delivered += 1
        # Never blocks: the broker sends at most prefetch unacked deliveries, and the buffer
        # holds that many.
        await self._buffer.put(delivery)

    async def cancel(self) -> None:
        """Unsubscribe (``basic.cancel``); on a closed channel log it and carry on."""
        tag, self._tag = self._tag, None
        if tag is None:
            return
        try:
            await self._queue.cancel(tag, timeout=CANCEL_TIMEOUT)
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            log.info("basic.cancel failed (%s): the channel is gone, so is the consumer", exc)

    async def requeue_buffered(self) -> int:
        """Requeue every delivery waiting in the buffer; return how many went back."""
        requeued = 0
        while True:
            try:
                delivery = self._buffer.get_nowait()
            except asyncio.QueueEmpty:
                return requeued
            if delivery is not None and await self._settler.requeue(delivery):
                requeued += 1

    def drop_stale(self) -> int:
        """Remove deliveries of a closed channel from the buffer (after a reconnect).

        The broker requeued them when the channel closed; running their handlers now would
        only find them again later as duplicates.
        """
        keep: list[AbstractIncomingMessage | None] = []
        dropped = 0
        while not self._buffer.empty():
            delivery = self._buffer.get_nowait()
            if delivery is not None and is_stale(delivery):
                dropped += 1
            else:
                keep.append(delivery)
        for delivery in keep:
            self._buffer.put_nowait(delivery)
        return dropped
