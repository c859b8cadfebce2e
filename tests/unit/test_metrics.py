"""The metric definitions: names and types, children bound before any message, build info."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from mayhem.metrics import DURATION_BUCKETS, OUTCOMES, Metrics

# DESIGN.md's metrics and the issue's, as they appear in the exposition.
EXPECTED_TYPES = {
    "mayhem_messages_total": "counter",
    "mayhem_messages_in_flight": "gauge",
    "mayhem_buffered_messages": "gauge",
    "mayhem_handler_duration_seconds": "histogram",
    "mayhem_broker_reconnects_total": "counter",
    "mayhem_stale_deliveries_total": "counter",
    "mayhem_consumer_active": "gauge",
    "mayhem_queue_depth": "gauge",
    "mayhem_database_up": "gauge",
    "mayhem_ready": "gauge",
    "mayhem_shutdown_duration_seconds": "gauge",
    "mayhem_shutdown_requeued_messages": "gauge",
    "mayhem_build_info": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
}


def types(text: str) -> dict[str, str]:
    """``# TYPE name type`` lines of an exposition, as a dict."""
    found = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            found[name] = kind
    return found


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_metric_is_exported_with_its_type():
    """Each metric of DESIGN.md and the issue is in the exposition, with the right type."""
    exported = types(Metrics().render().decode())
    for name, kind in EXPECTED_TYPES.items():
        assert exported.get(name) == kind, name


def test_outcome_children_exist_before_any_message():
    """All six outcomes are bound at start, so rate() and increase() see them from zero."""
    metrics = Metrics()
    values = samples(metrics.render().decode())
    for outcome in OUTCOMES:
        assert values[("mayhem_messages_total", (("outcome", outcome),))] == 0
    assert set(OUTCOMES) == {
        "acked", "duplicate", "requeued", "retried", "dead_lettered", "rejected",
    }  # fmt: skip
    metrics.acked.inc()
    metrics.rejected.inc(2)
    assert metrics.value("mayhem_messages_total", {"outcome": "acked"}) == 1
    assert metrics.value("mayhem_messages_total", {"outcome": "rejected"}) == 2


def test_duration_buckets_span_1ms_to_60s():
    """The handler histogram resolves a 1 ms handler and a minute-long one."""
    assert DURATION_BUCKETS[0] == 0.001
    assert DURATION_BUCKETS[-1] == 60
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)
    metrics = Metrics()
    metrics.handler_duration.observe(0.0005)
    metrics.handler_duration.observe(45)
    assert metrics.value("mayhem_handler_duration_seconds_bucket", {"le": "0.001"}) == 1
    assert metrics.value("mayhem_handler_duration_seconds_bucket", {"le": "30.0"}) == 1
    assert metrics.value("mayhem_handler_duration_seconds_bucket", {"le": "60.0"}) == 2


def test_build_info_carries_the_version():
    """mayhem_build_info{version} is 1 and names the package's version."""
    from mayhem import __version__  # noqa: PLC0415

    assert Metrics().value("mayhem_build_info", {"version": __version__}) == 1
