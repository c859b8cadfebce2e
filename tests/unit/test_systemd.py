"""sd_notify over a real AF_UNIX datagram socket (path and abstract), and the watchdog settings."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from mayhem.systemd import Notifier


@pytest.fixture
def receiver(tmp_path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a file in tmp_path, as systemd's notify socket is."""
    path = str(tmp_path / "notify.sock")
    assert len(path) < 100  # AF_UNIX paths are limited to about 108 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace; NOTIFY_SOCKET names it with '@'."""
    name = f"mayhem-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind("\0" + name)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def test_no_notify_socket_is_a_no_op():
    """Without NOTIFY_SOCKET the notifier is disabled, opens no socket and never fails."""
    notifier = Notifier({})
    assert notifier.enabled is False
    assert notifier.watchdog_interval is None
    notifier.ready("consuming")
    notifier.status("busy")
    notifier.watchdog()
    notifier.stopping()
    assert notifier._socket is None
    notifier.close()


def test_empty_notify_socket_is_a_no_op():
    """An empty NOTIFY_SOCKET counts as unset."""
    notifier = Notifier({"NOTIFY_SOCKET": ""})
    assert notifier.enabled is False
    notifier.ready("x")
    assert notifier._socket is None


def test_delivers_to_a_socket_path(receiver):
    """READY=1 with STATUS, STATUS, WATCHDOG=1 and STOPPING=1 arrive as datagrams, in order."""
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled is True
    try:
        notifier.ready("consuming from q")
        notifier.status("3 in flight")
        notifier.watchdog()
        notifier.stopping()
    finally:
        notifier.close()
    assert [sock.recv(4096) for _ in range(4)] == [
        b"READY=1\nSTATUS=consuming from q",
        b"STATUS=3 in flight",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=stopping",
    ]


def test_delivers_to_an_abstract_socket(abstract_receiver):
    """A NOTIFY_SOCKET starting with '@' names a socket in the abstract namespace."""
    sock, address = abstract_receiver
    notifier = Notifier({"NOTIFY_SOCKET": address})
    try:
        notifier.ready("up")
        notifier.watchdog()
        notifier.stopping()
    finally:
        notifier.close()
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_notify_after_close_reopens(receiver):
    """After close(), a further notification opens a new socket and is delivered."""
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.status("one")
    notifier.close()
    assert notifier._socket is None
    notifier.status("two")
    notifier.close()
    assert [sock.recv(4096), sock.recv(4096)] == [b"STATUS=one", b"STATUS=two"]


def test_missing_socket_logs_once_and_never_raises(tmp_path, caplog):
    """1. Sends to a NOTIFY_SOCKET path that does not exist log one warning and raise nothing.

    2. Once a socket is bound at that path, notifications are delivered again.
    """
    path = str(tmp_path / "later.sock")
    notifier = Notifier({"NOTIFY_SOCKET": path})
    with caplog.at_level(logging.WARNING, logger="mayhem.systemd"):
        notifier.ready("x")
        notifier.watchdog()
        notifier.stopping()
    warnings = [r for r in caplog.records if r.name == "mayhem.systemd"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert path in warnings[0].getMessage()
    later = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    later.settimeout(5)
    try:
        later.bind(path)
        notifier.watchdog()
        assert later.recv(4096) == b"WATCHDOG=1"
    finally:
        later.close()
        notifier.close()


def test_missing_abstract_socket_never_raises(caplog):
    """An abstract NOTIFY_SOCKET nobody listens on logs a warning and raises nothing."""
    notifier = Notifier({"NOTIFY_SOCKET": f"@mayhem-nobody-{uuid.uuid4().hex}"})
    with caplog.at_level(logging.WARNING, logger="mayhem.systemd"):
        notifier.ready("x")
        notifier.ready("y")
    notifier.close()
    assert len([r for r in caplog.records if r.name == "mayhem.systemd"]) == 1


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.25),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "-2000000"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ, interval):
    """The watchdog interval is half of WATCHDOG_USEC, unless WATCHDOG_PID names another process."""
    assert Notifier({"NOTIFY_SOCKET": "@x", **environ}).watchdog_interval == interval


def test_status_with_a_newline_stays_one_field(receiver):
    """A newline in a status cannot inject another KEY=VALUE field."""
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.status("busy\nREADY=1")
    notifier.close()
    fields = sock.recv(4096).decode().split("\n")
    assert len(fields) == 1
    assert fields[0].startswith("STATUS=busy")


def test_relative_notify_socket_is_ignored():
    """NOTIFY_SOCKET must be an absolute path or @abstract, as sd_notify requires."""
    assert Notifier({"NOTIFY_SOCKET": "relative/notify.sock"}).enabled is False


def test_watchdog_usec_zero_means_no_watchdog():
    """WATCHDOG_USEC=0 turns the watchdog off."""
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None


def test_extend_timeout_carries_a_status(receiver):
    """extend_timeout sends EXTEND_TIMEOUT_USEC in microseconds, with a status when given."""
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.extend_timeout(5.0, "stopping: draining, 3 in flight")
    notifier.close()
    fields = sock.recv(4096).decode().split("\n")
    assert "EXTEND_TIMEOUT_USEC=5000000" in fields
    assert "STATUS=stopping: draining, 3 in flight" in fields
