"""deploy/prometheus and deploy/grafana: valid for promtool, and only metrics mayhem exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mayhem.flush import flush_metrics
from mayhem.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "mayhem.json"
ALERTS = {
    "MayhemConsumerDown",
    "MayhemQueueDepthGrowing",
    "MayhemDeadLetters",
    "MayhemHandlerSlow",
    "MayhemReconnectStorm",
    "MayhemNotReady",
}
# Metric names in PromQL: mayhem's, and the process collector's.
METRIC_NAME = re.compile(r"\b(?:mayhem|process|python)_[a-z0-9_]*[a-z0-9]\b")
# Grafana's variables, replaced by values Prometheus would see.
VARIABLES = {"$__rate_interval": "5m", "$job": "mayhem", "$instance": ".*"}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (deploy/setup.sh --test installs it)")
    return found


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
    )


def exported_names() -> set[str]:
    """Every sample name a daemon's /metrics has (with _total, _bucket, _sum, _count)."""
    return {
        line.split("{")[0].split(" ")[0]
        for line in Metrics().render().decode().splitlines()
        if line and not line.startswith("#")
    }


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return queries


def test_promtool_check_config(promtool):
    """prometheus.yml is valid, and the alerting rules it loads are found."""
    done = run(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr


def test_promtool_check_rules(promtool):
    """alerts.yml is valid and holds the six alerts."""
    done = run(promtool, "check", "rules", "deploy/prometheus/alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 rules found" in done.stdout + done.stderr
    text = (PROMETHEUS / "alerts.yml").read_text()
    assert set(re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE)) == ALERTS


def test_promtool_test_rules(promtool):
    """The rule unit tests pass: each alert fires when it should and stays quiet otherwise."""
    done = run(promtool, "test", "rules", "deploy/prometheus/alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_quiet():
    """alerts_test.yml expects each alert at least once and its absence at least once."""
    text = (PROMETHEUS / "alerts_test.yml").read_text()
    checks = re.findall(r"alertname: (\w+)\n\s*exp_alerts:( \[\])?", text)
    for alert in ALERTS:
        outcomes = {quiet == "" for name, quiet in checks if name == alert}
        assert outcomes == {True, False}, alert


def test_alerts_use_only_exported_metrics():
    """Each metric named in alerts.yml (expressions and annotations) is in the exposition."""
    used = set(METRIC_NAME.findall((PROMETHEUS / "alerts.yml").read_text()))
    assert "mayhem_ready" in used
    assert used - exported_names() == set()


def test_dashboard_uses_only_exported_metrics():
    """Each metric in the dashboard's queries and variables is in the exposition."""
    used = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    assert used >= {
        "mayhem_messages_total",
        "mayhem_messages_in_flight",
        "mayhem_buffered_messages",
        "mayhem_handler_duration_seconds_bucket",
        "mayhem_queue_depth",
        "mayhem_broker_reconnects_total",
        "mayhem_stale_deliveries_total",
        "mayhem_database_up",
        "mayhem_consumer_active",
        "mayhem_ready",
        "mayhem_shutdown_duration_seconds",
    }
    assert used - exported_names() == set()


def test_dashboard_queries_parse(promtool, tmp_path):
    """Every dashboard query is valid PromQL (checked as recording rules by promtool)."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, query in enumerate(dashboard_queries()):
        expr = query
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        lines += [f"      - record: dashboard:query_{number}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard.yml"
    rules.write_text("\n".join(lines) + "\n")
    done = run(promtool, "check", "rules", str(rules))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_shape():
    """A Grafana dashboard (schema 39) whose panels all query the chosen Prometheus source."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "mayhem"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert all(target["expr"] for target in panel["targets"])
    titles = {panel["title"] for panel in panels}
    assert {"Throughput by outcome", "Queue depth", "Handler duration"} <= titles


def test_exposition_passes_promtool_check_metrics(promtool, tmp_path):
    """/metrics and the shutdown textfile pass promtool's linter."""
    metrics = Metrics()
    metrics.acked.inc()
    metrics.handler_duration.observe(0.2)
    done = run(promtool, "check", "metrics", stdin=metrics.render())
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    textfile = tmp_path / "mayhem.prom"
    flush_metrics(metrics, str(textfile), None, "mayhem")
    done = run(promtool, "check", "metrics", stdin=textfile.read_bytes())
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
