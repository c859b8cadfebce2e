"""Handlers for the tracing tests (imported by path, as users' handlers are)."""

from __future__ import annotations

import sys

import mayhem


async def _setup(db: mayhem.Transaction) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS otel_modules (message_id TEXT NOT NULL, loaded INTEGER)"
    )


async def record_otel_modules(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Record how many opentelemetry modules are loaded while a message is handled."""
    loaded = sum(name.split(".")[0] == "opentelemetry" for name in sys.modules)
    await ctx.db.execute(
        "INSERT INTO otel_modules (message_id, loaded) VALUES ($1, $2)",
        message.message_id,
        loaded,
    )


record_otel_modules.setup = _setup  # type: ignore[attr-defined]
