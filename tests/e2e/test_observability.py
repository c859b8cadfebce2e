"""What the daemon tells its operators: metrics that match the oracle, health, readiness, logs."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import signal
import urllib.parse

import pytest
from mayhem_testing import (
    DaemonProcess,
    daemon_args,
    declare,
    drain,
    http_get,
    oracle,
    publish,
    rows,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

OUTCOMES = ("acked", "duplicate", "requeued", "retried", "dead_lettered", "rejected")
SETTLED = ("acked", "duplicate", "dead_lettered", "rejected")
SECRET = "guest:guest"  # noqa: S105 -- the test broker's user:password in its URL
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _scrape(daemon: DaemonProcess) -> Samples:
    status, text = await http_get(daemon.metrics_addr, "/metrics")
    assert status == 200
    return _parse(text)


def _outcome(values: Samples, outcome: str) -> float:
    return values[("mayhem_messages_total", (("outcome", outcome),))]


def _value(values: Samples, name: str) -> float:
    return values[(name, ())]


async def _ready_in(amqp, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare on a channel of the test's own)."""
    channel = await amqp.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count
    finally:
        await channel.close()


async def _count(db_url: str, sql: str) -> int:
    return (await rows(db_url, sql))[0][0]


async def test_counters_equal_the_oracle_per_outcome(amqp, make_config, spawn):
    """Each outcome counter equals what the database and the dead-letter queue say.

    1. Publish 20 good messages, 5 of them twice (same message_id), 3 that always fail,
       2 that the handler rejects and 2 that are not JSON; max_attempts 3, retry delay 0.2 s.
    2. Wait until the rows and the dead-letter queue hold every message, and the daemon has
       settled as many deliveries as were published.
    3. Scrape /metrics once: acked = distinct rows, duplicate = republished, dead_lettered and
       rejected = dead letters by x-mayhem-reason, retried = their earlier attempts.
    """
    config = make_config(max_attempts=3, retry_delays=(0.2,))
    await declare(amqp, config)
    good = [json.dumps({"n": n}).encode() for n in range(20)]
    good_ids = await publish(amqp, config.queue, good)
    await publish(amqp, config.queue, good[:5], message_ids=good_ids[:5])
    other_ids = await publish(amqp, config.queue, [b"fail"] * 3 + [b"reject"] * 2 + [b"nope"] * 2)
    published = len(good) + 5 + len(other_ids)
    options = [
        "--handler", "sample_handlers:failing",
        "--max-attempts", "3",
        "--retry-delays", "0.2",
    ]  # fmt: skip
    daemon = spawn(daemon_args(config, *options))
    await daemon.start()

    async def everything_landed() -> bool:
        applied = await _count(config.db_url, "SELECT count(*) FROM applied")
        return applied == 20 and await _ready_in(amqp, config.dead_queue) == 7

    async def all_settled() -> bool:
        values = await _scrape(daemon)
        return sum(_outcome(values, outcome) for outcome in SETTLED) == published

    await wait_until(everything_landed, timeout=20)
    await wait_until(all_settled, timeout=10)
    values = await _scrape(daemon)
    assert await daemon.stop() == 0

    applied = [row[0] for row in await rows(config.db_url, "SELECT message_id FROM applied")]
    dead = await drain(amqp, config.dead_queue)
    reasons = collections.Counter(m.headers["x-mayhem-reason"] for m in dead)
    failed = [m for m in dead if m.headers["x-mayhem-reason"] == "failed"]
    assert len(applied) == len(set(applied)) == 20
    assert _outcome(values, "acked") == len(set(applied))
    assert _outcome(values, "duplicate") == len(good) + 5 - len(set(applied))
    assert _outcome(values, "dead_lettered") == reasons["failed"] == 3
    assert _outcome(values, "rejected") == reasons["rejected"] == 4
    assert _outcome(values, "retried") == sum(m.headers["x-mayhem-attempts"] - 1 for m in failed)
    assert _outcome(values, "retried") == 6
    assert _outcome(values, "requeued") == 0
    # One observation per delivery a worker took: every outcome, retries included.
    deliveries = sum(_outcome(values, outcome) for outcome in OUTCOMES)
    assert _value(values, "mayhem_handler_duration_seconds_count") == deliveries == 38
    assert _value(values, "mayhem_messages_in_flight") == 0
    assert _value(values, "mayhem_buffered_messages") == 0
    assert _value(values, "mayhem_stale_deliveries_total") == 0
    queued = await drain(amqp, config.queue)
    assert queued == []
    lost = set(good_ids + other_ids) - set(applied) - {m.message_id for m in dead}
    assert lost == set()
    assert daemon.tracebacks() == []


async def test_textfile_holds_the_final_counts_after_sigterm(amqp, make_config, spawn, tmp_path):
    """After SIGTERM the textfile exists and holds the final counts of mayhem's own metrics.

    1. Publish 5 good messages and 1 rejected one; run with --metrics-textfile.
    2. Once all are settled, SIGTERM; exit 0.
    3. The file parses: acked 5, rejected 1, shutdown duration > 0, not ready, not consuming;
       no process_* metrics (node_exporter has its own); no temporary file left beside it.
    """
    config = make_config()
    await declare(amqp, config)
    await publish(amqp, config.queue, [b"{}"] * 5 + [b"reject"])
    textfile = tmp_path / "textfile" / "mayhem.prom"
    daemon = spawn(
        daemon_args(
            config, "--handler", "sample_handlers:failing", "--metrics-textfile", str(textfile)
        )
    )
    await daemon.start()

    async def settled() -> bool:
        values = await _scrape(daemon)
        return (_outcome(values, "acked"), _outcome(values, "rejected")) == (5, 1)

    await wait_until(settled, timeout=20)
    assert not textfile.exists()
    assert await daemon.stop() == 0
    values = _parse(textfile.read_text())
    assert _outcome(values, "acked") == 5
    assert _outcome(values, "rejected") == 1
    assert _outcome(values, "duplicate") == _outcome(values, "requeued") == 0
    assert _value(values, "mayhem_shutdown_duration_seconds") > 0
    assert _value(values, "mayhem_shutdown_requeued_messages") == 0
    assert _value(values, "mayhem_ready") == 0
    assert _value(values, "mayhem_consumer_active") == 0
    assert _value(values, "mayhem_messages_in_flight") == 0
    assert all(name.startswith("mayhem_") for name, _ in values)
    assert [path.name for path in textfile.parent.iterdir()] == ["mayhem.prom"]
    assert daemon.events("metrics_written", path=str(textfile))


async def test_readyz_503_during_the_drain(amqp, make_config, spawn, tmp_path):
    """During the drain /readyz answers 503 "stopping" and /metrics still shows the drain.

    1. One worker, prefetch 1: a handler that never returns holds the first message, three
       more wait in the broker (queue depth 3); drain_timeout 2 s; a textfile configured.
    2. SIGTERM; once the buffered messages are requeued (step 3), the drain is going on.
    3. /readyz: 503 "stopping"; /metrics: 1 in flight, not ready, not consuming.
    4. Exit 0; the textfile says the shutdown requeued 1 message; all 4 are back in the queue.
    """
    config = make_config(handler="sample_handlers:stuck")
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b"stuck", b"{}", b"{}", b"{}"])
    textfile = tmp_path / "mayhem.prom"
    options = [
        "--handler", "sample_handlers:stuck",
        "--concurrency", "1",
        "--prefetch", "1",
        "--drain-timeout", "2",
        "--metrics-textfile", str(textfile),
    ]  # fmt: skip
    daemon = spawn(daemon_args(config, *options))
    await daemon.start()

    async def stuck_with_three_waiting() -> bool:
        values = await _scrape(daemon)
        in_flight = _value(values, "mayhem_messages_in_flight")
        return in_flight == 1 and _value(values, "mayhem_queue_depth") == 3

    # The depth is polled every 5 s.
    await wait_until(stuck_with_three_waiting, timeout=15)
    assert await http_get(daemon.metrics_addr, "/readyz") == (200, "ready\n")
    daemon.signal(signal.SIGTERM)
    await daemon.wait_for_event("shutdown_step", timeout=10, step="buffer_requeued")
    status, body = await http_get(daemon.metrics_addr, "/readyz")
    values = await _scrape(daemon)
    assert (status, body) == (503, "not ready: stopping\n")
    assert _value(values, "mayhem_messages_in_flight") == 1
    assert _value(values, "mayhem_ready") == 0
    assert _value(values, "mayhem_consumer_active") == 0
    assert await daemon.wait(timeout=20) == 0
    final = _parse(textfile.read_text())
    assert _value(final, "mayhem_shutdown_requeued_messages") == 1
    assert _outcome(final, "requeued") == 1
    assert _value(final, "mayhem_shutdown_duration_seconds") >= 2
    assert _value(final, "mayhem_messages_in_flight") == 0
    verdict = await oracle(amqp, config.queue, config.db_url, ids)
    assert verdict.queued == 4
    assert verdict.lost == frozenset()


async def test_buffered_gauge_counts_deliveries_only(amqp, make_config, spawn):
    """During the drain, mayhem_buffered_messages counts no message: none is buffered.

    1. One stuck handler, nothing else delivered; drain_timeout 1 s.
    2. SIGTERM; after step 3 the buffer holds no delivery.
    3. /metrics shows 1 in flight and 0 buffered.
    """
    config = make_config(handler="sample_handlers:stuck")
    await declare(amqp, config)
    await publish(amqp, config.queue, [b"stuck"])
    daemon = spawn(
        daemon_args(config, "--handler", "sample_handlers:stuck", "--drain-timeout", "1")
    )
    await daemon.start()

    async def stuck() -> bool:
        return _value(await _scrape(daemon), "mayhem_messages_in_flight") == 1

    await wait_until(stuck, timeout=10)
    daemon.signal(signal.SIGTERM)
    await daemon.wait_for_event("shutdown_step", timeout=10, step="buffer_requeued")
    values = await _scrape(daemon)
    assert _value(values, "mayhem_messages_in_flight") == 1
    assert _value(values, "mayhem_buffered_messages") == 0


class _BrokerProxy:
    """A TCP proxy to the broker that the test can cut: connections closed, new ones refused.

    Closing the daemon's connection on the broker is not enough to watch readiness from
    outside: aio-pika reconnects within milliseconds. Behind the proxy, the broker stays
    unreachable for as long as the test wants, and no other test's connections are touched.
    """

    def __init__(self, amqp_url: str) -> None:
        parts = urllib.parse.urlsplit(amqp_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._parts = parts
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        netloc = self._parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(self._parts._replace(netloc=netloc))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and close every proxied connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)


@pytest.fixture
async def broker_proxy(amqp_url):
    proxy = _BrokerProxy(amqp_url)
    await proxy.start()
    yield proxy
    await proxy.cut()


async def test_readyz_follows_the_broker_connection(amqp, make_config, spawn, broker_proxy):
    """/readyz and mayhem_ready say not ready while the broker is unreachable, ready after.

    1. A ready daemon, connected to the broker through a proxy.
    2. The proxy cuts the connection and refuses new ones: /readyz answers 503 "broker
       disconnected", mayhem_ready is 0 and mayhem_consumer_active is 0.
    3. The proxy listens again: the daemon reconnects by itself; /readyz 200, mayhem_ready 1,
       one reconnect counted, and a message published now is consumed.
    """
    config = make_config(amqp_url=broker_proxy.url)
    await declare(amqp, config)
    daemon = spawn(daemon_args(config, "--handler", "sample_handlers:record"))
    await daemon.start()
    assert await http_get(daemon.metrics_addr, "/readyz") == (200, "ready\n")
    await broker_proxy.cut()

    async def not_ready() -> bool:
        return (await http_get(daemon.metrics_addr, "/readyz"))[0] == 503

    await wait_until(not_ready, timeout=10)
    status, body = await http_get(daemon.metrics_addr, "/readyz")
    values = await _scrape(daemon)
    assert status == 503
    assert "broker disconnected" in body
    assert _value(values, "mayhem_ready") == 0
    assert _value(values, "mayhem_consumer_active") == 0
    await broker_proxy.start()

    async def ready_again() -> bool:
        status, _ = await http_get(daemon.metrics_addr, "/readyz")
        values = await _scrape(daemon)
        reconnects = _value(values, "mayhem_broker_reconnects_total")
        return status == 200 and _value(values, "mayhem_ready") == 1 and reconnects >= 1

    await wait_until(ready_again, timeout=30)
    assert _value(await _scrape(daemon), "mayhem_broker_reconnects_total") == 1
    ids = await publish(amqp, config.queue, [b"{}"])
    await wait_until(lambda: _count(config.db_url, "SELECT count(*) FROM applied"), timeout=10)
    assert await daemon.stop() == 0
    verdict = await oracle(amqp, config.queue, config.db_url, ids)
    assert (verdict.applied, verdict.lost) == (1, frozenset())


async def test_json_logs_health_and_no_secret(amqp, make_config, spawn):
    """Every log line is a JSON object; message lines carry message_id; no password anywhere.

    1. Publish a good, a failing and a rejected message with known ids; run at DEBUG level
       (aio-pika and aiormq log the connection URL there).
    2. /healthz answers 200; neither /metrics nor /readyz shows the password.
    3. After SIGTERM, every stderr line parses as JSON with time, level and message; the
       events about the failing and the rejected message carry their message_id; the
       password appears nowhere.
    """
    config = make_config(max_attempts=1)
    await declare(amqp, config)
    await publish(
        amqp, config.queue, [b"{}", b"fail", b"reject"], message_ids=["m-good", "m-fail", "m-rej"]
    )
    options = [
        "--handler", "sample_handlers:failing",
        "--max-attempts", "1",
        "--log-level", "DEBUG",
    ]  # fmt: skip
    daemon = spawn(daemon_args(config, *options))
    await daemon.start()

    async def settled() -> bool:
        return await _ready_in(amqp, config.dead_queue) == 2

    await wait_until(settled, timeout=20)
    assert await http_get(daemon.metrics_addr, "/healthz") == (200, "ok\n")
    for path in ("/metrics", "/readyz"):
        _, text = await http_get(daemon.metrics_addr, path)
        assert SECRET not in text
    assert await daemon.stop() == 0

    assert len(daemon.raw) > 20
    entries = [json.loads(line) for line in daemon.raw]
    for entry in entries:
        assert isinstance(entry, dict)
        assert TIME.match(entry["time"]), entry
        assert entry["level"] in {"debug", "info", "warning", "error", "critical"}, entry
        assert isinstance(entry["message"], str)
    by_id = collections.defaultdict(list)
    for entry in entries:
        if "event" in entry:
            by_id[entry.get("message_id")].append((entry["event"], entry.get("reason")))
    assert ("handler_failed", None) in by_id["m-fail"]
    assert ("dead_lettered", "failed") in by_id["m-fail"]
    assert ("dead_lettered", "rejected") in by_id["m-rej"]
    unattributed = [e for e, _ in by_id[None] if e in {"dead_lettered", "handler_failed"}]
    assert unattributed == []
    [started] = daemon.events("started")
    assert started["metrics_addr"] == daemon.metrics_addr  # fields beside the event
    assert not any(SECRET in line for line in daemon.raw)
    assert any("amqp://guest:***@" in line for line in daemon.raw)
