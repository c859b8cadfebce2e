"""A handler for the test kit's tests: it does what the body says, and notes every run.

The notes (``RUNS``) are kept outside the transaction, so a run that failed is noted too; the
daemon runs in-process in the integration tests, so the test reads them from either path.
"""

from __future__ import annotations

from typing import Any

import mayhem

RUNS: list[tuple[Any, ...]] = []


async def _setup(db) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS judged (message_id TEXT NOT NULL, attempt INTEGER NOT NULL)"
    )


def note(message: mayhem.Message) -> tuple[Any, ...]:
    """What the handler saw, but the times (the failure times, the broker's x-death time)."""
    headers = message.headers
    own = {key: value for key, value in headers.items() if not key.startswith("x-")}
    deaths = headers.get("x-death")
    death_queue = deaths[0].get("queue") if isinstance(deaths, list) and deaths else None
    return (
        message.message_id,
        message.attempt,
        message.content_type,
        repr(sorted(own.items())),
        headers.get("x-mayhem-attempt"),
        headers.get("x-mayhem-error"),
        death_queue,
    )


async def judge(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Do what the body says: ``{"do": ...}``.

    ok (stored), reject, fail (always), retry (Retry(delay) once), flaky (fails on attempts 1
    and 2); a body that is not JSON is a DecodeError.
    """
    RUNS.append(note(message))
    data = message.json()
    do = data.get("do") if isinstance(data, dict) else None
    if do == "reject":
        raise mayhem.Reject("not for us")
    if do == "fail":
        raise ValueError("poison pill")
    if do == "retry" and message.attempt == 1:
        raise mayhem.Retry(delay=data["delay"])
    if do == "flaky" and message.attempt < 3:
        raise RuntimeError(f"attempt {message.attempt} fails")
    await ctx.db.execute(
        "INSERT INTO judged (message_id, attempt) VALUES ($1, $2)",
        message.message_id,
        message.attempt,
    )


judge.setup = _setup  # type: ignore[attr-defined]
