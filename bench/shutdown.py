"""Time from SIGTERM to exit with a full prefetch window in flight and thousands queued.

Usage: python bench/shutdown.py [--queued 5000] [--concurrency 32] [--handler-delay 1.0]
           [--daemons 1]

The handler sleeps --handler-delay seconds, so the drain waits at most that long for the
handlers in flight; everything beyond it is mayhem's own shutdown cost.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from common import sigterm_to_exit


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--handler-delay", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--daemons", type=int, default=1, help="daemons on the one queue")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            await sigterm_to_exit(
                args.queued, args.concurrency, args.handler_delay, Path(tmp), daemons=args.daemons
            )
            for _ in range(args.rounds)
        ]
    totals = [t for t, _ in results]
    overheads = [t - d for t, d in results]
    print(
        f"SIGTERM to exit, {args.daemons} daemon(s), {args.concurrency} in flight each, "
        f"{args.queued} queued, "
        f"handler {args.handler_delay:g} s: median {statistics.median(totals):.3f} s "
        f"(min {min(totals):.3f}, max {max(totals):.3f}); beyond waiting for handlers: "
        f"median {statistics.median(overheads):.3f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
