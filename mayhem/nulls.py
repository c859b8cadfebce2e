"""Null objects: the components that are not there, so that no step has to ask.

The daemon starts with these in place of the components that need the running loop, and
keeps :class:`NoHealth` when the metrics endpoint is off. Each does nothing and reports
nothing, so a shutdown after a start-up that failed half way runs the same steps as any.
"""

from __future__ import annotations


class NoHealth:
    """The metrics endpoint when ``metrics_addr`` is off: nothing to serve, nothing to close."""

    bound: str | None = None

    async def start(self) -> None:
        """Nothing to bind."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def heartbeat(self) -> None:
        """Nothing measures the loop for an endpoint that is not there."""

    def loop_healthy(self) -> bool:
        """Healthy as far as anyone can tell."""
        return True


class NullConsumer:
    """The consumer before start-up made it: never connected, nothing delivered."""

    delivered = 0
    connected = False
    active = False
    queue_missing = False

    async def cancel(self) -> None:
        """Not subscribed."""

    async def close(self) -> None:
        """No connection."""


class NullBuffer:
    """The buffer before start-up made it: nothing delivered, no worker to stop."""

    def __len__(self) -> int:
        """Nothing waits."""
        return 0

    def stop_workers(self, count: int) -> None:
        """No worker runs."""

    exiting = 0

    def keep_workers(self, count: int) -> int:  # noqa: ARG002 -- the Buffer's signature
        """No worker was told to exit."""
        return 0

    def requeue(self) -> int:
        """Nothing was delivered."""
        return 0


class NullWorkers:
    """The workers before start-up made them: none ran, none run."""

    in_flight = 0
    cancelled = 0

    async def run(self) -> None:
        """No worker to run."""

    def close(self) -> None:
        """No handler threads."""
