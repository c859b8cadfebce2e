"""SIGHUP: re-read the configuration and apply what can change without a restart.

What can change is declared with each setting (``reloadable=True``, :mod:`mayhem.config`), and
read here as :data:`RELOADABLE`; every other changed setting is
named in the log as needing a restart. The running configuration stays when the new one is
invalid.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, Protocol

import attrs

from mayhem import logs
from mayhem.config import Config, reloadable_settings
from mayhem.exceptions import ConfigError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping

    from mayhem.systemd import Notifier

log = logging.getLogger(__name__)

# The settings a reload applies; the rest need a restart.
RELOADABLE: Final = reloadable_settings()


class Running(Protocol):
    """What a reload changes: the daemon's configuration and its number of workers."""

    config: Config
    notifier: Notifier

    def status(self) -> str:
        """The one-line status for systemd."""

    def resize_workers(self, count: int) -> None:
        """Start or stop workers until there are ``count``."""


class Reloader:
    """Re-reads the configuration on SIGHUP and applies it to a running daemon.

    Args:
        running: the daemon.
        config_file: the TOML file to re-read, if any.
        flags: the command-line settings, which keep precedence over the file.
        environ: the process environment (``MAYHEM_*``).
    """

    def __init__(
        self,
        running: Running,
        *,
        config_file: str | None,
        flags: Mapping[str, object],
        environ: Mapping[str, str],
    ) -> None:
        self._running = running
        self._config_file = config_file
        self._flags = dict(flags)
        self._environ = environ

    async def run(self, requested: asyncio.Event) -> None:
        """Reload each time ``requested`` is set (by SIGHUP); runs until cancelled."""
        while True:
            await requested.wait()
            requested.clear()
            self.reload()

    def reload(self) -> None:
        """Re-read the configuration; apply the reloadable settings (``RELOADING=1`` first)."""
        notifier = self._running.notifier
        notifier.reloading()
        try:
            self._apply()
        finally:
            notifier.ready(self._running.status())

    def _apply(self) -> None:
        try:
            new = Config.load(file=self._config_file, flags=self._flags, environ=self._environ)
        except ConfigError as exc:
            log.error("reload failed, the running configuration stays: %s", exc)  # noqa: TRY400
            return
        old = self._running.config
        changes = {key: getattr(new, key) for key in RELOADABLE}
        if changes["concurrency"] > old.effective_prefetch:
            log.warning(
                "reload: concurrency %d exceeds the prefetch window %d; keeping %d (restart "
                "to change prefetch)",
                new.concurrency,
                old.effective_prefetch,
                old.concurrency,
            )
            changes["concurrency"] = old.concurrency
        self._running.config = attrs.evolve(old, **changes)
        logs.set_level(changes["log_level"])
        if changes["concurrency"] != old.concurrency:
            self._running.resize_workers(changes["concurrency"])
        ignored = sorted(
            key
            for key, value in attrs.asdict(new).items()
            if key not in RELOADABLE and value != getattr(old, key)
        )
        log.info(
            "configuration reloaded ◆ log_level %s ◆ concurrency %d%s",
            changes["log_level"],
            changes["concurrency"],
            f" ◆ restart to apply: {', '.join(ignored)}" if ignored else "",
            extra={
                "event": "config_reloaded",
                "log_level": changes["log_level"],
                "concurrency": changes["concurrency"],
            },
        )
