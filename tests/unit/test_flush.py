"""The flush at shutdown: the textfile (atomic, owner-only) and the Pushgateway (masked)."""

from __future__ import annotations

import base64
import http.server
import logging
import os
import stat
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mayhem.flush import flush_metrics
from mayhem.metrics import Metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_textfile_holds_only_mayhem_metrics(tmp_path):
    """The textfile has mayhem's final values and none of the process collector's.

    node_exporter exports process_* metrics of its own: a second copy would collide.
    """
    metrics = Metrics()
    metrics.acked.inc(3)
    metrics.shutdown_duration.set(1.5)
    path = tmp_path / "textfile" / "mayhem.prom"
    flush_metrics(metrics, str(path), None, "mayhem")
    text = path.read_text()
    values = samples(text)
    assert values[("mayhem_messages_total", (("outcome", "acked"),))] == 3
    assert values[("mayhem_shutdown_duration_seconds", ())] == 1.5
    assert {name for name, _ in values} >= {"mayhem_build_info", "mayhem_queue_depth"}
    assert all(name.startswith("mayhem_") for name, _ in values)
    assert [p.name for p in path.parent.iterdir()] == ["mayhem.prom"]  # no temporary left


def test_textfile_rewritten_atomically(tmp_path):
    """A second flush replaces the file (rename over it), never appends to it."""
    metrics = Metrics()
    path = tmp_path / "mayhem.prom"
    flush_metrics(metrics, str(path), None, "mayhem")
    inode = path.stat().st_ino
    metrics.acked.inc()
    flush_metrics(metrics, str(path), None, "mayhem")
    assert path.stat().st_ino != inode
    assert samples(path.read_text())[("mayhem_messages_total", (("outcome", "acked"),))] == 1


@pytest.mark.parametrize(
    ("umask", "mode"), [(0o077, 0o600), (0o027, 0o640), (0o022, 0o640), (0, 0o640)]
)
def test_textfile_mode_follows_the_umask_never_wider_than_0640(tmp_path, umask, mode):
    """Owner read-write, group read at most, others nothing; a wider old file is replaced."""
    path = tmp_path / "mayhem.prom"
    path.write_text("")
    path.chmod(0o644)
    old = os.umask(umask)
    try:
        flush_metrics(Metrics(), str(path), None, "mayhem")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["mayhem.prom"]


def test_textfile_failure_is_logged_not_raised(tmp_path, caplog):
    """An unwritable textfile path is a warning: the shutdown goes on."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="mayhem.flush"):
        flush_metrics(Metrics(), str(blocker / "mayhem.prom"), None, "mayhem")
    assert "not written" in caplog.text


class _Pushgateway(http.server.BaseHTTPRequestHandler):
    pushes: list[tuple[str, str, bytes]]
    authorizations: list[str | None]

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.pushes.append(("PUT", self.path, body))
        self.authorizations.append(self.headers["Authorization"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def pushgateway() -> Iterator[tuple[str, list[tuple[str, str, bytes]], list[str | None]]]:
    """A tiny HTTP server on loopback standing in for a Pushgateway; records the pushes."""
    pushes: list[tuple[str, str, bytes]] = []
    authorizations: list[str | None] = []
    handler = type("Handler", (_Pushgateway,), {"pushes": pushes, "authorizations": authorizations})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", pushes, authorizations
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_pushgateway_gets_the_final_values(pushgateway):
    """The flush PUTs mayhem's metrics (only those) under job "mayhem"."""
    url, pushes, authorizations = pushgateway
    metrics = Metrics()
    metrics.dead_lettered.inc(2)
    flush_metrics(metrics, None, url, "mayhem")
    [(method, path, body)] = pushes
    assert (method, path) == ("PUT", "/metrics/job/mayhem")
    values = samples(body.decode())
    assert values[("mayhem_messages_total", (("outcome", "dead_lettered"),))] == 2
    assert all(name.startswith("mayhem_") for name, _ in values)
    assert authorizations == [None]
    assert authorizations == [None]


def test_pushgateway_failure_is_logged_without_the_password(caplog):
    """An unreachable Pushgateway is a warning, and its URL's password is masked."""
    with caplog.at_level(logging.WARNING, logger="mayhem.flush"):
        flush_metrics(Metrics(), None, "http://pusher:s3cret-pw@127.0.0.1:9/", "mayhem")
    assert "not pushed" in caplog.text
    assert "s3cret-pw" not in caplog.text


def test_pushgateway_credentials_in_the_url_are_sent_as_basic_auth(pushgateway):
    """user:password@ in the URL authenticates the push (urllib would read it as a host)."""
    url, pushes, authorizations = pushgateway
    flush_metrics(Metrics(), None, url.replace("http://", "http://pusher:p%40ss-w0rd@"), "mayhem")
    [(method, path, _)] = pushes
    assert (method, path) == ("PUT", "/metrics/job/mayhem")
    assert authorizations == ["Basic " + base64.b64encode(b"pusher:p@ss-w0rd").decode()]


@pytest.mark.parametrize(
    "url",
    [
        "http://pusher:s3cret-pw@127.0.0.1/",  # no port: http.client read 's3cret-pw@...' as one
        "pusher:s3cret-pw@127.0.0.1",
        "http://pusher:s3cret-pw@[::1/",
    ],
)
def test_pushgateway_url_without_port_fails_as_one_masked_line(caplog, url):
    """Any failure of the push is a warning without the password, never an exception."""
    with caplog.at_level(logging.WARNING, logger="mayhem.flush"):
        flush_metrics(Metrics(), None, url, "mayhem")
    [record] = caplog.records
    assert record.getMessage().startswith("metrics not pushed to ")
    assert record.exc_info is None
    assert "s3cret-pw" not in caplog.text
