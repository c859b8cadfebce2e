"""systemd's notify protocol: READY, STATUS, STOPPING, WATCHDOG. A no-op without NOTIFY_SOCKET.

Sending never raises: a failure is logged once and the daemon carries on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Talks to the service manager over ``$NOTIFY_SOCKET`` (abstract sockets included).

    Args:
        environ: the environment to read ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` from.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._socket: socket.socket | None = None
        self._failed = False
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return bool(self._address)

    def notify(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` fields in one datagram."""
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("sd_notify to %r failed: %s", self._address, exc)
            self._failed = True

    def ready(self, status: str) -> None:
        """Startup is complete."""
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A one-line status for ``systemctl status``."""
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        """Shutdown has begun."""
        self.notify("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        """A reload begins (``Type=notify-reload`` wants the monotonic time with it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd's stop (or start) timeout fires."""
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        """The daemon is healthy."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
