"""Signal handlers that only set state: 1st SIGTERM/SIGINT stop, 2nd force, SIGHUP reload."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Final

log = logging.getLogger(__name__)

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


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
