"""The test kit without ``await``: :class:`BlockingHarness`, for plain ``def`` tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Self, TypeVar

from mayhem.testing.harness import Harness, Outcome

if TYPE_CHECKING:
    from types import TracebackType

    from mayhem.amqp import Delivery
    from mayhem.config import Config
    from mayhem.store import Row

T = TypeVar("T")


class BlockingHarness:
    """:class:`Harness` for plain ``def`` tests: each call runs on an event loop of its own.

    ``with BlockingHarness(handle) as h: outcome = h.deliver(b"...")``. It takes the
    arguments of :class:`Harness`, and has its methods without ``await``. It cannot be used
    inside a running event loop (an ``async def`` test): use :class:`Harness` there.
    """

    def __init__(self, handler: Callable[..., Any] | str, **kwargs: Any) -> None:  # noqa: ANN401
        self.harness = Harness(handler, **kwargs)
        self._runner: asyncio.Runner | None = None

    @property
    def config(self) -> Config:
        """The effective configuration."""
        return self.harness.config

    @property
    def outcomes(self) -> list[Outcome]:
        """Every outcome so far, in order."""
        return self.harness.outcomes

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Start the event loop, open the database and run the handler's ``setup(db)``."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "BlockingHarness inside a running event loop: in an async test, use "
                "`async with mayhem.testing.Harness(...) as h`"
            )
        self._runner = asyncio.Runner()
        try:
            self._runner.run(self.harness.open())
        except BaseException:
            self._runner.close()
            self._runner = None
            raise

    def close(self) -> None:
        """Close the database and the event loop."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            runner.run(self.harness.close())
        finally:
            runner.close()

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        if self._runner is None:
            call.close()
            raise RuntimeError("the harness is not open: use `with BlockingHarness(...) as h`")
        return self._runner.run(call)

    def deliver(self, body: object, **kwargs: Any) -> Outcome:  # noqa: ANN401
        """:meth:`Harness.deliver`, blocking."""
        return self._run(self.harness.deliver(body, **kwargs))

    def deliver_until_settled(self, body: object, **kwargs: Any) -> list[Outcome]:  # noqa: ANN401
        """:meth:`Harness.deliver_until_settled`, blocking."""
        return self._run(self.harness.deliver_until_settled(body, **kwargs))

    def process(self, delivery: Delivery) -> Outcome:
        """:meth:`Harness.process`, blocking."""
        return self._run(self.harness.process(delivery))

    def delivery(self, body: object, **kwargs: Any) -> Delivery:  # noqa: ANN401
        """:meth:`Harness.delivery`."""
        return self.harness.delivery(body, **kwargs)

    def execute(self, sql: str, *args: object) -> None:
        """:meth:`Harness.execute`, blocking."""
        self._run(self.harness.execute(sql, *args))

    def fetch(self, sql: str, *args: object) -> list[Row]:
        """:meth:`Harness.fetch`, blocking."""
        return self._run(self.harness.fetch(sql, *args))

    def fetchrow(self, sql: str, *args: object) -> Row | None:
        """:meth:`Harness.fetchrow`, blocking."""
        return self._run(self.harness.fetchrow(sql, *args))

    def fetchval(self, sql: str, *args: object) -> Any:  # noqa: ANN401
        """:meth:`Harness.fetchval`, blocking."""
        return self._run(self.harness.fetchval(sql, *args))

    def seen(self, message_id: str) -> bool:
        """:meth:`Harness.seen`, blocking."""
        return self._run(self.harness.seen(message_id))
