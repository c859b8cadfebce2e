"""mayhem's pytest plugin: the ``mayhem_harness`` fixture, registered with mayhem itself.

``pip install mayhem`` registers it (entry point ``pytest11``); ``-p no:mayhem`` turns it off.
It imports nothing of the test kit until a test asks for the fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mayhem.testing.blocking import BlockingHarness


@pytest.fixture
def mayhem_harness() -> Iterator[Callable[..., BlockingHarness]]:
    """A factory of open harnesses for plain ``def`` tests, closed after the test.

    ``h = mayhem_harness(handle, max_attempts=3)`` takes the arguments of
    :class:`mayhem.testing.Harness` and returns an open
    :class:`mayhem.testing.BlockingHarness`: ``h.deliver(body, message_id=...)`` without
    ``await``. In an ``async def`` test, use ``async with mayhem.testing.Harness(...)``.
    """
    from mayhem.testing.blocking import BlockingHarness  # noqa: PLC0415 -- only when asked for

    made: list[BlockingHarness] = []

    def make(handler: Callable[..., Any] | str, **kwargs: Any) -> BlockingHarness:  # noqa: ANN401
        harness = BlockingHarness(handler, **kwargs)
        harness.open()
        made.append(harness)
        return harness

    yield make
    for harness in reversed(made):
        harness.close()
