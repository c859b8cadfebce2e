"""mayhem.buffer: the hand-off to the workers, its exit sentinels, requeues and stale drops.

The link is a stand-in recording the nacks that reach it; the settle stage and the settler are
the daemon's own, so every requeue is counted where the daemon counts it.
"""

from __future__ import annotations

import pytest

from mayhem.amqp import Delivery, Properties
from mayhem.buffer import Buffer
from mayhem.config import Config
from mayhem.exceptions import LinkLost
from mayhem.metrics import Metrics
from mayhem.settle import Settle
from mayhem.settler import Settler


class Link:
    """A stand-in for the consuming link: records requeues; closed, it refuses them."""

    def __init__(self) -> None:
        self.closed = False
        self.requeued: list[int] = []

    def nack(self, tag: int, *, requeue: bool = True) -> None:
        if self.closed:
            raise LinkLost("closed")
        assert requeue
        self.requeued.append(tag)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def parts():
    """A buffer of 4 on the daemon's settle stage (nothing is published: no channel)."""
    metrics = Metrics()
    config = Config.load(flags={"queue": "jobs"}, environ={})
    settler = Settler(metrics)
    settle = Settle(config, settler, None, metrics)  # type: ignore[arg-type]
    return Buffer(4, settle, metrics), settle, metrics


def deliver(settle: Settle, link: Link, tag: int) -> Delivery:
    delivery = Delivery(link, tag, redelivered=False, exchange="", routing_key="jobs",  # type: ignore[arg-type]
                        properties=Properties(), body=b"{}")  # fmt: skip
    settle.delivered(delivery)
    return delivery


async def test_exit_sentinels_come_after_the_deliveries_and_are_not_counted(parts):
    """Two deliveries, then two sentinels: the gauge says 2; workers get both, then None."""
    buffer, settle, metrics = parts
    link = Link()
    first, second = deliver(settle, link, 1), deliver(settle, link, 2)
    buffer.put(first)
    buffer.put(second)
    buffer.stop_workers(2)
    assert len(buffer) == 2
    assert value(metrics, "mayhem_buffered_messages") == 2
    assert [await buffer.get() for _ in range(4)] == [first, second, None, None]
    assert len(buffer) == 0


async def test_requeue_hands_back_every_delivery_and_counts_it_once(parts):
    """Requeued through the settle stage: each counted once; sentinels and stale ones not."""
    buffer, settle, metrics = parts
    live, gone = Link(), Link()
    for delivery in (deliver(settle, live, 1), deliver(settle, gone, 1), deliver(settle, live, 2)):
        buffer.put(delivery)
    buffer.stop_workers(1)
    gone.closed = True
    assert buffer.requeue() == 2
    assert live.requeued == [1, 2]
    assert value(metrics, "mayhem_messages_total", outcome="requeued") == 2
    assert value(metrics, "mayhem_stale_deliveries_total") == 1
    assert len(buffer) == 0
    assert buffer.requeue() == 0


async def test_a_lost_connection_drops_its_deliveries_and_keeps_the_rest_in_order(parts):
    """drop_stale: the closed link's deliveries go (counted stale); the others stay, in order."""
    buffer, settle, metrics = parts
    live, gone = Link(), Link()
    kept = [deliver(settle, live, 1), deliver(settle, live, 2)]
    buffer.put(deliver(settle, gone, 1))
    buffer.put(kept[0])
    buffer.put(deliver(settle, gone, 2))
    buffer.put(kept[1])
    gone.closed = True
    assert buffer.drop_stale() == 2
    assert value(metrics, "mayhem_stale_deliveries_total") == 2
    assert [await buffer.get(), await buffer.get()] == kept
    assert live.requeued == []


async def test_a_delivery_that_does_not_fit_goes_back(parts):
    """Never expected (the broker keeps to the prefetch window), but never lost either."""
    buffer, settle, metrics = parts
    link = Link()
    for tag in range(1, 6):
        buffer.put(deliver(settle, link, tag))
    assert len(buffer) == 4
    assert link.requeued == [5]
    assert value(metrics, "mayhem_messages_total", outcome="requeued") == 1
