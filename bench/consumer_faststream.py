"""FastStream's RabbitMQ subscriber with a no-op handler, for bench/run.py.

Usage: bench/.venv-faststream/bin/python bench/consumer_faststream.py --queue NAME --count N

Runs in its own virtualenv (FastStream pins its own aio-pika). The queue exists already
(declared by the benchmark as mayhem declares it), so the subscriber only checks it
(``declare=False``: a passive declare). The channel's QoS is ``--prefetch``; FastStream's
default acknowledgement policy acks each message after its handler returns. The handler takes
the decoded JSON body, as a FastStream handler usually does, and does nothing with it.
FastStream's per-message access log is off (``logger=None``): mayhem logs nothing per message
either.

It measures itself from the first handler call to the last and prints one JSON line:
``{"count", "seconds", "cpu_seconds", "maxrss_kb"}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from selftimed import Tally, arguments


async def consume(
    url: str, queue_name: str, count: int, prefetch: int, stall: float, *, queue_type: str
) -> None:
    tally = Tally(count)
    broker = RabbitBroker(
        url,
        default_channel=Channel(prefetch_count=prefetch),
        logger=None,
        on_close=[tally.connection_closed],
    )
    queue = RabbitQueue(queue_name, queue_type=QueueType(queue_type), durable=True, declare=False)

    @broker.subscriber(queue, no_reply=True)
    async def noop(body: dict[str, Any]) -> None:  # noqa: ARG001 -- a no-op
        tally.first()
        tally.finished()

    async with broker:
        await broker.start()
        await tally.wait(stall)
        # Let the last message's ack go out before the connection closes.
        await asyncio.sleep(0.2)
    tally.report()


def main() -> None:
    args = arguments(__doc__)
    uvloop.run(
        consume(
            args.url, args.queue, args.count, args.prefetch, args.stall, queue_type=args.queue_type
        )
    )


if __name__ == "__main__":
    main()
