"""mayhem's test kit: run a handler in-process, decided as the daemon decides, no broker.

An ``async def`` test (pytest-asyncio, anyio)::

    import mayhem.testing
    from shop.handler import handle

    async def test_an_order_is_applied_once():
        async with mayhem.testing.Harness(handle) as h:
            first = await h.deliver({"id": "A-1", "total": 1200}, message_id="m-1")
            again = await h.deliver({"id": "A-1", "total": 1200}, message_id="m-1")
            assert (first.status, again.status) == ("acked", "duplicate")
            assert await h.fetchval("SELECT total FROM orders") == 1200

A plain ``def`` test, with the ``mayhem_harness`` fixture of mayhem's pytest plugin
(installed with mayhem; the harness is closed after the test)::

    def test_a_failure_is_retried_then_dead_lettered(mayhem_harness):
        async def payment_down(message, ctx):
            raise ConnectionError("payment service down")

        h = mayhem_harness(payment_down, max_attempts=3)
        outcomes = h.deliver_until_settled({"id": "A-2", "total": 5})
        assert [o.status for o in outcomes] == ["retried", "retried", "dead_lettered"]
        assert outcomes[-1].error == "ConnectionError: payment service down"

See :class:`Harness` for the settings and the database, :class:`Outcome` for what an
outcome says, :class:`BlockingHarness` for the harness without ``await``.

Importing this package loads nothing else of mayhem until one of its names is used, so the
pytest plugin costs a test run nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mayhem.testing.blocking import BlockingHarness
    from mayhem.testing.harness import NEW_ID, Harness, Outcome

__all__ = ["NEW_ID", "BlockingHarness", "Harness", "Outcome"]


def __getattr__(name: str) -> Any:  # noqa: ANN401 -- the names of __all__
    if name == "BlockingHarness":
        return importlib.import_module("mayhem.testing.blocking").BlockingHarness
    if name in __all__:
        return getattr(importlib.import_module("mayhem.testing.harness"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
