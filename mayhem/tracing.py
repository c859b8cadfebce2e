"""OpenTelemetry tracing, optional: ``pip install 'mayhem[otel]'``.

One trace per message, from the publisher through the handler:

- ``mayhem publish`` (and the demo publisher) opens a PRODUCER span ``publish <exchange>`` per
  message, ending at the broker's confirm, and injects its context into the AMQP headers
  (W3C ``traceparent`` and ``tracestate``, or whatever the configured propagator writes);
- the daemon opens a CONSUMER span ``process <queue>`` per delivery, continuing the context
  found in the headers, from the delivery to its settlement; in it a ``handle`` span around the
  handler (current while it runs, so the handler's own spans nest under it) and a ``commit``
  span from the handler's return to the commit of its transaction with the inbox row.

Attribute names follow OpenTelemetry's messaging semantic conventions (``messaging.system`` is
``rabbitmq``; ``messaging.operation.type`` is ``send`` for a publish, which those conventions
renamed from ``publish``, and ``process`` for the handling).

When tracing is on, decided once, by :func:`active`, at the first call (the daemon's workers
start, a publish run begins): opentelemetry is installed and a tracer provider is configured,
either already set when mayhem starts (by the handler's module at its import, or by running
under ``opentelemetry-instrument``) or asked for by the standard variables:
``OTEL_TRACES_EXPORTER`` (then mayhem sets up the SDK's provider with those exporters, the
SDK's other ``OTEL_*`` variables applying; ``console`` writes one JSON line per span to
stderr) or ``OTEL_PYTHON_TRACER_PROVIDER``. ``OTEL_SDK_DISABLED=true`` turns it off.

Off costs nothing: opentelemetry is not even imported, :data:`ACTIVE` stays ``None``, and the
workers are left as they are (:func:`instrument` wraps three of their methods only when
tracing is on), so a message pays no check at all.

A header a publisher controls never breaks a message: a malformed ``traceparent`` is ignored by
the propagator, a value that is not a string is not handed to it, and a propagator that raises
starts a new trace instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from mayhem._version import __version__
from mayhem.exceptions import ConfigError

if TYPE_CHECKING:
    import aio_pika
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import TracerProvider

    from mayhem.amqp import Delivery
    from mayhem.message import Message
    from mayhem.policy import Outcome
    from mayhem.store import Transaction
    from mayhem.worker import Workers

log = logging.getLogger(__name__)

# Attribute names and values of the messaging semantic conventions.
SYSTEM: Final = "messaging.system"
OPERATION_TYPE: Final = "messaging.operation.type"
OPERATION_NAME: Final = "messaging.operation.name"
DESTINATION: Final = "messaging.destination.name"
SUBSCRIPTION: Final = "messaging.destination.subscription.name"
MESSAGE_ID: Final = "messaging.message.id"
BODY_SIZE: Final = "messaging.message.body.size"
ROUTING_KEY: Final = "messaging.rabbitmq.destination.routing_key"
DELIVERY_TAG: Final = "messaging.rabbitmq.message.delivery_tag"
ERROR_TYPE: Final = "error.type"
OUTCOME: Final = "mayhem.outcome"
ATTEMPT: Final = "mayhem.attempt"

# W3C allows a tracestate of 512 characters and more; a header far longer is not a trace
# context but a publisher's mistake (or worse), and is not handed to the propagator.
MAX_HEADER_CHARS: Final = 8192
MAX_STATUS_CHARS: Final = 512

_UNDECIDED: Final = object()
_decided: object = _UNDECIDED
# The tracing in use, once decided; None when off.
ACTIVE: Tracing | None = None


def active() -> Tracing | None:
    """The tracing in use, or ``None`` when off; decided at the first call.

    Raises:
        ConfigError: ``OTEL_TRACES_EXPORTER`` names an exporter that is not installed.
    """
    global _decided, ACTIVE  # noqa: PLW0603 -- decided once per process, on purpose
    if _decided is _UNDECIDED:
        ACTIVE = _decide(os.environ)
        _decided = ACTIVE
    return ACTIVE


def enable(provider: TracerProvider | None = None) -> Tracing:
    """Turn tracing on with ``provider`` (the global one when ``None``), whatever was decided.

    For embedding mayhem and for tests (with the SDK's in-memory exporter).
    """
    global _decided, ACTIVE  # noqa: PLW0603
    ACTIVE = Tracing(provider)
    _decided = ACTIVE
    return ACTIVE


def reset() -> None:
    """Forget the decision: the next :func:`active` decides again (for tests)."""
    global _decided, ACTIVE  # noqa: PLW0603
    ACTIVE = None
    _decided = _UNDECIDED


def instrument(workers: Workers) -> None:
    """Give ``workers`` their spans when tracing is on; when it is off, do nothing at all."""
    tracing = active()
    if tracing is not None:
        tracing.instrument(workers)


def publishing(
    message: aio_pika.Message, exchange: str, routing_key: str
) -> contextlib.AbstractContextManager[object]:
    """A PRODUCER span around one publish, its context injected into the message's headers."""
    tracing = ACTIVE
    if tracing is None:
        return contextlib.nullcontext()
    return tracing.publishing(message, exchange, routing_key)


def flush(timeout: float = 5.0) -> None:
    """Export the spans still buffered (before the process exits), if tracing is on."""
    if ACTIVE is not None:
        ACTIVE.flush(timeout)


def _decide(environ: Mapping[str, str]) -> Tracing | None:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    exporters = "" if exporters == "none" else exporters
    wanted = bool(exporters or environ.get("OTEL_PYTHON_TRACER_PROVIDER"))
    if not wanted and "opentelemetry.trace" not in sys.modules:
        return None  # nobody could have set a provider: import nothing
    try:
        from opentelemetry import trace  # noqa: PLC0415 -- the extra is optional
    except ImportError:
        log.warning("the OTEL_* variables ask for traces, but mayhem[otel] is not installed")
        return None
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # Set before mayhem looked (the handler's module, opentelemetry-instrument,
        # OTEL_PYTHON_TRACER_PROVIDER): used as it is.
        return Tracing()
    if exporters:
        trace.set_tracer_provider(provider_from_env(exporters))
        return Tracing(owns_provider=True)
    return None


def provider_from_env(exporters: str) -> SdkTracerProvider:
    """The SDK's tracer provider with the exporters ``OTEL_TRACES_EXPORTER`` names.

    The SDK reads its other variables itself (``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``); the service is
    called ``mayhem`` unless they name it.

    Raises:
        ConfigError: the SDK or a named exporter is not installed.
    """
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider as Provider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        raise ConfigError(
            "OTEL_TRACES_EXPORTER needs opentelemetry-sdk: pip install 'mayhem[otel]'"
        ) from None
    from importlib.metadata import entry_points  # noqa: PLC0415

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "mayhem"}))
    provider = Provider(resource=resource)
    for name in filter(None, (part.strip() for part in exporters.split(","))):
        exporter: SpanExporter
        if name == "console":
            # stderr: stdout carries the report of `mayhem publish`; one line per span.
            exporter = ConsoleSpanExporter(
                out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
            )
        else:
            found = entry_points(group="opentelemetry_traces_exporter", name=name)
            if not found:
                raise ConfigError(
                    f"OTEL_TRACES_EXPORTER: no trace exporter {name!r} is installed "
                    "(for otlp: pip install opentelemetry-exporter-otlp)"
                )
            exporter = next(iter(found)).load()()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _describe(error: BaseException) -> str:
    # The text of a handler's exception may quote a whole message body: keep a span small.
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= MAX_STATUS_CHARS else text[: MAX_STATUS_CHARS - 3] + "..."


class Tracing:
    """Spans for the daemon and the publisher, on one tracer.

    Args:
        provider: the tracer provider; the global one when ``None``.
        owns_provider: mayhem built the provider, so :meth:`flush` shuts it down.
    """

    def __init__(
        self, provider: TracerProvider | None = None, *, owns_provider: bool = False
    ) -> None:
        from opentelemetry import propagate, trace  # noqa: PLC0415 -- only when tracing is on
        from opentelemetry.propagators.textmap import Getter  # noqa: PLC0415

        self._trace = trace
        self._propagate = propagate
        self._provider = provider
        self._owns_provider = owns_provider
        self._tracer = trace.get_tracer("mayhem", __version__, tracer_provider=provider)

        class HeaderGetter(Getter[Mapping[str, Any]]):
            """Hands the propagator a header only when it is a string of a sane length."""

            def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
                value = carrier.get(key)
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        return None
                if isinstance(value, str) and len(value) <= MAX_HEADER_CHARS:
                    return [value]
                return None

            def keys(self, carrier: Mapping[str, Any]) -> list[str]:
                return [key for key in carrier if isinstance(key, str)]

        self._getter = HeaderGetter()

    def extract(self, headers: Mapping[str, Any]) -> OtelContext | None:
        """The trace context a publisher put in ``headers``; ``None`` (a new trace) if none.

        Whatever the headers hold, this never raises.
        """
        if not headers:
            return None
        try:
            return self._propagate.extract(headers, getter=self._getter)
        except Exception as exc:  # a propagator's bug must not cost a message
            log.debug("trace context not extracted: %s", exc)
            return None

    @contextlib.contextmanager
    def publishing(
        self, message: aio_pika.Message, exchange: str, routing_key: str
    ) -> Iterator[object]:
        """A PRODUCER span around one publish; its context goes into ``message.headers``."""
        attributes: dict[str, str | int] = {
            SYSTEM: "rabbitmq",
            OPERATION_TYPE: "send",
            OPERATION_NAME: "publish",
            DESTINATION: exchange,
            BODY_SIZE: len(message.body),
        }
        if message.message_id:
            attributes[MESSAGE_ID] = message.message_id
        if routing_key:
            attributes[ROUTING_KEY] = routing_key
        with self._tracer.start_as_current_span(
            f"publish {exchange or '(default)'}",
            kind=self._trace.SpanKind.PRODUCER,
            attributes=attributes,
        ) as span:
            self._propagate.inject(message.headers)
            yield span

    def instrument(self, workers: Workers) -> None:
        """Wrap the workers' ``_process`` and the applier's ``decide`` and ``_call_handler``.

        Wrapping the instance once, at start, rather than asking "tracing?" in the worker for
        each message keeps the untraced path exactly as it is.
        """
        applier = workers.applier
        process = workers._process  # noqa: SLF001 -- the three steps of a message, by design
        decide = applier.decide
        call_handler = applier._call_handler  # noqa: SLF001
        queue = applier.queue
        tracer = self._tracer
        trace = self._trace
        consumer, internal = trace.SpanKind.CONSUMER, trace.SpanKind.INTERNAL
        handler_end: contextvars.ContextVar[int | None] = contextvars.ContextVar(
            "mayhem_handler_end", default=None
        )

        async def traced_process(delivery: Delivery) -> None:
            attributes: dict[str, str | int] = {
                SYSTEM: "rabbitmq",
                OPERATION_TYPE: "process",
                OPERATION_NAME: "process",
                DESTINATION: delivery.exchange,
                SUBSCRIPTION: queue,
                DELIVERY_TAG: delivery.delivery_tag,
                BODY_SIZE: delivery.body_size,
            }
            if delivery.message_id:
                attributes[MESSAGE_ID] = delivery.message_id
            if delivery.routing_key:
                attributes[ROUTING_KEY] = delivery.routing_key
            token = handler_end.set(None)
            try:
                with tracer.start_as_current_span(
                    f"process {queue}",
                    context=self.extract(delivery.headers),
                    kind=consumer,
                    attributes=attributes,
                ):
                    await process(delivery)
            finally:
                handler_end.reset(token)

        async def traced_decide(delivery: Delivery) -> Outcome:
            outcome = await decide(delivery)
            error = outcome.error
            span = trace.get_current_span()
            if outcome.attempt:
                span.set_attribute(ATTEMPT, outcome.attempt)
            span.set_attribute(OUTCOME, outcome.kind.value)
            if error is not None:
                span.set_status(trace.StatusCode.ERROR, _describe(error))
                span.set_attribute(ERROR_TYPE, type(error).__qualname__)
            ended = handler_end.get()
            if ended is not None:
                # The handler returned: from then to here is the claim and the commit.
                commit = tracer.start_span("commit", kind=internal, start_time=ended)
                committed = outcome.kind.value == "applied"
                commit.set_attribute("mayhem.committed", committed)
                if not committed and error is not None:
                    commit.set_status(trace.StatusCode.ERROR, _describe(error))
                commit.end()
            return outcome

        async def traced_call_handler(message: Message, tx: Transaction) -> None:
            with tracer.start_as_current_span(
                "handle", kind=internal, attributes={MESSAGE_ID: message.message_id}
            ):
                await call_handler(message, tx)
            handler_end.set(time.time_ns())

        workers._process = traced_process  # type: ignore[method-assign]  # noqa: SLF001
        applier.decide = traced_decide  # type: ignore[method-assign]
        applier._call_handler = traced_call_handler  # type: ignore[method-assign]  # noqa: SLF001

    def flush(self, timeout: float) -> None:
        """Export what is buffered; shut the provider down if mayhem made it."""
        provider = self._provider or self._trace.get_tracer_provider()
        try:
            force_flush: Callable[[int], object] | None = getattr(provider, "force_flush", None)
            if force_flush is not None:
                force_flush(int(timeout * 1000))
            if self._owns_provider:
                getattr(provider, "shutdown", lambda: None)()
        except Exception as exc:  # an exporter's failure must not change the exit code
            log.warning("spans not exported at exit: %s", exc)
