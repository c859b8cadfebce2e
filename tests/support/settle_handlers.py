"""Handlers for the settling tests: they always fail and count their runs where a test reads it.

The daemon runs in the test's own process (the ``run_daemon`` fixture), so a module-level
counter is the handler's own record of how often it ran: a failed run rolls its database
writes back, and what is counted here is every run, failed or not.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import mayhem

RUNS: Counter[str] = Counter()
# Newlines, an ANSI escape, a NUL, a forged log line; then a megabyte.
HOSTILE_ERROR = (
    "first line\n2026-01-01 00:00:00,000 ERROR   mayhem.daemon forged line\r\n"
    "\x1b[31mred\x1b[0m nul\x00 end " + "x" * 1_000_000
)


async def always_fails(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Counts the run, then raises."""
    RUNS[message.message_id] += 1
    raise RuntimeError(f"attempt {message.attempt} fails")


async def fails_with_hostile_text(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Counts the run, then raises with newlines, ANSI escapes, a NUL and 1 MB of text."""
    RUNS[message.message_id] += 1
    raise ValueError(HOSTILE_ERROR)


async def fails_with_a_lone_surrogate(message: mayhem.Message, ctx: mayhem.Context) -> None:
    r"""Counts the run, then raises with text from the body: JSON's ``"\ud800"`` is one."""
    RUNS[message.message_id] += 1
    raise ValueError(f"unknown name {message.json()['name']}")


# Set by a test: the first run of each message tells STARTED, then waits for GATE to fail.
STARTED: asyncio.Event | None = None
GATE: asyncio.Event | None = None


async def fails_after_gate(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Counts the run; the first run waits for GATE (when a test set it); then raises."""
    RUNS[message.message_id] += 1
    if RUNS[message.message_id] == 1 and STARTED is not None and GATE is not None:
        STARTED.set()
        await GATE.wait()
    raise RuntimeError(f"attempt {message.attempt} fails")
