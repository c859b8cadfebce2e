"""Tracing in-process against the real broker: one trace from the publisher through the handler."""

from __future__ import annotations

import collections

import aio_pika
import pytest
from mayhem_testing import publish, wait_until
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mayhem import tracing
from mayhem.publisher import publish as mayhem_publish
from mayhem.worker import Applier, Workers


@pytest.fixture
def spans():
    """Tracing on, every span kept in memory (the SDK's InMemorySpanExporter)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    yield exporter
    tracing.reset()
    provider.shutdown()


def _settled(daemon, n: int):
    return lambda: (
        sum(
            daemon.metrics.value("mayhem_messages_total", {"outcome": outcome})
            for outcome in ("acked", "duplicate", "rejected", "dead_lettered", "retried")
        )
        >= n
    )


async def test_one_trace_from_publish_through_handler_and_commit(make_config, run_daemon, spans):
    """One trace per message, from mayhem's publisher through the daemon.

    1. mayhem's publisher sends 3 messages (a PRODUCER span each, context in the headers).
    2. The daemon handles them: each gets a CONSUMER span, child of its publish span, in the
       same trace, with a handle and a commit span under it.
    """
    config = make_config(handler="sample_handlers:record")
    async with run_daemon(config) as daemon:
        report = await mayhem_publish(config, count=3, rate=None, file=None)
        assert report.confirmed == 3
        await wait_until(_settled(daemon, 3))
        # A span ends after its message is settled: wait for the last one.
        await wait_until(
            lambda: sum(s.name.startswith("process") for s in spans.get_finished_spans()) == 3
        )
    finished = spans.get_finished_spans()
    by_trace = collections.defaultdict(list)
    for span in finished:
        by_trace[span.context.trace_id].append(span)
    assert len(by_trace) == 3
    for trace_spans in by_trace.values():
        named = {span.name: span for span in trace_spans}
        assert set(named) == {
            f"publish {config.exchange}",
            f"process {config.queue}",
            "handle",
            "commit",
        }
        sent = named[f"publish {config.exchange}"]
        process = named[f"process {config.queue}"]
        assert sent.kind is SpanKind.PRODUCER
        assert sent.parent is None
        assert process.kind is SpanKind.CONSUMER
        assert process.parent is not None
        assert process.parent.span_id == sent.context.span_id
        assert process.parent.is_remote
        for child in ("handle", "commit"):
            assert named[child].parent.span_id == process.context.span_id
            assert named[child].kind is SpanKind.INTERNAL
        assert named["handle"].end_time <= named["commit"].start_time
        assert named["commit"].end_time <= process.end_time
        message_id = sent.attributes["messaging.message.id"]
        assert dict(sent.attributes) == {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": config.exchange,
            "messaging.rabbitmq.destination.routing_key": config.queue,
            "messaging.message.id": message_id,
            "messaging.message.body.size": sent.attributes["messaging.message.body.size"],
        }
        assert process.attributes["messaging.system"] == "rabbitmq"
        assert process.attributes["messaging.operation.type"] == "process"
        assert process.attributes["messaging.destination.name"] == config.exchange
        assert process.attributes["messaging.destination.subscription.name"] == config.queue
        assert process.attributes["messaging.rabbitmq.destination.routing_key"] == config.queue
        assert process.attributes["messaging.message.id"] == message_id
        assert process.attributes["messaging.rabbitmq.message.delivery_tag"] >= 1
        assert process.attributes["mayhem.outcome"] == "applied"
        assert named["commit"].attributes["mayhem.committed"] is True
        assert process.status.status_code is StatusCode.UNSET


async def test_failures_show_in_the_spans(amqp, make_config, run_daemon, spans):
    """A rejected message: the handle span has the error, no commit span, outcome rejected."""
    config = make_config(handler="sample_handlers:failing", max_attempts=1)
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"reject"], message_ids=["r"])
        await wait_until(_settled(daemon, 1))
        await wait_until(
            lambda: any(s.name.startswith("process") for s in spans.get_finished_spans())
        )
    named = {span.name: span for span in spans.get_finished_spans()}
    assert set(named) == {f"process {config.queue}", "handle"}
    process = named[f"process {config.queue}"]
    assert process.parent is None  # published without a trace context: a new trace
    assert process.attributes["mayhem.outcome"] == "rejected"
    assert process.status.status_code is StatusCode.ERROR
    assert process.attributes["error.type"] == "Reject"
    assert named["handle"].status.status_code is StatusCode.ERROR
    assert named["handle"].events[0].name == "exception"


@pytest.mark.parametrize(
    "traceparent",
    ["garbage", 42, bytearray(b"\xff\xfe"), {"nested": "table"}, "00-" + "f" * 5000],
    ids=["text", "integer", "bytes", "table", "long"],
)
async def test_a_malformed_traceparent_never_breaks_a_message(
    amqp, make_config, run_daemon, spans, traceparent
):
    """A publisher's bad traceparent header: the message is applied all the same, in a new trace."""
    config = make_config(handler="sample_handlers:record")
    async with run_daemon(config) as daemon:
        await publish(
            amqp, config.queue, [b"{}"], message_ids=["m"], headers={"traceparent": traceparent}
        )
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "acked"}) == 1
        )
        await wait_until(
            lambda: any(s.name.startswith("process") for s in spans.get_finished_spans())
        )
    (process,) = [s for s in spans.get_finished_spans() if s.name.startswith("process")]
    assert process.parent is None
    assert process.attributes["mayhem.outcome"] == "applied"


async def test_the_context_survives_a_retry(amqp, make_config, run_daemon, spans):
    """A retried message keeps its headers: every attempt continues the publisher's trace."""
    config = make_config(handler="sample_handlers:failing", max_attempts=2, retry_delays="0.05")
    async with run_daemon(config) as daemon:
        exchange = await (await amqp.channel()).get_exchange(config.exchange)
        message = aio_pika.Message(b"fail", message_id="f")
        with tracing.publishing(message, config.exchange, config.queue):
            await exchange.publish(message, routing_key=config.queue)
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "dead_lettered"}) == 1
        )
        await wait_until(
            lambda: sum(s.name.startswith("process") for s in spans.get_finished_spans()) == 2
        )
    finished = spans.get_finished_spans()
    (sent,) = [s for s in finished if s.kind is SpanKind.PRODUCER]
    attempts = [s for s in finished if s.name.startswith("process")]
    assert [s.attributes["mayhem.attempt"] for s in attempts] == [1, 2]
    for attempt in attempts:
        assert attempt.context.trace_id == sent.context.trace_id
        assert attempt.parent.span_id == sent.context.span_id


async def test_tracing_off_leaves_the_workers_untouched(make_config, run_daemon):
    """Off (nothing configured): the workers' methods are the plain ones, no wrapper per message."""
    tracing.reset()
    config = make_config(handler="sample_handlers:record")
    async with run_daemon(config) as daemon:
        assert tracing.ACTIVE is None
        workers = daemon.workers
        assert workers._process.__func__ is Workers._process
        for name in ("decide", "_call_handler"):
            assert getattr(workers.applier, name).__func__ is getattr(Applier, name)
    tracing.reset()
