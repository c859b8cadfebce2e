"""The settle stage: every way a delivery ends, and the ``mayhem_messages_total`` count of each.

The last floor of a delivery's walk (see :mod:`mayhem.worker` for the whole walk)::

    Workers ──Outcome──▶ Settle.settle ──Policy.verdict──▶ ack | duplicate | retry
                                                           | dead_letter | reject_unread
                                                           | requeue (an outage)
                             │ retry, dead_letter: Copies (publish with confirms) first
                             ▼
                          Settler (batched acks, nacks) ──▶ the consuming Link

The worker hands over an :class:`~mayhem.policy.Outcome`; :class:`~mayhem.policy.Policy` (pure)
says what it calls for; this module carries that out and counts it. Nothing here calls back
into the worker. The consumer, the buffer and the workers' shutdown also requeue through
:meth:`Settle.requeue`, so every outcome is counted here and only here.

**Copies first, ack after.** A retry copy or a dead letter is published with confirms
(:class:`~mayhem.copies.Copies`) *before* the original is acknowledged, so a crash in between
leaves a copy too many (absorbed by the inbox), never one too few. What the broker does with
the copy can change the verdict:

- a retry copy that would not fit one frame goes to ``<queue>.dead`` without the original's
  headers, never to a retry (the handler would see other headers on its next attempt);
- when a copy cannot be published, the original is not requeued but rejected (``basic.nack``,
  no requeue), and the work queue's dead-letter exchange routes it to ``<queue>.dead`` with
  the broker's ``x-death`` trail in place of mayhem's headers: always for a dead letter, and
  for a retry the broker refused (a nack, returned as unroutable, a copy that cannot be
  encoded), which would fail the same way again;
- only a retry whose publish failed on a publishing connection that is down or slow is
  requeued, with its run counted (:class:`~mayhem.policy.Attempts`): the run that reaches
  ``max_attempts`` dead-letters, so the handler never runs more than ``max_attempts`` times.

A delivery whose link is gone is not counted: the settler counts it as stale, and the broker
redelivers it (the inbox knows it if it was applied). A failed run whose link is gone before
its copy is published publishes none: the redelivered original runs as the next attempt.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Final

from mayhem.copies import Copies, Sent, Unfit
from mayhem.headers import describe
from mayhem.policy import FAILED, REJECTED, Action, Attempts, Policy
from mayhem.topology import dead_queue

if TYPE_CHECKING:
    from collections.abc import Callable

    from aio_pika.abc import AbstractChannel

    from mayhem.amqp import Delivery
    from mayhem.config import Config
    from mayhem.metrics import Metrics
    from mayhem.policy import Outcome
    from mayhem.settler import Settler

log = logging.getLogger(__name__)

# A retry waits between JITTER and 1 times its tier's delay, so failures of one burst spread.
JITTER: Final = 0.8


def _no_outage(_: str) -> None:
    """Nobody to tell about a database outage."""


class Settle:
    """Acts on each delivery's outcome, and counts it.

    Args:
        config: the queue, ``max_attempts``, the retry delays, ``max_message_bytes``.
        settler: sends the acks (batched) and nacks on the delivery's link.
        channel: a publishing channel with confirms, for retry copies and dead letters.
        metrics: ``mayhem_messages_total``, by outcome.
        attempts: the attempts ledger the workers read; one of its own if not given.
        on_outage: told why, when a delivery is requeued because the database is down.

    Attributes:
        policy: the failure policy (pure): what each outcome calls for.
        attempts: which attempt a delivery runs as; requeued runs are counted in it.
        delivered: note a delivery's tag (the consumer calls it first, for each).
        flush: send every pending ack now (before the consuming link closes).
    """

    def __init__(
        self,
        config: Config,
        settler: Settler,
        channel: AbstractChannel,
        metrics: Metrics,
        *,
        attempts: Attempts | None = None,
        on_outage: Callable[[str], None] = _no_outage,
    ) -> None:
        self.policy = Policy(config)
        self.attempts = attempts or Attempts(config)
        self._copies = Copies(config, channel)
        self._settler = settler
        self._on_outage = on_outage
        self._max_message_bytes = config.max_message_bytes
        self._dead_queue = dead_queue(config.queue)
        self._acked = metrics.acked
        self._duplicate = metrics.duplicate
        self._retried = metrics.retried
        self._dead_lettered = metrics.dead_lettered
        self._rejected = metrics.rejected
        self._requeued = metrics.requeued
        self._stale = metrics.stale_deliveries
        # Bound once: the consumer calls these for every delivery.
        self.delivered = settler.delivered
        self.flush = settler.flush

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Carry out what the policy says of ``outcome``."""
        verdict = self.policy.verdict(outcome)
        action = verdict.action
        if action is Action.ACK:
            self.ack(delivery)
        elif action is Action.DUPLICATE:
            self.duplicate(delivery)
        elif action is Action.RETRY:
            error = outcome.error or RuntimeError("unknown failure")
            await self.retry(delivery, error, outcome.attempt, verdict.tier)
        elif action is Action.DEAD_LETTER:
            error = outcome.error or RuntimeError(verdict.reason)
            await self.dead_letter(delivery, error, outcome.attempt, verdict.reason)
        elif action is Action.REJECT_UNREAD:
            self.reject_unread(delivery)
        else:  # Action.REQUEUE: the database is down
            self.requeue_for_outage(delivery, outcome.error)

    def ack(self, delivery: Delivery) -> None:
        """Applied: acknowledge (batched at the end of this turn of the loop)."""
        if self._settler.ack(delivery):
            self._acked.inc()

    def duplicate(self, delivery: Delivery) -> None:
        """The inbox already has it: acknowledge without running the handler."""
        if self._settler.ack(delivery):
            self._duplicate.inc()

    def requeue(self, delivery: Delivery) -> bool:
        """Back to the queue, now.

        Returns:
            ``False`` if the delivery was stale (its link is gone: the broker has it back).
        """
        if not self._settler.requeue(delivery):
            return False
        self._requeued.inc()
        return True

    def requeue_for_outage(self, delivery: Delivery, error: BaseException | None) -> None:
        """The database is down: not the message's fault, not an attempt, not a dead letter."""
        why = describe(error) if error else "unknown"
        log.warning("database unavailable (%s): requeueing", why)
        self.requeue(delivery)
        self._on_outage(why)

    def reject_unread(self, delivery: Delivery) -> None:
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
            self._max_message_bytes,
            self._dead_queue,
            extra={"event": "rejected_unread"},
        )
        self._rejected.inc()

    async def retry(
        self, delivery: Delivery, exc: BaseException, attempt: int, tier: float
    ) -> None:
        """Publish a copy to ``tier``'s delay queue, then ack (see the module doc if it fails)."""
        wait = tier * random.uniform(JITTER, 1.0)
        sent = await self._copies.retry(delivery, exc, attempt, tier, wait)
        if isinstance(sent, Unfit):
            await self.dead_letter(delivery, exc, attempt, FAILED, shrink=sent.why)
            return
        if sent is Sent.STALE:
            self._stale_run(delivery, exc)
            return
        if sent is Sent.DOWN:
            self._requeue_run(delivery, exc, "the publishing connection is down")
            return
        if sent is Sent.UNCONFIRMED:
            self._requeue_run(delivery, exc, "the retry could not be published")
            return
        self.attempts.forget(delivery)
        if sent is Sent.REFUSED:
            self._reject(delivery, exc, attempt, FAILED)
            return
        log.info("attempt %d failed (%s): retry in %.2f s", attempt, describe(exc, 200), wait)
        if self._settler.ack(delivery):
            self._retried.inc()

    async def dead_letter(
        self,
        delivery: Delivery,
        exc: BaseException,
        attempt: int,
        reason: str,
        *,
        shrink: str | None = None,
    ) -> None:
        """Publish to ``<queue>.dead`` with the reason, then ack; if it cannot be, reject.

        ``shrink`` says why the dead letter must go without the original's headers.
        """
        self.attempts.forget(delivery)
        sent = await self._copies.dead_letter(delivery, exc, attempt, reason, shrink)
        if sent is Sent.STALE:
            self._stale_run(delivery, exc)
            return
        if sent is not Sent.CONFIRMED:
            self._reject(delivery, exc, attempt, reason)
            return
        # The error text, never the payload: only its size.
        log.info(
            "dead-lettered (%s) after %d attempts: %s, %d bytes",
            reason,
            attempt,
            describe(exc, 200),
            len(delivery.body),
            extra={"event": "dead_lettered", "reason": reason, "attempts": attempt},
        )
        if self._settler.ack(delivery):
            (self._rejected if reason == REJECTED else self._dead_lettered).inc()

    def _requeue_run(self, delivery: Delivery, exc: BaseException, why: str) -> None:
        """Requeue a failed run, counting it: its redelivery runs as the next attempt."""
        self.attempts.requeued(delivery)
        log.warning("%s (%s): requeueing, this run counted", why, describe(exc, 200))
        self.requeue(delivery)

    def _stale_run(self, delivery: Delivery, exc: BaseException) -> None:
        """The consuming link was lost during the run: no copy, the broker redelivers it.

        A retry copy published now would run beside the redelivered original, each counting
        its own attempts: the handler could run up to twice ``max_attempts`` times. The run
        is counted instead, so the redelivery runs as the next attempt (on a quorum queue the
        broker's ``x-delivery-count`` says so too), or is dead-lettered unrun past the last.
        """
        self.attempts.requeued(delivery)
        self._stale.inc()
        log.warning(
            "failed run (%s) of a delivery whose consuming connection is gone: no copy "
            "published; the broker redelivers it, this run counted",
            describe(exc, 200),
        )

    def _reject(self, delivery: Delivery, exc: BaseException, attempt: int, reason: str) -> None:
        """Leave it to the broker: the work queue's dead-letter exchange routes it to .dead."""
        log.warning(
            "cannot publish the dead letter or retry: rejected to the broker's dead-letter "
            "exchange instead (%s after %d attempts: %s)",
            reason,
            attempt,
            describe(exc, 200),
        )
        if self._settler.reject(delivery):
            (self._rejected if reason == REJECTED else self._dead_lettered).inc()
