"""Shared parts of the benchmarks: the broker, the topology, pre-filling, reading a process.

Everything here talks to loopback only: the local RabbitMQ, the local PostgreSQL and the
daemons the benchmarks start themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

HERE: Final = Path(__file__).resolve().parent
ROOT: Final = HERE.parent
SUPPORT: Final = ROOT / "tests" / "support"
for _path in (str(HERE), str(SUPPORT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import aio_pika  # noqa: E402
from mayhem_testing import DaemonProcess, http_get, wait_until  # noqa: E402

from mayhem.broker import declare_topology  # noqa: E402
from mayhem.config import Config  # noqa: E402
from mayhem.topology import dead_letter_exchange, retry_queue, retry_tiers  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

AMQP_URL: Final = os.environ.get("MAYHEM_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL: Final = os.environ.get("MAYHEM_BENCH_PG_URL", "postgresql://root@127.0.0.1/test")
BODY_BYTES: Final = 200
PUBLISH_WINDOW: Final = 1000
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    """Progress, on stderr, with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def body(seq: int) -> bytes:
    """A JSON document of exactly ``BODY_BYTES`` bytes with a ``host`` (the demo handler's)."""
    doc: dict[str, Any] = {
        "host": f"web-{seq % 1000:04d}",
        "action": "restart",
        "seq": seq,
        "requested_by": "bench",
        "pad": "",
    }
    short = BODY_BYTES - len(json.dumps(doc, separators=(",", ":")))
    doc["pad"] = "x" * max(short, 0)
    return json.dumps(doc, separators=(",", ":")).encode()


def bench_config(prefix: str, **settings: object) -> Config:
    """A configuration whose queue and exchange are unique to this run."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return Config.load(
        flags={"queue": name, "exchange": name, "amqp_url": AMQP_URL, **settings}, environ={}
    )


@contextlib.asynccontextmanager
async def topology(config: Config) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """Declare the queue as mayhem does; delete all of it afterwards, even on failure."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await declare_topology(channel, config)
        await channel.close()
        yield connection
    finally:
        await delete_topology(connection, config)
        await connection.close()


async def delete_topology(connection: aio_pika.abc.AbstractConnection, config: Config) -> None:
    """Delete the work, dead-letter and delay queues and both exchanges; ignore the missing."""
    queues = [config.queue, config.dead_queue]
    queues += [retry_queue(config.queue, delay) for delay in retry_tiers(config)]
    for name in queues:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            await channel.queue_delete(name, if_unused=False, if_empty=False)
            await channel.close()
    for name in (config.exchange, dead_letter_exchange(config.exchange)):
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            await channel.exchange_delete(name)
            await channel.close()


async def prefill(
    connection: aio_pika.abc.AbstractConnection,
    queue: str,
    count: int,
    bodies: list[bytes] | None = None,
) -> float:
    """Publish ``count`` persistent messages with confirms, a unique id each; return seconds.

    ``bodies``, when given, is cycled through instead of :func:`body`.
    """
    began = time.monotonic()
    channel = await connection.channel(publisher_confirms=True)
    run = uuid.uuid4().hex[:12]
    try:
        for start in range(0, count, PUBLISH_WINDOW):
            sends = [
                channel.default_exchange.publish(
                    aio_pika.Message(
                        bodies[seq % len(bodies)] if bodies else body(seq),
                        message_id=f"{run}-{seq}",
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                )
                for seq in range(start, min(start + PUBLISH_WINDOW, count))
            ]
            await asyncio.gather(*sends)
    finally:
        await channel.close()
    return time.monotonic() - began


async def queue_depth(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare on a fresh channel)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (the broker's beam.smp), or ``None``.

    Found through /proc: the listening socket's inode in /proc/net/tcp{,6}, then the process
    holding that inode open. Needs the rights to read other processes' fd tables (root).
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                listening = fields[3] == "0A"
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if str(fd.readlink()) in inodes:
                        return int(entry.name)
    return None


def broker_pid(url: str = AMQP_URL) -> int | None:
    """The OS pid of the broker behind ``url`` (loopback only), or ``None`` if not found."""
    return listener_pid(urlsplit(url).port or 5672)


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status, e.g. ``VmHWM`` (peak RSS) or ``VmRSS``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


async def scrape(addr: str) -> dict[str, float]:
    """A daemon's /metrics as ``{sample name with labels: value}``."""
    _, text = await http_get(addr, "/metrics")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


def outcomes(samples: dict[str, float]) -> dict[str, int]:
    """``mayhem_messages_total`` by outcome."""
    found = {}
    prefix = 'mayhem_messages_total{outcome="'
    for name, value in samples.items():
        if name.startswith(prefix):
            found[name[len(prefix) :].split('"', 1)[0]] = int(value)
    return found


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a benchmarked daemon: bench/ importable, no stray MAYHEM_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAYHEM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)])
    env.update(extra or {})
    return env


def mayhem_daemon(args: list[str], env: dict[str, str] | None = None) -> DaemonProcess:
    """``python -m mayhem run`` (JSON logs, metrics on a free loopback port) with ``args``."""
    daemon = DaemonProcess(args)
    daemon.env = daemon_env(env)
    return daemon


async def sigterm_to_exit(
    queued: int, concurrency: int, handler_delay: float, db_dir: Path, daemons: int = 1
) -> tuple[float, float]:
    """SIGTERM with ``concurrency`` handlers in flight and ``queued`` waiting; time to exit.

    With ``daemons`` > 1, that many daemons consume the one queue (each with its own SQLite
    inbox: they never see the same message, and a shared file would only add lock waits to
    the timing); all are signalled at once, and the time is until the last one has exited.

    Returns:
        Seconds from SIGTERM to the (last) exit, and the longest drain step (the wait for the
        handlers in flight).
    """
    config = bench_config("bench-shutdown")
    queue = config.queue
    async with topology(config) as connection:
        await prefill(connection, queue, queued, bodies=[b'{"host": "web-1"}'])
        started = [
            mayhem_daemon(
                [
                    *("--queue", queue, "--exchange", queue),
                    *("--handler", "bench_handlers:sleep", "--concurrency", str(concurrency)),
                    *("--db-url", f"sqlite:///{db_dir / f'{queue}-{i}.db'}"),
                ],
                env={"BENCH_HANDLER_DELAY": str(handler_delay)},
            )
            for i in range(daemons)
        ]
        try:
            await asyncio.gather(*(daemon.start() for daemon in started))

            async def window_full(daemon: DaemonProcess) -> bool:
                addr = daemon.metrics_addr or ""
                in_flight = (await scrape(addr)).get("mayhem_messages_in_flight", 0)
                return in_flight >= concurrency

            for daemon in started:
                await wait_until(lambda d=daemon: window_full(d), timeout=30, interval=0.01)
            sent = time.monotonic()
            for daemon in started:
                daemon.signal(signal.SIGTERM)
            codes = await asyncio.gather(*(daemon.wait(timeout=120) for daemon in started))
            took = time.monotonic() - sent
        finally:
            for daemon in started:
                await daemon.kill()
        if any(codes):
            raise RuntimeError(f"daemons exited {codes}")
        drains = []
        for daemon in started:
            [drain] = daemon.events("shutdown_step", step="drained")
            drains.append(float(drain["duration"]))
        return took, max(drains)
