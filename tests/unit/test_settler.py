"""The settler's batched acks, driven by generated sequences of deliveries, acks and loop turns.

The broker side is modelled by :class:`BrokerChannel`: it keeps the unacknowledged tags of one
channel as RabbitMQ does and refuses what RabbitMQ would refuse (a tag acked twice, an unknown
tag). The invariants are the settler's promise: a ``multiple=True`` ack never covers a tag that
a worker has not acknowledged (after its commit), requeued tags are never acked, and every
acknowledged tag reaches the broker exactly once.
"""

from __future__ import annotations

import asyncio

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mayhem.amqp import Delivery, Properties
from mayhem.exceptions import LinkLost
from mayhem.metrics import Metrics
from mayhem.settler import Settler


class BrokerChannel:
    """A stand-in for the link, recording what reached the broker's channel."""

    def __init__(self) -> None:
        self.closed = False
        self.unacked: set[int] = set()
        self.acked: list[int] = []
        self.nacked: list[int] = []
        self.frames: list[tuple[int, list[int]]] = []

    def ack(self, multiple_up_to: int, singles=()) -> None:
        if self.closed:
            raise LinkLost("closed")
        singles = list(singles)
        self.frames.append((multiple_up_to, singles))
        for tag in singles:
            assert tag in self.unacked, f"tag {tag} acked twice or never delivered"
            self.unacked.discard(tag)
            self.acked.append(tag)
        if multiple_up_to:
            assert multiple_up_to in self.unacked, f"unknown tag {multiple_up_to}"
            covered = sorted(tag for tag in self.unacked if tag <= multiple_up_to)
            self.unacked.difference_update(covered)
            self.acked.extend(covered)

    def nack(self, tag: int, *, requeue: bool = True) -> None:
        if self.closed:
            raise LinkLost("closed")
        assert requeue
        assert tag in self.unacked, f"tag {tag} nacked after being settled"
        self.unacked.discard(tag)
        self.nacked.append(tag)


def delivery_on(channel: BrokerChannel, tag: int) -> Delivery:
    return Delivery(channel, tag, redelivered=False, exchange="", routing_key="rk",
                    properties=Properties(), body=b"")  # fmt: skip


# deliver (with a gap of N tags the settler never sees), ack/requeue the i-th open delivery,
# or let the loop turn (the settler's flush runs then).
EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), st.sampled_from([0, 0, 0, 0, 1, 3])),
        st.tuples(st.just("ack"), st.integers(0, 63)),
        st.tuples(st.just("requeue"), st.integers(0, 63)),
        st.tuples(st.just("turn"), st.just(0)),
    ),
    max_size=120,
)


async def play(events: list[tuple[str, int]]) -> tuple[BrokerChannel, set[int], set[int]]:
    channel = BrokerChannel()
    settler = Settler(Metrics())
    open_deliveries: list[Delivery] = []
    worker_acked: set[int] = set()
    requeued: set[int] = set()
    tag = 0
    for kind, value in events:
        if kind == "deliver":
            # Tags in a gap exist on the broker's channel but never reach the settler.
            for _ in range(value):
                tag += 1
                channel.unacked.add(tag)
            tag += 1
            channel.unacked.add(tag)
            delivery = delivery_on(channel, tag)
            settler.delivered(delivery)
            open_deliveries.append(delivery)
        elif kind in {"ack", "requeue"} and open_deliveries:
            delivery = open_deliveries.pop(value % len(open_deliveries))
            if kind == "ack":
                assert settler.ack(delivery)
                worker_acked.add(delivery.delivery_tag)
            else:
                assert settler.requeue(delivery)
                requeued.add(delivery.delivery_tag)
        elif kind == "turn":
            await asyncio.sleep(0)  # one turn of the loop: the batched flush runs
        # After every event: nothing reached the broker that a worker did not acknowledge.
        assert set(channel.acked) <= worker_acked
    settler.flush()
    return channel, worker_acked, requeued


@settings(max_examples=400, deadline=None)
@given(EVENTS)
# Tag 1 stays outstanding while 2 and then 3 are acked in separate turns: the watermark of
# the lowest outstanding tag must not move past 1.
@example([("deliver", 0)] * 3 + [("ack", 1), ("turn", 0), ("ack", 1), ("turn", 0)])
def test_batched_acks_cover_only_settled_tags(events):
    """Every acknowledged tag reaches the broker once; nothing else is ever covered.

    Whatever the order of deliveries, acks, requeues and loop turns, no unacknowledged or
    requeued tag is covered, and the tags the settler never saw stay unacknowledged.
    """
    channel, worker_acked, requeued = asyncio.run(play(events))
    assert sorted(channel.acked) == sorted(worker_acked)
    assert len(channel.acked) == len(set(channel.acked))
    assert not requeued & set(channel.acked)
    assert set(channel.nacked) == requeued


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(1, 33))))
def test_acks_in_any_order_on_contiguous_tags_batch_into_few_frames(order):
    """Thirty-two contiguous deliveries acked in any order in one turn: one multiple ack."""

    async def scenario() -> BrokerChannel:
        channel = BrokerChannel()
        settler = Settler(Metrics())
        deliveries = {}
        for tag in range(1, 33):
            channel.unacked.add(tag)
            deliveries[tag] = delivery_on(channel, tag)
            settler.delivered(deliveries[tag])
        for tag in order:
            settler.ack(deliveries[tag])
        await asyncio.sleep(0)  # one turn of the loop: the batched flush runs
        return channel

    channel = asyncio.run(scenario())
    assert sorted(channel.acked) == list(range(1, 33))
    assert len(channel.frames) == 1
    multiple, singles = channel.frames[0]
    assert multiple == 32
    assert singles == []


def test_a_closed_link_counts_acks_as_stale_and_never_raises():
    """Acks of a delivery whose link closed are void: counted as stale, nothing is sent."""

    async def scenario() -> tuple[BrokerChannel, Metrics, bool]:
        channel = BrokerChannel()
        metrics = Metrics()
        settler = Settler(metrics)
        delivery = delivery_on(channel, 1)
        channel.unacked.add(1)
        settler.delivered(delivery)
        channel.closed = True
        return channel, metrics, settler.ack(delivery)

    channel, metrics, sent = asyncio.run(scenario())
    assert sent is False
    assert channel.acked == []
    assert metrics.registry.get_sample_value("mayhem_stale_deliveries_total") == 1
