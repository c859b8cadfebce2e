"""The workers: take a delivery, run the handler in a database transaction, then settle it.

Order per message, the heart of the exactly-once promise:

1. skip the handler when the inbox already has the id (a redelivery): ack as duplicate;
2. run the handler inside a transaction, claim the id in the inbox in that transaction;
3. commit, and only then ack.

A crash between 3's commit and ack is healed by step 1 on redelivery.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import enum
import functools
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

from mayhem import tracing
from mayhem.exceptions import HandlerTimeout, Reject, StoreUnavailable
from mayhem.headers import describe
from mayhem.logs import MESSAGE_ID
from mayhem.message import Context, Message, SyncContext, build_message
from mayhem.retry import AttemptsExhausted
from mayhem.store import BlockingTransaction

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayhem.amqp import Delivery
    from mayhem.config import Config
    from mayhem.metrics import Metrics
    from mayhem.retry import Failures
    from mayhem.settler import Settler
    from mayhem.store import Store, Transaction

log = logging.getLogger(__name__)
handler_log = logging.getLogger("mayhem.handler")


class Outcome(enum.Enum):
    """What applying a message came to; decides how it is settled."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STORE_DOWN = "store_down"
    REJECTED = "rejected"
    FAILED = "failed"


class Workers:
    """The worker coroutines and what they share.

    Args:
        config: the daemon's configuration.
        buffer: the consumer's buffer; ``None`` in it tells one worker to exit.
        store: the database with the inbox.
        handler: the user's handler (async or plain).
        settler: acks and requeues.
        failures: sends failed messages to a retry tier or the dead-letter queue.
        metrics: where outcomes are counted.
        on_store_outage: called when the database cannot be reached.
    """

    def __init__(
        self,
        *,
        config: Config,
        buffer: asyncio.Queue[Delivery | None],
        store: Store,
        handler: Callable[..., Any],
        settler: Settler,
        failures: Failures,
        metrics: Metrics,
        on_store_outage: Callable[[str], None],
    ) -> None:
        self._config = config
        self._buffer = buffer
        self._store = store
        self._handler = handler
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 -- an async __call__ method
        )
        self._settler = settler
        self._failures = failures
        self._metrics = metrics
        self._on_store_outage = on_store_outage
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Handler deadlines of the messages in flight, checked by one timer for them all.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.in_flight = 0
        self.acked = 0
        self.cancelled = 0
        metrics.in_flight.set_function(lambda: self.in_flight)
        tracing.instrument(self)  # spans per message when tracing is on; off, nothing at all

    async def run(self) -> None:
        """One worker: take deliveries until told to exit (``None``) or cancelled."""
        buffer = self._buffer
        while True:
            delivery = await buffer.get()
            if delivery is None:
                return
            try:
                await self._process(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in mayhem, not in the handler: keep the worker, keep the message.
                log.exception("unexpected error while processing a message; requeueing it")
                self._settler.requeue(delivery)

    async def _process(self, delivery: Delivery) -> None:
        if delivery.stale:
            self._metrics.stale_deliveries.inc()
            return
        token = MESSAGE_ID.set(delivery.message_id)
        if delivery.body_dropped:
            try:
                self._reject_unread(delivery)
            finally:
                MESSAGE_ID.reset(token)
            return
        self.in_flight += 1
        started = time.perf_counter()
        try:
            try:
                attempt = self._failures.attempt_of(delivery)
                outcome, error = await self._apply(delivery, attempt)
            except asyncio.CancelledError:
                # Shutdown's drain deadline passed: the transaction has rolled back.
                self.cancelled += 1
                self._settler.requeue(delivery)
                raise
            finally:
                self.in_flight -= 1
                self._metrics.handler_duration.observe(time.perf_counter() - started)
            # Settling is apart from the handler's outcome: a failed ack is never a failed
            # handler (the broker redelivers, and the inbox knows the message).
            await self._settle(delivery, outcome, error, attempt)
        finally:
            MESSAGE_ID.reset(token)

    def _reject_unread(self, delivery: Delivery) -> None:
        """A body over max_message_bytes, skipped unread: the broker dead-letters it whole.

        Copying it to ``<queue>.dead`` through mayhem would mean holding it in memory; the work
        queue's dead-letter exchange moves it there on the broker, body intact.
        """
        if not self._settler.reject(delivery):
            return  # the link is gone: the broker requeues it, and it comes back here
        log.warning(
            "rejected unread: body of %d bytes over max_message_bytes (%d); the broker "
            "dead-letters it to %s",
            delivery.body_size,
            self._config.max_message_bytes,
            self._config.dead_queue,
            extra={"event": "rejected_unread"},
        )
        self._metrics.rejected.inc()

    async def _apply(
        self, delivery: Delivery, attempt: int
    ) -> tuple[Outcome, BaseException | None]:
        """Run the handler and commit its effects with the inbox row; say what happened."""
        config = self._config
        try:
            message = build_message(
                delivery,
                config.max_message_bytes,
                hash_missing_id=config.missing_id == "content-hash",
                attempt=attempt,
            )
            applied = await self._apply_by_deadline(message)
        except StoreUnavailable as exc:
            return Outcome.STORE_DOWN, exc
        except Reject as exc:
            return Outcome.REJECTED, exc
        except Exception as exc:
            log.warning(
                "handler failed: %s",
                describe(exc),
                exc_info=log.isEnabledFor(10),
                extra={"event": "handler_failed"},
            )
            return Outcome.FAILED, exc
        return (Outcome.APPLIED if applied else Outcome.DUPLICATE), None

    async def _apply_by_deadline(self, message: Message) -> bool:
        """``store.apply`` cancelled by the reaper at ``handler_timeout``.

        Raises:
            HandlerTimeout: the deadline passed (the transaction has rolled back).
        """
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a worker runs in a task")
        timeout = self._config.handler_timeout
        self._deadlines[task] = self._loop.time() + timeout
        if self._reaper is None:
            self._reaper = self._loop.call_later(self._reap_interval, self._reap)
        cancelling = task.cancelling()
        try:
            return await self._store.apply(
                self._config.queue,
                message.message_id,
                functools.partial(self._call_handler, message),
            )
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            if task.uncancel() > cancelling:
                raise  # shutdown's cancel too, not only the deadline's
            raise HandlerTimeout(f"handler ran past handler_timeout ({timeout:g} s)") from None
        finally:
            del self._deadlines[task]
            if task in self._expired:
                # The deadline's cancel came out as another exception (or none): take it
                # back, or the task's next wait would take it for shutdown's.
                self._expired.discard(task)
                task.uncancel()

    @property
    def _reap_interval(self) -> float:
        # A deadline is noticed at most this late: a tenth of the timeout, 0.1 s at most.
        return min(0.1, self._config.handler_timeout / 10)

    def _reap(self) -> None:
        """Cancel the handlers past their deadline (one timer for all, not one per message)."""
        self._reaper = None
        now = self._loop.time()
        for task, deadline in self._deadlines.items():
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel(msg="handler_timeout")
        if self._deadlines:
            self._reaper = self._loop.call_later(self._reap_interval, self._reap)

    async def _settle(
        self, delivery: Delivery, outcome: Outcome, error: BaseException | None, attempt: int
    ) -> None:
        metrics = self._metrics
        if outcome is Outcome.APPLIED:
            if self._settler.ack(delivery):
                self.acked += 1
                metrics.acked.inc()
        elif outcome is Outcome.DUPLICATE:
            if self._settler.ack(delivery):
                metrics.duplicate.inc()
        elif outcome is Outcome.STORE_DOWN:
            # Not the message's fault: back to the queue, not an attempt, not a dead letter.
            why = describe(error) if error else "unknown"
            log.warning("database unavailable (%s): requeueing", why)
            self._settler.requeue(delivery)
            self._on_store_outage(why)
        elif outcome is Outcome.REJECTED:
            await self._failures.dead_letter(
                delivery, error or Reject("rejected"), attempt, reason="rejected"
            )
        else:
            await self._failures.failed(delivery, error or RuntimeError("unknown failure"), attempt)

    async def _call_handler(self, message: Message, tx: Transaction) -> None:
        if message.attempt > self._config.max_attempts:
            # Redelivered after runs that could not be settled (or that a crash cut short):
            # it may have run max_attempts times already. Not a duplicate (checked before).
            msg = (
                f"may have run max_attempts ({self._config.max_attempts}) times already: "
                f"redelivered as attempt {message.attempt}"
            )
            raise AttemptsExhausted(msg)
        logger = logging.LoggerAdapter(handler_log, {"message_id": message.message_id})
        if self._is_async:
            await self._handler(message, Context(db=tx, log=logger))
            return
        # A plain def runs in the thread pool, with a ctx.db that blocks its thread.
        ctx = SyncContext(db=BlockingTransaction(tx), log=logger)
        call = functools.partial(contextvars.copy_context().run, self._handler, message, ctx)
        if self._executor is None:
            # Our own pool, not the loop's default one: closing the loop waits for the
            # default pool's threads forever, and a stuck handler's thread never ends.
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._config.concurrency, thread_name_prefix="mayhem-handler"
            )
        await self._loop.run_in_executor(self._executor, call)

    def close(self) -> None:
        """Let go of the handler threads without waiting for them (a stuck one never ends)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
