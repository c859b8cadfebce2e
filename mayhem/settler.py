"""The settle stage's mechanism: acks batched with ``multiple=True``, requeues and rejects.

:mod:`mayhem.settle` decides what becomes of a delivery and counts it; this module sends the
frames on the delivery's link, and counts only what it could not send (stale deliveries).

Acks are batched without delaying any: a worker's ack joins the acks of every worker that
finishes in the same turn of the loop, and the longest run of settled tags from the lowest
outstanding one goes out as a single ``basic.ack`` with ``multiple=True``. A tag is only ever
covered after its own worker acknowledged it, that is after its commit; a tag this settler has
not seen delivered is never covered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mayhem.exceptions import LinkLost

if TYPE_CHECKING:
    from mayhem.amqp import Delivery, Link
    from mayhem.metrics import Metrics

log = logging.getLogger(__name__)


class _Tags:
    """One link's delivery tags: those not yet settled, and acks waiting for the flush."""

    __slots__ = ("contiguous", "flushing", "link", "low", "outstanding", "pending", "seen")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.seen = 0  # the highest tag delivered (tags on a channel are consecutive from 1)
        self.contiguous = True  # every tag up to seen was delivered to us
        self.outstanding: set[int] = set()  # delivered, neither acked nor requeued; <= prefetch
        # No tag below it is outstanding: tags only grow, so the lowest outstanding one never
        # goes down, and finding it is a walk forward from here instead of min() over the set.
        self.low = 1
        self.pending: list[int] = []  # acknowledged by a worker, frame not yet sent
        self.flushing = False


class Settler:
    """Acks, requeues and rejects deliveries on their link; a stale one is counted and dropped.

    A delivery tag belongs to its link: once the link is closed, settling an old tag is
    void; the broker has already requeued that message, so it is counted as stale.

    Args:
        metrics: where stale deliveries are counted.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._links: dict[Link, _Tags] = {}
        self._last: _Tags | None = None
        self._loop = asyncio.get_running_loop()

    def _tags(self, link: Link) -> _Tags:
        tags = self._last
        if tags is not None and tags.link is link:
            return tags
        tags = self._links.get(link)
        if tags is None:
            for old in [old for old in self._links if old.closed]:
                del self._links[old]
            tags = self._links[link] = _Tags(link)
        self._last = tags
        return tags

    def delivered(self, delivery: Delivery) -> None:
        """Note a delivery's tag as outstanding (the consumer calls this first, for each)."""
        tags = self._tags(delivery.link)
        tag = delivery.delivery_tag
        if tag != tags.seen + 1 and tags.contiguous:
            # Never on one channel; if it were, a multiple ack could cover a tag not seen.
            log.warning("delivery tag %d after %d: acks are sent one by one", tag, tags.seen)
            tags.contiguous = False
        tags.seen = max(tags.seen, tag)
        tags.outstanding.add(tag)

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge (the frame goes out at the end of this turn of the loop).

        Returns:
            ``False`` if the delivery was stale.
        """
        link = delivery.link
        if link.closed:
            self._metrics.stale_deliveries.inc()
            return False
        tags = self._tags(link)
        tags.outstanding.discard(delivery.delivery_tag)
        tags.pending.append(delivery.delivery_tag)
        if not tags.flushing:
            tags.flushing = True
            self._loop.call_soon(self._flush, tags)
        return True

    def requeue(self, delivery: Delivery) -> bool:
        """Negative-acknowledge with requeue, now.

        Returns:
            ``False`` if the delivery was stale.
        """
        return self._nack(delivery, requeue=True)

    def reject(self, delivery: Delivery) -> bool:
        """Negative-acknowledge without requeue, now: the broker dead-letters the message.

        The work queue's dead-letter exchange routes it to ``<queue>.dead`` whole, as it was
        published. Like a requeue, the tag is settled at once: a later multiple ack may
        cover it (the broker skips settled tags), and none covers it before.

        Returns:
            ``False`` if the delivery was stale.
        """
        return self._nack(delivery, requeue=False)

    def _nack(self, delivery: Delivery, *, requeue: bool) -> bool:
        link = delivery.link
        try:
            link.nack(delivery.delivery_tag, requeue=requeue)
        except LinkLost:
            self._metrics.stale_deliveries.inc()
            return False
        self._tags(link).outstanding.discard(delivery.delivery_tag)
        return True

    def flush(self) -> None:
        """Send every pending ack now (before the link is closed)."""
        for tags in list(self._links.values()):
            if tags.flushing:
                self._flush(tags)

    def _flush(self, tags: _Tags) -> None:
        tags.flushing = False
        pending, link = tags.pending, tags.link
        if not pending:
            return
        # Every tag below the lowest outstanding one is settled: one multiple ack covers the
        # highest pending tag there; the pending tags above it go one by one.
        lowest = 0
        if tags.contiguous:
            lowest, outstanding, seen = tags.low, tags.outstanding, tags.seen
            while lowest <= seen and lowest not in outstanding:
                lowest += 1
            tags.low = lowest
        highest, singles = 0, []
        for tag in pending:
            if tag < lowest:
                highest = max(highest, tag)
            else:
                singles.append(tag)
        pending.clear()
        try:
            link.ack(highest, singles)
        except LinkLost:
            # The broker redelivers them; the inbox knows they were applied.
            unsent = len(singles) + bool(highest)
            log.info("%d acks not sent: the consuming connection is gone", unsent)
            self._metrics.stale_deliveries.inc(unsent)
