"""What becomes of a delivery: the worker's decision, and the failure policy. Pure: no I/O.

Two values carry a delivery's fate down the floors:

- an :class:`Outcome` is what the worker found (:meth:`mayhem.worker.Applier.decide`): the
  handler's transaction committed (:data:`APPLIED`), the inbox already knew the message
  (:data:`DUPLICATE`), the body was over ``max_message_bytes`` and never read
  (:data:`UNREAD`), the database was down (:meth:`Outcome.outage`), the handler raised
  :class:`~mayhem.Reject` (:meth:`Outcome.rejected`) or failed (:meth:`Outcome.failed`);
- a :class:`Verdict` is what the failure policy makes of it (:meth:`Policy.verdict`): ack,
  ack as a duplicate, retry after a delay tier, dead-letter with a reason, reject unread to
  the broker's dead-letter exchange, or requeue.

:mod:`mayhem.settle` carries the verdict out on the broker (copies published with confirms,
then the ack). What the broker can refuse changes the verdict there, never here: a copy that
does not fit a frame, a publish that is refused or not confirmed (see that module).

The common outcomes and verdicts are module constants, so the hot path allocates nothing:
only a failure, a rejection or an outage makes an :class:`Outcome` of its own, and only a
retry a :class:`Verdict` (for its tier).

**The handler never runs more than ``max_attempts`` times.** A delivery runs as attempt
*trusted x-mayhem-attempt* (:func:`mayhem.headers.trusted_attempt`) plus the runs of that
attempt that may already have happened (:class:`Attempts`): the requeues after a failed
settle that this process counted, and, on a quorum queue, the broker's ``x-delivery-count``
(mayhem cannot tell a redelivery after a run from one before it, so it counts them all, as the
broker's own ``x-delivery-limit`` does). A delivery past ``max_attempts`` is not run: it is
dead-lettered as failed (:class:`AttemptsExhausted`), unless the inbox knows it (a
duplicate). This also ends the crash loop of a message whose handler kills the daemon. The
price: a message requeued for other reasons (a database outage, a restart with it
prefetched) has that many attempts fewer.

What is left: on a classic queue the count of requeued runs is this process's memory (up to
``MAX_COUNTED`` messages), so a restart or a second daemon in that window may run a message
again; a quorum queue (the default) counts on the broker.
"""

from __future__ import annotations

import collections
import enum
from typing import TYPE_CHECKING, Final, final

from mayhem.exceptions import Retry
from mayhem.headers import delivery_count, publishing_user, trusted_attempt
from mayhem.message import content_id
from mayhem.topology import QUORUM, retry_tiers

if TYPE_CHECKING:
    from mayhem.amqp import Delivery
    from mayhem.config import Config

# Messages whose requeued runs are remembered (oldest forgotten first).
MAX_COUNTED: Final = 10_000
# The dead-letter reasons (x-mayhem-reason).
FAILED: Final = "failed"
REJECTED: Final = "rejected"


class AttemptsExhausted(Exception):  # noqa: N818 -- reads as what it is in x-mayhem-error
    """The handler may already have run ``max_attempts`` times: it is not run again."""


class Kind(enum.Enum):
    """What the worker found; see the module's docstring."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    UNREAD = "unread"
    OUTAGE = "outage"
    REJECTED = "rejected"
    FAILED = "failed"


@final
class Outcome:
    """The worker's decision about one delivery, handed to the settle stage.

    Attributes:
        kind: what happened.
        error: the exception, for an outage, a rejection or a failure.
        attempt: the attempt the handler ran as (0 when it did not run).
    """

    __slots__ = ("attempt", "error", "kind")

    def __init__(self, kind: Kind, error: BaseException | None = None, attempt: int = 0) -> None:
        self.kind = kind
        self.error = error
        self.attempt = attempt

    @classmethod
    def failed(cls, error: BaseException, attempt: int) -> Outcome:
        """The handler raised (or ran past ``handler_timeout``) on ``attempt``."""
        return cls(Kind.FAILED, error, attempt)

    @classmethod
    def rejected(cls, error: BaseException, attempt: int) -> Outcome:
        """The handler raised :class:`~mayhem.Reject`: not worth another attempt."""
        return cls(Kind.REJECTED, error, attempt)

    @classmethod
    def outage(cls, error: BaseException) -> Outcome:
        """The database could not be reached: not the message's fault."""
        return cls(Kind.OUTAGE, error)

    def __repr__(self) -> str:
        return f"Outcome({self.kind.value}, {self.error!r}, attempt={self.attempt})"


APPLIED: Final = Outcome(Kind.APPLIED)
DUPLICATE: Final = Outcome(Kind.DUPLICATE)
UNREAD: Final = Outcome(Kind.UNREAD)


class Action(enum.Enum):
    """What the settle stage does; the value is the ``mayhem_messages_total`` outcome label."""

    ACK = "acked"
    DUPLICATE = "duplicate"
    RETRY = "retried"
    DEAD_LETTER = "dead_lettered"
    REJECT_UNREAD = "rejected"
    REQUEUE = "requeued"


@final
class Verdict:
    """The failure policy's decision for one outcome.

    Attributes:
        action: what to do.
        tier: for a retry, the delay tier (seconds; its delay queue is ``<queue>.retry.<ms>``).
        reason: for a dead letter, ``failed`` or ``rejected`` (``x-mayhem-reason``).
    """

    __slots__ = ("action", "reason", "tier")

    def __init__(self, action: Action, tier: float = 0.0, reason: str = "") -> None:
        self.action = action
        self.tier = tier
        self.reason = reason

    @property
    def label(self) -> str:
        """The ``mayhem_messages_total`` outcome it is counted as, once carried out."""
        if self.action is Action.DEAD_LETTER and self.reason == REJECTED:
            return REJECTED
        return self.action.value

    def __repr__(self) -> str:
        return f"Verdict({self.action.name}, tier={self.tier:g}, reason={self.reason!r})"


ACK: Final = Verdict(Action.ACK)
ACK_DUPLICATE: Final = Verdict(Action.DUPLICATE)
REJECT_UNREAD: Final = Verdict(Action.REJECT_UNREAD)
REQUEUE: Final = Verdict(Action.REQUEUE)
DEAD_FAILED: Final = Verdict(Action.DEAD_LETTER, reason=FAILED)
DEAD_REJECTED: Final = Verdict(Action.DEAD_LETTER, reason=REJECTED)
# Every outcome but a failure always gets the same verdict.
_VERDICTS: Final = {
    Kind.APPLIED: ACK,
    Kind.DUPLICATE: ACK_DUPLICATE,
    Kind.UNREAD: REJECT_UNREAD,
    # Not the message's fault: back to the queue, not an attempt, not a dead letter.
    Kind.OUTAGE: REQUEUE,
    Kind.REJECTED: DEAD_REJECTED,
}


class Policy:
    """The failure policy: what happens to an outcome, a failure at attempt N in particular.

    Args:
        config: ``max_attempts`` and the retry delays.
    """

    def __init__(self, config: Config) -> None:
        self.max_attempts = config.max_attempts
        self._delays = config.effective_retry_delays
        self._tiers = retry_tiers(config)

    def verdict(self, outcome: Outcome) -> Verdict:
        """Ack, retry at a tier, dead-letter with a reason, reject unread, or requeue."""
        if outcome is APPLIED:  # the hot path first
            return ACK
        if outcome.kind is not Kind.FAILED:
            return _VERDICTS[outcome.kind]
        if outcome.attempt >= self.max_attempts:
            return DEAD_FAILED
        error = outcome.error
        requested = error.delay if isinstance(error, Retry) else None
        return Verdict(Action.RETRY, tier=self.delay_for(outcome.attempt, requested))

    def delay_for(self, attempt: int, requested: float | None) -> float:
        """The tier for a retry after ``attempt``; a requested delay rounds up to a tier."""
        if requested is not None:
            return next((tier for tier in self._tiers if tier >= requested), self._tiers[-1])
        return self._delays[min(attempt - 1, len(self._delays) - 1)]


class Attempts:
    """Which attempt a delivery runs as, and the runs requeued after a failed settle.

    The worker asks :meth:`of` before running the handler; the settle stage counts a run it
    had to requeue (:meth:`requeued`) and forgets the message once it is settled for good.

    Args:
        config: the queue, its type, ``max_attempts`` and the publishing user.
    """

    def __init__(self, config: Config) -> None:
        self._queue = config.queue
        self._max_attempts = config.max_attempts
        self._user = publishing_user(config.amqp_url)
        self._quorum = config.queue_type == QUORUM
        # (message, attempt) -> runs of that attempt requeued after a failed publish.
        self._requeued_runs: collections.OrderedDict[tuple[str, int], int] = (
            collections.OrderedDict()
        )

    def of(self, delivery: Delivery) -> int:
        """The attempt ``delivery`` runs as: retries, plus earlier runs of this attempt."""
        attempt = trusted_attempt(delivery, self._queue, self._max_attempts, self._user)
        if not delivery.redelivered:
            return attempt
        runs = delivery_count(delivery) if self._quorum else 0
        if self._requeued_runs:
            runs = max(runs, self._requeued_runs.get(self._key(delivery), 0))
        return attempt + runs

    def requeued(self, delivery: Delivery) -> None:
        """A run of ``delivery`` was requeued: its redelivery runs as the next attempt."""
        key = self._key(delivery)
        runs = self._requeued_runs
        runs[key] = runs.get(key, 0) + 1
        runs.move_to_end(key)
        while len(runs) > MAX_COUNTED:
            runs.popitem(last=False)

    def forget(self, delivery: Delivery) -> None:
        """``delivery`` left the work queue (retried, dead-lettered or rejected)."""
        if self._requeued_runs:
            self._requeued_runs.pop(self._key(delivery), None)

    def _key(self, delivery: Delivery) -> tuple[str, int]:
        # What identifies a message across its redeliveries, and the attempt it came as.
        trusted = trusted_attempt(delivery, self._queue, self._max_attempts, self._user)
        return delivery.message_id or content_id(delivery.body), trusted
