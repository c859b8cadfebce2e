"""What the self-timed consumers (raw aio-pika, FastStream) share; standard library only.

Each counts its messages with a :class:`Tally`, waits on it, and prints its result as one
JSON line on stdout; with ``--broker-pid``, the broker's CPU time over the same window too.
The tally fails the run when the broker connection is lost or no
message arrives for ``stall`` seconds, so a disturbed run ends at once instead of hanging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User plus system CPU seconds of another process (all threads), from /proc; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def arguments(description: str | None) -> argparse.Namespace:
    """The command line every self-timed consumer takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--stall", type=float, default=30, help="seconds without a message")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument(
        "--broker-pid", type=int, default=0, help="the broker's OS pid, to read its CPU time too"
    )
    args = parser.parse_args()
    Tally.broker_pid = args.broker_pid
    return args


class Tally:
    """Counts messages; marks the clock and the process's CPU time at the first and last.

    Args:
        count: how many messages make a run.
    """

    broker_pid = 0  # set from --broker-pid: its CPU time is read at the same two moments

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.marks: dict[str, float] = {}
        self.lost: str | None = None
        self.done = asyncio.Event()

    def first(self) -> None:
        """Call at the start of each message's handling."""
        if not self.marks:
            self.marks["t0"], self.marks["cpu0"] = time.monotonic(), time.process_time()
            self.marks["broker0"] = process_cpu(self.broker_pid) if self.broker_pid else 0.0

    def finished(self) -> None:
        """Call when a message is handled (acked, for the raw consumer)."""
        self.seen += 1
        if self.seen == self.count:
            self.marks["t1"], self.marks["cpu1"] = time.monotonic(), time.process_time()
            self.marks["broker1"] = process_cpu(self.broker_pid) if self.broker_pid else 0.0
            self.done.set()

    def connection_closed(self, *args: object) -> None:
        """A connection close callback: before the end, the run is void."""
        if not self.done.is_set():
            cause = next((a for a in args if isinstance(a, BaseException)), None)
            self.lost = str(cause) if cause else "closed"
            self.done.set()

    async def wait(self, stall: float) -> None:
        """Until the last message; raise if the connection is lost or messages stop coming."""
        progress, progress_at = self.seen, time.monotonic()
        while not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 1.0)
            if self.seen != progress:
                progress, progress_at = self.seen, time.monotonic()
            elif time.monotonic() - progress_at > stall:
                raise SystemExit(f"stalled at {self.seen}/{self.count} messages")
        if self.lost is not None:
            raise SystemExit(f"broker connection lost at {self.seen}/{self.count}: {self.lost}")

    def report(self) -> None:
        """The result line: messages, seconds and CPU seconds between first and last, peak RSS."""
        print(
            json.dumps(
                {
                    "count": self.count,
                    "seconds": self.marks["t1"] - self.marks["t0"],
                    "cpu_seconds": self.marks["cpu1"] - self.marks["cpu0"],
                    "broker_cpu_seconds": self.marks["broker1"] - self.marks["broker0"],
                    "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                }
            ),
            flush=True,
        )
