"""Handlers the tests run the daemon with (imported by path, as users' handlers are).

The ``applied`` table has no unique constraint on purpose: a message applied twice would show
as two rows, which is what the oracle looks for.
"""

from __future__ import annotations

import asyncio
import os
import time

import mayhem

DELAY = float(os.environ.get("SAMPLE_HANDLER_DELAY", "0"))


async def _setup(db) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS applied (message_id TEXT NOT NULL, at DOUBLE PRECISION)"
    )


class _Record:
    """Sleeps SAMPLE_HANDLER_DELAY seconds, then inserts a row in ``applied``."""

    setup = staticmethod(_setup)

    async def __call__(self, message: mayhem.Message, ctx: mayhem.Context) -> None:
        if DELAY:
            await asyncio.sleep(DELAY)
        await ctx.db.execute(
            "INSERT INTO applied (message_id, at) VALUES ($1, $2)", message.message_id, time.time()
        )


record = _Record()


class _Stuck(_Record):
    """Never returns for a body of b'stuck'; records any other message."""

    async def __call__(self, message: mayhem.Message, ctx: mayhem.Context) -> None:
        if message.body == b"stuck":
            await ctx.db.execute(
                "INSERT INTO applied (message_id, at) VALUES ($1, $2)", "stuck-started", time.time()
            )
            await asyncio.Event().wait()
        await super().__call__(message, ctx)


stuck = _Stuck()


class _Failing(_Record):
    """Raises for a body of b'fail', rejects b'reject', records anything else."""

    async def __call__(self, message: mayhem.Message, ctx: mayhem.Context) -> None:
        if message.body == b"fail":
            await ctx.db.execute("INSERT INTO applied (message_id) VALUES ($1)", "rolled-back")
            raise ValueError("boom")
        if message.body == b"reject":
            raise mayhem.Reject("not for us")
        message.json()
        await super().__call__(message, ctx)


failing = _Failing()


def sync_record(message: mayhem.Message, ctx: mayhem.SyncContext) -> None:
    """A plain def handler: runs in a thread, writes through the blocking ctx.db."""
    ctx.db.execute(
        "INSERT INTO applied (message_id, at) VALUES ($1, $2)", message.message_id, time.time()
    )


sync_record.setup = _setup  # type: ignore[attr-defined]


not_callable = 42


class _SlowAfterWrite(_Record):
    """Writes its row, then waits SAMPLE_HANDLER_DELAY seconds inside the transaction."""

    async def __call__(self, message: mayhem.Message, ctx: mayhem.Context) -> None:
        await ctx.db.execute(
            "INSERT INTO applied (message_id, at) VALUES ($1, $2)", message.message_id, time.time()
        )
        await asyncio.sleep(DELAY)


slow_after_write = _SlowAfterWrite()


class _Staggered(_Record):
    """Sleeps the number of seconds in the body's "sleep" field, then records the message."""

    async def __call__(self, message: mayhem.Message, ctx: mayhem.Context) -> None:
        await asyncio.sleep(float(message.json()["sleep"]))
        await ctx.db.execute(
            "INSERT INTO applied (message_id, at) VALUES ($1, $2)", message.message_id, time.time()
        )


staggered = _Staggered()


class _BlocksTheLoop(_Record):
    """Blocks the event loop with time.sleep for the body's "block" seconds (a handler bug).

    The row's ``at`` is when the block began, so a test can line it up with what it saw.
    """

    async def __call__(self, message: mayhem.Message, ctx: mayhem.Context) -> None:
        began = time.time()
        time.sleep(float(message.json()["block"]))  # noqa: ASYNC251 -- the bug under test
        await ctx.db.execute(
            "INSERT INTO applied (message_id, at) VALUES ($1, $2)", message.message_id, began
        )


blocks_the_loop = _BlocksTheLoop()


def sync_stuck(message: mayhem.Message, ctx: mayhem.SyncContext) -> None:
    """A plain def handler that never returns (a thread cannot be cancelled)."""
    time.sleep(3600)


sync_stuck.setup = _setup  # type: ignore[attr-defined]


# Set by a test: the gated handler waits for it (the one set when the message started).
GATE: asyncio.Event | None = None
# The messages the gated handler started, in order.
STARTED: list[str] = []


async def gated(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Notes the message in STARTED, then waits for GATE if a test set one; writes nothing."""
    STARTED.append(message.message_id)
    gate = GATE
    if gate is not None:
        await gate.wait()


# Cleared by a test once it is done with the handler below, so that its task can end.
SWALLOW_CANCEL = True


async def swallows_cancel(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Notes the message in STARTED, then waits, swallowing every CancelledError (a bug)."""
    STARTED.append(message.message_id)
    while True:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not SWALLOW_CANCEL:
                raise


swallows_cancel.setup = _setup  # type: ignore[attr-defined]
