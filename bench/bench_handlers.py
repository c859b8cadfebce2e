"""Handlers for the benchmarks."""

from __future__ import annotations

import asyncio
import os

import mayhem

DELAY = float(os.environ.get("BENCH_HANDLER_DELAY", "0.1"))


async def noop(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Does nothing: what is left is mayhem's own cost (inbox included)."""


async def sleep(message: mayhem.Message, ctx: mayhem.Context) -> None:  # noqa: ARG001
    """Waits BENCH_HANDLER_DELAY seconds, like a handler calling a slow service."""
    await asyncio.sleep(DELAY)
