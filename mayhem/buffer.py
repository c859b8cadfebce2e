"""The buffer: the hand-off from the consumer to the workers.

The consumer puts each delivery in (:meth:`Buffer.put`); each worker takes the next one
(:attr:`Buffer.get`), or ``None``, an exit sentinel (:meth:`Buffer.stop_workers`: fewer
workers after a reload, or all of them at shutdown, each after the message it holds). The
broker sends at most the prefetch window unacknowledged, so the buffer holds that many
deliveries plus room for one sentinel per worker.

What is buffered belongs to the broker until a worker settles it: :meth:`Buffer.requeue`
hands it all back (when consuming stops: shutdown, a database outage), and a delivery of a
closed connection is dropped, never run (the broker has requeued it already): at once when
the connection is lost (:meth:`Buffer.drop_stale`), or when a worker takes it
(:meth:`Buffer.drop`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from mayhem.amqp import Delivery
    from mayhem.metrics import Metrics
    from mayhem.settle import Settle


class Buffer:
    """A bounded queue of deliveries waiting for a worker.

    Args:
        capacity: the prefetch window plus one exit sentinel per worker.
        settle: requeues what cannot be buffered, or what is handed back.
        metrics: ``mayhem_buffered_messages`` (deliveries only) and the stale deliveries.
    """

    def __init__(self, capacity: int, settle: Settle, metrics: Metrics) -> None:
        self._queue: asyncio.Queue[Delivery | None] = asyncio.Queue(maxsize=capacity)
        self._settle = settle
        self._stale = metrics.stale_deliveries
        metrics.buffered.set_function(self.__len__)
        #: The next delivery for a worker, or ``None``: the worker taking it exits. A
        #: delivery whose connection is gone since is the worker's to :meth:`drop`. Bound
        #: once, so that taking a message costs no coroutine of ours.
        self.get: Callable[[], Coroutine[Any, Any, Delivery | None]] = self._queue.get

    def __len__(self) -> int:
        """Deliveries waiting: not the exit sentinels."""
        return sum(item is not None for item in self._queue._queue)  # type: ignore[attr-defined]  # noqa: SLF001

    def put(self, delivery: Delivery) -> None:
        """Buffer ``delivery`` for a worker (never full: the broker keeps to the prefetch)."""
        try:
            self._queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self._settle.requeue(delivery)

    def drop(self, delivery: Delivery) -> None:  # noqa: ARG002 -- says which one
        """A worker took a delivery of a closed connection: dropped unrun, counted as stale."""
        self._stale.inc()

    def stop_workers(self, count: int) -> None:
        """Tell ``count`` workers to exit, each once it takes the sentinel (after what it holds)."""
        for _ in range(count):
            self._queue.put_nowait(None)

    @property
    def exiting(self) -> int:
        """Exit sentinels no worker has taken yet: workers told to exit that still run."""
        return sum(item is None for item in self._queue._queue)  # type: ignore[attr-defined]  # noqa: SLF001

    def keep_workers(self, count: int) -> int:
        """Take back up to ``count`` exit sentinels not taken yet; return how many.

        A reload up while workers are still due to exit keeps them rather than starting new
        ones beside them: the sentinels never outnumber the workers, so they always fit.
        """
        queue = self._queue
        kept: list[Delivery | None] = []
        taken = 0
        while not queue.empty():
            item = queue.get_nowait()
            if item is None and taken < count:
                taken += 1
            else:
                kept.append(item)
        for item in kept:
            queue.put_nowait(item)
        return taken

    def requeue(self) -> int:
        """Hand every buffered delivery back to the broker; return how many went back.

        Exit sentinels go too: call this before :meth:`stop_workers`, or after the workers
        have exited.
        """
        requeued = 0
        queue = self._queue
        while True:
            try:
                delivery = queue.get_nowait()
            except asyncio.QueueEmpty:
                return requeued
            if delivery is not None and self._settle.requeue(delivery):
                requeued += 1

    def drop_stale(self) -> int:
        """Remove deliveries of a closed connection; return how many were dropped.

        The broker requeued them when the connection closed; running their handlers now would
        only find them again later as duplicates.
        """
        queue = self._queue
        keep: list[Delivery | None] = []
        dropped = 0
        while not queue.empty():
            delivery = queue.get_nowait()
            if delivery is not None and delivery.stale:
                dropped += 1
            else:
                keep.append(delivery)
        for delivery in keep:
            queue.put_nowait(delivery)
        if dropped:
            self._stale.inc(dropped)
        return dropped
