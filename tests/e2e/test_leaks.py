"""Leaks and exhaustion: the daemon as a process, against hostile local peers and bad URLs."""

from __future__ import annotations

import contextlib
import errno
import resource
import socket
from pathlib import Path

import aiohttp
from mayhem_testing import (
    applied_at_least,
    daemon_args,
    declare,
    http_get,
    metric,
    publish,
    wait_until,
)

IDLE_CONNECTIONS = 1_100
# Low enough that the idle connections alone would use up the daemon's file descriptors.
DAEMON_NOFILE = 256


def _open_idle(addr: str, count: int) -> list[socket.socket]:
    """Start ``count`` TCP connections to ``addr`` that never send a byte."""
    host, _, port = addr.rpartition(":")
    opened = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)  # noqa: FBT003 -- the socket API
        code = sock.connect_ex((host, int(port)))
        assert code in {0, errno.EINPROGRESS}, errno.errorcode.get(code, code)
        opened.append(sock)
    return opened


def _open_files(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


async def test_idle_connections_to_the_endpoint_do_not_exhaust_the_daemon(
    amqp, make_config, db_url, spawn
):
    """1,100 idle connections to /metrics: no false database outage, nothing requeued.

    1. Start the daemon, then lower its open-file limit to 256 (prlimit); its database pool
       (PostgreSQL) has one connection so far.
    2. Open 1,100 connections to the endpoint that send nothing; once the daemon refuses
       connections beyond its limit, publish 200 messages (handled 50 ms each, 16 at once).
    3. All 200 are applied while the idle connections stay open, and the daemon holds fewer
       than 128 files; no database outage was detected and no message was requeued.
    4. After the idle connections are closed, /metrics answers again.
    """
    config = make_config(db_url=db_url)
    await declare(amqp, config)
    daemon = spawn(
        daemon_args(config, "--handler", "sample_handlers:record"),
        env={"SAMPLE_HANDLER_DELAY": "0.05"},
    )
    await daemon.start()
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (DAEMON_NOFILE, DAEMON_NOFILE))
    idle = _open_idle(daemon.metrics_addr, IDLE_CONNECTIONS)
    try:
        # The attack has landed once the daemon refuses connections, or (without a limit)
        # once it has no file descriptor left.
        await wait_until(
            lambda: (
                daemon.events("http_connections_refused")
                or _open_files(daemon.pid) >= DAEMON_NOFILE - 1
            ),
            timeout=30,
        )
        await publish(amqp, config.queue, [b"{}"] * 200)
        await wait_until(lambda: applied_at_least(config.db_url, 200), timeout=60)
        # The endpoint holds at most its limit of sockets, far from the process's limit.
        assert _open_files(daemon.pid) < DAEMON_NOFILE / 2
    finally:
        for sock in idle:
            sock.close()

    async def answers() -> bool:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, _ = await http_get(daemon.metrics_addr, "/metrics")
            return status == 200
        return False

    await wait_until(answers, timeout=30)
    assert await metric(daemon.metrics_addr, "mayhem_database_outages_total") == 0
    assert await metric(daemon.metrics_addr, "mayhem_database_up") == 1
    assert await metric(daemon.metrics_addr, 'mayhem_messages_total{outcome="requeued"}') == 0
    assert await metric(daemon.metrics_addr, 'mayhem_messages_total{outcome="acked"}') == 200
    assert not daemon.events("database_outage")
    assert not daemon.events("consumption_paused")
    assert await daemon.stop() == 0
    assert daemon.tracebacks() == []


async def test_pushgateway_url_without_port_leaks_no_password(make_config, spawn):
    """A Pushgateway URL with a password and no port: one masked warning, exit 0.

    http.client used to read 'password@host' as a port and raise InvalidURL quoting it, in a
    traceback of a failed shutdown step.
    """
    config = make_config()
    pushgateway = "http://pusher:s3cret-pw@127.0.0.1/"  # port 80: nothing listens there
    daemon = spawn(daemon_args(config, "--pushgateway", pushgateway))
    await daemon.start()
    assert await daemon.stop() == 0
    [warning] = daemon.events("metrics_not_pushed")
    assert warning["level"] == "warning"
    assert warning["message"].startswith("metrics not pushed to http://pusher:***@127.0.0.1/: ")
    assert daemon.tracebacks() == []
    assert not any("s3cret-pw" in line for line in daemon.raw)


async def test_passwords_in_url_options_masked_in_logs_and_process_title(make_config, spawn):
    """A db_url's ?password= shows nowhere: not in the logs, not in /proc/PID/cmdline.

    SQLite ignores the query, so the daemon runs; the password is masked all the same.
    """
    config = make_config()
    db_url = config.db_url + "?password=db-s3cret"
    args = daemon_args(config, "--log-level", "DEBUG")
    args[args.index("--db-url") + 1] = db_url
    daemon = spawn(args)
    await daemon.start()
    title = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()  # noqa: ASYNC240
    assert "db-s3cret" not in title
    assert "?password=***" in title
    assert await daemon.stop() == 0
    assert not any("db-s3cret" in line for line in daemon.raw)
