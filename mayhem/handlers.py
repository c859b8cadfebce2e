"""Handler loading by import path, and the built-in demo handler: Mayhem's "restart a host"."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mayhem.exceptions import ConfigError, Reject

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayhem.message import Context, Message
    from mayhem.store import Transaction


def load_handler(path: str) -> Callable[..., Any]:
    """Import ``package.module:attribute`` the way ``python -m`` would.

    The working directory and ``PYTHONPATH`` are on the import path.

    Raises:
        ConfigError: the module cannot be imported, has no such attribute, or it is not
            callable.
    """
    module_name, _, attr = path.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"handler {path!r}: cannot import {module_name!r}: {first}") from None
    try:
        target = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise ConfigError(f"handler {path!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"handler {path!r}: {attr!r} is not callable")
    return target


def handler_setup(handler: Callable[..., Any]) -> Callable[[Transaction], Any] | None:
    """A handler's optional one-time ``setup(db)`` coroutine, run at start in a transaction."""
    setup = getattr(handler, "setup", None)
    return setup if setup is not None and inspect.iscoroutinefunction(setup) else None


class DemoHandler:
    """Mayhem's demo: "restart" the host named in ``{"host": ...}``, record it in ``restarts``.

    Args:
        max_delay: the simulated restart takes a random time up to this many seconds.
    """

    def __init__(self, max_delay: float) -> None:
        self.max_delay = max_delay

    async def setup(self, db: Transaction) -> None:
        """Create the ``restarts`` table."""
        await db.execute(
            "CREATE TABLE IF NOT EXISTS restarts ("
            " message_id TEXT PRIMARY KEY,"
            " host TEXT NOT NULL,"
            " delay DOUBLE PRECISION NOT NULL,"
            " restarted_at DOUBLE PRECISION NOT NULL)"
        )

    async def __call__(self, message: Message, ctx: Context) -> None:
        """Simulate the restart, then record it in the message's transaction."""
        data = message.json()
        host = data.get("host") if isinstance(data, dict) else None
        if not isinstance(host, str) or not host:
            raise Reject("demo message needs a non-empty string 'host'")
        delay = random.uniform(0.0, self.max_delay) if self.max_delay > 0 else 0.0
        if delay:
            await asyncio.sleep(delay)
        await ctx.db.execute(
            "INSERT INTO restarts (message_id, host, delay, restarted_at) VALUES ($1, $2, $3, $4)",
            message.message_id,
            host,
            delay,
            time.time(),
        )
        ctx.log.debug("restarted %s in %.3f s", host, delay)
