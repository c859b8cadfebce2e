"""mayhem's benchmark suite: consume throughput against raw aio-pika and FastStream, and more.

Usage: .venv/bin/python bench/run.py [--messages 50000] [--rounds 3] [--quick]

In one run, with every contender in its own process consuming a queue pre-filled with
publisher confirms and declared as mayhem declares it (quorum by default, durable, 200-byte
persistent JSON messages with unique ids, manual acks, the same prefetch for all):

1. throughput, first message to last, in alternating rounds (A B C D E, A B C D E, ...):
   raw aio-pika (ack per message), mayhem with a no-op handler (inbox on SQLite, metrics,
   health endpoint, shutdown machinery all on), mayhem's demo handler through the inbox on
   SQLite and on PostgreSQL, and FastStream's RabbitMQ subscriber with a no-op handler; with
   the CPU time each process spends per message;
2. time from SIGTERM to exit with messages queued and a full window of handlers in flight;
3. mayhem's peak RSS as the backlog grows (10,000 then 100,000 messages);
4. mayhem's throughput at concurrency 1, 8, 64 and 256.

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
from mayhem_testing import pg_schema

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

RAW, NOOP, DEMO_SQLITE, DEMO_PG, FASTSTREAM = (
    "raw aio-pika",
    "mayhem no-op",
    "mayhem demo, SQLite inbox",
    "mayhem demo, PostgreSQL inbox",
    "FastStream no-op",
)
CONTENDERS: Final = (RAW, NOOP, DEMO_SQLITE, DEMO_PG, FASTSTREAM)
T = TypeVar("T")


@dataclass
class Sample:
    """One consume run: how many messages over how long, and the consumer's CPU time."""

    count: int
    seconds: float
    cpu_seconds: float
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


@dataclass
class Tally:
    """A contender's samples and failures over the rounds."""

    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, what: str) -> float | None:
        """The median of a :class:`Sample` property over the runs; ``None`` without runs."""
        values = [getattr(s, what) for s in self.samples]
        return statistics.median(values) if values else None


# A part of the suite's results, or why it has none.
SigtermResult = list[tuple[float, float]] | str
RssResult = list[tuple[int, Sample]] | str
CurveResult = list[tuple[int, Sample | str]] | str


class DisturbedError(RuntimeError):
    """Something outside the benchmark got in the way (a broker restart): run it again."""


# -- the contenders --------------------------------------------------------------------------


async def run_script(python: Path, script: str, config: Config, n: int, prefetch: int) -> Sample:
    """A consumer script that measures itself and prints one JSON line."""
    proc = await asyncio.create_subprocess_exec(
        str(python),
        str(HERE / script),
        *("--url", AMQP_URL, "--queue", config.queue, "--count", str(n)),
        *("--prefetch", str(prefetch), "--stall", str(STALL)),
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
        raise RuntimeError(f"{script} exited {proc.returncode}: {' | '.join(tail)}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    # Intervals between the first and the last message: count - 1 of them.
    return Sample(
        count=result["count"] - 1,
        seconds=result["seconds"],
        cpu_seconds=result["cpu_seconds"],
        extra={"maxrss_kb": result["maxrss_kb"]},
    )


@dataclass
class Reading:
    """One poll of a daemon: when, how many acked, its CPU time so far, every outcome."""

    at: float
    acked: int
    cpu: float
    counts: dict[str, int]


class Watcher:
    """Polls one daemon's /metrics and /proc entries.

    Args:
        daemon: a started daemon.
    """

    def __init__(self, daemon: DaemonProcess) -> None:
        if daemon.metrics_addr is None:
            raise RuntimeError("the daemon did not report its metrics address")
        self.pid, self.addr = daemon.pid, daemon.metrics_addr
        self.scrapes = 0
        self.rss_max_kb = 0

    async def read(self) -> Reading:
        """Scrape once; the time is the middle of the request."""
        before = time.monotonic()
        samples = await scrape(self.addr)
        after = time.monotonic()
        self.scrapes += 1
        if samples.get("mayhem_broker_reconnects_total", 0) > 0:
            raise DisturbedError("mayhem's broker connection dropped and was re-established")
        if samples.get("mayhem_database_outages_total", 0) > 0:
            raise DisturbedError("mayhem's database went away during the run")
        self.rss_max_kb = max(self.rss_max_kb, status_kb(self.pid, "VmRSS"))
        counts = outcomes(samples)
        return Reading((before + after) / 2, counts.get("acked", 0), cpu_seconds(self.pid), counts)

    async def first(self) -> Reading:
        """The first reading with a message acked, polled finely."""
        began = time.monotonic()
        while (reading := await self.read()).acked == 0:
            if time.monotonic() - began > STALL:
                raise RuntimeError(f"no message acked within {STALL:g} s: {reading.counts}")
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


async def follow_daemon(daemon: DaemonProcess, n: int) -> Sample:
    """Watch a daemon consume ``n`` messages, from outside; then stop it.

    mayhem's ``mayhem_messages_total{outcome="acked"}`` is polled on /metrics, finely (every
    5 ms) until the first reading above zero and again as the end nears, coarsely (every
    250 ms) in between so the polling costs the daemon little. The rate is the messages
    acked between the first non-zero reading and the reading that reaches ``n``, over the
    time between them; the CPU time (utime + stime of all its threads, /proc/<pid>/stat)
    is read at the same two moments.
    """
    watcher = Watcher(daemon)
    first = await watcher.first()
    last = await watcher.last(first, n)
    hwm = status_kb(daemon.pid, "VmHWM")
    code = await daemon.stop(timeout=120)
    if code != 0:
        raise RuntimeError(f"mayhem exited {code} after the run")
    return Sample(
        count=last.acked - first.acked,
        seconds=last.at - first.at,
        cpu_seconds=last.cpu - first.cpu,
        extra={
            "hwm_kb": hwm,
            "rss_max_kb": watcher.rss_max_kb,
            "scrapes": watcher.scrapes,
            "acked_at_first_reading": first.acked,
            "other_outcomes": {k: v for k, v in last.counts.items() if k != "acked" and v},
        },
    )


async def run_mayhem(
    args: argparse.Namespace,
    n: int,
    *,
    concurrency: int,
    prefetch: int,
    handler: str | None,
    db: str,
    env: dict[str, str] | None = None,
) -> Sample:
    """Pre-fill a fresh queue with ``n`` messages, then let a mayhem daemon consume them."""
    config = bench_config("bench-mayhem", queue_type=args.queue_type)
    async with contextlib.AsyncExitStack() as stack:
        connection = await stack.enter_async_context(topology(config))
        if db == "postgresql":
            db_url = await stack.enter_async_context(pg_schema(PG_URL, "bench"))
        else:
            path = args.tmp / (config.queue + ".db")
            db_url = f"sqlite:///{path}"
            for suffix in ("", "-wal", "-shm"):
                stack.callback(Path(f"{path}{suffix}").unlink, missing_ok=True)
        took = await prefill(connection, config.queue, n)
        await asyncio.sleep(SETTLE)
        source = source_digest()
        daemon = mayhem_daemon(
            [
                *("--queue", config.queue, "--exchange", config.exchange),
                *("--queue-type", config.queue_type),
                *(("--handler", handler) if handler else ()),
                *("--concurrency", str(concurrency), "--prefetch", str(prefetch)),
                *("--db-url", db_url),
            ],
            env=env,
        )
        try:
            try:
                await daemon.start()
            except (TimeoutError, EOFError) as exc:
                tail = " | ".join(daemon.raw[-3:]) or "no output"
                raise RuntimeError(f"mayhem did not start ({type(exc).__name__}): {tail}") from None
            sample = await follow_daemon(daemon, n)
        finally:
            await daemon.kill()
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


async def run_contender(args: argparse.Namespace, name: str, n: int) -> Sample:
    if name == NOOP:
        return await run_mayhem(
            args,
            n,
            concurrency=args.concurrency,
            prefetch=args.prefetch,
            handler="bench_handlers:noop",
            db="sqlite",
        )
    if name in {DEMO_SQLITE, DEMO_PG}:
        return await run_mayhem(
            args,
            n,
            concurrency=args.concurrency,
            prefetch=args.prefetch,
            handler=None,
            db="postgresql" if name == DEMO_PG else "sqlite",
            env={"MAYHEM_DEMO_MAX_DELAY": "0"},
        )
    python, script = (
        (Path(sys.executable), "consumer_aiopika.py")
        if name == RAW
        else (args.faststream_python, "consumer_faststream.py")
    )
    prefix = "bench-raw" if name == RAW else "bench-faststream"
    config = bench_config(prefix, queue_type=args.queue_type)
    async with topology(config) as connection:
        took = await prefill(connection, config.queue, n)
        await asyncio.sleep(SETTLE)
        sample = await run_script(python, script, config, n, args.prefetch)
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


async def throughput(args: argparse.Namespace) -> dict[str, Tally]:
    tallies = {name: Tally() for name in CONTENDERS}
    if args.faststream_python is None:
        tallies[FASTSTREAM].failures.append(f"not measured: {args.faststream_missing}")
    for round_ in range(1, args.rounds + 1):
        for name in args.contenders:
            if name == FASTSTREAM and args.faststream_python is None:
                continue
            say(f"round {round_}/{args.rounds}: {name}, {args.messages} messages")
            try:
                sample = await measure(
                    args,
                    f"round {round_}, {name}",
                    lambda name=name: run_contender(args, name, args.messages),
                )
            except Exception as exc:
                say(f"  failed: {why(exc)}")
                tallies[name].failures.append(f"round {round_}: {why(exc)}")
                continue
            tallies[name].samples.append(sample)
            say(f"  {sample.rate:,.0f} msg/s, {sample.cpu_us:.0f} µs CPU/message{details(sample)}")
    return tallies


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
    if "source" in sample.extra:
        text += f"; mayhem source {sample.extra['source']}"
    if sample.extra.get("other_outcomes"):
        text += f"; other outcomes: {sample.extra['other_outcomes']}"
    return text + ")"


async def shutdown_timing(args: argparse.Namespace) -> list[tuple[float, float]]:
    runs = []
    for i in range(1, args.rounds + 1):
        say(
            f"SIGTERM to exit {i}/{args.rounds}: {args.sigterm_queued} queued, "
            f"{args.sigterm_concurrency} in flight, handler {args.handler_delay:g} s"
        )
        took, drain = await sigterm_to_exit(
            args.sigterm_queued, args.sigterm_concurrency, args.handler_delay, args.tmp
        )
        say(f"  {took:.3f} s (drain {drain:.3f} s)")
        runs.append((took, drain))
    return runs


async def rss_growth(args: argparse.Namespace) -> list[tuple[int, Sample]]:
    found = []
    for backlog in args.rss_backlogs:
        say(f"peak RSS: mayhem no-op against a backlog of {backlog:,} messages")
        sample = await measure(
            args,
            f"peak RSS, backlog {backlog:,}",
            lambda backlog=backlog: run_mayhem(
                args,
                backlog,
                concurrency=args.concurrency,
                prefetch=args.prefetch,
                handler="bench_handlers:noop",
                db="sqlite",
            ),
        )
        say(
            f"  VmHWM {sample.extra['hwm_kb'] / 1024:.1f} MiB, {sample.rate:,.0f} msg/s"
            f"{details(sample)}"
        )
        found.append((backlog, sample))
    return found


async def scaling(args: argparse.Namespace) -> list[tuple[int, Sample | str]]:
    found: list[tuple[int, Sample | str]] = []
    for concurrency in args.scaling:
        say(f"scaling: mayhem no-op at concurrency {concurrency}, {args.scaling_messages} messages")
        try:
            sample = await measure(
                args,
                f"scaling, concurrency {concurrency}",
                lambda concurrency=concurrency: run_mayhem(
                    args,
                    args.scaling_messages,
                    concurrency=concurrency,
                    prefetch=2 * concurrency,
                    handler="bench_handlers:noop",
                    db="sqlite",
                ),
            )
        except Exception as exc:
            say(f"  failed: {why(exc)}")
            found.append((concurrency, f"failed: {why(exc)}"))
            continue
        say(f"  {sample.rate:,.0f} msg/s, {sample.cpu_us:.0f} µs CPU/message{details(sample)}")
        found.append((concurrency, sample))
    return found


async def guarded(what: str, part: Callable[[], Awaitable[T]]) -> T | str:
    """Run one part of the suite; on failure, say so and return why."""
    try:
        return await part()
    except Exception as exc:
        say(f"{what} failed: {why(exc)}")
        return f"failed: {why(exc)}"


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


def throughput_table(args: argparse.Namespace, tallies: dict[str, Tally]) -> list[str]:
    raw_rate, raw_cpu = tallies[RAW].median("rate"), tallies[RAW].median("cpu_us")
    lines = [
        (
            "| contender | median msg/s | min | max | ratio to raw aio-pika "
            "| CPU µs/message (median) | CPU ratio to raw | runs |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CONTENDERS:
        tally = tallies[name]
        rates = [s.rate for s in tally.samples]
        if not rates:
            why = "; ".join(tally.failures) or "no run"
            lines.append(f"| {name} | {why} | | | | | | 0 |")
            continue
        rate, cpu = tally.median("rate"), tally.median("cpu_us")
        lines.append(
            f"| {name} | {fmt(rate)} | {fmt(min(rates))} | {fmt(max(rates))} "
            f"| {fmt(ratio(rate, raw_rate), '.2f')} | {fmt(cpu)} "
            f"| {fmt(ratio(cpu, raw_cpu), '.2f')} | {len(rates)}/{args.rounds} |"
        )
    scrapes = [
        s.extra["scrapes"] for t in tallies.values() for s in t.samples if "scrapes" in s.extra
    ]
    if scrapes:
        lines.append(
            f"\nmayhem's /metrics was scraped {statistics.median(scrapes):.0f} times per run "
            "(median); the CPU each scrape costs the daemon is in its CPU per message."
        )
    versions = {
        s.extra["source"] for t in tallies.values() for s in t.samples if "source" in s.extra
    }
    if len(versions) > 1:
        lines.append(
            f"\n**mayhem's source changed during the rounds** ({len(versions)} versions: "
            f"{', '.join(sorted(versions))}): its rounds measured different code."
        )
    failed = [(n, f) for n in CONTENDERS for f in tallies[n].failures if tallies[n].samples]
    lines += [f"\nFailed run of {n}: {f}" for n, f in failed]
    return lines


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


def goals_section(
    args: argparse.Namespace,
    tallies: dict[str, Tally],
    sigterm: SigtermResult,
    rss: RssResult,
) -> list[str]:
    raw_rate, raw_cpu = tallies[RAW].median("rate"), tallies[RAW].median("cpu_us")
    noop_rate, noop_cpu = tallies[NOOP].median("rate"), tallies[NOOP].median("cpu_us")
    fs_rate = tallies[FASTSTREAM].median("rate")
    pg_rate = tallies[DEMO_PG].median("rate")

    def at_least(value: float | None, target: float) -> bool | None:
        return None if value is None else value >= target

    vs_raw, vs_fs, cpu_vs_raw = (
        ratio(noop_rate, raw_rate),
        ratio(noop_rate, fs_rate),
        ratio(noop_cpu, raw_cpu),
    )
    pg_vs_raw = ratio(pg_rate, raw_rate)
    lines = [
        "| goal | measured | verdict |",
        "|---|---|---|",
        (
            f"| mayhem no-op >= 1.3x raw aio-pika | {fmt(vs_raw, '.2f')} "
            f"({fmt(noop_rate)} vs {fmt(raw_rate)} msg/s) | {goal(at_least(vs_raw, 1.3))} |"
        ),
        (
            f"| mayhem no-op >= 2.5x FastStream | {fmt(vs_fs, '.2f')} "
            f"({fmt(noop_rate)} vs {fmt(fs_rate)} msg/s) | {goal(at_least(vs_fs, 2.5))} |"
        ),
        (
            f"| mayhem no-op CPU per message <= 0.8x raw aio-pika's | {fmt(cpu_vs_raw, '.2f')} "
            f"({fmt(noop_cpu)} vs {fmt(raw_cpu)} µs) "
            f"| {goal(None if cpu_vs_raw is None else cpu_vs_raw <= 0.8)} |"
        ),
        (
            f"| demo handler, PostgreSQL inbox >= 0.5x raw aio-pika | {fmt(pg_vs_raw, '.2f')} "
            f"({fmt(pg_rate)} vs {fmt(raw_rate)} msg/s) | {goal(at_least(pg_vs_raw, 0.5))} |"
        ),
    ]
    if isinstance(sigterm, list) and sigterm:
        worst = max(t for t, _ in sigterm)
        limit = 1.0 + args.handler_delay
        lines.append(
            f"| SIGTERM to exit < 1 s + the longest handler in flight ({args.handler_delay:g} s)"
            f" | worst of {len(sigterm)}: {worst:.3f} s (limit {limit:g} s) "
            f"| {goal(worst < limit)} |"
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
    return lines


def report(
    args: argparse.Namespace,
    meta: dict[str, Any],
    *,
    tallies: dict[str, Tally],
    sigterm: SigtermResult,
    rss: RssResult,
    curve: CurveResult,
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
        "",
        "## Setting",
        "",
        (
            f"- {args.messages:,} messages per run, {args.rounds} alternating round(s) "
            f"({' / '.join(CONTENDERS)}), each contender a separate process."
        ),
        (
            f"- Each run gets a fresh {args.queue_type} queue declared by "
            "`mayhem.broker.declare_topology` (durable, dead-letter arguments as mayhem sets "
            "them), pre-filled through the default exchange with publisher confirms: "
            "200-byte JSON bodies with a `host` key, `content_type` application/json, a unique "
            f"`message_id`, persistent; then {SETTLE:g} s of rest before the consumer starts. "
            "Queues, exchanges, schemas and SQLite files are deleted after each run."
        ),
        (
            f"- Manual acks, one per message, and prefetch {args.prefetch} for every contender; "
            f"mayhem runs with `--concurrency {args.concurrency} --prefetch {args.prefetch}`, "
            "uvloop, metrics and health endpoint on 127.0.0.1 (a free port), JSON logs at INFO, "
            "SQLite files in a temp dir (WAL, synchronous=FULL: one fsync per commit)."
        ),
        (
            "- raw aio-pika (`bench/consumer_aiopika.py`): `aio_pika.connect`, "
            "`channel.set_qos(prefetch)`, `queue.consume(callback)`, the callback awaits "
            "`message.ack()`; uvloop."
        ),
        "- mayhem no-op: `mayhem run --handler bench_handlers:noop`, the inbox on SQLite.",
        (
            "- mayhem demo: no `--handler` (the demo handler: parse the JSON, insert a row in "
            "`restarts`), `MAYHEM_DEMO_MAX_DELAY=0` (no simulated restart delay), the inbox on "
            "SQLite or on PostgreSQL (a fresh schema through `?search_path=`)."
        ),
        (
            "- FastStream (`bench/consumer_faststream.py`): `RabbitBroker` with "
            f"`Channel(prefetch_count={args.prefetch})`, `RabbitQueue(declare=False)` (a passive "
            "declare of the existing queue), a no-op `async def` subscriber taking the decoded "
            "JSON body, FastStream's default ack policy (ack after the handler returns), "
            "per-message access log off (`logger=None`); uvloop."
        ),
        (
            "- Throughput is first message to last. raw aio-pika and FastStream time themselves "
            "(monotonic clock at the first delivery and after the last ack / last handler call; "
            "rate = (N - 1) / elapsed). mayhem is timed from outside: its "
            '`mayhem_messages_total{outcome="acked"}` is polled on /metrics every 5 ms until '
            "the first non-zero reading and again near the end, every 250 ms at most in "
            "between; rate = messages acked between the first non-zero reading and the "
            "reading that reaches N, over the time between the two readings."
        ),
        (
            "- CPU per message is the consumer process's own CPU time (user + system, all "
            "threads) between those same two moments, divided by the messages in between: "
            "`time.process_time()` inside the scripts, utime + stime from /proc/<pid>/stat for "
            "mayhem. Start-up and idle time are excluded for everyone. RabbitMQ's (and "
            "PostgreSQL's) CPU is not counted: on 2 cores they compete with the consumer."
        ),
        "- Ratios are ratios of medians, within this run.",
        "",
        "## Throughput",
        "",
        *throughput_table(args, tallies),
        "",
        "## SIGTERM to exit",
        "",
    ]
    if isinstance(sigterm, list) and sigterm:
        totals = [t for t, _ in sigterm]
        beyond = [t - d for t, d in sigterm]
        out += [
            (
                f"mayhem with `bench_handlers:sleep` ({args.handler_delay:g} s per message), "
                f"`--concurrency {args.sigterm_concurrency}` (prefetch "
                f"{2 * args.sigterm_concurrency}), {args.sigterm_queued:,} messages queued; "
                "SIGTERM once the window is full (`mayhem_messages_in_flight` = concurrency); "
                f"{len(totals)} run(s), as `bench/shutdown.py` does."
            ),
            "",
            "| | median | min | max |",
            "|---|---:|---:|---:|",
            (
                f"| SIGTERM to exit (s) | {statistics.median(totals):.3f} | {min(totals):.3f} "
                f"| {max(totals):.3f} |"
            ),
            (
                f"| beyond waiting for the handlers (s) | {statistics.median(beyond):.3f} "
                f"| {min(beyond):.3f} | {max(beyond):.3f} |"
            ),
        ]
    else:
        out.append(f"Not measured: {sigterm}")
    out += ["", "## Peak RSS as the backlog grows", ""]
    if isinstance(rss, list) and rss:
        out += [
            (
                f"mayhem no-op (`--concurrency {args.concurrency} --prefetch {args.prefetch}`) "
                "consuming a pre-filled backlog to the end; VmHWM (peak RSS) read from "
                "/proc/<pid>/status after the last ack, before SIGTERM, and the largest VmRSS "
                "seen while polling."
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
        if len(rss) >= 2:
            growth = rss[-1][1].extra["hwm_kb"] / rss[0][1].extra["hwm_kb"]
            out += ["", f"Peak RSS ratio, largest to smallest backlog: {growth:.2f}x."]
    else:
        out.append(f"Not measured: {rss}")
    out += ["", "## Scaling with concurrency", ""]
    if isinstance(curve, list) and curve:
        out += [
            (
                f"mayhem no-op, prefetch = 2 x concurrency, {args.scaling_messages:,} messages, "
                "one run each."
            ),
            "",
            "| concurrency | prefetch | msg/s | CPU µs/message |",
            "|---:|---:|---:|---:|",
        ]
        for concurrency, s in curve:
            if isinstance(s, Sample):
                out.append(
                    f"| {concurrency} | {2 * concurrency} | {s.rate:,.0f} | {s.cpu_us:.0f} |"
                )
            else:
                out.append(f"| {concurrency} | {2 * concurrency} | {s} | |")
    else:
        out.append(f"Not measured: {curve}")
    out += ["", "## Goals", "", *goals_section(args, tallies, sigterm, rss), ""]
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
    parser.add_argument("--messages", type=int, default=50_000, help="messages per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 5,000 messages, 1 round, small backlogs"
    )
    parser.add_argument(
        "--contenders",
        default="all",
        help="comma-separated subset for a quick look: raw, noop, demo-sqlite, demo-pg, faststream",
    )
    parser.add_argument("--prefetch", type=int, default=64, help="every contender's prefetch")
    parser.add_argument("--concurrency", type=int, default=32, help="mayhem's concurrency")
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--sigterm-queued", type=int, default=5000)
    parser.add_argument("--sigterm-concurrency", type=int, default=64)
    parser.add_argument("--handler-delay", type=float, default=1.0)
    parser.add_argument(
        "--rss-backlogs",
        default=None,
        help="comma-separated backlogs for peak RSS (default 10000,100000; quick 2000,20000)",
    )
    parser.add_argument(
        "--scaling",
        default="1,8,64,256",
        help="comma-separated concurrencies for the scaling curve",
    )
    parser.add_argument(
        "--only",
        default="throughput,sigterm,rss,scaling",
        help="comma-separated parts to run (throughput, sigterm, rss, scaling)",
    )
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds = 5000, 1
    args.rss_backlogs = [
        int(b)
        for b in (args.rss_backlogs or ("2000,20000" if args.quick else "10000,100000")).split(",")
    ]
    args.scaling = [int(c) for c in args.scaling.split(",")]
    args.scaling_messages = max(1000, round(args.messages * 0.4))
    args.only = set(args.only.split(","))
    short = dict(
        zip(("raw", "noop", "demo-sqlite", "demo-pg", "faststream"), CONTENDERS, strict=True)
    )
    args.contenders = (
        CONTENDERS
        if args.contenders == "all"
        else tuple(short[name] for name in args.contenders.split(","))
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
    meta: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "load_before": load(),
        "source_before": source_digest(),
        "machine": machine(),
        "python": platform.python_version(),
        "versions": versions(None, ("aio-pika", "aiormq", "uvloop", "aiosqlite", "asyncpg")),
        "servers": await servers(),
    }
    say(f"load average {meta['load_before']}; {command}")
    args.faststream_python, args.faststream_missing = None, "not requested"
    if "throughput" in args.only:
        args.faststream_python, args.faststream_missing = faststream_python()
    meta["fs_versions"] = (
        versions(args.faststream_python, ("faststream", "aio-pika", "aiormq", "uvloop"))
        if args.faststream_python
        else {}
    )
    skipped = "skipped (--only)"
    tallies: dict[str, Tally] = {name: Tally() for name in CONTENDERS}
    sigterm: SigtermResult = skipped
    rss: RssResult = skipped
    curve: CurveResult = skipped
    with tempfile.TemporaryDirectory(prefix="mayhem-bench-") as tmp:
        args.tmp = Path(tmp)
        if "throughput" in args.only:
            tallies = await throughput(args)
        if "sigterm" in args.only:
            sigterm = await guarded("SIGTERM timing", lambda: shutdown_timing(args))
        if "rss" in args.only:
            rss = await guarded("peak RSS", lambda: rss_growth(args))
        if "scaling" in args.only:
            curve = await scaling(args)
    meta["load_after"] = load()
    meta["source_after"] = source_digest()
    meta["elapsed"] = time.monotonic() - began
    text = report(args, meta, tallies=tallies, sigterm=sigterm, rss=rss, curve=curve)
    RESULTS.write_text(text)
    print(text)
    say(f"done in {meta['elapsed'] / 60:.1f} min; written {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
