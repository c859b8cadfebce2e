"""Every metric in one place, the HTTP endpoint that serves them, and the flush at shutdown.

Children of labelled metrics are bound once here, so the hot path never looks a label up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.exposition import basic_auth_handler, default_handler, push_to_gateway
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from mayhem._version import __version__
from mayhem.redact import mask_url, redact, url_secrets

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

OUTCOMES: Final = ("acked", "duplicate", "requeued", "retried", "dead_lettered", "rejected")
# From a 1 ms no-op to a minute-long handler.
DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
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
# The metrics textfile's mode before the umask: never readable by others (see _write_textfile).
TEXTFILE_MODE: Final = 0o640


class Metrics:
    """The daemon's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        messages = Counter(
            "mayhem_messages",
            "Messages settled, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.acked = messages.labels("acked")
        self.duplicate = messages.labels("duplicate")
        self.requeued = messages.labels("requeued")
        self.retried = messages.labels("retried")
        self.dead_lettered = messages.labels("dead_lettered")
        self.rejected = messages.labels("rejected")
        self.in_flight = Gauge(
            "mayhem_messages_in_flight", "Messages whose handler is running.", registry=registry
        )
        self.buffered = Gauge(
            "mayhem_buffered_messages",
            "Deliveries waiting in the local buffer for a worker.",
            registry=registry,
        )
        self.handler_duration = Histogram(
            "mayhem_handler_duration_seconds",
            "Time from a worker taking a message to its handler's transaction ending.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.broker_reconnects = Counter(
            "mayhem_broker_reconnects",
            "Times the consuming connection to the broker was re-established.",
            registry=registry,
        )
        self.stale_deliveries = Counter(
            "mayhem_stale_deliveries",
            "Deliveries dropped because their channel closed; the broker redelivers them.",
            registry=registry,
        )
        self.consumer_active = Gauge(
            "mayhem_consumer_active",
            "1 while the broker consumer is subscribed.",
            registry=registry,
        )
        self.ready = Gauge(
            "mayhem_ready",
            "1 while /readyz answers 200: broker connected, consuming, database up, not stopping.",
            registry=registry,
        )
        self.store_up = Gauge(
            "mayhem_database_up", "1 while the database answers.", registry=registry
        )
        self.store_outages = Counter(
            "mayhem_database_outages",
            "Times consumption paused because the database was unreachable.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "mayhem_queue_depth", "Messages ready in the broker's work queue.", registry=registry
        )
        self.shutdown_duration = Gauge(
            "mayhem_shutdown_duration_seconds",
            "How long the last shutdown took.",
            registry=registry,
        )
        self.shutdown_requeued = Gauge(
            "mayhem_shutdown_requeued_messages",
            "Messages the last shutdown requeued.",
            registry=registry,
        )
        self.http_refused = Counter(
            "mayhem_http_connections_refused",
            "Connections to the metrics endpoint closed at once: too many were open.",
            registry=registry,
        )
        self.inbox_pruned = Counter(
            "mayhem_inbox_pruned_rows",
            "Inbox rows deleted after their retention.",
            registry=registry,
        )
        Info("mayhem_build", "The running mayhem's version.", registry=registry).info(
            {"version": __version__}
        )
        self._own = _OwnMetrics(registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Read one sample's current value (0 when it has none)."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)

    def flush(
        self,
        textfile: str | None,
        pushgateway: str | None,
        job: str,
        grouping: dict[str, str] | None = None,
    ) -> None:
        """Write the final values to a textfile and/or a Pushgateway; log and go on on failure.

        Blocking (file and HTTP I/O): call it in a thread.

        Args:
            textfile: a path for node_exporter's textfile collector, written atomically.
            pushgateway: the Pushgateway's URL.
            job: the Pushgateway job name.
            grouping: the Pushgateway grouping key, so that daemons do not overwrite each
                other's final values.
        """
        # Only mayhem's own metrics leave the process: node_exporter and the Pushgateway export
        # process_* metrics of their own, and a second copy would collide with them.
        if textfile:
            try:
                _write_textfile(textfile, self._own)
            except OSError as exc:
                log.warning("metrics textfile %s not written: %s", textfile, exc)
            else:
                log.info("metrics written to %s", textfile)
        if pushgateway:
            shown = mask_url(pushgateway)
            try:
                _push(pushgateway, job, self._own, grouping)
            except Exception as exc:
                # One line without a traceback: an error about the URL (e.g. http.client's
                # InvalidURL) may quote it, password and all.
                error = redact(f"{type(exc).__name__}: {exc}", url_secrets(pushgateway))
                log.warning("metrics not pushed to %s: %s", shown, error)
            else:
                log.info("metrics pushed to %s", shown)


class _OwnMetrics:
    """The ``mayhem_*`` families of a registry, without the process, platform and GC ones."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return [family for family in self._registry.collect() if family.name.startswith("mayhem_")]


def _push(url: str, job: str, registry: _OwnMetrics, grouping: dict[str, str] | None) -> None:
    """PUT the metrics to the Pushgateway at ``url``, with the URL's user and password if any.

    urllib does not take credentials from a URL (it reads ``user:password@host`` as a host
    and a port), so they are taken out of it and sent as HTTP Basic authentication.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    # The same rule as mask_url: the credentials run up to the last '@'.
    userinfo, at, hostpart = rest.rpartition("@")
    gateway = f"{scheme}://{hostpart}"
    handler: Callable[..., Callable[[], None]] = default_handler
    if at:
        user, _, password = userinfo.partition(":")

        def handler(**request: Any) -> Callable[[], None]:  # noqa: ANN401 -- urllib's arguments
            return basic_auth_handler(**request, username=unquote(user), password=unquote(password))

    push_to_gateway(
        gateway, job=job, registry=registry, grouping_key=grouping, timeout=5, handler=handler
    )


def _write_textfile(path: str, registry: _OwnMetrics) -> None:
    """Write the metrics to ``path`` atomically, readable by its owner and at most its group.

    The file is created with mode 0640 less the process umask: 0600 under UMask=0077 (the
    systemd units' default), 0640 under 0027 or 0022; never readable by others. Its group is
    the process's, or the directory's when the directory is setgid, which is how a group
    such as node_exporter's is given read access.
    """
    # A temporary file beside the target, renamed over it, so that node_exporter never reads
    # half a file; its name does not end in .prom, so node_exporter never reads it at all.
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.unlink(missing_ok=True)  # left by a crash of an earlier process of this pid
    data = generate_latest(registry)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, TEXTFILE_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
        handler.force_close()

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
            log.warning(
                "metrics endpoint: refusing connections beyond %d open ◆ %d refused so far",
                open_connections,
                int(self._metrics.value("mayhem_http_connections_refused_total")),
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
