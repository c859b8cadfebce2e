"""The names and arguments of everything mayhem uses on the broker, in one place.

For a work queue ``<queue>`` on exchange ``<exchange>``:

- ``<exchange>`` (direct) routes ``<queue>`` to the work queue;
- ``<queue>`` is the work queue: its type (quorum or classic), and a dead-letter exchange for
  what mayhem rejects (``basic.nack`` without requeue) or the broker dead-letters itself;
- ``<exchange>.dlx`` (direct) is that dead-letter exchange: it routes ``<queue>.dead``;
- ``<queue>.dead`` holds the dead letters, mayhem's (published with a reason) and the broker's;
- ``<queue>.retry.<ms>``, one per retry delay tier, holds retry copies for ``<ms>``
  milliseconds (its TTL) and then dead-letters them back to the work queue through the
  default exchange.

:mod:`mayhem.broker` declares these; ``deploy/rabbitmq/definitions.json`` spells them out
for a broker set up by hand (a test checks that it matches this module). mayhem's message
headers are in :mod:`mayhem.headers`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from mayhem.config import Config

DLX_SUFFIX: Final = ".dlx"
DEAD_SUFFIX: Final = ".dead"
RETRY_INFIX: Final = ".retry."
# What follows the work queue's name in the name of one of its delay queues.
RETRY_QUEUE_TAIL: Final = re.compile(r"\.retry\.[0-9]+")
QUORUM: Final = "quorum"


def dead_letter_exchange(exchange: str) -> str:
    """The exchange the work queue dead-letters to."""
    return f"{exchange}{DLX_SUFFIX}"


def dead_queue(queue: str) -> str:
    """The dead-letter queue's name (also its routing key on the dead-letter exchange)."""
    return f"{queue}{DEAD_SUFFIX}"


def retry_queue(queue: str, delay: float) -> str:
    """The delay queue of one tier, named by its delay in milliseconds."""
    return f"{queue}{RETRY_INFIX}{round(delay * 1000)}"


def retry_tiers(config: Config) -> tuple[float, ...]:
    """The distinct retry delays, shortest first: one delay queue each."""
    return tuple(sorted(set(config.effective_retry_delays)))


def _safe_dead_lettering(config: Config, arguments: dict[str, Any]) -> dict[str, Any]:
    if config.queue_type == QUORUM:
        # Broker-side dead-lettering (e.g. an operator's delivery limit) without loss.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


def queue_arguments(config: Config) -> dict[str, Any]:
    """The work queue's arguments: its type and where the broker dead-letters to."""
    return _safe_dead_lettering(
        config,
        {
            "x-queue-type": config.queue_type,
            "x-dead-letter-exchange": dead_letter_exchange(config.exchange),
            "x-dead-letter-routing-key": dead_queue(config.queue),
        },
    )


def dead_queue_arguments(config: Config) -> dict[str, Any]:
    """The dead-letter queue's arguments: its type only (nothing leaves it by itself)."""
    return {"x-queue-type": config.queue_type}


def retry_queue_arguments(config: Config, delay: float) -> dict[str, Any]:
    """A delay queue's arguments: its TTL, and back to the work queue when it expires."""
    return _safe_dead_lettering(
        config,
        {
            "x-queue-type": config.queue_type,
            "x-message-ttl": round(delay * 1000),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": config.queue,
        },
    )
