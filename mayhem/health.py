"""The HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``, served from the event loop.

aiohttp's low-level server, guarded: a cap on open connections and on their idle time, so
that scrapers and probes, idle or slow, cannot use up the file descriptors that the database
and broker connections need.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from mayhem.metrics import Metrics

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL: Final = 0.5
# The endpoint serves a few scrapers and probes. Connections beyond this many are closed as
# they arrive, so that idle or slow clients cannot use up the file descriptors that the
# database and broker connections need.
MAX_HTTP_CONNECTIONS: Final = 64
# A connection without a request for this long (from its start or from its last answer) is
# closed: this bounds keep-alive idling and the time a client may take to send its request's
# head (a slowloris). Longer than Prometheus's usual 15 s scrape interval, so a scraper's
# keep-alive connection is reused.
HTTP_IDLE_TIMEOUT: Final = 30.0
# Connections the kernel may queue before mayhem accepts them; they hold no descriptor of ours.
HTTP_BACKLOG: Final = 64
HTTP_REFUSED_LOG_INTERVAL: Final = 60.0


class _Connection:
    """What the guard knows of one open connection to the endpoint."""

    __slots__ = ("busy", "last", "timer")

    def __init__(self, now: float) -> None:
        self.last = now  # when it opened or last got an answer
        self.busy = 0  # requests being answered
        self.timer: asyncio.TimerHandle | None = None


class _GuardedServer(web.Server):
    """aiohttp's low-level server, with a cap on open connections and on their idle time.

    aiohttp alone keeps a connection that never sends a request open forever (before 3.14)
    and takes any number of them.
    """

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        max_connections: int,
        idle_timeout: float,
        on_refused: Callable[[int], None],
    ) -> None:
        super().__init__(self._tracked, access_log=None, keepalive_timeout=idle_timeout)
        self._handler = handler
        self._max = max_connections
        self._idle_timeout = idle_timeout
        self._on_refused = on_refused
        self._open: dict[web.RequestHandler, _Connection] = {}

    @property
    def open_connections(self) -> int:
        """Connections being served (refused ones are not counted)."""
        return len(self._open)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        """Refuse the connection when the cap is reached; else watch its idle time."""
        super().connection_made(handler, transport)
        loop = asyncio.get_running_loop()
        if len(self._open) >= self._max:
            # Once aiohttp has set the connection up: closed from in here, the connection
            # would be gone before aiohttp's task for it starts, which that task asserts against.
            loop.call_soon(handler.force_close)
            self._on_refused(len(self._open))
            return
        connection = self._open[handler] = _Connection(loop.time())
        connection.timer = loop.call_at(connection.last + self._idle_timeout, self._expire, handler)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        """Forget the connection."""
        connection = self._open.pop(handler, None)
        if connection is not None and connection.timer is not None:
            connection.timer.cancel()
        super().connection_lost(handler, exc)

    def _expire(self, handler: web.RequestHandler) -> None:
        connection = self._open.get(handler)
        if connection is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = connection.last + self._idle_timeout
        if connection.busy or now < due:
            connection.timer = loop.call_at(max(due, now + 1.0), self._expire, handler)
            return
        # Idle, or still sending its request's head: close it as aiohttp's keep-alive does.
        connection.timer = None
        transport = handler.transport
        handler.force_close()
        if transport is not None and transport.get_write_buffer_size():
            # Answers it has not read for the whole idle time: close() would wait for ever to
            # send them, and the socket would stay open and count toward the limit.
            transport.abort()

    async def _tracked(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = self._open.get(request.protocol)
        if connection is None:
            return await self._handler(request)
        connection.busy += 1
        try:
            return await self._handler(request)
        finally:
            connection.busy -= 1
            connection.last = asyncio.get_running_loop().time()


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` served from the event loop by aiohttp.

    At most :data:`MAX_HTTP_CONNECTIONS` connections are served at once; a connection idle
    for :data:`HTTP_IDLE_TIMEOUT` is closed.

    Args:
        metrics: what ``/metrics`` shows.
        addr: ``HOST:PORT`` to bind; port 0 picks a free one (see :attr:`bound`).
        ready: answers whether the daemon is ready, with the reasons it is not.
        block_threshold: ``/healthz`` fails once the loop has been late by more than this.
        max_connections: connections served at once; more are closed as they arrive.
        idle_timeout: seconds a connection may stay without a request.
    """

    def __init__(
        self,
        metrics: Metrics,
        addr: str,
        ready: Callable[[], list[str]],
        block_threshold: float = 5.0,
        *,
        max_connections: int = MAX_HTTP_CONNECTIONS,
        idle_timeout: float = HTTP_IDLE_TIMEOUT,
    ) -> None:
        self._metrics = metrics
        host, _, port = addr.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._ready = ready
        self._block_threshold = block_threshold
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        metrics.ready.set_function(lambda: float(not ready()))
        self._routes: dict[str, Callable[[web.BaseRequest], Awaitable[web.Response]]] = {
            "/metrics": self._serve_metrics,
            "/healthz": self._serve_health,
            "/readyz": self._serve_ready,
        }
        self._runner: web.ServerRunner | None = None
        self._server: _GuardedServer | None = None
        self._refused_logged_at = -math.inf
        self.bound: str | None = None
        self.last_beat = time.monotonic()
        self.max_lag = 0.0

    @property
    def open_connections(self) -> int:
        """Connections being served now."""
        return self._server.open_connections if self._server is not None else 0

    async def start(self) -> None:
        """Bind and start serving."""
        self._server = _GuardedServer(
            self._dispatch,
            max_connections=self._max_connections,
            idle_timeout=self._idle_timeout,
            on_refused=self._refused,
        )
        self._runner = web.ServerRunner(self._server, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, backlog=HTTP_BACKLOG)
        await site.start()
        server = site._server  # noqa: SLF001 -- aiohttp keeps the bound socket here
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self._port
        self.bound = f"{self._host}:{port}"

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _refused(self, open_connections: int) -> None:
        self._metrics.http_refused.inc()
        now = time.monotonic()
        if now - self._refused_logged_at >= HTTP_REFUSED_LOG_INTERVAL:
            self._refused_logged_at = now
            refused = int(self._metrics.value("mayhem_http_connections_refused_total"))
            log.warning(
                "metrics endpoint: refusing connections beyond %d open ◆ %d refused so far",
                open_connections,
                refused,
                extra={
                    "event": "http_connections_refused",
                    "open": open_connections,
                    "refused": refused,
                },
            )

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        serve = self._routes.get(request.path)
        if serve is None:
            return web.Response(status=404, text="not found\n")
        if request.method not in {"GET", "HEAD"}:
            return web.Response(
                status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"}
            )
        return await serve(request)

    async def heartbeat(self) -> None:
        """Measure how late the loop wakes up, for ``/healthz``; runs until cancelled."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            self.last_beat = now = time.monotonic()
            self.max_lag = max(0.0, now - before - HEARTBEAT_INTERVAL)

    def loop_healthy(self) -> bool:
        """The loop ran the heartbeat recently and was not blocked for long."""
        overdue = time.monotonic() - self.last_beat - HEARTBEAT_INTERVAL
        return max(overdue, self.max_lag) < self._block_threshold

    async def _serve_metrics(self, _: web.BaseRequest) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _serve_health(self, _: web.BaseRequest) -> web.Response:
        if self.loop_healthy():
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"event loop blocked ({self.max_lag:.1f} s)\n")

    async def _serve_ready(self, _: web.BaseRequest) -> web.Response:
        reasons = self._ready()
        if not reasons:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: " + ", ".join(reasons) + "\n")
