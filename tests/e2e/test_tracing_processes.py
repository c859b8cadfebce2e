"""Tracing as users run it: ``mayhem publish`` and ``mayhem run`` processes, OTEL_* variables."""

from __future__ import annotations

import asyncio
import json
import sys

from mayhem_testing import ROOT, SUPPORT, DaemonProcess, daemon_args, metric, rows, wait_until

ACKED = 'mayhem_messages_total{outcome="acked"}'
# The daemon's spans: the SDK's console exporter, as mayhem sets it up (one JSON line each).
CONSOLE = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
NO_OTEL = {"OTEL_TRACES_EXPORTER": "", "OTEL_PYTHON_TRACER_PROVIDER": ""}


async def _python(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{SUPPORT}:{ROOT}", **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _spans(lines: list[str]) -> list[dict]:
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "context" in entry and "kind" in entry:
            found.append(entry)
    return found


async def test_one_trace_from_mayhem_publish_through_a_daemon_process(make_config, spawn):
    """One trace from `mayhem publish` through `mayhem run`, both configured by OTEL_* alone.

    1. `mayhem run` with OTEL_TRACES_EXPORTER=console;
    2. `mayhem publish --count 3` with it too;
    3. after the daemon stops, each consumer span is the child of its publish span, and the
       handle and commit spans are the consumer span's.
    """
    config = make_config(handler="sample_handlers:record")
    daemon: DaemonProcess = spawn(
        daemon_args(config, "--handler", "sample_handlers:record"), env=CONSOLE
    )
    await daemon.start()
    code, out, err = await _python(
        "-m", "mayhem", "publish", "--count", "3",
        "--amqp-url", config.amqp_url, "--queue", config.queue, "--exchange", config.exchange,
        env=CONSOLE,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("published 3, confirmed 3, failed 0")  # the spans are not on stdout
    sent = _spans(err.splitlines())
    assert [span["name"] for span in sent] == [f"publish {config.exchange}"] * 3
    assert daemon.metrics_addr is not None
    addr = daemon.metrics_addr
    await wait_until(lambda: _at_least(addr, 3))
    assert await daemon.stop() == 0  # flushes the spans still buffered
    received = _spans(daemon.raw)
    for producer in sent:
        assert producer["kind"] == "SpanKind.PRODUCER"
        trace_id = producer["context"]["trace_id"]
        in_trace = {
            span["name"]: span for span in received if span["context"]["trace_id"] == trace_id
        }
        assert set(in_trace) == {f"process {config.queue}", "handle", "commit"}
        process = in_trace[f"process {config.queue}"]
        assert process["kind"] == "SpanKind.CONSUMER"
        assert process["parent_id"] == producer["context"]["span_id"]
        assert in_trace["handle"]["parent_id"] == process["context"]["span_id"]
        assert in_trace["commit"]["parent_id"] == process["context"]["span_id"]
        assert (
            process["attributes"]["messaging.message.id"]
            == producer["attributes"]["messaging.message.id"]
        )
        assert process["resource"]["attributes"]["service.name"] == "mayhem"


async def _at_least(addr: str, n: int) -> bool:
    return await metric(addr, ACKED) >= n


async def test_no_opentelemetry_is_imported_in_a_full_message_run(make_config, spawn):
    """Tracing not configured: a whole message run imports no opentelemetry module.

    The extra is installed here; neither the publisher's process nor the daemon's imports it.
    """
    config = make_config(handler="tracing_handlers:record_otel_modules")
    daemon = spawn(
        daemon_args(config, "--handler", "tracing_handlers:record_otel_modules"), env=NO_OTEL
    )
    await daemon.start()
    flags = {"amqp_url": config.amqp_url, "queue": config.queue, "exchange": config.exchange}
    code, out, err = await _python(
        "-c",
        "import asyncio, sys\n"
        "from mayhem.config import Config\n"
        "from mayhem.publisher import publish\n"
        f"config = Config.load(flags={flags!r}, environ={{}})\n"
        "report = asyncio.run(publish(config, count=3, rate=None, file=None))\n"
        "assert report.confirmed == 3, report\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry'))\n",
        env=NO_OTEL,
    )
    assert code == 0, err
    assert out.strip() == "[]"
    assert daemon.metrics_addr is not None
    addr = daemon.metrics_addr
    await wait_until(lambda: _at_least(addr, 3))
    assert await daemon.stop() == 0
    assert await rows(config.db_url, "SELECT loaded FROM otel_modules") == [(0,)] * 3
