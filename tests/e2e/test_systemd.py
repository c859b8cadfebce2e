"""The daemon as systemd sees it: sd_notify datagrams on a socket the test binds, as PID 1 would.

Each test binds its own AF_UNIX datagram socket, runs ``mayhem run`` with ``NOTIFY_SOCKET``
(and ``WATCHDOG_USEC``) pointing at it, and reads what arrives, in order, with the time of
arrival. A 400 ms watchdog means a ping every 200 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import attrs
import pytest
from conftest import PG_URL
from mayhem_testing import (
    applied_at_least,
    close_connections_of,
    daemon_args,
    declare,
    in_flight_at_least,
    metric,
    pg_ctl,
    pg_ready,
    publish,
    rows,
    wait_until,
)

WATCHDOG_USEC = 400_000
PING = WATCHDOG_USEC / 1e6 / 2


@attrs.frozen
class Datagram:
    """One notification: its ``KEY=VALUE`` fields and when it arrived."""

    fields: dict[str, str]
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class Listener:
    """What systemd would receive on its notify socket, kept in arrival order."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.received: list[Datagram] = []
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.sock.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._keep(await loop.sock_recv(self.sock, 4096))

    def _keep(self, data: bytes) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.received.append(Datagram(fields, time.monotonic(), time.time()))

    def drain(self) -> None:
        """Take whatever is still queued in the socket (after the daemon has exited)."""
        while True:
            try:
                self._keep(self.sock.recv(4096))
            except BlockingIOError:
                return

    def with_key(self, key: str, *, after: float = 0.0) -> list[Datagram]:
        return [d for d in self.received if key in d.fields and d.at >= after]

    async def wait_for(
        self,
        key: str,
        value: str | None = None,
        *,
        after: float = 0.0,
        count: int = 1,
        timeout: float = 30,
    ) -> Datagram:
        """Wait for ``count`` datagrams with ``key`` (=``value``) arrived at ``after`` or later."""

        def found() -> list[Datagram]:
            return [d for d in self.with_key(key, after=after) if d.has(key, value)]

        await wait_until(lambda: len(found()) >= count, timeout=timeout, interval=0.01)
        return found()[count - 1]


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)  # noqa: FBT003 -- the socket API
    return sock


@pytest.fixture
async def listener(tmp_path: Path):
    """A notify socket at a path, as systemd's /run/systemd/notify."""
    path = str(tmp_path / "notify")
    assert len(path) < 108, "AF_UNIX paths are limited to 108 bytes"
    found = Listener(_bound(path), path)
    found.start()
    yield found
    await found.stop()


@pytest.fixture
async def abstract_listener():
    """A notify socket in the abstract namespace: NOTIFY_SOCKET=@name."""
    name = f"mayhem-test-{uuid.uuid4().hex}"
    found = Listener(_bound("\0" + name), "@" + name)
    found.start()
    yield found
    await found.stop()


def _env(notify: Listener, watchdog_usec: int | None = WATCHDOG_USEC, **extra: str) -> dict:
    # Set every variable, so that none leaks in from a test runner that runs under systemd.
    return {
        "NOTIFY_SOCKET": notify.address,
        "WATCHDOG_USEC": str(watchdog_usec) if watchdog_usec else "",
        "WATCHDOG_PID": "",
        **extra,
    }


def _gaps(pings: list[Datagram]) -> list[tuple[float, float]]:
    """(start, length) of each gap between consecutive pings, in wall-clock time."""
    return [(a.wall, b.wall - a.wall) for a, b in itertools.pairwise(pings)]


async def _consumers(amqp, queue: str) -> int:
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count
    finally:
        await channel.close()


async def test_ready_after_the_consumer_is_up_pings_then_stopping(
    amqp, make_config, listener, spawn
):
    """The life of a unit, from READY=1 to STOPPING=1, on a notify socket at a path.

    1. Start the daemon with NOTIFY_SOCKET and WATCHDOG_USEC=400000 (a ping every 200 ms).
    2. The first datagram is READY=1 with a STATUS; when it arrives the queue already has the
       daemon's consumer.
    3. WATCHDOG=1 keeps coming at about the interval: at least 3 in the time 6 intervals take,
       and not a flood.
    4. SIGTERM: STOPPING=1 arrives, no ping after it, and the daemon exits 0.
    """
    config = make_config()
    await declare(amqp, config)
    daemon = spawn(daemon_args(config, "--handler", "sample_handlers:record"), env=_env(listener))
    await daemon.start(wait_ready=False)
    ready = await listener.wait_for("READY", "1")
    assert await _consumers(amqp, config.queue) == 1, "READY=1 came before the consumer"
    assert listener.received[0] is ready, "READY=1 is the first notification"
    assert ready.fields["STATUS"].startswith("ready;")
    await daemon.wait_for_event("started")

    last = await listener.wait_for("WATCHDOG", "1", after=ready.at, count=8, timeout=10)
    window = [d for d in listener.with_key("WATCHDOG") if ready.at <= d.at <= ready.at + 6 * PING]
    assert len(window) >= 3, f"only {len(window)} pings in {6 * PING:.1f} s"
    pings = listener.with_key("WATCHDOG", after=ready.at)
    assert last.at - pings[0].at >= 4 * PING, "pings faster than every interval"

    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(timeout=30) == 0
    listener.drain()
    stopping = [d for d in listener.received if d.has("STOPPING", "1")]
    assert len(stopping) == 1
    assert stopping[0].at >= signalled
    assert stopping[0].fields.get("STATUS") == "stopping"
    assert listener.with_key("WATCHDOG", after=stopping[0].at) == []
    assert not [d for d in listener.received if d.has("READY")][1:], "READY=1 only once"


async def test_abstract_notify_socket(amqp, make_config, abstract_listener, spawn):
    """NOTIFY_SOCKET=@name (the abstract namespace): READY=1, then STOPPING=1 on SIGTERM.

    Without WATCHDOG_USEC there is no WATCHDOG=1 at all.
    """
    config = make_config()
    daemon = spawn(daemon_args(config), env=_env(abstract_listener, watchdog_usec=None))
    await daemon.start()
    await abstract_listener.wait_for("READY", "1")
    assert await daemon.stop() == 0
    await abstract_listener.wait_for("STOPPING", "1")
    abstract_listener.drain()
    keys = [next(iter(d.fields)) for d in abstract_listener.received]
    assert keys[0] == "READY"
    assert keys[-1] == "STOPPING"
    assert "WATCHDOG" not in keys


async def test_status_counts_and_no_pings_for_another_watchdog_pid(
    amqp, make_config, listener, spawn
):
    """WATCHDOG_PID names another process: no pings; STATUS= still reports live counts.

    1. Publish 3 messages; start the daemon with WATCHDOG_USEC set but WATCHDOG_PID of the
       test process (systemd watches someone else).
    2. The periodic STATUS= (every 5 s) says 3 acked.
    3. In those 5 s (25 watchdog intervals) no WATCHDOG=1 was sent.
    """
    config = make_config()
    await declare(amqp, config)
    await publish(amqp, config.queue, [b"{}"] * 3)
    env = {**_env(listener), "WATCHDOG_PID": str(os.getpid())}
    daemon = spawn(daemon_args(config, "--handler", "sample_handlers:record"), env=env)
    await daemon.start()
    ready = await listener.wait_for("READY", "1")
    await wait_until(lambda: applied_at_least(config.db_url, 3), timeout=10)
    status = await listener.wait_for("STATUS", after=ready.at + 0.001, timeout=15)
    assert "READY" not in status.fields
    assert status.fields["STATUS"].startswith("ready;")
    assert "3 acked" in status.fields["STATUS"]
    assert listener.with_key("WATCHDOG") == []
    assert await daemon.stop() == 0


async def test_extend_timeout_while_the_drain_progresses(amqp, make_config, listener, spawn):
    """EXTEND_TIMEOUT_USEC= while handlers finish one by one during the drain.

    1. Three handlers in flight that take 1 s, 2 s and 3 s; SIGTERM once all three run.
    2. STOPPING=1, then EXTEND_TIMEOUT_USEC= as each handler finishes (at least twice), asking
       for at least a second more each time; none before STOPPING=1.
    3. Exit 0, every message applied: systemd was kept from SIGKILLing a daemon at work.
    """
    config = make_config()
    await declare(amqp, config)
    bodies = [json.dumps({"sleep": seconds}).encode() for seconds in (1, 2, 3)]
    await publish(amqp, config.queue, bodies)
    daemon = spawn(
        daemon_args(config, "--handler", "sample_handlers:staggered", "--concurrency", "3"),
        env=_env(listener),
    )
    await daemon.start()
    await wait_until(lambda: in_flight_at_least(daemon, 3), timeout=10)
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(timeout=30) == 0
    listener.drain()
    stopping = next(d for d in listener.received if d.has("STOPPING", "1"))
    extends = listener.with_key("EXTEND_TIMEOUT_USEC")
    assert len(extends) >= 2, f"{len(extends)} EXTEND_TIMEOUT_USEC during a 3 s drain"
    assert all(d.at >= stopping.at for d in extends)
    assert all(int(d.fields["EXTEND_TIMEOUT_USEC"]) >= 1_000_000 for d in extends)
    assert await rows(config.db_url, "SELECT count(*) FROM applied") == [(3,)]
    [drained] = daemon.events("shutdown_step", step="drained")
    assert drained["cancelled"] == 0


async def test_reload_sends_reloading_then_ready(amqp, make_config, listener, spawn, tmp_path):
    """SIGHUP: RELOADING=1 with MONOTONIC_USEC= (for Type=notify-reload), then READY=1.

    1. Run with --config FILE (concurrency 2); wait for READY=1.
    2. Change the file to concurrency 3 and send SIGHUP.
    3. RELOADING=1 arrives with this machine's CLOCK_MONOTONIC of the reload, then READY=1;
       the new concurrency is applied.
    """
    config = make_config()
    config_file = tmp_path / "mayhem.toml"
    config_file.write_text("[mayhem]\nconcurrency = 2\n")
    daemon = spawn(daemon_args(config, "--config", str(config_file)), env=_env(listener))
    await daemon.start()
    ready = await listener.wait_for("READY", "1")
    config_file.write_text("[mayhem]\nconcurrency = 3\n")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.signal(signal.SIGHUP)
    reloading = await listener.wait_for("RELOADING", "1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
    assert reloading.fields["STATUS"] == "reloading"
    ready_again = await listener.wait_for("READY", "1", after=reloading.at)
    assert ready_again.at > ready.at
    assert ready_again.fields["STATUS"].startswith("ready;")
    reloaded = await daemon.wait_for_event("config_reloaded")
    assert reloaded["concurrency"] == 3
    assert await daemon.stop() == 0


async def test_a_blocked_loop_stops_the_pings(amqp, make_config, listener, spawn):
    """A handler that blocks the event loop silences the watchdog for as long as it blocks.

    1. Steady pings every 200 ms.
    2. A message whose handler calls time.sleep(2) on the loop (the bug systemd should catch).
    3. No ping arrives while the loop is blocked: one gap of about 2 s covers the block.
    4. Once the handler returns, the pings resume.
    """
    config = make_config()
    await declare(amqp, config)
    daemon = spawn(
        daemon_args(config, "--handler", "sample_handlers:blocks_the_loop"), env=_env(listener)
    )
    await daemon.start()
    ready = await listener.wait_for("READY", "1")
    await listener.wait_for("WATCHDOG", "1", after=ready.at, count=3, timeout=10)
    block = 2.0
    await publish(amqp, config.queue, [json.dumps({"block": block}).encode()])
    await wait_until(lambda: applied_at_least(config.db_url, 1), timeout=15)
    [(began,)] = await rows(config.db_url, "SELECT at FROM applied")
    resumed = await listener.wait_for("WATCHDOG", "1", after=time.monotonic(), count=3)

    pings = [d for d in listener.with_key("WATCHDOG") if d.at <= resumed.at]
    during = [d for d in pings if began + 0.5 < d.wall < began + block]
    assert during == [], "pinged while the loop was blocked"
    start, longest = max(_gaps(pings), key=lambda gap: gap[1])
    assert longest >= block - 0.5
    assert start <= began + 0.5
    assert start + longest >= began + block
    assert await daemon.stop() == 0


async def test_a_dead_consumer_stops_the_pings(amqp, make_config, listener, spawn):
    """While the broker connection is gone the consumer is dead: no pings until it is back.

    1. Steady pings; the broker closes the daemon's connection.
    2. The pings stop until the daemon has reconnected and consumes again (a gap of several
       intervals), then resume.
    """
    config = make_config()
    await declare(amqp, config)
    daemon = spawn(daemon_args(config, "--handler", "sample_handlers:record"), env=_env(listener))
    await daemon.start()
    ready = await listener.wait_for("READY", "1")
    await listener.wait_for("WATCHDOG", "1", after=ready.at, count=3, timeout=10)
    closed = time.time()
    assert close_connections_of(daemon.pid) >= 1
    await daemon.wait_for_event("consuming_again", timeout=30)
    resumed = await listener.wait_for("WATCHDOG", "1", after=time.monotonic(), count=3)
    pings = [d for d in listener.with_key("WATCHDOG") if d.at <= resumed.at]
    start, longest = max(_gaps(pings), key=lambda gap: gap[1])
    assert longest >= 3 * PING, f"the longest gap in pings was {longest:.2f} s"
    assert start >= closed - 2 * PING
    assert await metric(daemon.metrics_addr, "mayhem_broker_reconnects_total") >= 1
    assert await daemon.stop() == 0


@pytest.mark.postgres
async def test_pings_go_on_while_paused_for_a_database_outage(
    amqp, make_config, pg_url, listener, spawn
):
    """Paused on purpose for a database outage, the daemon is healthy: the pings go on.

    1. Messages flowing into PostgreSQL; stop PostgreSQL.
    2. The daemon pauses consumption and probes the database; meanwhile WATCHDOG=1 keeps
       coming at the interval, so systemd does not restart a daemon that is waiting correctly.
    3. Start PostgreSQL again; the daemon resumes.
    """
    config = make_config(db_url=pg_url)
    await declare(amqp, config)
    await publish(amqp, config.queue, [b"{}"] * 1000)
    daemon = spawn(
        daemon_args(config, "--handler", "sample_handlers:record"),
        env=_env(listener, SAMPLE_HANDLER_DELAY="0.01"),
    )
    await daemon.start()
    await wait_until(lambda: applied_at_least(pg_url, 50), timeout=30)
    try:
        await asyncio.to_thread(pg_ctl, "stop")
        await daemon.wait_for_event("consumption_paused", 30)
        paused = time.monotonic()
        await wait_until(lambda: len(daemon.events("database_still_unavailable")) >= 3, timeout=30)
        probing = time.monotonic()
    finally:
        await asyncio.to_thread(pg_ctl, "start")
        await wait_until(lambda: pg_ready(PG_URL), timeout=60)
    pings = [d for d in listener.with_key("WATCHDOG", after=paused) if d.at <= probing]
    assert len(pings) >= (probing - paused) / PING / 2
    assert max((gap for _, gap in _gaps(pings)), default=0.0) < 5 * PING
    await daemon.wait_for_event("database_back", 60)
    assert await daemon.stop() == 0


async def test_no_ready_when_startup_fails(make_config, listener, spawn):
    """A daemon that cannot reach the broker exits 1 without ever sending READY=1."""
    config = make_config(amqp_url="amqp://guest:guest@127.0.0.1:1/")
    daemon = spawn(daemon_args(config), env=_env(listener))
    await daemon.start(wait_ready=False)
    assert await daemon.wait(timeout=30) == 1
    listener.drain()
    assert [d for d in listener.received if d.has("READY")] == []
    assert listener.with_key("WATCHDOG") == []
