"""What the shutdown runbook is made of: a named step, how one runs, and cancelling tasks."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import attrs

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection

    from mayhem.signals import Deadlines

log = logging.getLogger(__name__)

CANCEL_RETRY: Final = 0.1
T = TypeVar("T")
Details = dict[str, int]


@attrs.frozen
class Step(Generic[T]):
    """One step of the shutdown runbook.

    Attributes:
        name: a stable name, logged as the ``step`` field.
        what: what is done once the step is, for the log line.
        run: the step, given what it works on; returns numbers worth logging, if any.
    """

    name: str
    what: str
    run: Callable[[T], Awaitable[Details | None]]


async def run_steps(steps: Collection[Step[T]], target: T, *, level: int) -> bool:
    """Run ``steps`` on ``target`` in order, each logged at ``level`` with its duration.

    A failing step is logged and the ones after it run all the same: they close what is
    still open.

    Returns:
        ``False`` if a step failed.
    """
    ok = True
    for number, step in enumerate(steps, 1):
        began = time.monotonic()
        details: Details = {}
        try:
            details = await step.run(target) or {}
        except Exception:
            log.exception(
                "shutdown step %d (%s) failed",
                number,
                step.what,
                extra={"event": "shutdown_step_failed", "step": step.name},
            )
            ok = False
        finally:
            took = time.monotonic() - began
            shown = "".join(f" ◆ {key} {value}" for key, value in details.items())
            log.log(
                level,
                "shutdown step %d/%d: %s in %.3f s%s",
                number,
                len(steps),
                step.what,
                took,
                shown,
                extra={
                    "event": "shutdown_step",
                    "step": step.name,
                    "duration": round(took, 3),
                    **details,
                },
            )
    return ok


async def cancel_all(
    tasks: Collection[asyncio.Task[Any]], deadlines: Deadlines, msg: str | None = None
) -> None:
    """Cancel ``tasks`` and wait for them, within a step's time limit.

    On Python 3.11, ``asyncio.wait_for`` (inside aiormq and asyncpg) can swallow a
    cancellation that races with its result, so one ``cancel()`` is not always enough: each
    task still running is cancelled again.
    """
    pending = {task for task in tasks if not task.done()}
    async with deadlines.at_most():
        while pending:
            for task in pending:
                task.cancel(msg)
            _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY)
    for task in pending:
        log.error("task did not stop when cancelled: %r", task)
