"""Signal handlers that only set state: 1st SIGTERM/SIGINT stop, 2nd force, SIGHUP reload.

The daemon awaits that state. :class:`Deadlines` is how it turns a forced exit into "stop
waiting": each shutdown step waits inside an :func:`asyncio.timeout`, and a task that awaits
``force_exit`` moves every running one to (nearly) now with ``reschedule()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

log = logging.getLogger(__name__)

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# A shutdown step waits this long at most, and only this long once the exit is forced.
STEP_TIMEOUT: Final = 10.0
FORCED_STEP_TIMEOUT: Final = 0.5


class Signals:
    """The state the handlers set, as events the daemon awaits.

    Attributes:
        stop_requested: set by the first SIGTERM or SIGINT.
        force_exit: set by a second one, during shutdown: stop waiting.
        reload_requested: set by SIGHUP; the daemon clears it when it has reloaded.
    """

    def __init__(self) -> None:
        self.stop_requested = asyncio.Event()
        self.force_exit = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.received: signal.Signals | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        """Install the handlers on the running loop."""
        self._loop = loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)

    def remove(self) -> None:
        """Remove the handlers; a signal after this one has the default effect."""
        if self._loop is None:
            return
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            self._loop.remove_signal_handler(sig)
        self._loop = None

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop_requested.is_set():
            self.force_exit.set()
        else:
            self.received = sig
            self.stop_requested.set()


class Deadlines:
    """Time limits of the shutdown steps, cut short once ``force`` is set.

    Args:
        force: the event a second stop signal sets (:attr:`Signals.force_exit`).
    """

    def __init__(self, force: asyncio.Event) -> None:
        self._force = force
        self._running: dict[asyncio.Timeout, float] = {}

    @property
    def forced(self) -> bool:
        """A second stop signal came: every limit is short now."""
        return self._force.is_set()

    def budget(self, seconds: float, forced: float = FORCED_STEP_TIMEOUT) -> float:
        """``seconds``, or ``forced`` if that is less and the exit is forced."""
        return min(seconds, forced) if self.forced else seconds

    @contextlib.asynccontextmanager
    async def limit(
        self, seconds: float, *, forced: float = FORCED_STEP_TIMEOUT
    ) -> AsyncIterator[asyncio.Timeout]:
        """Wait at most ``seconds`` inside; at most ``forced`` more once the exit is forced.

        Raises:
            TimeoutError: the limit passed (:meth:`asyncio.Timeout.expired` says it was this one).
        """
        async with asyncio.timeout(self.budget(seconds, forced)) as timeout:
            self._running[timeout] = forced
            try:
                yield timeout
            finally:
                del self._running[timeout]

    @contextlib.asynccontextmanager
    async def at_most(self, seconds: float = STEP_TIMEOUT) -> AsyncIterator[None]:
        """:meth:`limit` for a shutdown step: a passed limit is logged, and the step goes on."""
        try:
            async with self.limit(seconds) as timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            log.warning(
                "shutdown step timed out; going on", extra={"event": "shutdown_step_timed_out"}
            )

    async def enforce(self) -> None:
        """Wait for ``force``, then move each running limit to now (plus its ``forced`` grace).

        Run it as a task for as long as the shutdown may wait; the limits that start later
        are short from the start (:meth:`budget`).
        """
        await self._force.wait()
        now = asyncio.get_running_loop().time()
        for timeout, forced in self._running.items():
            when = timeout.when()
            timeout.reschedule(now + forced if when is None else min(when, now + forced))
