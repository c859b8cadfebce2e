"""The daemon: ``run()`` is ``startup()``, ``serve()``, ``shutdown()``, and reads like the runbook.

**Startup** follows the data flow: the metrics endpoint, the store, the broker's publishing
connection (with the topology), then a delivery's floors from the bottom up (the settle
stage, the buffer, the consuming connection, the workers; the walk is in
:mod:`mayhem.worker`), the subscription, the jobs beside them, then ``READY=1``.

**Shutdown** is one ordered table, :data:`SHUTDOWN`, the seven steps of DESIGN.md "Signals and
shutdown". The same steps run after a stop signal and after a start-up that failed half way:
a component that never started is there all the same, unopened (or as a null object), and
closing it does nothing. Each step is logged with its name (the ``step`` field) and duration.

The order is start-up in reverse, with one exception:

1. not ready, ``STOPPING=1``: undoes ``READY=1``;
2. the jobs stop and ``basic.cancel`` goes out: undoes the subscription, no new deliveries;
3. the buffer is requeued: the deliveries no worker has started go back now, not at the close;
4. the workers drain, up to ``drain_timeout``; the rest are cancelled, their transactions roll
   back and their messages are requeued: undoes the workers;
5. the database closes. This is the exception: the store was opened before both broker
   connections, yet it closes before them. Once the drain is over, closing the store makes the
   set of committed messages final: a transaction still running (a handler that ignored its
   cancellation, a plain ``def`` handler in its thread) can no longer commit. So every commit's
   ack is in the settler before step 7 sends the last acks and closes the consuming
   connection, and no message commits after its delivery could no longer be acked. (The inbox
   would make such a late commit safe anyway: the broker redelivers it and it is acked as a
   duplicate without running. Closing the store first removes the window instead of relying
   on that.)
6. the metrics are flushed (textfile, Pushgateway): every count is final after step 4;
7. the consuming connection (sending the last acks first), the publishing connection, the
   handler threads and the endpoint close, in reverse start-up order; last the tasks that
   watched the shutdown itself (the loop heartbeat, the force-exit watch) stop.

Every wait is bounded by an :func:`asyncio.timeout` (:class:`~mayhem.signals.Deadlines`); a
second SIGTERM or SIGINT reschedules the running one to now, so the exit comes within
seconds, and every delivered message is still acked or requeued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Final

from mayhem import periodic
from mayhem.broker import Broker
from mayhem.buffer import Buffer
from mayhem.config import Config
from mayhem.consumer import Consumer
from mayhem.exceptions import ConfigError, MayhemError
from mayhem.flush import flush_metrics
from mayhem.handlers import DemoHandler, handler_setup, load_handler
from mayhem.health import HealthServer
from mayhem.metrics import Metrics
from mayhem.nulls import NoHealth, NullBuffer, NullConsumer, NullWorkers
from mayhem.outage import Outage
from mayhem.policy import Attempts
from mayhem.redact import mask_url
from mayhem.reload import Reloader
from mayhem.settle import Settle
from mayhem.settler import Settler
from mayhem.signals import FORCED_STEP_TIMEOUT, STEP_TIMEOUT, Deadlines, Signals
from mayhem.steps import Details, Step, cancel_all, run_steps
from mayhem.store import open_store
from mayhem.systemd import Notifier
from mayhem.worker import Applier, Workers

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Coroutine, Mapping

log = logging.getLogger(__name__)

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

    Raises:
        ConfigError: the handler cannot be loaded.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_file: str | None = None,
        flags: Mapping[str, object] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self.config = config
        # Resolved before anything opens: a bad handler is a configuration error, with
        # nothing to undo.
        self.handler: Callable[..., Any] = (
            load_handler(config.handler) if config.handler else DemoHandler(config.demo_max_delay)
        )
        self.signals = Signals()
        self.deadlines = Deadlines(self.signals.force_exit)
        self.metrics = Metrics()
        self.notifier = Notifier(environ)
        self.reloader = Reloader(self, config_file=config_file, flags=flags or {}, environ=environ)
        # Every component exists from here on; those not opened yet close as a no-op.
        self.health: HealthServer | NoHealth = (
            HealthServer(self.metrics, config.metrics_addr, self.not_ready)
            if config.metrics_addr
            else NoHealth()
        )
        self.store = open_store(config.db_url, pool_size=config.concurrency + 2)
        self.outage = Outage(self.store, self.metrics)
        self.broker = Broker(config)
        # These need the running loop and the broker: startup() makes them.
        self.buffer: Buffer | NullBuffer = NullBuffer()
        self.consumer: Consumer | NullConsumer = NullConsumer()
        self.workers: Workers | NullWorkers = NullWorkers()
        self._tg: asyncio.TaskGroup | None = None
        self._worker_tasks: list[asyncio.Task[None]] = []
        # Workers whose handler swallowed its cancellation: left running, never waited for.
        self.abandoned: list[asyncio.Task[None]] = []
        self._jobs: list[asyncio.Task[Any]] = []  # stopped at step 2
        self._watchers: list[asyncio.Task[Any]] = []  # watch the shutdown; stopped last
        self._started = False
        self._stopping = False
        self._shutdown_began = 0.0
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
        """Metrics, store, broker, consuming connection, workers, subscription, jobs, READY=1."""
        config = self.config
        began = time.monotonic()
        self._watch(self.deadlines.enforce())
        # Metrics first: the endpoint answers (not ready) while the rest starts.
        try:
            await self.health.start()
        except OSError as exc:
            msg = f"metrics_addr {config.metrics_addr}: cannot listen: {exc.strerror}"
            raise ConfigError(msg) from None
        self._watch(self.health.heartbeat())
        # The store: the schema, and the handler's own setup.
        await self.store.open()
        self.metrics.store_up.set(1)
        setup = handler_setup(self.handler)
        if setup is not None:
            await self.store.run_setup(setup)
        # The broker: topology, and the connection that publishes retries and dead letters.
        await self.broker.start()
        if self.broker.publish_channel is None:
            raise AssertionError
        # The floors of a delivery's walk, bottom up: settle, buffer, consuming connection,
        # workers; then the subscription that feeds them.
        attempts = Attempts(config)
        settle = Settle(
            config,
            Settler(self.metrics),
            self.broker.publish_channel,
            self.metrics,
            attempts=attempts,
            on_outage=self.outage.report,
        )
        # Room for the prefetch window plus one exit sentinel per worker.
        capacity = config.effective_prefetch + config.concurrency
        self.buffer = buffer = Buffer(capacity, settle, self.metrics)
        self.consumer = consumer = Consumer(config, buffer, settle, self.metrics)
        await consumer.open()
        applier = Applier(
            config=config,
            store=self.store,
            handler=self.handler,
            attempts=attempts,
            metrics=self.metrics,
        )
        self.workers = Workers(buffer=buffer, applier=applier, settle=settle)
        self.resize_workers(config.concurrency)
        self.metrics.consumer_active.set_function(lambda: int(self.consumer.active))
        await consumer.start()
        # Beside the workers: reconnecting, the database outage, SIGHUP, the periodic jobs.
        self._spawn(consumer.keep_connected())
        self._spawn(self.outage.watch(consumer, buffer, stopping=lambda: self._stopping))
        self._spawn(self.reloader.run(self.signals.reload_requested))
        self._spawn(periodic.poll_depth(self.broker, self.metrics))
        self._spawn(
            periodic.prune_inbox(self.store, self.outage, config.inbox_retention, self.metrics)
        )
        if self.notifier.enabled:
            self._spawn(periodic.report_status(self.notifier, self.status))
        if self.notifier.watchdog_interval:
            self._spawn(
                periodic.watchdog(
                    self.notifier,
                    self.notifier.watchdog_interval,
                    loop_healthy=self.health.loop_healthy,
                    consuming=lambda: self.consumer.active,
                    outage=self.outage,
                )
            )
        if config.demo:
            self._spawn(periodic.demo_publisher(self.broker, config))
        self._started = True
        self.notifier.ready(self.status())
        log.info(
            "mayhem started in %.2f s ◆ queue %s ◆ %d workers ◆ prefetch %d ◆ db %s ◆ metrics %s",
            time.monotonic() - began,
            config.queue,
            config.concurrency,
            config.effective_prefetch,
            mask_url(config.db_url),
            f"http://{self.health.bound}/metrics" if self.health.bound else "off",
            extra={"event": "started", "metrics_addr": self.health.bound},
        )

    # -- serve -----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Consume until a stop signal."""
        await self.signals.stop_requested.wait()

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Run the steps of :data:`SHUTDOWN` in order, each logged with its duration."""
        self._shutdown_began = began = time.monotonic()
        # After a failed start the same steps run, quietly: the start-up error is the news.
        level = logging.INFO if self._started else logging.DEBUG
        sig = self.signals.received
        log.log(
            level,
            "shutdown begins (%s)",
            sig.name if sig else "startup failed or ended",
            extra={"event": "shutdown_begins", "signal": sig.name if sig else None},
        )
        if not await run_steps(SHUTDOWN, self, level=level):
            self.exit_code = 1
        summary = {
            "duration": round(time.monotonic() - began, 3),
            "delivered": self.consumer.delivered,
            "acked": self._count("acked"),
            "requeued": self.shutdown_requeued,
            "cancelled": self.workers.cancelled,
            "duplicates": self._count("duplicate"),
            "dead_lettered": self._count("dead_lettered") + self._count("rejected"),
        }
        log.log(
            level,
            "shutdown complete in %.2f s ◆ %d delivered ◆ %d acked ◆ %d requeued ◆ "
            "%d cancelled ◆ %d duplicates ◆ %d dead-lettered",
            *summary.values(),
            extra={"event": "shutdown_complete", **summary},
        )

    async def _announce_stop(self) -> None:
        """Step 1: ``/readyz`` answers 503; systemd hears ``STOPPING=1``."""
        self._stopping = True
        self.notifier.stopping()

    async def _stop_consuming(self) -> None:
        """Step 2: the jobs beside the workers stop, then ``basic.cancel``."""
        await cancel_all(self._jobs, self.deadlines)
        self._jobs = []
        async with self.deadlines.at_most():
            await self.consumer.cancel()

    async def _requeue_buffered(self) -> Details:
        """Step 3: the deliveries no worker has started go back to the queue."""
        # Nacks written to the connection: nothing to wait for, so no time limit.
        requeued = self.buffer.requeue()
        self.shutdown_requeued += requeued
        return {"requeued": requeued}

    async def _drain(self) -> Details:
        """Step 4: handlers in flight finish, up to ``drain_timeout`` or a second signal."""
        tasks = [task for task in self._worker_tasks if not task.done()]
        self.buffer.stop_workers(len(tasks))  # one exit sentinel per worker, behind its message
        in_flight = self.workers.in_flight
        # A second signal means: stop waiting for handlers at once (no grace).
        with contextlib.suppress(TimeoutError):
            async with self.deadlines.limit(self.config.drain_timeout, forced=0):
                await self._wait_for_workers(tasks)
        pending = [task for task in tasks if not task.done()]
        if pending:
            why = "second signal" if self.deadlines.forced else "drain_timeout"
            reason, cancelled = why.replace(" ", "_"), len(pending)
            log.warning(
                "%s: cancelling %d handlers still running",
                why,
                cancelled,
                extra={"event": "handlers_cancelled", "why": reason, "cancelled": cancelled},
            )
            await cancel_all(pending, self.deadlines, msg=f"{why}: message requeued")
            # A handler that swallows CancelledError never ends: its worker is left behind,
            # not waited for (its message goes back when the consuming connection closes).
            self.abandoned = [task for task in pending if not task.done()]
        self.shutdown_requeued += self.workers.cancelled
        # Deliveries that raced with basic.cancel and landed behind the exit sentinels.
        late = self.buffer.requeue()
        self.shutdown_requeued += late
        return {"in_flight": in_flight, "cancelled": self.workers.cancelled, "late_requeued": late}

    async def _wait_for_workers(self, tasks: Collection[asyncio.Task[None]]) -> None:
        pending = set(tasks)
        running = self.workers.in_flight
        while pending:
            _, pending = await asyncio.wait(
                pending, timeout=EXTEND_INTERVAL, return_when=asyncio.FIRST_COMPLETED
            )
            now_running = self.workers.in_flight
            if now_running < running:
                # Handlers are finishing: ask systemd not to SIGKILL us meanwhile.
                self.notifier.extend_timeout(
                    EXTEND_BY, f"stopping: draining, {now_running} in flight"
                )
            running = now_running

    async def _close_store(self) -> None:
        """Step 5: the database closes, so nothing commits any more (see the module doc)."""
        # The store's own limit comes first; then it stops waiting for its connections.
        async with self.deadlines.at_most(STEP_TIMEOUT + FORCED_STEP_TIMEOUT):
            await self.store.close(self.deadlines.budget(STEP_TIMEOUT))

    async def _flush_metrics(self) -> None:
        """Step 6: the final counts go to the textfile and the Pushgateway, if configured."""
        self.metrics.shutdown_duration.set(time.monotonic() - self._shutdown_began)
        self.metrics.shutdown_requeued.set(self.shutdown_requeued)
        grouping = {"instance": socket.gethostname(), "queue": self.config.queue}
        async with self.deadlines.at_most():
            # In a thread: a slow Pushgateway must not stall the endpoint's last scrapes.
            await asyncio.to_thread(
                flush_metrics,
                self.metrics,
                self.config.metrics_textfile,
                self.config.pushgateway,
                "mayhem",
                grouping,
            )

    async def _close_connections(self) -> None:
        """Step 7: connections, handler threads, the endpoint; last, the shutdown's watchers."""
        async with self.deadlines.at_most():
            await self.consumer.close()  # sends the last acks first
        async with self.deadlines.at_most():
            await self.broker.close()
        self.workers.close()
        async with self.deadlines.at_most():
            await self.health.stop()
        self.notifier.close()
        await cancel_all(self._watchers, self.deadlines)
        self._watchers = []

    # -- what runs beside the workers ------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a job beside the workers, until shutdown's step 2."""
        self._jobs.append(self._task_group.create_task(coro))

    def _watch(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a task that the shutdown itself needs, until its last step."""
        self._watchers.append(self._task_group.create_task(coro))

    @property
    def _task_group(self) -> asyncio.TaskGroup:
        if self._tg is None:
            raise RuntimeError("the daemon is not running")
        return self._tg

    def resize_workers(self, count: int) -> None:
        """Start workers up to ``count``, or tell the surplus to exit after their message."""
        self._worker_tasks = [task for task in self._worker_tasks if not task.done()]
        # Workers told to exit by an earlier reload and still busy are not staying.
        staying = len(self._worker_tasks) - self.buffer.exiting
        if count > staying:
            kept = self.buffer.keep_workers(count - staying)
            for _ in range(count - staying - kept):
                self._worker_tasks.append(self._start_worker())
        else:
            self.buffer.stop_workers(staying - count)

    def _start_worker(self) -> asyncio.Task[None]:
        """A worker task, owned here but not by the task group.

        The task group's exit waits for every task in it, and a handler that swallows its
        CancelledError never ends: the shutdown would hang for ever. The drain gives up on such
        a worker instead (:attr:`abandoned`). A worker that fails stops the daemon, exit 1, as
        the task group would.
        """
        task = asyncio.get_running_loop().create_task(self.workers.run())
        task.add_done_callback(self._worker_done)
        return task

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.critical("a worker failed; stopping", exc_info=task.exception())
        self.exit_code = 1
        self.signals.stop_requested.set()

    def not_ready(self) -> list[str]:
        """Why the daemon is not ready; empty when it is (``/readyz``)."""
        if self._stopping:
            return ["stopping"]
        if not self._started:
            return ["starting"]
        reasons = []
        # The queue deleted: the consuming connection comes and goes while the broker refuses
        # the subscription, but the broker is there.
        missing = self.consumer.queue_missing
        if not (self.broker.connected and (self.consumer.connected or missing)):
            reasons.append("broker disconnected")
        if missing:
            reasons.append("queue missing")
        if not self.consumer.active:
            reasons.append("consumer not active")
        if not self.outage.available:
            reasons.append("database unavailable")
        return reasons

    def status(self) -> str:
        """The one-line status for systemd (``STATUS=``)."""
        return (
            f"{', '.join(self.not_ready()) or 'ready'}; "
            f"{self.workers.in_flight} in flight, "
            f"{len(self.buffer)} buffered, {self._count('acked')} acked"
        )

    def _count(self, outcome: str) -> int:
        return int(self.metrics.value("mayhem_messages_total", {"outcome": outcome}))


# DESIGN.md "Signals and shutdown", in its order; the module docstring says why this order.
SHUTDOWN: Final[tuple[Step[Daemon], ...]] = (
    Step("not_ready", "not ready; STOPPING=1 sent to systemd", Daemon._announce_stop),  # noqa: SLF001
    Step("consumer_cancelled", "consumer cancelled: no new deliveries", Daemon._stop_consuming),  # noqa: SLF001
    Step("buffer_requeued", "buffered messages requeued", Daemon._requeue_buffered),  # noqa: SLF001
    Step("drained", "in-flight handlers drained", Daemon._drain),  # noqa: SLF001
    Step("store_closed", "database closed", Daemon._close_store),  # noqa: SLF001
    Step("metrics_flushed", "metrics flushed", Daemon._flush_metrics),  # noqa: SLF001
    Step("connections_closed", "connections closed; loop stopping", Daemon._close_connections),  # noqa: SLF001
)


def run_daemon(daemon: Daemon, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> int:
    """Run ``daemon`` on a new loop made by ``loop_factory``; return its exit code."""
    runner = asyncio.Runner(loop_factory=loop_factory)
    try:
        return runner.run(daemon.run())
    finally:
        if daemon.abandoned:
            # The runner's clean-up would cancel them and wait for ever: close the loop as is.
            log.warning(
                "exiting with %d handlers that ignored their cancellation",
                len(daemon.abandoned),
                extra={"event": "handler_tasks_left", "count": len(daemon.abandoned)},
            )
            runner.get_loop().close()
        else:
            runner.close()
