"""Test helpers: publishing with confirms, draining queues, the oracle, the daemon process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import aiohttp
import aiosqlite
import asyncpg
import attrs
import pika

from mayhem.broker import declare_topology
from mayhem.config import Config
from mayhem.topology import dead_queue

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


async def declare(connection: aio_pika.abc.AbstractConnection, config: Config) -> None:
    """Declare the daemon's topology so that messages can be published before it starts."""
    channel = await connection.channel()
    await declare_topology(channel, config)
    await channel.close()


async def publish(
    connection: aio_pika.abc.AbstractConnection,
    queue: str,
    bodies: list[bytes],
    *,
    message_ids: list[str] | None = None,
    **properties: Any,
) -> list[str]:
    """Publish to ``queue`` through the default exchange with confirms; return the ids."""
    ids = message_ids or [uuid.uuid4().hex for _ in bodies]
    channel = await connection.channel(publisher_confirms=True)
    try:
        sends = [
            channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    message_id=mid or None,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    **properties,
                ),
                routing_key=queue,
            )
            for body, mid in zip(bodies, ids, strict=True)
        ]
        for start in range(0, len(sends), 500):
            await asyncio.gather(*sends[start : start + 500])
    finally:
        await channel.close()
    return ids


async def publish_without_id(queue: str, body: bytes) -> None:
    """Publish with confirms but without a message_id (aiormq always adds one; pika does not)."""

    def send() -> None:
        params = pika.URLParameters(os.environ.get("MAYHEM_TEST_AMQP_URL", DEFAULT_AMQP))
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                "", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True
            )
        finally:
            connection.close()

    await asyncio.to_thread(send)


async def drain(connection: aio_pika.abc.AbstractConnection, queue: str) -> list[Any]:
    """Take every message left in ``queue`` (acked); return them."""
    channel = await connection.channel()
    taken = []
    try:
        q = await channel.get_queue(queue, ensure=False)
        while (message := await q.get(fail=False, no_ack=False)) is not None:
            await message.ack()
            taken.append(message)
    finally:
        await channel.close()
    return taken


async def rows(db_url: str, sql: str) -> list[tuple[Any, ...]]:
    """Run a query on the test's database (SQLite file or PostgreSQL schema)."""
    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")
        async with aiosqlite.connect(path) as db, db.execute(sql) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]
    base, _, query = db_url.partition("?")
    settings = dict(part.split("=", 1) for part in query.split("&") if part)
    conn = await asyncpg.connect(base, server_settings=settings)
    try:
        return [tuple(record) for record in await conn.fetch(sql)]
    finally:
        await conn.close()


@attrs.frozen
class Verdict:
    """The oracle's counts (RELIABILITY.md)."""

    confirmed: int
    applied: int
    rows: int
    dead: int
    queued: int
    lost: frozenset[str]

    @property
    def duplicates(self) -> int:
        return self.rows - self.applied


async def oracle(
    connection: aio_pika.abc.AbstractConnection,
    queue: str,
    db_url: str,
    confirmed: list[str],
    table: str = "applied",
    retry_queues: tuple[str, ...] = (),
) -> Verdict:
    """Every confirmed id is applied once, dead-lettered, or still queued (or waiting to retry)."""
    applied_rows = [row[0] for row in await rows(db_url, f"SELECT message_id FROM {table}")]
    dead = {m.message_id for m in await drain(connection, dead_queue(queue))}
    queued = {m.message_id for m in await drain(connection, queue)}
    for waiting in retry_queues:
        queued |= {m.message_id for m in await drain(connection, waiting)}
    applied = set(applied_rows) & set(confirmed)
    lost = set(confirmed) - applied - dead - queued
    return Verdict(
        confirmed=len(confirmed),
        applied=len(applied),
        rows=len([r for r in applied_rows if r in set(confirmed)]),
        dead=len(dead),
        queued=len(queued),
        lost=frozenset(lost),
    )


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl (as root, on this machine) and return its output."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


def connections_of(pid: int) -> list[str]:
    """The broker's ids (Erlang pids) of the connections that the OS process ``pid`` opened.

    mayhem names its connections ``mayhem <role> host=... pid=... queue=...``, so a test
    closes its own daemon's connections and never another process's.
    """
    listing = rabbitmqctl("list_connections", "pid", "client_properties").splitlines()
    return [line.split("\t", 1)[0] for line in listing if f"pid={pid} " in line]


def close_connections_of(pid: int) -> int:
    """Close every broker connection of the OS process ``pid``; return how many."""
    found = connections_of(pid)
    for connection in found:
        rabbitmqctl("close_connection", connection, "closed by a mayhem test")
    return len(found)


async def metric(addr: str, name: str) -> float:
    """One sample from a daemon's /metrics (0 when absent)."""
    _, text = await http_get(addr, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class DaemonProcess:
    """``python -m mayhem run`` as a child process, with JSON logs read line by line.

    Tests wait on a line's stable ``event`` name (``mayhem.logs.EVENTS``) and the fields
    beside it, never on its human text.

    Args:
        args: extra command-line arguments.
        env: extra environment variables.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(ROOT)]),
            **(env or {}),
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.metrics_addr: str | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: list[tuple[Any, asyncio.Future[dict[str, Any]]]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, *, wait_ready: bool = True) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mayhem",
            "run",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
            *self.args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())
        if wait_ready:
            started = await self.wait_for_event("started", 30)
            self.metrics_addr = started.get("metrics_addr")

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            try:
                entry = json.loads(text)
            except ValueError:
                entry = {"message": text, "level": "raw"}
            self.lines.append(entry)
            for match, future in list(self._waiters):
                if not future.done() and match(entry):
                    future.set_result(entry)
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(EOFError("\n".join(self.raw[-30:])))

    async def wait_for(self, match: Any, timeout: float = 30) -> dict[str, Any]:
        """Wait for a log entry for which ``match(entry)`` is true (past ones count)."""
        for entry in self.lines:
            if match(entry):
                return entry
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self._reader is not None and self._reader.done():
            raise EOFError("\n".join(self.raw[-30:]))
        self._waiters.append((match, future))
        return await asyncio.wait_for(future, timeout)

    async def wait_for_event(
        self, event: str, timeout: float = 30, **fields: Any
    ) -> dict[str, Any]:
        """Wait for a log line of ``event`` whose ``fields`` have these values (past ones count)."""
        return await self.wait_for(lambda e: _is_event(e, event, fields), timeout)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit code."""
        self.signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The log lines of ``event`` so far whose ``fields`` have these values."""
        return [e for e in self.lines if _is_event(e, event, fields)]

    def tracebacks(self) -> list[str]:
        return [e["exception"] for e in self.lines if "exception" in e]


def records_of(records: Iterable[logging.LogRecord], event: str) -> list[logging.LogRecord]:
    """The log records (``caplog.records``, say) logged with ``extra={"event": event}``."""
    return [record for record in records if getattr(record, "event", None) == event]


def _is_event(entry: dict[str, Any], event: str, fields: dict[str, Any]) -> bool:
    return entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items())


async def http_get(addr: str, path: str) -> tuple[int, str]:
    """GET ``path`` from the endpoint at ``addr`` (``host:port``) with aiohttp's client.

    Raises:
        aiohttp.ClientError: the endpoint did not answer (refused, reset, closed unanswered).
    """
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
        session.get(f"http://{addr}{path}") as response,
    ):
        return response.status, await response.text()


async def wait_until(predicate: Any, timeout: float = 30, interval: float = 0.05) -> None:
    """Poll ``predicate()`` (sync or async) until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)  # waits on the condition above, polled


def daemon_args(config: Config, *extra: str) -> list[str]:
    """`mayhem run` flags for a test's broker, queue, exchange and database."""
    return [
        "--amqp-url", config.amqp_url,
        "--queue", config.queue,
        "--exchange", config.exchange,
        "--db-url", config.db_url,
        *extra,
    ]  # fmt: skip


def pg_ctl(action: str) -> None:
    """Start or (fast) stop this machine's PostgreSQL cluster."""
    version = max(p.name for p in Path("/etc/postgresql").iterdir())
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    if action == "stop":
        command += ["-m", "fast"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)


async def pg_ready(url: str) -> bool:
    """PostgreSQL accepts a connection at ``url``."""
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


async def applied_at_least(db_url: str, n: int) -> bool:
    """At least ``n`` distinct ids are in the sample handlers' ``applied`` table."""
    found = await rows(db_url, "SELECT count(DISTINCT message_id) FROM applied")
    return found[0][0] >= n


async def in_flight_at_least(daemon: DaemonProcess, n: int) -> bool:
    """At least ``n`` handlers of ``daemon`` are running, by its /metrics."""
    assert daemon.metrics_addr is not None
    return await metric(daemon.metrics_addr, "mayhem_messages_in_flight") >= n


@contextlib.asynccontextmanager
async def pg_schema(admin_url: str, prefix: str) -> AsyncIterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards; yields a db_url whose search_path is it.

    A connection each time: PostgreSQL may have been restarted in between.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await admin.close()
    try:
        yield f"{admin_url}?search_path={name}"
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await admin.close()
