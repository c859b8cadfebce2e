"""Every exception mayhem raises or asks handlers to raise."""

from __future__ import annotations


class MayhemError(Exception):
    """The base of every mayhem exception."""


class ConfigError(MayhemError):
    """The configuration is invalid: a setting, a flag, a file or the handler path.

    The message is one line that names the setting and what is wrong with it; the command
    line prints it and exits with status 2.
    """


class StartupError(MayhemError):
    """A resource needed to start could not be reached: the broker or the database.

    The message names the resource (secrets masked) and the cause; the command line prints
    it and exits with status 1.
    """


class Reject(MayhemError):  # noqa: N818 -- the handler API names it for what it does
    """Raised by a handler: the message is poison and goes to the dead-letter queue now.

    Args:
        reason: a short, human-readable reason, stored in the ``x-mayhem-reason`` header.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecodeError(Reject):
    """The message body cannot be decoded (``Message.json()`` on a body that is not JSON)."""


class Retry(MayhemError):  # noqa: N818 -- the handler API names it for what it does
    """Raised by a handler: try the message again later.

    Args:
        delay: seconds to wait before the next attempt, or ``None`` for the configured
            backoff.
    """

    def __init__(self, delay: float | None = None) -> None:
        super().__init__(f"retry requested (delay={delay})")
        self.delay = delay


class StoreUnavailable(MayhemError):  # noqa: N818 -- a state, not an error of the caller
    """The database cannot be reached; the message is requeued, not failed."""


class HandlerTimeout(MayhemError):  # noqa: N818 -- what happened, as the error header shows it
    """The handler ran past ``handler_timeout``: it was cancelled and its transaction rolled back.

    The message follows the retry policy.
    """


class TransactionClosed(MayhemError):  # noqa: N818 -- a state, as the message says
    """``ctx.db`` was used after its transaction ended (a handler thread that outlived it)."""


class TransactionAborted(MayhemError):  # noqa: N818 -- a state, as the message says
    """A statement failed and the transaction was rolled back, yet the handler returned.

    PostgreSQL fails a whole transaction at its first error; the message follows the retry
    policy.
    """


class LinkLost(MayhemError):  # noqa: N818 -- a state, as the message says
    """The consuming connection to the broker is gone (or never came up); it is reopened."""


class BrokerRefused(LinkLost):
    """The broker refused the credentials or the virtual host."""


class QueueMissing(LinkLost):
    """The work queue is gone: the broker cancelled the consumer, or refused it (404)."""
