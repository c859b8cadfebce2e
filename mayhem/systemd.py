"""systemd's notify protocol (``sd_notify``): READY, STATUS, STOPPING, RELOADING, WATCHDOG.

A no-op without ``$NOTIFY_SOCKET``. Sending never raises and never blocks the event loop: a
failure is logged once and the daemon carries on, as ``sd_notify(3)`` callers are told to.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)

# The longest STATUS= text sent; systemctl status shows one line anyway.
MAX_STATUS: Final = 400


def _address(value: str) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names, as ``sd_notify`` reads it; None if unusable.

    An absolute path is a socket file; a leading ``@`` names one in the abstract namespace.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _field(key: str, value: str) -> str:
    # One field per line: a newline inside a value would smuggle in another field.
    return f"{key}={' '.join(value.split())[:MAX_STATUS]}"


class Notifier:
    """Talks to the service manager over ``$NOTIFY_SOCKET`` (abstract sockets included).

    Args:
        environ: the environment to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
            ``WATCHDOG_PID`` from.

    Attributes:
        watchdog_interval: seconds between ``WATCHDOG=1`` pings, half of ``$WATCHDOG_USEC``;
            None when systemd's watchdog is off or watches another process.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self._address = _address(path)
        if path and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor @abstract; ignored", path)
        self._socket: socket.socket | None = None
        self._failed = False
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = (
            int(usec) / 1e6 / 2 if usec.isdigit() and int(usec) > 0 and mine else None
        )

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._address is not None

    def notify(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` fields in one datagram; log a failure, never raise."""
        if self._address is None:
            return
        try:
            if self._socket is None:
                # Non-blocking: a stalled service manager must not stall the event loop.
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto("\n".join(fields).encode(errors="replace"), self._address)
        except (OSError, ValueError) as exc:
            if not self._failed:
                shown = "@" + self._address[1:] if self._address.startswith("\0") else self._address
                log.warning("sd_notify to %s failed: %s", shown, exc)
            self._failed = True
        else:
            self._failed = False

    def ready(self, status: str) -> None:
        """Startup (or a reload) is complete: ``READY=1``."""
        self.notify("READY=1", _field("STATUS", status))

    def status(self, status: str) -> None:
        """A one-line status for ``systemctl status``."""
        self.notify(_field("STATUS", status))

    def stopping(self) -> None:
        """Shutdown has begun: ``STOPPING=1``."""
        self.notify("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        """A reload begins: ``RELOADING=1`` with the monotonic time ``Type=notify-reload`` wants."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def extend_timeout(self, seconds: float, status: str | None = None) -> None:
        """Ask for ``seconds`` more before systemd's stop (or start) timeout fires.

        Args:
            seconds: how long from now the next notification may take.
            status: a ``STATUS=`` to send with it, such as the drain's progress.
        """
        fields = [f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1e6), 1)}"]
        if status is not None:
            fields.append(_field("STATUS", status))
        self.notify(*fields)

    def watchdog(self) -> None:
        """The daemon is healthy: ``WATCHDOG=1``."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket (a later notification opens a new one)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
