"""A minimal raw aio-pika consumer: the baseline of bench/run.py.

Usage: python bench/consumer_aiopika.py --queue NAME --count N [--prefetch 64]

One channel with QoS ``--prefetch``, ``queue.consume(callback)``, and a callback that acks each
message; uvloop. It measures itself from the first delivery to the last ack and prints one
JSON line: ``{"count", "seconds", "cpu_seconds", "maxrss_kb"}``; the CPU time is the process's
own (all threads) between those two moments.
"""

from __future__ import annotations

import aio_pika
import uvloop
from selftimed import Tally, arguments


async def consume(url: str, queue_name: str, count: int, prefetch: int, stall: float) -> None:
    tally = Tally(count)
    connection = await aio_pika.connect(url)
    connection.close_callbacks.add(tally.connection_closed)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(queue_name, passive=True)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        tally.first()
        await message.ack()
        tally.finished()

    await queue.consume(on_message)
    await tally.wait(stall)
    tally.report()
    await connection.close()


def main() -> None:
    args = arguments(__doc__)
    uvloop.run(consume(args.url, args.queue, args.count, args.prefetch, args.stall))


if __name__ == "__main__":
    main()
