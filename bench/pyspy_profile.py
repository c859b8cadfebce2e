"""Where mayhem spends its time under load: a py-spy profile of a daemon draining a backlog.

Usage: .venv/bin/python bench/pyspy_profile.py [--messages 50000] [--seconds 8] [--top 15]
           [--handler bench_handlers:noop] [--db sqlite|postgresql] [--concurrency 32]
           [--prefetch 64] [--queue-type quorum|classic]

Pre-fills a fresh queue (as bench/run.py does), starts mayhem on it, and once the first
message is acked samples it with py-spy (``.venv/bin/py-spy record``, all threads, idle
ones excluded) for --seconds. Prints the functions with the most samples at the top of the
stack ("own time") and the most samples anywhere on the stack ("total"). Not part of
bench/run.py: the sampler itself slows the daemon down.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common import (
    PG_URL,
    bench_config,
    mayhem_daemon,
    outcomes,
    prefill,
    say,
    scrape,
    topology,
    wait_until,
)
from mayhem_testing import pg_schema

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

ROOT_SHARE = 0.95  # frames on at least this share of the stacks are the root chain
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def short(frame: str) -> str:
    """``function (path/to/pkg/file.py:123)`` as ``function (pkg/file.py)``."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{match['func']} ({file})"


def tally(raw: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Own and total samples per function from py-spy's raw (collapsed stacks) output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short(f) for f in stack.split(";")]
        # The first frames name the process and the thread, not code.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own, total, samples


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--handler", default="bench_handlers:noop", help="'demo' for the demo")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every non-idle thread, not only the one holding the GIL (then time "
        "blocked in SQLite's fsync counts too)",
    )
    parser.add_argument(
        "--native", action="store_true", help="include C frames (uvloop, sqlite3, asyncpg)"
    )
    parser.add_argument(
        "--keep", type=Path, help="also save py-spy's raw collapsed stacks there (flamegraph.pl)"
    )
    return parser.parse_args()


@dataclass(frozen=True)
class Profiled:
    """What to profile: the daemon's settings and py-spy's."""

    messages: int = 50_000
    seconds: float = 8
    top: int = 15
    handler: str = "bench_handlers:noop"
    db: str = "sqlite"
    concurrency: int = 32
    prefetch: int = 64
    queue_type: str = "quorum"
    rate: int = 250
    all_threads: bool = False
    native: bool = False
    keep: Path | None = None


async def profile(what: Profiled) -> str:
    """Pre-fill, start mayhem, sample it with py-spy; the summary as text.

    Raises:
        SystemExit: py-spy is missing or failed, or the daemon did not report its address.
    """
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    config = bench_config("bench-profile", queue_type=what.queue_type)
    with tempfile.TemporaryDirectory(prefix="mayhem-profile-") as tmp:
        async with topology(config) as connection, contextlib_schema(what.db) as pg_url:
            db_url = pg_url or f"sqlite:///{Path(tmp) / 'profile.db'}"
            say(f"pre-filling {what.messages:,} messages")
            await prefill(connection, config.queue, what.messages)
            handler = () if what.handler == "demo" else ("--handler", what.handler)
            daemon = mayhem_daemon(
                [
                    *("--queue", config.queue, "--exchange", config.exchange),
                    *("--queue-type", config.queue_type),
                    *handler,
                    *("--concurrency", str(what.concurrency), "--prefetch", str(what.prefetch)),
                    *("--db-url", db_url),
                ],
                env={"MAYHEM_DEMO_MAX_DELAY": "0"},
            )
            out = Path(tmp) / "profile.txt"
            try:
                await daemon.start()
                addr = daemon.metrics_addr
                if addr is None:
                    raise SystemExit("the daemon did not report its metrics address")

                async def consuming() -> bool:
                    return outcomes(await scrape(addr)).get("acked", 0) > 0

                await wait_until(consuming, timeout=60, interval=0.01)
                say(f"profiling pid {daemon.pid} for {what.seconds:g} s")
                began = time.monotonic()
                acked0 = outcomes(await scrape(addr)).get("acked", 0)
                spy = await asyncio.create_subprocess_exec(
                    py_spy,
                    "record",
                    *("--pid", str(daemon.pid), "--duration", str(max(1, round(what.seconds)))),
                    *("--rate", str(what.rate), "--format", "raw", "--output", str(out)),
                    *(() if what.all_threads else ("--gil",)),
                    *(("--native",) if what.native else ()),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                _, err = await spy.communicate()
                acked1 = outcomes(await scrape(addr)).get("acked", 0)
                rate = (acked1 - acked0) / (time.monotonic() - began)
                if spy.returncode != 0 or not out.exists():
                    raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
                await daemon.stop()
            finally:
                await daemon.kill()
            raw = out.read_text()
            if what.keep:
                what.keep.write_text(raw)
            own, total, samples = tally(raw)
    head = (
        f"mayhem {what.handler}, {what.db}, {what.queue_type} queue, concurrency "
        f"{what.concurrency}, prefetch {what.prefetch}: {samples} samples over "
        f"{what.seconds:g} s at {what.rate}/s "
        f"({'all non-idle threads' if what.all_threads else 'the thread holding the GIL'}); "
        f"{rate:,.0f} msg/s while sampled"
    )
    lines = [
        head,
        (
            f"{samples / (what.seconds * what.rate):.0%} of the possible samples were taken "
            "(py-spy leaves out idle threads; with --gil, below 100 % means the process "
            "waited the rest of the time: on I/O, or for a core)"
        ),
    ]
    # The frames under everything (runpy, cli, run_daemon, the loop's run) say nothing.
    roots = {frame for frame, count in total.items() if count >= ROOT_SHARE * samples}
    inner = collections.Counter({f: c for f, c in total.items() if f not in roots})
    for title, counter in (("own time", own), ("total (on the stack)", inner)):
        lines.append(f"\ntop {what.top} by {title}:")
        lines += [
            f"{100 * count / samples:6.1f}%  {frame}"
            for frame, count in counter.most_common(what.top)
        ]
    return "\n".join(lines)


async def main() -> None:
    args = parse_args()
    print(
        await profile(
            Profiled(
                messages=args.messages,
                seconds=args.seconds,
                top=args.top,
                handler=args.handler,
                db=args.db,
                concurrency=args.concurrency,
                prefetch=args.prefetch,
                queue_type=args.queue_type,
                rate=args.rate,
                all_threads=args.all_threads,
                native=args.native,
                keep=args.keep,
            )
        )
    )


def contextlib_schema(db: str) -> AbstractAsyncContextManager[str | None]:
    """A fresh PostgreSQL schema for ``postgresql``; nothing (``None``) for SQLite."""
    return pg_schema(PG_URL, "bench") if db == "postgresql" else contextlib.nullcontext()


if __name__ == "__main__":
    asyncio.run(main())
