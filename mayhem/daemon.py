"""The daemon: ``startup()``, ``serve()``, ``shutdown()``, in that order, read like the runbook.

Startup follows the data flow: metrics, store, broker, workers, consumer, then ``READY=1``.
Shutdown is startup in reverse, as an ordered, time-limited drain (DESIGN.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Final, TypeVar

import attrs

from mayhem import logs
from mayhem.broker import Broker
from mayhem.config import Config, reloadable_settings
from mayhem.consumer import Consumer
from mayhem.exceptions import ConfigError, MayhemError, StoreUnavailable
from mayhem.handlers import DemoHandler, handler_setup, load_handler
from mayhem.metrics import HealthServer, Metrics
from mayhem.publisher import PublishReport, demo_stream, publish_bodies
from mayhem.redact import mask_url
from mayhem.retry import Failures
from mayhem.settler import Settler
from mayhem.signals import Signals
from mayhem.store import Store, open_store
from mayhem.systemd import Notifier
from mayhem.worker import Workers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping

    from mayhem.amqp import Delivery

log = logging.getLogger(__name__)
T = TypeVar("T")

DEPTH_INTERVAL: Final = 5.0
STATUS_INTERVAL: Final = 5.0
PRUNE_INTERVAL: Final = 3600.0
STORE_RETRY_MAX: Final = 30.0
# After a second signal every remaining step gets this long, so the exit comes within 2 s.
FORCED_STEP_TIMEOUT: Final = 0.5
STEP_TIMEOUT: Final = 10.0
CANCEL_RETRY: Final = 0.1
# While the drain makes progress, systemd's stop timeout is pushed this far ahead, this often.
EXTEND_BY: Final = 5.0
EXTEND_INTERVAL: Final = 1.0


class Daemon:
    """One consumer daemon: owns the lifecycle, the task group and the stop events.

    Args:
        config: the configuration to start with.
        config_file: the TOML file that SIGHUP re-reads, if any.
        flags: the command-line settings, which keep precedence over the file on reload.
        environ: the process environment (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``).
    """

    def __init__(
        self,
        config: Config,
        *,
        config_file: str | None = None,
        flags: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._config_file = config_file
        self._flags = dict(flags or {})
        self._environ = os.environ if environ is None else environ
        self.signals = Signals()
        self.metrics = Metrics()
        self.notifier = Notifier(self._environ)
        self.health: HealthServer | None = None
        self.store: Store | None = None
        self.broker: Broker | None = None
        self.consumer: Consumer | None = None
        self.workers: Workers | None = None
        # Room for the prefetch window plus one exit sentinel per worker.
        self.buffer: asyncio.Queue[Delivery | None] = asyncio.Queue(
            maxsize=config.effective_prefetch + config.concurrency
        )
        self._tg: asyncio.TaskGroup | None = None
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._background: list[asyncio.Task[Any]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._store_down = asyncio.Event()
        self._store_ok = True
        self._started = False
        self._stopping = False
        self.shutdown_requeued = 0
        self.exit_code = 0

    async def run(self) -> int:
        """Start, serve until a stop signal, shut down; return the exit code.

        Raises:
            ConfigError: the configuration is invalid (exit 2).
            StartupError: the broker or database cannot be reached (exit 1).
        """
        self.signals.install()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                try:
                    await self.startup()
                except BaseException:
                    await self._close_partial()
                    raise
                try:
                    await self.serve()
                finally:
                    await self.shutdown()
        except BaseExceptionGroup as group:
            # Unwrap the task group's error, so the caller sees a single MayhemError.
            errors = group.exceptions
            if len(errors) == 1 and isinstance(errors[0], MayhemError):
                raise errors[0] from None
            raise
        finally:
            self.signals.remove()
        return self.exit_code

    # -- startup ---------------------------------------------------------------------------

    async def startup(self) -> None:
        """Metrics, store, broker, workers, consumer, then READY=1."""
        config = self.config
        began = time.monotonic()
        handler = load_handler(config.handler) if config.handler else None
        handler = handler or DemoHandler(config.demo_max_delay)
        # Metrics first: the endpoint answers (not ready) while the rest starts.
        if config.metrics_addr:
            self.health = HealthServer(self.metrics, config.metrics_addr, self.not_ready)
            try:
                await self.health.start()
            except OSError as exc:
                msg = f"metrics_addr {config.metrics_addr}: cannot listen: {exc.strerror}"
                raise ConfigError(msg) from None
            self._heartbeat = self._spawn(self.health.heartbeat())
        # The store: the schema, and the handler's own setup.
        self.store = store = open_store(config.db_url, pool_size=config.concurrency + 2)
        await store.open()
        self.metrics.store_up.set(1)
        setup = handler_setup(handler)
        if setup is not None:
            await store.run_setup(setup)
        # The broker: topology, and the connection that publishes retries and dead letters.
        self.broker = broker = Broker(config)
        await broker.start()
        if broker.publish_channel is None:
            raise AssertionError
        # The consuming connection, then workers, then the subscription that feeds them.
        settler = Settler(self.metrics)
        self.consumer = Consumer(config, self.buffer, settler, self.metrics)
        await self.consumer.open()
        failures = Failures(config, broker.publish_channel, settler, self.metrics)
        self.workers = Workers(
            config=config,
            buffer=self.buffer,
            store=store,
            handler=handler,
            settler=settler,
            failures=failures,
            metrics=self.metrics,
            on_store_outage=self._store_outage,
        )
        self._resize_workers(config.concurrency)
        self.metrics.buffered.set_function(self._buffered)
        self.metrics.consumer_active.set_function(lambda: int(self._consuming()))
        await self.consumer.start()
        # Reconnecting, and the periodic tasks.
        self._spawn(self.consumer.keep_connected())
        self._spawn(self._watch_store())
        self._spawn(self._reload_on_sighup())
        self._spawn(self._poll_depth())
        self._spawn(self._prune_inbox())
        if self.notifier.enabled:
            self._spawn(self._report_status())
        if self.notifier.watchdog_interval:
            self._spawn(self._watchdog(self.notifier.watchdog_interval))
        if config.demo:
            self._spawn(self._demo_publisher())
        self._started = True
        took = time.monotonic() - began
        self.notifier.ready(self._status())
        log.info(
            "mayhem started in %.2f s ◆ queue %s ◆ %d workers ◆ prefetch %d ◆ db %s ◆ metrics %s",
            took,
            config.queue,
            config.concurrency,
            config.effective_prefetch,
            mask_url(config.db_url),
            f"http://{self.health.bound}/metrics" if self.health else "off",
            extra={"metrics_addr": self.health.bound if self.health else None},
        )

    # -- serve -----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Consume until a stop signal."""
        await self.signals.stop_requested.wait()

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop taking messages, drain, cancel what is left, close resources."""
        began = time.monotonic()
        self._stopping = True
        sig = self.signals.received
        log.info("shutdown begins (%s)", sig.name if sig else "startup failed or ended")
        drain_timeout = self.config.drain_timeout
        async with self._step(1, "not ready; STOPPING=1 sent to systemd"):
            self.notifier.stopping()
        async with self._step(2, "consumer cancelled: no new deliveries"):
            await self._cancel_background(keep=self._heartbeat)
            if self.consumer is not None:
                await self._bounded(self.consumer.cancel())
        async with self._step(3, "buffered messages requeued") as step:
            if self.consumer is not None:
                step["requeued"] = await self._bounded(self.consumer.requeue_buffered()) or 0
                self.shutdown_requeued += step["requeued"]
        async with self._step(4, "in-flight handlers drained") as step:
            step.update(await self._drain(drain_timeout))
        async with self._step(5, "database closed"):
            if self.store is not None:
                await self.store.close(self._timeout())
        async with self._step(6, "metrics flushed"):
            took = time.monotonic() - began
            self.metrics.shutdown_duration.set(took)
            self.metrics.shutdown_requeued.set(self.shutdown_requeued)
            # In a thread: a slow Pushgateway must not stall the endpoint's last scrapes.
            await self._bounded(
                asyncio.to_thread(
                    self.metrics.flush,
                    self.config.metrics_textfile,
                    self.config.pushgateway,
                    "mayhem",
                    {"instance": socket.gethostname(), "queue": self.config.queue},
                )
            )
        async with self._step(7, "connections closed; loop stopping"):
            if self.consumer is not None:
                await self._bounded(self.consumer.close())
            if self.broker is not None:
                await self._bounded(self.broker.close())
            await self._cancel_background()
            if self.workers is not None:
                self.workers.close()
            if self.health is not None:
                await self._bounded(self.health.stop())
            self.notifier.close()
        delivered = self.consumer.delivered if self.consumer else 0
        acked = self.workers.acked if self.workers else 0
        cancelled = self.workers.cancelled if self.workers else 0
        log.info(
            "shutdown complete in %.2f s ◆ %d delivered ◆ %d acked ◆ %d requeued ◆ "
            "%d cancelled ◆ %d duplicates ◆ %d dead-lettered",
            time.monotonic() - began,
            delivered,
            acked,
            self.shutdown_requeued,
            cancelled,
            self._count("duplicate"),
            self._count("dead_lettered") + self._count("rejected"),
        )

    async def _drain(self, timeout: float) -> dict[str, int]:
        """Let the workers finish their messages, up to ``timeout`` or a second signal."""
        tasks = [task for task in self._worker_tasks if not task.done()]
        for _ in tasks:
            self.buffer.put_nowait(None)
        in_flight = self.workers.in_flight if self.workers else 0
        forced = asyncio.ensure_future(self.signals.force_exit.wait())
        pending: set[asyncio.Task[Any]] = set(tasks)
        deadline = time.monotonic() + timeout
        try:
            running = self.workers.in_flight if self.workers else 0
            while pending and not forced.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _, pending = await asyncio.wait(
                    pending | {forced},
                    timeout=min(left, EXTEND_INTERVAL),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                pending.discard(forced)
                now_running = self.workers.in_flight if self.workers else 0
                if now_running < running:
                    # Handlers are finishing: ask systemd not to SIGKILL us meanwhile.
                    self.notifier.extend_timeout(
                        EXTEND_BY, f"stopping: draining, {now_running} in flight"
                    )
                running = now_running
        finally:
            forced.cancel()
        if pending:
            why = "second signal" if self.signals.force_exit.is_set() else "drain_timeout"
            log.warning("%s: cancelling %d handlers still running", why, len(pending))
            await cancel_all(pending, msg=f"{why}: message requeued")
        cancelled = self.workers.cancelled if self.workers else 0
        self.shutdown_requeued += cancelled
        # Deliveries that raced with basic.cancel and landed behind the exit sentinels.
        late = await self.consumer.requeue_buffered() if self.consumer else 0
        self.shutdown_requeued += late
        return {"in_flight": in_flight, "cancelled": cancelled, "late_requeued": late}

    @contextlib.asynccontextmanager
    async def _step(self, number: int, what: str) -> AsyncIterator[dict[str, int]]:
        began = time.monotonic()
        details: dict[str, int] = {}
        try:
            yield details
        except Exception:
            # A failing step must not stop the ones after it: they close what is still open.
            log.exception("shutdown step %d (%s) failed", number, what)
            self.exit_code = 1
        finally:
            took = time.monotonic() - began
            extra = "".join(f" ◆ {key} {value}" for key, value in details.items())
            log.info("shutdown step %d/7: %s in %.3f s%s", number, what, took, extra)

    def _timeout(self) -> float:
        return FORCED_STEP_TIMEOUT if self.signals.force_exit.is_set() else STEP_TIMEOUT

    async def _bounded(self, awaitable: Coroutine[Any, Any, T]) -> T | None:
        """Await a shutdown step for at most the step timeout, much less after a 2nd signal."""
        task = asyncio.ensure_future(awaitable)
        forced = asyncio.ensure_future(self.signals.force_exit.wait())
        try:
            done, _ = await asyncio.wait(
                {task, forced}, timeout=STEP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if task not in done and forced in done:
                await asyncio.wait({task}, timeout=FORCED_STEP_TIMEOUT)
        finally:
            forced.cancel()
        if task.done():
            return task.result()
        task.cancel()
        log.warning("shutdown step timed out; going on")
        return None

    async def _close_partial(self) -> None:
        """Startup failed: close quietly whatever it had opened."""
        self._stopping = True
        await self._cancel_background()
        if self.store is not None:
            await self.store.close(FORCED_STEP_TIMEOUT)
        if self.consumer is not None:
            await self._bounded(self.consumer.close())
        if self.broker is not None:
            await self._bounded(self.broker.close())
        if self.health is not None:
            await self.health.stop()

    async def _cancel_background(self, *, keep: asyncio.Task[Any] | None = None) -> None:
        await cancel_all([task for task in self._background if task is not keep])
        self._background = [keep] if keep is not None else []

    # -- what runs beside the workers ------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        if self._tg is None:
            raise RuntimeError("the daemon is not running")
        task = self._tg.create_task(coro)
        self._background.append(task)
        return task

    def _resize_workers(self, count: int) -> None:
        """Start workers up to ``count``, or tell the surplus to exit after their message."""
        if self._tg is None or self.workers is None:
            raise RuntimeError("the daemon is not running")
        self._worker_tasks = [task for task in self._worker_tasks if not task.done()]
        for _ in range(count - len(self._worker_tasks)):
            self._worker_tasks.append(self._tg.create_task(self.workers.run()))
        for _ in range(len(self._worker_tasks) - count):
            self.buffer.put_nowait(None)

    def _buffered(self) -> int:
        # Deliveries only: not the exit markers that shutdown puts in for the workers.
        return sum(item is not None for item in self.buffer._queue)  # type: ignore[attr-defined]  # noqa: SLF001

    def _consuming(self) -> bool:
        return bool(self.consumer and self.consumer.active)

    def not_ready(self) -> list[str]:
        """Why the daemon is not ready; empty when it is (``/readyz``)."""
        reasons = []
        if self._stopping:
            reasons.append("stopping")
        elif not self._started:
            reasons.append("starting")
        else:
            # The queue deleted: the consuming connection comes and goes while the broker
            # refuses the subscription, but the broker is there.
            missing = self.consumer is not None and self.consumer.queue_missing
            if (
                self.broker is None
                or not self.broker.connected
                or self.consumer is None
                or not (self.consumer.connected or missing)
            ):
                reasons.append("broker disconnected")
            if missing:
                reasons.append("queue missing")
            if self.consumer is None or not self.consumer.active:
                reasons.append("consumer not active")
            if not self._store_ok:
                reasons.append("database unavailable")
        return reasons

    def _status(self) -> str:
        return (
            f"{'ready' if not self.not_ready() else ', '.join(self.not_ready())}; "
            f"{self.workers.in_flight if self.workers else 0} in flight, "
            f"{self.buffer.qsize()} buffered, {self._count('acked')} acked"
        )

    def _count(self, outcome: str) -> int:
        return int(self.metrics.value("mayhem_messages_total", {"outcome": outcome}))

    def _store_outage(self, why: str) -> None:
        if not self._store_down.is_set():
            log.warning("database outage detected: %s", why)
            self._store_down.set()

    async def _watch_store(self) -> None:
        """Pause consumption while the database is down, resume when it answers."""
        store, consumer = self.store, self.consumer
        if store is None or consumer is None:
            return
        while True:
            await self._store_down.wait()
            began = time.monotonic()
            self._store_ok = False
            self.metrics.store_up.set(0)
            self.metrics.store_outages.inc()
            await consumer.cancel()
            requeued = await consumer.requeue_buffered()
            log.warning("consumption paused: database unavailable ◆ %d buffered requeued", requeued)
            delay = 0.25
            while True:
                try:
                    await store.ping()
                    break
                except StoreUnavailable as exc:
                    log.info("database still unavailable (%s); next try in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, STORE_RETRY_MAX)
            self._store_down.clear()
            self._store_ok = True
            self.metrics.store_up.set(1)
            await self._resume(consumer)
            log.info("database back after %.1f s: consuming again", time.monotonic() - began)

    async def _resume(self, consumer: Consumer) -> None:
        delay = 0.25
        while not self._stopping:
            try:
                await consumer.start()
            except Exception as exc:
                log.warning("resuming the consumer failed (%s); next try in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
            else:
                return

    async def _reload_on_sighup(self) -> None:
        while True:
            await self.signals.reload_requested.wait()
            self.signals.reload_requested.clear()
            self.reload()

    def reload(self) -> None:
        """Re-read the configuration; apply the log level and the concurrency."""
        self.notifier.reloading()
        try:
            self._apply_reload()
        finally:
            self.notifier.ready(self._status())

    def _apply_reload(self) -> None:
        try:
            new = Config.load(file=self._config_file, flags=self._flags, environ=self._environ)
        except ConfigError as exc:
            log.error("reload failed, the running configuration stays: %s", exc)  # noqa: TRY400
            return
        old = self.config
        concurrency = new.concurrency
        if concurrency > old.effective_prefetch:
            log.warning(
                "reload: concurrency %d exceeds the prefetch window %d; keeping %d (restart "
                "to change prefetch)",
                concurrency,
                old.effective_prefetch,
                old.concurrency,
            )
            concurrency = old.concurrency
        self.config = attrs.evolve(old, log_level=new.log_level, concurrency=concurrency)
        logs.set_level(new.log_level)
        if concurrency != old.concurrency:
            self._resize_workers(concurrency)
        ignored = sorted(
            key
            for key, value in attrs.asdict(new).items()
            if key not in reloadable_settings() and value != getattr(old, key)
        )
        log.info(
            "configuration reloaded ◆ log_level %s ◆ concurrency %d%s",
            new.log_level,
            concurrency,
            f" ◆ restart to apply: {', '.join(ignored)}" if ignored else "",
        )

    async def _poll_depth(self) -> None:
        while True:
            if self.broker is not None:
                depth = await self.broker.depth()
                if depth is not None:
                    self.metrics.queue_depth.set(depth)
            await asyncio.sleep(DEPTH_INTERVAL)

    async def _prune_inbox(self) -> None:
        while True:
            if self.store is not None and self._store_ok:
                try:
                    pruned = await self.store.prune(time.time() - self.config.inbox_retention)
                except StoreUnavailable as exc:
                    log.info("inbox prune skipped: %s", exc)
                else:
                    self.metrics.inbox_pruned.inc(pruned)
                    if pruned:
                        log.info("inbox pruned ◆ %d rows older than the retention", pruned)
            await asyncio.sleep(PRUNE_INTERVAL)

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            self.notifier.status(self._status())

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog while the loop is healthy and the consumer is working."""
        while True:
            healthy = self.health.loop_healthy() if self.health else True
            working = self._consuming() or self._store_down.is_set()
            if healthy and working:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _demo_publisher(self) -> PublishReport:
        """``--demo``: publish demo messages to our own queue at ``demo_rate``."""
        if self.broker is None or self.broker.publish_channel is None:
            raise RuntimeError("the broker is not connected")
        exchange = await self.broker.publish_channel.get_exchange(
            self.config.exchange, ensure=False
        )
        report = PublishReport()
        log.info("demo publisher: %.1f messages/s to %s", self.config.demo_rate, self.config.queue)
        try:
            await publish_bodies(
                exchange,
                self.config.queue,
                demo_stream(),
                rate=self.config.demo_rate,
                report=report,
            )
        finally:
            log.info("demo publisher stopped: %s", report.summary())
        return report


async def cancel_all(
    tasks: Collection[asyncio.Task[Any]], msg: str | None = None, timeout: float = STEP_TIMEOUT
) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while any is still running.

    On Python 3.11, ``asyncio.wait_for`` (inside aiormq and asyncpg) can swallow a
    cancellation that races with its result, so one ``cancel()`` is not always enough.
    """
    pending = {task for task in tasks if not task.done()}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel(msg)
        _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY)
    for task in pending:
        log.error("task did not stop when cancelled: %r", task)


def run_daemon(daemon: Daemon, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> int:
    """Run ``daemon`` on a new loop made by ``loop_factory``; return its exit code."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(daemon.run())
