"""Every metric in one place, in a registry of mayhem's own.

Children of labelled metrics are bound once here, so the hot path never looks a label up.
:mod:`mayhem.health` serves them on ``/metrics``; :mod:`mayhem.flush` writes the final values
at shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from mayhem._version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterable

    from prometheus_client.metrics_core import Metric

OUTCOMES: Final = ("acked", "duplicate", "requeued", "retried", "dead_lettered", "rejected")
# From a 1 ms no-op to a minute-long handler.
DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


class Metrics:
    """The daemon's metrics, in a registry of their own.

    Attributes:
        own: the ``mayhem_*`` families only, what the flush at shutdown writes.
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        messages = Counter(
            "mayhem_messages",
            "Messages settled, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.acked = messages.labels("acked")
        self.duplicate = messages.labels("duplicate")
        self.requeued = messages.labels("requeued")
        self.retried = messages.labels("retried")
        self.dead_lettered = messages.labels("dead_lettered")
        self.rejected = messages.labels("rejected")
        self.in_flight = Gauge(
            "mayhem_messages_in_flight", "Messages whose handler is running.", registry=registry
        )
        self.buffered = Gauge(
            "mayhem_buffered_messages",
            "Deliveries waiting in the local buffer for a worker.",
            registry=registry,
        )
        self.handler_duration = Histogram(
            "mayhem_handler_duration_seconds",
            "Time from a worker taking a message to its handler's transaction ending.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.broker_reconnects = Counter(
            "mayhem_broker_reconnects",
            "Times the consuming connection to the broker was re-established.",
            registry=registry,
        )
        self.stale_deliveries = Counter(
            "mayhem_stale_deliveries",
            "Deliveries dropped because their channel closed; the broker redelivers them.",
            registry=registry,
        )
        self.consumer_active = Gauge(
            "mayhem_consumer_active",
            "1 while the broker consumer is subscribed.",
            registry=registry,
        )
        self.ready = Gauge(
            "mayhem_ready",
            "1 while /readyz answers 200: broker connected, consuming, database up, not stopping.",
            registry=registry,
        )
        self.store_up = Gauge(
            "mayhem_database_up", "1 while the database answers.", registry=registry
        )
        self.store_outages = Counter(
            "mayhem_database_outages",
            "Times consumption paused because the database was unreachable.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "mayhem_queue_depth", "Messages ready in the broker's work queue.", registry=registry
        )
        self.shutdown_duration = Gauge(
            "mayhem_shutdown_duration_seconds",
            "How long the last shutdown took.",
            registry=registry,
        )
        self.shutdown_requeued = Gauge(
            "mayhem_shutdown_requeued_messages",
            "Messages the last shutdown requeued.",
            registry=registry,
        )
        self.http_refused = Counter(
            "mayhem_http_connections_refused",
            "Connections to the metrics endpoint closed at once: too many were open.",
            registry=registry,
        )
        self.inbox_pruned = Counter(
            "mayhem_inbox_pruned_rows",
            "Inbox rows deleted after their retention.",
            registry=registry,
        )
        Info("mayhem_build", "The running mayhem's version.", registry=registry).info(
            {"version": __version__}
        )
        self.own = OwnMetrics(registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Read one sample's current value (0 when it has none)."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class OwnMetrics:
    """The ``mayhem_*`` families of a registry, without the process, platform and GC ones.

    What leaves the process at shutdown (:mod:`mayhem.flush`).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        """The ``mayhem_*`` families, as a registry's ``collect`` gives them."""
        return [family for family in self._registry.collect() if family.name.startswith("mayhem_")]
