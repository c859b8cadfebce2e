"""The HTTP endpoint: /metrics, /healthz and /readyz, readiness, and the connection limits.

Requests go through aiohttp's client (``http_get``); the tests of the limits open raw
connections, because what they try is connections that never send a request, or send it
slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import aiohttp
import pytest
from mayhem_testing import http_get, wait_until

from mayhem.health import HealthServer
from mayhem.metrics import Metrics


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
        with caplog.at_level(logging.WARNING, logger="mayhem.health"):
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
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{server.bound}/metrics") as response,
    ):
        assert response.status == 405
        assert response.headers["Allow"] == "GET, HEAD"


async def test_endpoint_closes_a_connection_that_never_reads_its_answers(serve):
    """A client that pipelines requests and never reads the answers is closed, not kept.

    Its answers fill the socket buffers and the server's write waits for ever, so the
    request never ends: such connections, up to the limit, would shut out every probe. With
    idle_timeout 0.5 s the server closes it within a few seconds and a probe answers again.
    """
    server = await serve(Metrics(), list, max_connections=1, idle_timeout=0.5)
    host, _, port = server.bound.rpartition(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)  # noqa: FBT003 -- socket's API
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 5000)
        await wait_until(lambda: server.open_connections == 0, timeout=10)
        assert (await http_get(server.bound, "/healthz"))[0] == 200
    finally:
        writer.transport.abort()
