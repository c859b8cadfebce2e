"""The workers: take a delivery, decide what becomes of it, hand the decision to settle.

The walk of one delivery goes down the floors, never back up::

    broker ─▶ Consumer (mayhem.consumer): notes the tag (Settle.delivered), Buffer.put
           ─▶ Buffer (mayhem.buffer): waits for a worker; stale ones dropped
           ─▶ Workers.run ─▶ Applier.decide (here): the handler in the store's transaction
                              ─▶ an Outcome (mayhem.policy)
           ─▶ Settle.settle (mayhem.settle): Policy.verdict, then copies published with
              confirms (mayhem.copies) and the ack, reject or requeue
           ─▶ Settler (mayhem.settler): batched acks and nacks on the consuming Link

The decision (:meth:`Applier.decide`) needs no broker: it reads the delivery, runs the
handler and returns an :class:`~mayhem.policy.Outcome`. Order per message, the heart of the
exactly-once promise:

1. skip the handler when the inbox already has the id (a redelivery): a duplicate;
2. run the handler inside a transaction, claim the id in the inbox in that transaction;
3. commit, and only then ack (the settle stage acts after the decision).

A crash between 3's commit and ack is healed by step 1 on redelivery.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
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
from mayhem.policy import APPLIED, DUPLICATE, UNREAD, AttemptsExhausted, Outcome
from mayhem.store import BlockingTransaction

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayhem.amqp import Delivery
    from mayhem.buffer import Buffer
    from mayhem.config import Config
    from mayhem.metrics import Metrics
    from mayhem.policy import Attempts
    from mayhem.settle import Settle
    from mayhem.store import Store, Transaction

log = logging.getLogger(__name__)
handler_log = logging.getLogger("mayhem.handler")


class Applier:
    """The worker's decision: run the handler in the store's transaction, say what came of it.

    Needs no broker: :meth:`decide` takes a delivery and returns an
    :class:`~mayhem.policy.Outcome`; the settle stage acts on it.

    Args:
        config: the daemon's configuration.
        store: the database with the inbox.
        handler: the user's handler (async or plain).
        attempts: which attempt a delivery runs as.
        metrics: the handlers' durations and the messages in flight.
    """

    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        handler: Callable[..., Any],
        attempts: Attempts,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self.queue = config.queue
        self._store = store
        self._handler = handler
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 -- an async __call__ method
        )
        self._attempts = attempts
        self._duration = metrics.handler_duration
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # Handler deadlines of the messages in flight, checked by one timer for them all.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)

    async def decide(self, delivery: Delivery) -> Outcome:
        """Apply ``delivery`` (handler and inbox row in one transaction); say what happened.

        Raises:
            asyncio.CancelledError: shutdown cancelled the handler; its transaction rolled back.
        """
        if delivery.body_dropped:
            return UNREAD
        self.in_flight += 1
        started = time.perf_counter()
        config = self._config
        try:
            # One coroutine for the whole decision: the hot path awaits no more than this.
            attempt = self._attempts.of(delivery)
            message = build_message(
                delivery,
                config.max_message_bytes,
                hash_missing_id=config.missing_id == "content-hash",
                attempt=attempt,
            )
            applied = await self._apply_by_deadline(message)
        except StoreUnavailable as exc:
            return Outcome.outage(exc)
        except Reject as exc:
            return Outcome.rejected(exc, attempt)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this worker is cancelled (shutdown): the transaction rolled back
            # Nobody cancelled this worker: the handler awaited something that was cancelled
            # (a task of its own, say). A failure like any other; re-raised, it would end
            # the worker for good, and the redelivered message the next one.
            return self._failed(exc, attempt)
        except Exception as exc:
            return self._failed(exc, attempt)
        finally:
            self.in_flight -= 1
            self._duration.observe(time.perf_counter() - started)
        return APPLIED if applied else DUPLICATE

    @staticmethod
    def _failed(exc: BaseException, attempt: int) -> Outcome:
        log.warning(
            "handler failed: %s",
            describe(exc),
            exc_info=log.isEnabledFor(10),
            extra={"event": "handler_failed"},
        )
        return Outcome.failed(exc, attempt)

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


class Workers:
    """The worker coroutines: each takes a delivery, decides, and hands it to the settle stage.

    Args:
        buffer: where deliveries wait; ``None`` from it tells one worker to exit.
        applier: decides what becomes of each delivery.
        settle: acts on the decision.
    """

    def __init__(self, *, buffer: Buffer, applier: Applier, settle: Settle) -> None:
        self._buffer = buffer
        self.applier = applier
        self._settle = settle
        self.cancelled = 0
        tracing.instrument(self)  # spans per message when tracing is on; off, nothing at all

    @property
    def in_flight(self) -> int:
        """Messages whose handler is running."""
        return self.applier.in_flight

    async def run(self) -> None:
        """One worker: take deliveries until told to exit (``None``) or cancelled."""
        buffer, settle = self._buffer, self._settle
        get = buffer.get
        while True:
            delivery = await get()
            if delivery is None:
                return
            if delivery.stale:
                buffer.drop(delivery)
                continue
            try:
                await self._process(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in mayhem, not in the handler: keep the worker, keep the message.
                log.exception("unexpected error while processing a message; requeueing it")
                settle.requeue(delivery)

    async def _process(self, delivery: Delivery) -> None:
        token = MESSAGE_ID.set(delivery.message_id)
        try:
            try:
                outcome = await self.applier.decide(delivery)
            except asyncio.CancelledError:
                # Shutdown's drain deadline passed: the transaction has rolled back.
                self.cancelled += 1
                self._settle.requeue(delivery)
                raise
            # Settling is apart from the handler's outcome: a failed ack is never a failed
            # handler (the broker redelivers, and the inbox knows the message).
            await self._settle.settle(delivery, outcome)
        finally:
            MESSAGE_ID.reset(token)

    def close(self) -> None:
        """Let go of the handler threads without waiting for them (a stuck one never ends)."""
        self.applier.close()
