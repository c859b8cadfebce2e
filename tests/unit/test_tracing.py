"""Tracing without a broker: off imports nothing, hostile headers never break a message."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mayhem_testing import ROOT, SUPPORT
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mayhem import tracing
from mayhem.exceptions import ConfigError

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{SPAN_ID}-01"


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracing.enable(provider)
    tracing.reset()


def _parent(context) -> trace.SpanContext:
    return trace.get_current_span(context).get_span_context()


def test_a_valid_traceparent_is_continued(traced):
    context = traced.extract({"traceparent": VALID, "tracestate": "vendor=1"})
    parent = _parent(context)
    assert parent.is_valid
    assert parent.is_remote
    assert f"{parent.trace_id:032x}" == TRACE_ID
    assert f"{parent.span_id:016x}" == SPAN_ID
    assert parent.trace_state.get("vendor") == "1"


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        f"00-{TRACE_ID}-{SPAN_ID}",  # a field short
        f"00-{'0' * 32}-{SPAN_ID}-01",  # the invalid all-zero trace id
        f"ff-{TRACE_ID}-{SPAN_ID}-01",  # the forbidden version
        f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",
        "00-" + "a" * 10_000,
        "\x00\n\r",
        42,
        -1.5,
        True,
        None,
        b"\xff\xfe",
        b"00-not-even-close",
        {"nested": {"table": VALID}},
        [VALID, VALID],
        VALID * 200,  # far past any sane length: not handed to the propagator
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace(traced, value):
    """Whatever a publisher puts in traceparent: no exception, no parent, a new trace."""
    context = traced.extract({"traceparent": value, "tracestate": value})
    assert context is None or not _parent(context).is_valid


def test_a_traceparent_as_bytes_is_read_when_it_is_utf8(traced):
    assert _parent(traced.extract({"traceparent": VALID.encode()})).is_valid


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["traceparent", "tracestate", "baggage", "other"]),
        st.one_of(st.text(max_size=300), st.binary(max_size=100), st.integers(), st.none()),
    )
)
def test_any_headers_extract_without_raising(headers):
    """Hypothesis: the extraction never raises, whatever the headers hold."""
    tracing.enable(TracerProvider())
    try:
        tracing.ACTIVE.extract(headers)  # type: ignore[union-attr]
    finally:
        tracing.reset()


def test_a_failing_propagator_starts_a_new_trace(traced, monkeypatch):
    """A propagator that raises (a bug in a third-party one) must not cost the message."""

    def broken(*_args, **_kwargs):
        raise ValueError("propagator bug")

    monkeypatch.setattr(traced._propagate, "extract", broken)
    assert traced.extract({"traceparent": VALID}) is None


def test_nothing_configured_means_off():
    """With opentelemetry imported but no provider set and no OTEL_* variable: off."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert tracing._decide({}) is None
    assert tracing._decide({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing._decide({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None


def test_console_exporter_writes_one_json_line_per_span_to_stderr(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    provider = tracing.provider_from_env("console")
    provider.get_tracer("t").start_span("one").end()
    provider.shutdown()
    (line,) = err.getvalue().splitlines()
    span = json.loads(line)
    assert span["name"] == "one"
    assert span["resource"]["attributes"]["service.name"] == "mayhem"


def test_an_exporter_not_installed_is_a_configuration_error():
    with pytest.raises(ConfigError, match="no trace exporter 'zipkin-nope' is installed"):
        tracing.provider_from_env("zipkin-nope")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{SUPPORT}:{ROOT}", **env},
        check=False,
    )


def test_off_imports_no_opentelemetry():
    """mayhem, its workers, publisher and CLI, with tracing decided off: no opentelemetry module.

    (That a whole message run imports none either is in tests/e2e/test_tracing_processes.py.)
    """
    done = _python(
        "import sys, mayhem, mayhem.cli, mayhem.worker, mayhem.publisher, mayhem.daemon\n"
        "from mayhem import tracing\n"
        "assert tracing.active() is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_otel_traces_exporter_turns_tracing_on_in_a_fresh_process():
    """The standard variable alone: mayhem sets up the SDK's provider, spans reach stderr."""
    done = _python(
        "from mayhem import tracing\n"
        "t = tracing.active()\n"
        "assert t is not None\n"
        "with t._tracer.start_as_current_span('probe'): pass\n"
        "tracing.flush()\n",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="probe-service",
    )
    assert done.returncode == 0, done.stderr
    span = json.loads(done.stderr.splitlines()[-1])
    assert span["name"] == "probe"
    assert span["resource"]["attributes"]["service.name"] == "probe-service"
