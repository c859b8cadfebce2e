"""Handlers for the failure-policy tests: they fail on purpose, by attempt or by body."""

from __future__ import annotations

import asyncio
import os
import time

import mayhem
from mayhem.headers import parse_timestamp


async def _setup(db) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS attempts ("
        " message_id TEXT NOT NULL, attempt INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL,"
        " first_failure DOUBLE PRECISION, last_failure DOUBLE PRECISION, error TEXT)"
    )


async def _record(message: mayhem.Message, ctx: mayhem.Context) -> None:
    headers = message.headers
    await ctx.db.execute(
        "INSERT INTO attempts (message_id, attempt, at, first_failure, last_failure, error)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        message.message_id,
        message.attempt,
        time.time(),
        parse_timestamp(headers.get("x-mayhem-first-failure")),
        parse_timestamp(headers.get("x-mayhem-last-failure")),
        headers.get("x-mayhem-error"),
    )


async def fails_twice(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Writes a row, then raises on attempts 1 and 2 (rolled back); records attempt 3."""
    if message.attempt < 3:
        await ctx.db.execute(
            "INSERT INTO attempts (message_id, attempt, at) VALUES ($1, $2, $3)",
            "rolled-back",
            message.attempt,
            time.time(),
        )
        raise RuntimeError(f"attempt {message.attempt} fails")
    await _record(message, ctx)


async def poison_or_record(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Always raises for the body b"poison"; records anything else."""
    if message.body == b"poison":
        raise ValueError("poison pill")
    await _record(message, ctx)


async def slow_first(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Attempt 1 writes, then hangs past any handler_timeout; attempt 2 records."""
    if message.attempt == 1:
        await ctx.db.execute(
            "INSERT INTO attempts (message_id, attempt, at) VALUES ($1, $2, $3)",
            "timed-out",
            1,
            time.time(),
        )
        await asyncio.Event().wait()
    await _record(message, ctx)


async def asks_retry(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Raises mayhem.Retry(delay=0.05) on attempt 1; records attempt 2."""
    if message.attempt == 1:
        raise mayhem.Retry(delay=0.05)
    await _record(message, ctx)


async def fails_until_flag(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Raises while the file named by $RETRY_FLAG does not exist; then records."""
    if not os.path.exists(os.environ["RETRY_FLAG"]):  # noqa: PTH110, ASYNC240 -- a tiny stat
        raise RuntimeError("not yet")
    await _record(message, ctx)


async def awaits_cancelled_or_records(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """For the body b"cancel", awaits a task of its own that was cancelled; records the rest.

    The CancelledError comes from the handler's own await: nobody cancelled the worker.
    """
    if message.body == b"cancel":
        task = asyncio.ensure_future(asyncio.Event().wait())
        task.cancel()
        await task
    await _record(message, ctx)


for _handler in (
    fails_twice,
    poison_or_record,
    slow_first,
    asks_retry,
    fails_until_flag,
    awaits_cancelled_or_records,
):
    _handler.setup = _setup  # type: ignore[attr-defined]
