"""Time from SIGTERM to exit with a full prefetch window in flight and thousands queued.

Usage: python bench/shutdown.py [--queued 5000] [--concurrency 32] [--handler-delay 1.0]

The handler sleeps --handler-delay seconds, so the drain waits at most that long for the
handlers in flight; everything beyond it is mayhem's own shutdown cost.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "support"), str(HERE)]

import aio_pika  # noqa: E402
from mayhem_testing import DaemonProcess, declare, metric, publish, wait_until  # noqa: E402

from mayhem.config import Config  # noqa: E402


async def one_run(args: argparse.Namespace, db_dir: Path) -> tuple[float, float]:
    queue = f"bench-shutdown-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    config = Config.load(flags={"queue": queue, "exchange": queue}, environ={})
    try:
        await declare(connection, config)
        await publish(connection, queue, [b'{"host": "web-1"}'] * args.queued)
        daemon = DaemonProcess(
            [
                "--queue",
                queue,
                "--exchange",
                queue,
                "--handler",
                "bench_handlers:sleep",
                "--concurrency",
                str(args.concurrency),
                "--db-url",
                f"sqlite:///{db_dir / (queue + '.db')}",
            ],
            env={"BENCH_HANDLER_DELAY": str(args.handler_delay), "PYTHONPATH": str(HERE)},
        )
        daemon.env["PYTHONPATH"] += f":{HERE}:{HERE.parent}"
        await daemon.start()

        async def window_full() -> bool:
            return (
                await metric(daemon.metrics_addr, "mayhem_messages_in_flight") >= args.concurrency
            )

        await wait_until(window_full, timeout=30, interval=0.01)
        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = await daemon.wait(timeout=120)
        took = time.monotonic() - sent
        if code != 0:
            raise SystemExit(f"daemon exited {code}")
        drain = next(e for e in daemon.lines if "step 4/7" in e["event"])
        drain_s = float(drain["event"].split(" in ")[1].split(" s")[0])
        return took, drain_s
    finally:
        channel = await connection.channel()
        for name in (queue, f"{queue}.dead"):
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        for name in (queue, f"{queue}.dlx"):
            await channel.exchange_delete(name)
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--handler-delay", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        results = [await one_run(args, Path(tmp)) for _ in range(args.rounds)]
    totals = [t for t, _ in results]
    overheads = [t - d for t, d in results]
    print(
        f"SIGTERM to exit, {args.concurrency} in flight, {args.queued} queued, "
        f"handler {args.handler_delay:g} s: median {statistics.median(totals):.3f} s "
        f"(min {min(totals):.3f}, max {max(totals):.3f}); beyond waiting for handlers: "
        f"median {statistics.median(overheads):.3f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
