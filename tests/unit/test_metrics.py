"""The metrics module: names and types, the HTTP endpoint, readiness, and the flush at shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator

import pytest
from mayhem_testing import http_get, wait_until
from prometheus_client.parser import text_string_to_metric_families

from mayhem.metrics import DURATION_BUCKETS, OUTCOMES, HealthServer, Metrics

# DESIGN.md's metrics and the issue's, as they appear in the exposition.
EXPECTED_TYPES = {
    "mayhem_messages_total": "counter",
    "mayhem_messages_in_flight": "gauge",
    "mayhem_buffered_messages": "gauge",
    "mayhem_handler_duration_seconds": "histogram",
    "mayhem_broker_reconnects_total": "counter",
    "mayhem_stale_deliveries_total": "counter",
    "mayhem_consumer_active": "gauge",
    "mayhem_queue_depth": "gauge",
    "mayhem_database_up": "gauge",
    "mayhem_ready": "gauge",
    "mayhem_shutdown_duration_seconds": "gauge",
    "mayhem_shutdown_requeued_messages": "gauge",
    "mayhem_build_info": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
}


def types(text: str) -> dict[str, str]:
    """``# TYPE name type`` lines of an exposition, as a dict."""
    found = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            found[name] = kind
    return found


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_metric_is_exported_with_its_type():
    """Each metric of DESIGN.md and the issue is in the exposition, with the right type."""
    exported = types(Metrics().render().decode())
    for name, kind in EXPECTED_TYPES.items():
        assert exported.get(name) == kind, name


def test_outcome_children_exist_before_any_message():
    """All six outcomes are bound at start, so rate() and increase() see them from zero."""
    metrics = Metrics()
    values = samples(metrics.render().decode())
    for outcome in OUTCOMES:
        assert values[("mayhem_messages_total", (("outcome", outcome),))] == 0
    assert set(OUTCOMES) == {
        "acked", "duplicate", "requeued", "retried", "dead_lettered", "rejected",
    }  # fmt: skip
    metrics.acked.inc()
    metrics.rejected.inc(2)
    assert metrics.value("mayhem_messages_total", {"outcome": "acked"}) == 1
    assert metrics.value("mayhem_messages_total", {"outcome": "rejected"}) == 2


def test_duration_buckets_span_1ms_to_60s():
    """The handler histogram resolves a 1 ms handler and a minute-long one."""
    assert DURATION_BUCKETS[0] == 0.001
    assert DURATION_BUCKETS[-1] == 60
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    metrics = Metrics()
    metrics.handler_duration.observe(0.0005)
    metrics.handler_duration.observe(45)
    assert metrics.value("mayhem_handler_duration_seconds_bucket", {"le": "0.001"}) == 1
    assert metrics.value("mayhem_handler_duration_seconds_bucket", {"le": "30.0"}) == 1
    assert metrics.value("mayhem_handler_duration_seconds_bucket", {"le": "60.0"}) == 2


def test_build_info_carries_the_version():
    """mayhem_build_info{version} is 1 and names the package's version."""
    from mayhem import __version__  # noqa: PLC0415

    assert Metrics().value("mayhem_build_info", {"version": __version__}) == 1


def test_ready_gauge_follows_the_readiness_callable():
    """The HealthServer makes mayhem_ready read the daemon's readiness at each scrape."""
    metrics = Metrics()
    reasons = ["starting"]
    HealthServer(metrics, "127.0.0.1:0", lambda: reasons)
    assert metrics.value("mayhem_ready") == 0
    reasons.clear()
    assert metrics.value("mayhem_ready") == 1
    reasons.append("stopping")
    assert metrics.value("mayhem_ready") == 0


@pytest.fixture
async def serve():
    """Start a HealthServer (and its heartbeat) on a free loopback port; stop it afterwards."""
    servers: list[tuple[HealthServer, asyncio.Task[None]]] = []

    async def start(metrics: Metrics, ready, **kwargs) -> HealthServer:
        server = HealthServer(metrics, "127.0.0.1:0", ready, **kwargs)
        await server.start()
        servers.append((server, asyncio.create_task(server.heartbeat())))
        return server

    yield start
    for server, heartbeat in servers:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await server.stop()


async def test_endpoints_answer(serve):
    """/metrics serves the exposition, /healthz 200, /readyz 503 with the reasons, then 200."""
    metrics = Metrics()
    reasons = ["broker disconnected", "consumer not active"]
    server = await serve(metrics, lambda: reasons)
    assert server.bound is not None
    assert server.bound.startswith("127.0.0.1:")
    metrics.acked.inc(7)
    status, text = await http_get(server.bound, "/metrics")
    assert status == 200
    assert 'mayhem_messages_total{outcome="acked"} 7.0' in text.splitlines()
    assert "mayhem_ready 0.0" in text.splitlines()
    assert await http_get(server.bound, "/healthz") == (200, "ok\n")
    assert await http_get(server.bound, "/readyz") == (
        503,
        "not ready: broker disconnected, consumer not active\n",
    )
    reasons.clear()
    assert await http_get(server.bound, "/readyz") == (200, "ready\n")
    _, text = await http_get(server.bound, "/metrics")
    assert "mayhem_ready 1.0" in text.splitlines()


async def test_healthz_fails_after_the_loop_was_blocked(serve):
    """/healthz answers 503 right after the loop was blocked past the threshold, then 200 again.

    1. A HealthServer with a 0.1 s threshold; /healthz answers 200.
    2. Block the loop for 0.9 s (a sync sleep, as a careless handler would).
    3. /healthz answers 503 naming the blocked loop; once the heartbeat runs again, 200.
    """
    server = await serve(Metrics(), list, block_threshold=0.1)
    assert server.bound is not None
    assert (await http_get(server.bound, "/healthz"))[0] == 200
    time.sleep(0.9)  # noqa: ASYNC251 -- the scenario: a blocked event loop
    status, text = await http_get(server.bound, "/healthz")
    assert status == 503
    assert text.startswith("event loop blocked")
    assert not server.loop_healthy()

    async def healthy() -> bool:
        return (await http_get(server.bound, "/healthz"))[0] == 200

    await wait_until(healthy, timeout=5)


def test_textfile_holds_only_mayhem_metrics(tmp_path):
    """The textfile has mayhem's final values and none of the process collector's.

    node_exporter exports process_* metrics of its own: a second copy would collide.
    """
    metrics = Metrics()
    metrics.acked.inc(3)
    metrics.shutdown_duration.set(1.5)
    path = tmp_path / "textfile" / "mayhem.prom"
    metrics.flush(str(path), None, "mayhem")
    text = path.read_text()
    values = samples(text)
    assert values[("mayhem_messages_total", (("outcome", "acked"),))] == 3
    assert values[("mayhem_shutdown_duration_seconds", ())] == 1.5
    assert {name for name, _ in values} >= {"mayhem_build_info", "mayhem_queue_depth"}
    assert all(name.startswith("mayhem_") for name, _ in values)
    assert [p.name for p in path.parent.iterdir()] == ["mayhem.prom"]  # no temporary left


def test_textfile_rewritten_atomically(tmp_path):
    """A second flush replaces the file (rename over it), never appends to it."""
    metrics = Metrics()
    path = tmp_path / "mayhem.prom"
    metrics.flush(str(path), None, "mayhem")
    inode = path.stat().st_ino
    metrics.acked.inc()
    metrics.flush(str(path), None, "mayhem")
    assert path.stat().st_ino != inode
    assert samples(path.read_text())[("mayhem_messages_total", (("outcome", "acked"),))] == 1


@pytest.mark.parametrize(
    ("umask", "mode"), [(0o077, 0o600), (0o027, 0o640), (0o022, 0o640), (0, 0o640)]
)
def test_textfile_mode_follows_the_umask_never_wider_than_0640(tmp_path, umask, mode):
    """Owner read-write, group read at most, others nothing; a wider old file is replaced."""
    path = tmp_path / "mayhem.prom"
    path.write_text("")
    path.chmod(0o644)
    old = os.umask(umask)
    try:
        Metrics().flush(str(path), None, "mayhem")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["mayhem.prom"]


def test_textfile_failure_is_logged_not_raised(tmp_path, caplog):
    """An unwritable textfile path is a warning: the shutdown goes on."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="mayhem.metrics"):
        Metrics().flush(str(blocker / "mayhem.prom"), None, "mayhem")
    assert "not written" in caplog.text


class _Pushgateway(http.server.BaseHTTPRequestHandler):
    pushes: list[tuple[str, str, bytes]]
    authorizations: list[str | None]

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.pushes.append(("PUT", self.path, body))
        self.authorizations.append(self.headers["Authorization"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def pushgateway() -> Iterator[tuple[str, list[tuple[str, str, bytes]], list[str | None]]]:
    """A tiny HTTP server on loopback standing in for a Pushgateway; records the pushes."""
    pushes: list[tuple[str, str, bytes]] = []
    authorizations: list[str | None] = []
    handler = type("Handler", (_Pushgateway,), {"pushes": pushes, "authorizations": authorizations})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", pushes, authorizations
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_pushgateway_gets_the_final_values(pushgateway):
    """The flush PUTs mayhem's metrics (only those) under job "mayhem"."""
    url, pushes, authorizations = pushgateway
    metrics = Metrics()
    metrics.dead_lettered.inc(2)
    metrics.flush(None, url, "mayhem")
    [(method, path, body)] = pushes
    assert (method, path) == ("PUT", "/metrics/job/mayhem")
    values = samples(body.decode())
    assert values[("mayhem_messages_total", (("outcome", "dead_lettered"),))] == 2
    assert all(name.startswith("mayhem_") for name, _ in values)
    assert authorizations == [None]
    assert authorizations == [None]


def test_pushgateway_failure_is_logged_without_the_password(caplog):
    """An unreachable Pushgateway is a warning, and its URL's password is masked."""
    with caplog.at_level(logging.WARNING, logger="mayhem.metrics"):
        Metrics().flush(None, "http://pusher:s3cret-pw@127.0.0.1:9/", "mayhem")
    assert "not pushed" in caplog.text
    assert "s3cret-pw" not in caplog.text


def test_pushgateway_credentials_in_the_url_are_sent_as_basic_auth(pushgateway):
    """user:password@ in the URL authenticates the push (urllib would read it as a host)."""
    url, pushes, authorizations = pushgateway
    Metrics().flush(None, url.replace("http://", "http://pusher:p%40ss-w0rd@"), "mayhem")
    [(method, path, _)] = pushes
    assert (method, path) == ("PUT", "/metrics/job/mayhem")
    assert authorizations == ["Basic " + base64.b64encode(b"pusher:p@ss-w0rd").decode()]


@pytest.mark.parametrize(
    "url",
    [
        "http://pusher:s3cret-pw@127.0.0.1/",  # no port: http.client read 's3cret-pw@...' as one
        "pusher:s3cret-pw@127.0.0.1",
        "http://pusher:s3cret-pw@[::1/",
    ],
)
def test_pushgateway_url_without_port_fails_as_one_masked_line(caplog, url):
    """Any failure of the push is a warning without the password, never an exception."""
    with caplog.at_level(logging.WARNING, logger="mayhem.metrics"):
        Metrics().flush(None, url, "mayhem")
    [record] = caplog.records
    assert record.getMessage().startswith("metrics not pushed to ")
    assert record.exc_info is None
    assert "s3cret-pw" not in caplog.text


# -- the endpoint's limits ------------------------------------------------------------------


async def _connect(addr: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = addr.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection without an answer (a reset, if data was unread)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def test_endpoint_refuses_connections_beyond_its_limit(serve, caplog):
    """Past max_connections, a new connection is closed at once, counted and logged once.

    1. Three idle connections fill a limit of 3.
    2. Two more are closed by the server without an answer; the refusal counter says 2 and
       one warning says why.
    3. Once one idle connection is closed, /healthz answers again.
    """
    metrics = Metrics()
    server = await serve(metrics, list, max_connections=3)
    writers = []
    try:
        idle = [await _connect(server.bound) for _ in range(3)]
        writers += [writer for _, writer in idle]
        await wait_until(lambda: server.open_connections == 3, timeout=5)
        with caplog.at_level(logging.WARNING, logger="mayhem.metrics"):
            for _ in range(2):
                reader, writer = await _connect(server.bound)
                writers.append(writer)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await _closed_by_server(reader)
        assert metrics.value("mayhem_http_connections_refused_total") == 2
        [record] = caplog.records
        assert record.getMessage() == (
            "metrics endpoint: refusing connections beyond 3 open ◆ 1 refused so far"
        )
        idle[0][1].close()
        await wait_until(lambda: server.open_connections == 2, timeout=5)
        assert (await http_get(server.bound, "/healthz"))[0] == 200
    finally:
        for writer in writers:
            writer.close()


async def test_endpoint_closes_idle_and_slow_connections(serve):
    """A connection that sends nothing, or its request's head too slowly, is closed.

    idle_timeout 0.5 s: one connection sends nothing; another sends a header line every
    0.1 s and never finishes; a third is a keep-alive client that got its answer. The server
    closes all three, and counts none of them as refused.
    """
    metrics = Metrics()
    server = await serve(metrics, list, idle_timeout=0.5)
    silent_reader, silent_writer = await _connect(server.bound)
    slow_reader, slow_writer = await _connect(server.bound)
    kept_reader, kept_writer = await _connect(server.bound)
    try:
        kept_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(kept_reader.readuntil(b"ok\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        slow_writer.write(b"GET /metrics HTTP/1.1\r\n")
        began = time.monotonic()
        while not slow_reader.at_eof() and time.monotonic() - began < 5:
            slow_writer.write(b"X-Slow: 1\r\n")
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                await asyncio.wait_for(slow_reader.read(), 0.1)
        assert slow_reader.at_eof()
        assert time.monotonic() - began < 2
        assert await _closed_by_server(silent_reader)
        assert await _closed_by_server(kept_reader)
        await wait_until(lambda: server.open_connections == 0, timeout=5)
        assert metrics.value("mayhem_http_connections_refused_total") == 0
    finally:
        for writer in (silent_writer, slow_writer, kept_writer):
            writer.close()


async def test_endpoint_keeps_a_busy_keepalive_connection(serve):
    """Requests on one keep-alive connection, closer together than idle_timeout, all answer."""
    server = await serve(Metrics(), list, idle_timeout=0.5)
    reader, writer = await _connect(server.bound)
    for _ in range(4):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"ok\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.3)  # the scenario: a scraper's pause, under the idle timeout
    writer.close()
    await writer.wait_closed()


async def test_endpoint_answers_unknown_paths_and_methods(serve):
    server = await serve(Metrics(), list)
    assert (await http_get(server.bound, "/nope"))[0] == 404
    reader, writer = await _connect(server.bound)
    try:
        writer.write(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 405")
    assert b"Allow: GET, HEAD" in answer
