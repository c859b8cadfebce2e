"""Every metric in one place, the HTTP endpoint that serves them, and the flush at shutdown.

Children of labelled metrics are bound once here, so the hot path never looks a label up.
"""

from __future__ import annotations

import asyncio
import logging
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
    from collections.abc import Callable, Iterable

    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

OUTCOMES: Final = ("acked", "duplicate", "requeued", "retried", "dead_lettered", "rejected")
# From a 1 ms no-op to a minute-long handler.
DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
HEARTBEAT_INTERVAL: Final = 0.5
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


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` served from the event loop by aiohttp.

    Args:
        metrics: what ``/metrics`` shows.
        addr: ``HOST:PORT`` to bind; port 0 picks a free one (see :attr:`bound`).
        ready: answers whether the daemon is ready, with the reasons it is not.
        block_threshold: ``/healthz`` fails once the loop has been late by more than this.
    """

    def __init__(
        self,
        metrics: Metrics,
        addr: str,
        ready: Callable[[], list[str]],
        block_threshold: float = 5.0,
    ) -> None:
        self._metrics = metrics
        host, _, port = addr.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._ready = ready
        self._block_threshold = block_threshold
        metrics.ready.set_function(lambda: float(not ready()))
        self._runner: web.AppRunner | None = None
        self.bound: str | None = None
        self.last_beat = time.monotonic()
        self.max_lag = 0.0

    async def start(self) -> None:
        """Bind and start serving."""
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._serve_health)
        app.router.add_get("/readyz", self._serve_ready)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
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

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _serve_health(self, _: web.Request) -> web.Response:
        if self.loop_healthy():
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"event loop blocked ({self.max_lag:.1f} s)\n")

    async def _serve_ready(self, _: web.Request) -> web.Response:
        reasons = self._ready()
        if not reasons:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: " + ", ".join(reasons) + "\n")
