"""mayhem's benchmark suite: every contender at its best, the ceiling, scale-out, memory, stop.

Usage: .venv/bin/python bench/run.py [--messages 20000] [--rounds 3] [--quick] [--large]

(``pip install -e '.[test,bench]'`` first: py-spy profiles a contender that misses a goal.)

In one run, each contender in its own process consuming a queue pre-filled with publisher
confirms and declared as mayhem declares it (durable, 200-byte persistent JSON messages with
unique ids, manual acks):

1. throughput, first message to last, on a quorum and on a classic queue, each contender at
   prefetch 64, 256 and 1024 (its best is reported), in alternating rounds: the ceiling (a
   bare pamqp protocol acking once per socket read, ``multiple=True``), raw aio-pika (an ack
   per message), FastStream, mayhem with a no-op handler and mayhem's demo handler through
   the PostgreSQL inbox; with the CPU time per message of the consumer process and of the
   broker (beam.smp) over the same window;
2. scale-out: 1, 2 and 4 mayhem daemons (demo handler, one shared PostgreSQL schema) on one
   queue of each type;
3. time from SIGTERM to exit of 3 daemons with their windows full and thousands queued;
4. mayhem's peak RSS as the backlog grows (10,000 and 100,000; with --large also 1,000,000);
5. when a goal is not met, a py-spy profile of the contender that missed it.

A default run takes about 20 minutes on a quiet 2-core machine (90 throughput runs: 2 queue
types x 3 prefetches x 5 contenders x 3 rounds), --large about 6 more, --quick about 3.
Run it on a quiet machine: other work shows up as noise, chiefly in the broker's CPU.

Progress goes to stderr, the results to stdout and bench/RESULTS.md (overwritten).
FastStream runs in its own virtualenv, bench/.venv-faststream, created on the first run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aio_pika
import asyncpg
from common import (
    AMQP_URL,
    HERE,
    PG_URL,
    ROOT,
    bench_config,
    broker_pid,
    cpu_seconds,
    mayhem_daemon,
    outcomes,
    prefill,
    say,
    scrape,
    sigterm_to_exit,
    status_kb,
    topology,
)
from mayhem_testing import pg_schema, rows
from pyspy_profile import Profiled, profile

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from mayhem_testing import DaemonProcess

    from mayhem.config import Config

FASTSTREAM_VENV: Final = HERE / ".venv-faststream"
FASTSTREAM_PACKAGES: Final = ("faststream[rabbit]", "uvloop")
RESULTS: Final = HERE / "RESULTS.md"
SETTLE: Final = 1.0  # seconds between pre-filling a queue and starting its consumer
STALL: Final = 30.0  # seconds without progress after which a run is abandoned
SCRAPE_COARSE: Final = 0.25  # longest pause between two /metrics polls of a daemon
SCRAPE_FINE: Final = 0.005  # shortest pause, near the first and the last message
RSS_FLAT: Final = 1.10  # "flat": peak RSS at the big backlog at most 10 % above the small one
CLIENT_BOUND: Final = 0.9  # a consumer busier than this share of one core is its own limit
BROKER_BOUND: Final = 0.9  # a consumer this close to the ceiling is held back by the broker
NOOP_CONCURRENCY_CAP: Final = 256
# The PostgreSQL pool is as large as the concurrency, and the server takes 100 connections.
PG_CONCURRENCY_CAP: Final = 32
SCALE_CONCURRENCY: Final = 16  # per daemon in the scale-out: 4 x 16 pool connections
SCALE_PREFETCH: Final = 128
SHUTDOWN_DAEMONS: Final = 3

CEILING, RAW, FASTSTREAM, NOOP, DEMO_PG = (
    "ceiling (bare pamqp protocol)",
    "raw aio-pika",
    "FastStream no-op",
    "mayhem no-op",
    "mayhem demo, PostgreSQL inbox",
)
CONTENDERS: Final = (CEILING, RAW, FASTSTREAM, NOOP, DEMO_PG)
SHORT: Final = dict(
    zip(("ceiling", "raw", "faststream", "noop", "demo-pg"), CONTENDERS, strict=True)
)
SCRIPTS: Final = {
    CEILING: "consumer_ceiling.py",
    RAW: "consumer_aiopika.py",
    FASTSTREAM: "consumer_faststream.py",
}
T = TypeVar("T")


def mayhem_concurrency(name: str, prefetch: int) -> int:
    """Mayhem's ``--concurrency`` at a prefetch: half the window, capped.

    Half, so that a window's worth of deliveries is always buffered behind the busy workers;
    capped at 256 for the no-op (more tasks only cost switching) and at 32 for the demo on
    PostgreSQL (one pool connection per worker; the server allows 100 in all).
    """
    cap = PG_CONCURRENCY_CAP if name == DEMO_PG else NOOP_CONCURRENCY_CAP
    return max(1, min(prefetch // 2, cap))


@dataclass
class Sample:
    """One consume run: how many messages over how long, and the CPU time it took."""

    count: int
    seconds: float
    cpu_seconds: float
    broker_cpu_seconds: float = 0.0
    prefill_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.count / self.seconds

    @property
    def cpu_us(self) -> float:
        """The consumer's CPU microseconds per message."""
        return self.cpu_seconds / self.count * 1e6

    @property
    def broker_us(self) -> float:
        """The broker's CPU microseconds per message."""
        return self.broker_cpu_seconds / self.count * 1e6

    @property
    def busy(self) -> float:
        """The consumer's CPU time over the wall time: cores it kept busy."""
        return self.cpu_seconds / self.seconds

    @property
    def broker_busy(self) -> float:
        """The broker's CPU time over the wall time: cores it kept busy."""
        return self.broker_cpu_seconds / self.seconds


@dataclass
class Tally:
    """A contender's samples and failures over the rounds, at one setting."""

    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, what: str) -> float | None:
        """The median of a :class:`Sample` property over the runs; ``None`` without runs."""
        values = [getattr(s, what) for s in self.samples]
        return statistics.median(values) if values else None


# (queue type, contender, prefetch) -> its runs
Key = tuple[str, str, int]
Tallies = dict[Key, Tally]
# A part of the suite's results, or why it has none.
SigtermResult = list[tuple[float, float]] | str
RssResult = list[tuple[int, Sample]] | str
ScaleResult = list[tuple[str, int, Sample | str]] | str


class DisturbedError(RuntimeError):
    """Something outside the benchmark got in the way (a broker restart): run it again."""


# -- the contenders --------------------------------------------------------------------------


async def run_script(
    args: argparse.Namespace, name: str, config: Config, n: int, prefetch: int
) -> Sample:
    """A consumer script that measures itself and prints one JSON line."""
    python = args.faststream_python if name == FASTSTREAM else Path(sys.executable)
    proc = await asyncio.create_subprocess_exec(
        str(python),
        str(HERE / SCRIPTS[name]),
        *("--url", AMQP_URL, "--queue", config.queue, "--count", str(n)),
        *("--prefetch", str(prefetch), "--stall", str(STALL)),
        *("--queue-type", config.queue_type, "--broker-pid", str(args.broker_pid or 0)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), STALL + n / 100)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{SCRIPTS[name]} exited {proc.returncode}: {' | '.join(tail)}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    # Intervals between the first and the last message: count - 1 of them.
    return Sample(
        count=result["count"] - 1,
        seconds=result["seconds"],
        cpu_seconds=result["cpu_seconds"],
        broker_cpu_seconds=result.get("broker_cpu_seconds", 0.0),
        extra={"maxrss_kb": result["maxrss_kb"]},
    )


@dataclass
class Reading:
    """One poll of daemons: when, how many acked, their CPU time and the broker's so far."""

    at: float
    acked: int
    cpu: float
    broker_cpu: float
    counts: dict[str, int]
    each: list[int] = field(default_factory=list)


class Watcher:
    """Polls daemons' /metrics and /proc entries (one daemon, or several on one queue).

    Args:
        daemons: started daemons.
        broker: the broker's pid, or ``None`` when it was not found.
    """

    def __init__(self, daemons: list[DaemonProcess], broker: int | None) -> None:
        self.targets = []
        for daemon in daemons:
            if daemon.metrics_addr is None:
                raise RuntimeError("the daemon did not report its metrics address")
            self.targets.append((daemon.pid, daemon.metrics_addr))
        self.broker = broker
        self.scrapes = 0
        self.rss_max_kb = 0

    async def read(self) -> Reading:
        """Scrape each daemon once; the time is the middle of the requests."""
        before = time.monotonic()
        scraped = await asyncio.gather(*(scrape(addr) for _, addr in self.targets))
        after = time.monotonic()
        self.scrapes += 1
        total: dict[str, int] = {}
        each, cpu = [], 0.0
        for (pid, _), samples in zip(self.targets, scraped, strict=True):
            if samples.get("mayhem_broker_reconnects_total", 0) > 0:
                raise DisturbedError("mayhem's broker connection dropped and was re-established")
            if samples.get("mayhem_database_outages_total", 0) > 0:
                raise DisturbedError("mayhem's database went away during the run")
            self.rss_max_kb = max(self.rss_max_kb, status_kb(pid, "VmRSS"))
            counts = outcomes(samples)
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value
            each.append(counts.get("acked", 0))
            cpu += cpu_seconds(pid)
        broker = cpu_seconds(self.broker) if self.broker else 0.0
        return Reading((before + after) / 2, sum(each), cpu, broker, total, each)

    async def first(self) -> Reading:
        """The first reading with a message acked by every daemon, polled finely."""
        began = time.monotonic()
        while not all((reading := await self.read()).each):
            if time.monotonic() - began > STALL:
                raise RuntimeError(f"not every daemon acked within {STALL:g} s: {reading.each}")
            await asyncio.sleep(SCRAPE_FINE)
        return reading

    async def last(self, first: Reading, n: int) -> Reading:
        """The first reading with ``n`` acked: coarse polls, finer as the end nears."""
        progress = first
        while (reading := await self.read()).acked < n:
            if reading.acked > progress.acked:
                progress = reading
            elif reading.at - progress.at > STALL:
                raise RuntimeError(f"stalled at {reading.acked}/{n} acked: {reading.counts}")
            rate = (reading.acked - first.acked) / (reading.at - first.at)
            pause = (n - reading.acked) / rate / 2 if rate else SCRAPE_COARSE
            await asyncio.sleep(min(SCRAPE_COARSE, max(SCRAPE_FINE, pause)))
        return reading


async def follow_daemons(daemons: list[DaemonProcess], n: int, broker: int | None) -> Sample:
    """Watch daemons consume ``n`` messages from one queue, from outside; then stop them.

    Each daemon's ``mayhem_messages_total{outcome="acked"}`` is polled on /metrics, finely
    (every 5 ms) until every daemon has acked a message and again as the end nears, coarsely
    (every 250 ms) in between so the polling costs the daemons little. The rate is the
    messages acked between the first reading where all daemons are consuming and the reading
    that reaches ``n``, over the time between them; the CPU times (utime + stime of all
    threads, /proc/<pid>/stat; the daemons' summed, and the broker's) are read at the same
    two moments.
    """
    watcher = Watcher(daemons, broker)
    first = await watcher.first()
    last = await watcher.last(first, n)
    hwm = max(status_kb(daemon.pid, "VmHWM") for daemon in daemons)
    codes = await asyncio.gather(*(daemon.stop(timeout=120) for daemon in daemons))
    if any(codes):
        raise RuntimeError(f"mayhem exited {codes} after the run")
    return Sample(
        count=last.acked - first.acked,
        seconds=last.at - first.at,
        cpu_seconds=last.cpu - first.cpu,
        broker_cpu_seconds=last.broker_cpu - first.broker_cpu,
        extra={
            "hwm_kb": hwm,
            "rss_max_kb": watcher.rss_max_kb,
            "scrapes": watcher.scrapes,
            "acked_at_first_reading": first.acked,
            "acked_each": last.each,
            "other_outcomes": {k: v for k, v in last.counts.items() if k != "acked" and v},
        },
    )


@dataclass(frozen=True)
class Setting:
    """How mayhem runs: handler (``None``: the demo), database, concurrency, prefetch, daemons."""

    handler: str | None
    db: str
    concurrency: int
    prefetch: int
    daemons: int = 1


async def run_mayhem(args: argparse.Namespace, n: int, queue_type: str, setting: Setting) -> Sample:
    """Pre-fill a fresh queue with ``n`` messages, then let mayhem daemons consume them."""
    config = bench_config("bench-mayhem", queue_type=queue_type)
    async with contextlib.AsyncExitStack() as stack:
        connection = await stack.enter_async_context(topology(config))
        if setting.db == "postgresql":
            db_url = await stack.enter_async_context(pg_schema(PG_URL, "bench"))
        else:
            path = args.tmp / (config.queue + ".db")
            db_url = f"sqlite:///{path}"
            for suffix in ("", "-wal", "-shm"):
                stack.callback(Path(f"{path}{suffix}").unlink, missing_ok=True)
        took = await prefill(connection, config.queue, n)
        await asyncio.sleep(SETTLE)
        source = source_digest()
        daemons = [
            mayhem_daemon(
                [
                    *("--queue", config.queue, "--exchange", config.exchange),
                    *("--queue-type", config.queue_type),
                    *(("--handler", setting.handler) if setting.handler else ()),
                    *("--concurrency", str(setting.concurrency)),
                    *("--prefetch", str(setting.prefetch)),
                    *("--db-url", db_url),
                ],
                env=None if setting.handler else {"MAYHEM_DEMO_MAX_DELAY": "0"},
            )
            for _ in range(setting.daemons)
        ]
        try:
            try:
                await asyncio.gather(*(daemon.start() for daemon in daemons))
            except (TimeoutError, EOFError) as exc:
                tail = " | ".join(daemons[0].raw[-3:]) or "no output"
                raise RuntimeError(f"mayhem did not start ({type(exc).__name__}): {tail}") from None
            sample = await follow_daemons(daemons, n, args.broker_pid)
        finally:
            for daemon in daemons:
                await daemon.kill()
        if setting.handler is None:
            # The demo's effects: one row per message, never two (the inbox is shared).
            found = await rows(db_url, "SELECT count(*), count(DISTINCT message_id) FROM restarts")
            sample.extra["effects"], sample.extra["distinct_effects"] = found[0]
        sample.prefill_seconds = took
        sample.extra["source"] = source
        return sample


def source_digest() -> str:
    """A digest of mayhem's source as it is now: others may change it while the suite runs."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "mayhem").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


async def run_contender(
    args: argparse.Namespace, name: str, n: int, queue_type: str, prefetch: int
) -> Sample:
    """One run of a contender on a fresh queue of ``n`` messages."""
    if name in {NOOP, DEMO_PG}:
        setting = Setting(
            handler="bench_handlers:noop" if name == NOOP else None,
            db="sqlite" if name == NOOP else "postgresql",
            concurrency=mayhem_concurrency(name, prefetch),
            prefetch=prefetch,
        )
        return await run_mayhem(args, n, queue_type, setting)
    config = bench_config("bench-self", queue_type=queue_type)
    async with topology(config) as connection:
        took = await prefill(connection, config.queue, n)
        await asyncio.sleep(SETTLE)
        sample = await run_script(args, name, config, n, prefetch)
        sample.prefill_seconds = took
        return sample


# -- FastStream's virtualenv -----------------------------------------------------------------


def faststream_python() -> tuple[Path | None, str]:
    """The FastStream virtualenv's python, created on first use; or ``None`` and why not."""
    python = FASTSTREAM_VENV / "bin" / "python"
    if not python.exists():
        say(f"creating {FASTSTREAM_VENV.relative_to(ROOT)} for FastStream (first run only)")
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(FASTSTREAM_VENV)], check=True, timeout=300
            )
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", *FASTSTREAM_PACKAGES],
                check=True,
                timeout=900,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            return None, f"cannot create its virtualenv: {exc}"
    check = subprocess.run(
        [str(python), "-c", "import faststream.rabbit, uvloop"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if check.returncode != 0:
        reason = (check.stderr.strip().splitlines() or ["import failed"])[-1]
        return None, f"{FASTSTREAM_VENV.name} is broken ({reason}); delete it to rebuild it"
    return python, ""


def versions(python: Path | None, names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``names`` in this interpreter or in ``python``'s environment."""
    if python is None:
        found = {}
        for name in names:
            try:
                found[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                found[name] = "not installed"
        return found
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return 'not installed'\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    done = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=True, timeout=60
    )
    return dict(json.loads(done.stdout))


# -- the parts of a run ----------------------------------------------------------------------


def rotated(items: tuple[str, ...], by: int) -> tuple[str, ...]:
    """``items`` starting at ``by``: each round puts another contender first."""
    by %= len(items) or 1
    return items[by:] + items[:by]


async def throughput(args: argparse.Namespace) -> Tallies:
    tallies: Tallies = {
        (q, name, p): Tally()
        for q in args.queue_types
        for name in args.contenders
        for p in args.prefetches
    }
    for round_ in range(1, args.rounds + 1):
        for queue_type in args.queue_types:
            for prefetch in args.prefetches:
                for name in rotated(args.contenders, round_ - 1):
                    key = (queue_type, name, prefetch)
                    if name == FASTSTREAM and args.faststream_python is None:
                        if not tallies[key].failures:
                            tallies[key].failures.append(args.faststream_missing)
                        continue
                    say(
                        f"round {round_}/{args.rounds}, {queue_type}, prefetch {prefetch}: "
                        f"{name}, {args.messages:,} messages"
                    )
                    try:
                        sample = await measure(
                            args,
                            f"round {round_}, {queue_type}, prefetch {prefetch}, {name}",
                            lambda k=key: run_contender(args, k[1], args.messages, k[0], k[2]),
                        )
                    except Exception as exc:
                        say(f"  failed: {why(exc)}")
                        tallies[key].failures.append(f"round {round_}: {why(exc)}")
                        continue
                    tallies[key].samples.append(sample)
                    say(f"  {summary(sample)}{details(sample)}")
    return tallies


def summary(sample: Sample) -> str:
    return (
        f"{sample.rate:,.0f} msg/s, {sample.cpu_us:.0f} µs CPU/message "
        f"({sample.busy:.2f} cores), broker {sample.broker_us:.0f} µs/message "
        f"({sample.broker_busy:.2f} cores)"
    )


def best(tallies: Tallies, queue_type: str, name: str) -> tuple[int, Tally] | None:
    """A contender's best prefetch on a queue type (highest median msg/s), and its runs."""
    found = [
        (tally.median("rate") or 0.0, prefetch, tally)
        for (q, n, prefetch), tally in tallies.items()
        if q == queue_type and n == name and tally.samples
    ]
    if not found:
        return None
    _, prefetch, tally = max(found, key=lambda item: item[0])
    return prefetch, tally


async def scale_out(args: argparse.Namespace) -> list[tuple[str, int, Sample | str]]:
    found: list[tuple[str, int, Sample | str]] = []
    for queue_type in args.queue_types:
        for daemons in args.scale_daemons:
            say(
                f"scale-out: {daemons} daemon(s), demo handler on one PostgreSQL schema, "
                f"{queue_type} queue, {args.messages:,} messages"
            )
            setting = Setting(
                handler=None,
                db="postgresql",
                concurrency=SCALE_CONCURRENCY,
                prefetch=SCALE_PREFETCH,
                daemons=daemons,
            )
            try:
                sample = await measure(
                    args,
                    f"scale-out, {daemons} daemons, {queue_type}",
                    lambda q=queue_type, s=setting: run_mayhem(args, args.messages, q, s),
                )
            except Exception as exc:
                say(f"  failed: {why(exc)}")
                found.append((queue_type, daemons, f"failed: {why(exc)}"))
                continue
            say(f"  {summary(sample)}{details(sample)}")
            found.append((queue_type, daemons, sample))
    return found


async def shutdown_timing(args: argparse.Namespace) -> list[tuple[float, float]]:
    runs = []
    for i in range(1, args.sigterm_rounds + 1):
        say(
            f"SIGTERM to exit {i}/{args.sigterm_rounds}: {SHUTDOWN_DAEMONS} daemons, "
            f"{args.sigterm_queued} queued, {args.sigterm_concurrency} in flight each, "
            f"handler {args.handler_delay:g} s"
        )
        took, drain = await sigterm_to_exit(
            args.sigterm_queued,
            args.sigterm_concurrency,
            args.handler_delay,
            args.tmp,
            daemons=SHUTDOWN_DAEMONS,
        )
        say(f"  {took:.3f} s (longest drain {drain:.3f} s)")
        runs.append((took, drain))
    return runs


async def rss_growth(args: argparse.Namespace) -> list[tuple[int, Sample]]:
    found = []
    setting = Setting("bench_handlers:noop", "sqlite", args.rss_prefetch // 2, args.rss_prefetch)
    for backlog in args.rss_backlogs:
        say(f"peak RSS: mayhem no-op against a backlog of {backlog:,} messages")
        sample = await measure(
            args,
            f"peak RSS, backlog {backlog:,}",
            lambda backlog=backlog: run_mayhem(args, backlog, "quorum", setting),
        )
        say(
            f"  VmHWM {sample.extra['hwm_kb'] / 1024:.1f} MiB, {sample.rate:,.0f} msg/s"
            f"{details(sample)}"
        )
        found.append((backlog, sample))
    return found


async def profiles(args: argparse.Namespace, missed: list[tuple[str, str, int]]) -> list[str]:
    """A py-spy profile of each contender that missed a goal, at its best setting."""
    out: list[str] = []
    for name, queue_type, prefetch in missed:
        what = Profiled(
            messages=args.profile_messages,
            seconds=args.profile_seconds,
            handler="bench_handlers:noop" if name == NOOP else "demo",
            db="sqlite" if name == NOOP else "postgresql",
            concurrency=mayhem_concurrency(name, prefetch),
            prefetch=prefetch,
            queue_type=queue_type,
        )
        say(f"profiling {name} on a {queue_type} queue at prefetch {prefetch} (a goal missed)")
        try:
            text = await profile(what)
        except (Exception, SystemExit) as exc:
            text = f"not profiled: {why(exc)}"
        out += [f"### {name}, {queue_type} queue, prefetch {prefetch}", "", "```", text, "```", ""]
    return out


async def broker_ready(timeout: float = 120) -> None:
    """Wait until the broker accepts a connection again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(AMQP_URL, timeout=5)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)
        else:
            await connection.close()
            return


async def measure(
    args: argparse.Namespace, what: str, run: Callable[[], Awaitable[Sample]]
) -> Sample:
    """Run once; after a failure (say, another process restarted the broker) once more."""
    try:
        return await run()
    except Exception as exc:
        say(f"  failed: {why(exc)}; running it once more")
        args.notes.append(f"{what}: {why(exc)}; run again")
        await broker_ready()
        return await run()


def details(sample: Sample) -> str:
    """What else a run found: the pre-fill time, and for mayhem how it was watched."""
    text = f" (pre-filled in {sample.prefill_seconds:.1f} s"
    if "scrapes" in sample.extra:
        text += (
            f"; {sample.extra['acked_at_first_reading']} acked at the first reading, "
            f"{sample.extra['scrapes']} scrapes"
        )
    if "effects" in sample.extra:
        text += f"; {sample.extra['effects']} effects"
    if sample.extra.get("other_outcomes"):
        text += f"; other outcomes: {sample.extra['other_outcomes']}"
    return text + ")"


async def guarded(what: str, part: Callable[[], Awaitable[T]]) -> T | str:
    """Run one part of the suite; on failure, say so and return why."""
    try:
        return await part()
    except Exception as exc:
        say(f"{what} failed: {why(exc)}")
        return f"failed: {why(exc)}"


def machine() -> dict[str, str]:
    info = {
        "cores (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor() or "unknown",
        ),
        "memory": next(
            (
                f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")
            ),
            "unknown",
        ),
        "kernel": platform.release(),
    }
    with contextlib.suppress(Exception):
        info["temp dir filesystem"] = subprocess.run(
            ["stat", "-f", "-c", "%T", tempfile.gettempdir()],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    with contextlib.suppress(Exception):
        info["mayhem checkout"] = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    return info


async def servers() -> dict[str, str]:
    found = {}
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(AMQP_URL)
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        found["RabbitMQ"] = str(props.get("version", "unknown"))
        await connection.close()
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(PG_URL)
        found["PostgreSQL"] = str(await conn.fetchval("SHOW server_version"))
        await conn.close()
    return found


# -- the report ------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ",.0f") -> str:
    """A number for the report; a ``.2f`` one is a ratio and gets its ``x``."""
    if value is None:
        return "n/a"
    return format(value, spec) + ("x" if spec == ".2f" else "")


def why(exc: BaseException) -> str:
    """An exception on one line, its type always named."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def goal(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**not met**")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def sweep_table(args: argparse.Namespace, tallies: Tallies, queue_type: str) -> list[str]:
    lines = [
        (
            "| contender | prefetch | mayhem concurrency | median msg/s | min | max "
            "| CPU µs/msg | consumer cores busy | broker CPU µs/msg | broker cores busy | runs |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.contenders:
        for prefetch in args.prefetches:
            tally = tallies[queue_type, name, prefetch]
            conc = str(mayhem_concurrency(name, prefetch)) if name in {NOOP, DEMO_PG} else ""
            rates = [s.rate for s in tally.samples]
            if not rates:
                reason = "; ".join(tally.failures) or "no run"
                lines.append(f"| {name} | {prefetch} | {conc} | {reason} | | | | | | | 0 |")
                continue
            lines.append(
                f"| {name} | {prefetch} | {conc} | {fmt(tally.median('rate'))} "
                f"| {fmt(min(rates))} | {fmt(max(rates))} | {fmt(tally.median('cpu_us'))} "
                f"| {fmt(tally.median('busy'), '.2f').rstrip('x')} "
                f"| {fmt(tally.median('broker_us'))} "
                f"| {fmt(tally.median('broker_busy'), '.2f').rstrip('x')} "
                f"| {len(rates)}/{args.rounds} |"
            )
    failed = [
        (name, p, f)
        for (q, name, p), t in tallies.items()
        if q == queue_type and t.samples
        for f in t.failures
    ]
    lines += [f"\nFailed run of {n} at prefetch {p}: {f}" for n, p, f in failed]
    return lines


def best_table(args: argparse.Namespace, tallies: Tallies, queue_type: str) -> list[str]:
    raw, ceiling = best(tallies, queue_type, RAW), best(tallies, queue_type, CEILING)
    raw_rate = raw[1].median("rate") if raw else None
    raw_cpu = raw[1].median("cpu_us") if raw else None
    ceiling_rate = ceiling[1].median("rate") if ceiling else None
    lines = [
        (
            "| contender | best prefetch | median msg/s | x best raw aio-pika | x ceiling "
            "| CPU µs/msg | CPU x raw | broker CPU µs/msg | consumer cores busy | limited by |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in args.contenders:
        found = best(tallies, queue_type, name)
        if found is None:
            lines.append(f"| {name} | not measured | | | | | | | | |")
            continue
        prefetch, tally = found
        rate, cpu, busy = tally.median("rate"), tally.median("cpu_us"), tally.median("busy")
        bound = limited_by(rate, busy, ceiling_rate)
        lines.append(
            f"| {name} | {prefetch} | {fmt(rate)} | {fmt(ratio(rate, raw_rate), '.2f')} "
            f"| {fmt(ratio(rate, ceiling_rate), '.2f')} | {fmt(cpu)} "
            f"| {fmt(ratio(cpu, raw_cpu), '.2f')} | {fmt(tally.median('broker_us'))} "
            f"| {fmt(busy, '.2f').rstrip('x')} | {bound} |"
        )
    return lines


def limited_by(rate: float | None, busy: float | None, ceiling_rate: float | None) -> str:
    """What holds a contender back: the broker, its own CPU, or its own waiting.

    Within 10 % of the ceiling, no client could do better on this broker: the broker is the
    limit. Below that the client is; one busy near a full core spends its CPU (a Python
    consumer runs on one thread), one below waits on something of its own making (its inbox
    commits, its ack round trips, its event loop's scheduling) or for a core.
    """
    if rate and ceiling_rate and rate >= BROKER_BOUND * ceiling_rate:
        return "the broker"
    if (busy or 0) >= CLIENT_BOUND:
        return "the client's CPU"
    return "the client's waits"


def limit_text(tallies: Tallies, queue_type: str) -> str:
    """Says plainly whether the broker or the client limits consumption on this queue type."""
    raw, ceiling = best(tallies, queue_type, RAW), best(tallies, queue_type, CEILING)
    if raw is None or ceiling is None:
        return "Where the limit is: not measured (the ceiling or raw aio-pika has no run)."
    c = ceiling[1]
    c_rate, r_rate = c.median("rate") or 0.0, raw[1].median("rate") or 0.0
    busy, broker_busy = c.median("busy") or 0.0, c.median("broker_busy") or 0.0
    cores = len(os.sched_getaffinity(0))
    text = (
        f"Where the limit is, on a {queue_type} queue: the ceiling reaches {c_rate:,.0f} msg/s, "
        f"{c_rate / r_rate:.2f}x the best raw aio-pika. At the ceiling the consumer keeps "
        f"{busy:.2f} of a core busy and the broker {broker_busy:.2f} of the machine's {cores} "
        f"cores ({c.median('broker_us') or 0:.0f} µs of broker CPU per message): that rate is "
        "what this broker can deliver, so it bounds every client. "
    )
    if r_rate >= BROKER_BOUND * c_rate:
        text += (
            "Raw aio-pika is within 10 % of it: **here the broker, not the client, is the "
            "limit**, and msg/s cannot tell the clients apart; their CPU per message can."
        )
    else:
        text += (
            "Every contender below 90 % of the ceiling is limited by its own client, not by "
            "the broker (the `limited by` column)."
        )
    if busy + broker_busy >= 0.9 * cores:
        text += (
            f" At the ceiling consumer and broker use {busy + broker_busy:.2f} of {cores} "
            "cores: the machine is saturated, and every CPU µs a client spends is taken "
            "from the broker."
        )
    return text


def why_missed(tallies: Tallies, goal_text: str, name: str, queue_type: str, other: str) -> str:
    """One line on a missed goal: what CPU per message alone allows, and how busy it was."""
    found, theirs = best(tallies, queue_type, name), best(tallies, queue_type, other)
    if found is None or theirs is None:
        return f"- {goal_text}: not enough runs to say."
    tally, other_tally = found[1], theirs[1]
    cpu, busy = tally.median("cpu_us") or 0.0, tally.median("busy") or 0.0
    other_cpu = other_tally.median("cpu_us") or 0.0
    cap = 1e6 / cpu if cpu else 0.0
    other_rate = other_tally.median("rate") or 0.0
    return (
        f"- {goal_text}: {name} spends {cpu:.0f} µs of CPU per message against {other}'s "
        f"{other_cpu:.0f} µs; on one core that alone caps it at {cap:,.0f} msg/s "
        f"({cap / other_rate:.2f}x {other}'s {other_rate:,.0f}) if it never waited. It kept "
        f"{busy:.2f} of a core busy: "
        + (
            "its own CPU is the limit."
            if busy >= CLIENT_BOUND
            else f"the other {1 - busy:.0%} of the time it waited (for its database commits, "
            "the broker, or a core)."
        )
    )


def goals_section(  # noqa: C901 -- one table, one row per goal
    args: argparse.Namespace, tallies: Tallies, sigterm: SigtermResult, rss: RssResult
) -> tuple[list[str], list[tuple[str, str, int]]]:
    """The goals table, and the (contender, queue type, prefetch) that missed one."""
    lines = ["| goal | measured | verdict |", "|---|---|---|"]
    missed: list[tuple[str, str, int]] = []
    reasons: list[str] = []

    def rate_of(queue_type: str, name: str) -> tuple[float | None, float | None, int]:
        found = best(tallies, queue_type, name)
        if found is None:
            return None, None, 0
        return found[1].median("rate"), found[1].median("cpu_us"), found[0]

    def check(
        text: str, name: str, queue_type: str, other: str, target: float, *, what: str = "rate"
    ) -> None:
        rate, cpu, prefetch = rate_of(queue_type, name)
        o_rate, o_cpu, _ = rate_of(queue_type, other)
        if what == "rate":
            value, shown = ratio(rate, o_rate), f"({fmt(rate)} vs {fmt(o_rate)} msg/s)"
            met = None if value is None else value >= target
        else:
            value, shown = ratio(cpu, o_cpu), f"({fmt(cpu)} vs {fmt(o_cpu)} µs)"
            met = None if value is None else value <= target
        lines.append(f"| {text} | {fmt(value, '.2f')} {shown} | {goal(met)} |")
        if met is False:
            missed.append((name, queue_type, prefetch))
            reasons.append(why_missed(tallies, text, name, queue_type, other))

    if "classic" in args.queue_types:
        check("mayhem no-op >= 1.3x best raw aio-pika, classic", NOOP, "classic", RAW, 1.3)
    if "quorum" in args.queue_types:
        check("mayhem no-op >= 1.0x best raw aio-pika, quorum", NOOP, "quorum", RAW, 1.0)
    for queue_type in args.queue_types:
        check(f"mayhem no-op >= 0.8x the ceiling, {queue_type}", NOOP, queue_type, CEILING, 0.8)
    for queue_type in args.queue_types:
        check(
            f"mayhem no-op CPU per message <= 0.5x raw aio-pika's, {queue_type}",
            NOOP,
            queue_type,
            RAW,
            0.5,
            what="cpu",
        )
    if "quorum" in args.queue_types:
        check(
            "demo handler, PostgreSQL inbox >= 0.5x best raw aio-pika, quorum",
            DEMO_PG,
            "quorum",
            RAW,
            0.5,
        )
    if isinstance(sigterm, list) and sigterm:
        worst = max(t for t, _ in sigterm)
        limit = 1.0 + args.handler_delay
        lines.append(
            f"| SIGTERM to exit of {SHUTDOWN_DAEMONS} daemons < 1 s + the longest handler "
            f"({args.handler_delay:g} s) | worst of {len(sigterm)}: {worst:.3f} s "
            f"(limit {limit:g} s) | {goal(worst < limit)} |"
        )
    else:
        lines.append(f"| SIGTERM to exit < 1 s + the longest handler | {sigterm} | not measured |")
    if isinstance(rss, list) and len(rss) >= 2:
        (small, s_small), (big, s_big) = rss[0], rss[-1]
        growth = s_big.extra["hwm_kb"] / s_small.extra["hwm_kb"]
        lines.append(
            f"| peak RSS flat from a backlog of {small:,} to {big:,} "
            f"(at most {RSS_FLAT:.2f}x) | {growth:.2f}x "
            f"({s_small.extra['hwm_kb'] / 1024:.1f} -> {s_big.extra['hwm_kb'] / 1024:.1f} MiB) "
            f"| {goal(growth <= RSS_FLAT)} |"
        )
    else:
        lines.append(f"| peak RSS flat as the backlog grows | {rss} | not measured |")
    if reasons:
        lines += [
            "",
            "Why, from the measurements (the profiles at the end say where the time goes):",
        ]
        lines += ["", *reasons]
    return lines, list(dict.fromkeys(missed))


def scale_section(scale: ScaleResult) -> list[str]:
    if not isinstance(scale, list) or not scale:
        return [f"Not measured: {scale}"]
    lines = [
        (
            f"N mayhem daemons on one queue, each `--concurrency {SCALE_CONCURRENCY} --prefetch "
            f"{SCALE_PREFETCH}`, the demo handler (`MAYHEM_DEMO_MAX_DELAY=0`) with the inbox in "
            "one PostgreSQL schema shared by all N (so a message is applied once whichever "
            "daemon gets it). Timed from the first reading where every daemon has acked a "
            "message to the reading where all are acked; one run each."
        ),
        "",
        (
            "| queue | daemons | msg/s | x 1 daemon | CPU µs/msg (all daemons) "
            "| broker CPU µs/msg | acked by each | effects (distinct) |"
        ),
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    single: dict[str, float] = {}
    for queue_type, daemons, sample in scale:
        if not isinstance(sample, Sample):
            lines.append(f"| {queue_type} | {daemons} | {sample} | | | | | |")
            continue
        if daemons == 1:
            single[queue_type] = sample.rate
        lines.append(
            f"| {queue_type} | {daemons} | {sample.rate:,.0f} "
            f"| {fmt(ratio(sample.rate, single.get(queue_type)), '.2f')} "
            f"| {sample.cpu_us:.0f} | {sample.broker_us:.0f} "
            f"| {', '.join(f'{n:,}' for n in sample.extra['acked_each'])} "
            f"| {sample.extra.get('effects', 0):,} "
            f"({sample.extra.get('distinct_effects', 0):,}) |"
        )
    return lines


def setting_lines(args: argparse.Namespace) -> list[str]:
    return [
        (
            f"- {args.messages:,} messages per run, {args.rounds} round(s); in each round every "
            f"queue type ({', '.join(args.queue_types)}) and prefetch "
            f"({', '.join(map(str, args.prefetches))}), and at each of them every contender in "
            "turn, the first contender rotating from round to round; each contender a "
            "separate process. A contender's best prefetch is the one with the highest median."
        ),
        (
            "- Each run gets a fresh queue declared by `mayhem.broker.declare_topology` "
            "(durable, `x-queue-type` quorum or classic, dead-letter arguments as mayhem sets "
            "them), pre-filled through the default exchange with publisher confirms: 200-byte "
            "JSON bodies with a `host` key, `content_type` application/json, a unique "
            f"`message_id`, persistent; then {SETTLE:g} s of rest before the consumer starts. "
            "Queues, exchanges and schemas are deleted after each run."
        ),
        (
            "- ceiling (`bench/consumer_ceiling.py`): an `asyncio.Protocol` on uvloop that "
            "speaks AMQP through pamqp only for the handshake, then counts complete messages "
            "in each socket read and acks them all with one `basic.ack multiple=True` per read;"
            " no handler, no message object. The fastest consumer this machine can run."
        ),
        (
            "- raw aio-pika (`bench/consumer_aiopika.py`): `aio_pika.connect`, "
            "`channel.set_qos(prefetch)`, `queue.consume(callback)`, the callback awaits "
            "`message.ack()` (one ack per message); uvloop."
        ),
        (
            "- FastStream (`bench/consumer_faststream.py`): `RabbitBroker` with "
            "`Channel(prefetch_count=prefetch)`, `RabbitQueue(declare=False)`, a no-op "
            "`async def` subscriber taking the decoded JSON body, ack after the handler "
            "returns, access log off; uvloop; in its own virtualenv."
        ),
        (
            "- mayhem no-op: `mayhem run --handler bench_handlers:noop --prefetch P "
            f"--concurrency C` with C = P/2 capped at {NOOP_CONCURRENCY_CAP}, the inbox on "
            "SQLite (WAL, synchronous=FULL) in a temp dir; mayhem demo: no `--handler` (parse "
            "the JSON, insert a row in `restarts`), `MAYHEM_DEMO_MAX_DELAY=0`, the inbox on "
            f"PostgreSQL (a fresh schema), C = P/2 capped at {PG_CONCURRENCY_CAP} (one pool "
            "connection per worker; the server allows 100). uvloop, metrics and health "
            "endpoint on 127.0.0.1, JSON logs at INFO."
        ),
        (
            "- Throughput is first message to last. The scripts time themselves (monotonic "
            "clock at the first delivery and after the last ack; rate = (N - 1) / elapsed). "
            'mayhem is timed from outside: `mayhem_messages_total{outcome="acked"}` is polled '
            "on /metrics every 5 ms until the first non-zero reading and again near the end, "
            "every 250 ms at most in between; rate = messages acked between the first non-zero "
            "reading and the reading that reaches N, over the time between the two readings."
        ),
        (
            "- CPU per message is the consumer process's CPU time (user + system, all threads) "
            "between those two moments over the messages in between: `time.process_time()` in "
            "the scripts, /proc/<pid>/stat for mayhem. The broker's CPU per message is "
            "beam.smp's utime + stime (/proc/<pid>/stat; the process listening on the AMQP "
            "port) read at the same two moments. `cores busy` is CPU time over wall time. "
            "PostgreSQL's CPU is not counted. Other work on the machine adds to the broker's."
        ),
        "- Ratios are ratios of medians, within this run.",
    ]


def report(
    args: argparse.Namespace,
    meta: dict[str, Any],
    *,
    tallies: Tallies,
    scale: ScaleResult,
    sigterm: SigtermResult,
    rss: RssResult,
    goals: list[str],
    profiled: list[str],
) -> str:
    out = [
        "# mayhem benchmark results",
        "",
        (
            f"Written by `{meta['command']}` on {meta['date']} (UTC), "
            f"in {meta['elapsed'] / 60:.1f} minutes. Overwritten by every run."
        ),
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in meta["machine"].items()),
        (
            f"- load average (1, 5, 15 min) before: {meta['load_before']}, "
            f"after: {meta['load_after']} (other work on the machine adds noise)"
        ),
        (
            f"- mayhem's source (sha256 of mayhem/**/*.py, first 12 digits): "
            f"{meta['source_before']} at the start, {meta['source_after']} at the end"
            + (
                " (**changed during the run**)"
                if meta["source_before"] != meta["source_after"]
                else ""
            )
        ),
        f"- Python {meta['python']}",
        f"- mayhem's virtualenv: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        (
            f"- FastStream's virtualenv: "
            f"{', '.join(f'{k} {v}' for k, v in meta['fs_versions'].items()) or 'not available'}"
        ),
        *(f"- {k} {v}" for k, v in meta["servers"].items()),
        f"- broker process (beam.smp) for its CPU time: {meta['broker']}",
        "",
        "## Setting",
        "",
        *setting_lines(args),
        "",
        "## Goals",
        "",
        *goals,
        "",
    ]
    if "throughput" in args.only:
        for queue_type in args.queue_types:
            out += [
                f"## Throughput, {queue_type} queue",
                "",
                "### Each contender at its best prefetch",
                "",
                *best_table(args, tallies, queue_type),
                "",
                limit_text(tallies, queue_type),
                "",
                "### Every prefetch",
                "",
                *sweep_table(args, tallies, queue_type),
                "",
            ]
    out += ["## Scale-out: N daemons on one queue", "", *scale_section(scale), ""]
    out += ["## SIGTERM to exit, 3 daemons", ""]
    if isinstance(sigterm, list) and sigterm:
        totals = [t for t, _ in sigterm]
        beyond = [t - d for t, d in sigterm]
        out += [
            (
                f"{SHUTDOWN_DAEMONS} mayhem daemons on one queue with `bench_handlers:sleep` "
                f"({args.handler_delay:g} s per message), `--concurrency "
                f"{args.sigterm_concurrency}` each (prefetch {2 * args.sigterm_concurrency}), "
                f"{args.sigterm_queued:,} messages queued, each its own SQLite inbox; SIGTERM "
                "to all at once when every window is full (`mayhem_messages_in_flight` = "
                f"concurrency), timed until the last exits; {len(totals)} run(s)."
            ),
            "",
            "| | median | min | max |",
            "|---|---:|---:|---:|",
            (
                f"| SIGTERM to the last exit (s) | {statistics.median(totals):.3f} "
                f"| {min(totals):.3f} | {max(totals):.3f} |"
            ),
            (
                f"| beyond the longest wait for handlers (s) | {statistics.median(beyond):.3f} "
                f"| {min(beyond):.3f} | {max(beyond):.3f} |"
            ),
        ]
    else:
        out.append(f"Not measured: {sigterm}")
    out += ["", "## Peak RSS as the backlog grows", ""]
    if isinstance(rss, list) and rss:
        out += [
            (
                f"mayhem no-op (`--concurrency {args.rss_prefetch // 2} --prefetch "
                f"{args.rss_prefetch}`) consuming a pre-filled quorum queue to the end; VmHWM "
                "(peak RSS) read from /proc/<pid>/status after the last ack, before SIGTERM, "
                "and the largest VmRSS seen while polling."
            ),
            "",
            "| backlog | peak RSS (VmHWM) MiB | largest VmRSS sampled MiB | msg/s |",
            "|---:|---:|---:|---:|",
        ]
        out += [
            f"| {backlog:,} | {s.extra['hwm_kb'] / 1024:.1f} | {s.extra['rss_max_kb'] / 1024:.1f} "
            f"| {s.rate:,.0f} |"
            for backlog, s in rss
        ]
    else:
        out.append(f"Not measured: {rss}")
    out.append("")
    if profiled:
        out += [
            "## Why a goal was missed: py-spy profiles",
            "",
            (
                "`bench/pyspy_profile.py` on the contender that missed, at its best setting: "
                "py-spy samples the thread holding the GIL; `own time` is the function at the "
                "top of the stack, `total` anywhere on it. The sampler slows the daemon down."
            ),
            "",
            *profiled,
        ]
    if args.notes:
        out += [
            "## Runs repeated",
            "",
            "A failed run is run once more (other work on the machine, such as a test that",
            "restarts RabbitMQ, can get in the way); these failed the first time:",
            "",
            *(f"- {note}" for note in args.notes),
            "",
        ]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 3,000 messages, 1 round, small backlogs, short profiles",
    )
    parser.add_argument(
        "--large", action="store_true", help="also a backlog of 1,000,000 for peak RSS (slow)"
    )
    parser.add_argument(
        "--contenders",
        default="all",
        help="comma-separated subset: ceiling, raw, faststream, noop, demo-pg",
    )
    parser.add_argument("--prefetches", default="64,256,1024", help="the prefetch sweep")
    parser.add_argument("--queue-types", default="quorum,classic")
    parser.add_argument("--scale-daemons", default="1,2,4", help="daemon counts, scale-out")
    parser.add_argument("--sigterm-queued", type=int, default=5000)
    parser.add_argument("--sigterm-concurrency", type=int, default=64)
    parser.add_argument("--sigterm-rounds", type=int, default=3)
    parser.add_argument("--handler-delay", type=float, default=1.0)
    parser.add_argument("--rss-prefetch", type=int, default=256)
    parser.add_argument(
        "--rss-backlogs",
        default=None,
        help="comma-separated backlogs (default 10000,100000 (+1000000 with --large); "
        "quick 2000,20000)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="no py-spy profile when a goal is missed"
    )
    parser.add_argument(
        "--only",
        default="throughput,scale,sigterm,rss",
        help="comma-separated parts to run (throughput, scale, sigterm, rss)",
    )
    args = parser.parse_args()
    args.profile_messages, args.profile_seconds = 60_000, 4
    if args.quick:
        args.messages, args.rounds, args.sigterm_rounds = 3000, 1, 1
        args.sigterm_queued = 1000
        args.profile_messages, args.profile_seconds = 15_000, 2
    default_backlogs = "2000,20000" if args.quick else "10000,100000"
    if args.large and not args.quick:
        default_backlogs += ",1000000"
    args.rss_backlogs = [int(b) for b in (args.rss_backlogs or default_backlogs).split(",")]
    args.prefetches = [int(p) for p in args.prefetches.split(",")]
    args.queue_types = args.queue_types.split(",")
    args.scale_daemons = [int(n) for n in args.scale_daemons.split(",")]
    args.only = set(args.only.split(","))
    args.contenders = (
        CONTENDERS
        if args.contenders == "all"
        else tuple(SHORT[name] for name in args.contenders.split(","))
    )
    args.notes = []
    return args


def command_line() -> str:
    """This run's command line, paths relative to the checkout."""
    here = [os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT)]
    return shlex.join([*here, *sys.argv[1:]])


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


async def main() -> None:
    args = parse_args()
    began = time.monotonic()
    command = command_line()
    args.broker_pid = broker_pid()
    meta: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "load_before": load(),
        "source_before": source_digest(),
        "machine": machine(),
        "python": platform.python_version(),
        "versions": versions(None, ("aio-pika", "aiormq", "pamqp", "uvloop", "asyncpg")),
        "servers": await servers(),
        "broker": f"pid {args.broker_pid}"
        if args.broker_pid
        else "not found (its CPU reads as 0; run as root)",
    }
    say(f"load average {meta['load_before']}; broker {meta['broker']}; {command}")
    args.faststream_python, args.faststream_missing = None, "not requested"
    if "throughput" in args.only and FASTSTREAM in args.contenders:
        args.faststream_python, args.faststream_missing = faststream_python()
    meta["fs_versions"] = (
        versions(args.faststream_python, ("faststream", "aio-pika", "aiormq", "uvloop"))
        if args.faststream_python
        else {}
    )
    skipped = "skipped (--only)"
    tallies: Tallies = {}
    scale: ScaleResult = skipped
    sigterm: SigtermResult = skipped
    rss: RssResult = skipped
    with tempfile.TemporaryDirectory(prefix="mayhem-bench-") as tmp:
        args.tmp = Path(tmp)
        if "throughput" in args.only:
            tallies = await throughput(args)
        if "scale" in args.only:
            scale = await guarded("scale-out", lambda: scale_out(args))
        if "sigterm" in args.only:
            sigterm = await guarded("SIGTERM timing", lambda: shutdown_timing(args))
        if "rss" in args.only:
            rss = await guarded("peak RSS", lambda: rss_growth(args))
        meta["load_after"] = load()
        goals, missed = goals_section(args, tallies, sigterm, rss)
        profiled = [] if args.no_profile else await profiles(args, missed)
    meta["source_after"] = source_digest()
    meta["elapsed"] = time.monotonic() - began
    text = report(
        args,
        meta,
        tallies=tallies,
        scale=scale,
        sigterm=sigterm,
        rss=rss,
        goals=goals,
        profiled=profiled,
    )
    RESULTS.write_text(text)
    print(text)
    say(f"done in {meta['elapsed'] / 60:.1f} min; written {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
