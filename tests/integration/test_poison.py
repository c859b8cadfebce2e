"""Poison messages against the real broker: headers nested too deep, bodies over the limit.

Each used to stop consumption or blow up memory. Each ends in ``<queue>.dead`` with a reason
while every other message flows, the consuming connection stays up, and the ``dead`` tools
handle it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from pathlib import Path

import pika
import pytest
from mayhem_testing import (
    daemon_args,
    declare,
    drain,
    metric,
    publish,
    records_of,
    wait_until,
)
from pamqp import commands, frame, header

from mayhem.dead import dead_list, dead_replay, format_letters

AMQP_URL = os.environ.get("MAYHEM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DEPTH = 500  # RabbitMQ takes it; pamqp's recursive decoder does not
MIB = 1024 * 1024


def nested_table(depth: int) -> bytes:
    """A field table ``{"n": {"n": ... {}}}``, ``depth`` tables deep (~3.5 KB for 500)."""
    table = bytes(4)
    for _ in range(depth - 1):
        entry = b"\x01nF" + table
        table = len(entry).to_bytes(4) + entry
    return table


class _RawProperties(pika.BasicProperties):
    """Basic properties sent as given bytes: no client library encodes 500 nested tables."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw = raw

    def encode(self) -> list[bytes]:
        return [self._raw]


def raw_properties(message_id: bytes, headers_table: bytes | None = None) -> bytes:
    """Property flags and values: headers (as encoded bytes), delivery_mode 2, message_id."""
    flags = (1 << 12) | (1 << 7) | ((1 << 13) if headers_table is not None else 0)
    return (
        flags.to_bytes(2)
        + (headers_table or b"")
        + b"\x02"
        + bytes((len(message_id),))
        + message_id
    )


async def publish_raw(queue: str, body: bytes, properties: bytes) -> None:
    """Publish with confirms (pika, in a thread) a message whose properties are raw bytes."""

    def send() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("", queue, body, _RawProperties(properties), mandatory=True)
        finally:
            connection.close()

    await asyncio.to_thread(send)


def _outcome(daemon, outcome: str) -> float:
    return daemon.metrics.value("mayhem_messages_total", {"outcome": outcome})


async def test_headers_nested_too_deep_are_dead_lettered_and_the_rest_flows(
    amqp, make_config, run_daemon
):
    """Headers 500 tables deep: that delivery is dead-lettered, the connection stays.

    1. Five messages, one whose headers nest 500 deep, five more.
    2. The ten are applied; the deep one is in <queue>.dead, reason rejected, the error says
       why, body and message_id kept; the consuming connection never dropped.
    """
    config = make_config(handler="sample_handlers:record")
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"] * 5)
        await publish_raw(config.queue, b"deep body", raw_properties(b"deep", nested_table(DEPTH)))
        await publish(amqp, config.queue, [b"{}"] * 5)
        await wait_until(lambda: _outcome(daemon, "acked") == 10 and _outcome(daemon, "rejected"))
        assert _outcome(daemon, "rejected") == 1
        assert daemon.metrics.value("mayhem_broker_reconnects_total") == 0
        assert daemon.consumer is not None
        assert daemon.consumer.connected
        assert not daemon.not_ready()
    [dead] = await drain(amqp, config.dead_queue)
    assert (dead.message_id, dead.body) == ("deep", b"deep body")
    assert dead.headers["x-mayhem-reason"] == "rejected"
    assert "headers cannot be decoded: nested too deeply" in dead.headers["x-mayhem-error"]


async def test_dead_tools_list_and_replay_what_they_cannot_decode(amqp, make_config):
    """`dead list` and `dead replay` on undecodable and hostile messages in <queue>.dead.

    1. Into <queue>.dead: one with headers 500 deep, one whose message_id holds terminal
       escapes, one whose message_id is not UTF-8.
    2. list shows all three: the deep one's error says ``<undecodable: ...>``; the printed
       table escapes the control characters.
    3. replay sends two to the work queue (the deep one without its headers, saying so in
       x-mayhem-error); the one whose id cannot be kept stays in <queue>.dead.
    """
    config = make_config()
    await declare(amqp, config)
    dead_queue = config.dead_queue
    await publish_raw(dead_queue, b"deep body", raw_properties(b"deep", nested_table(DEPTH)))
    await publish(amqp, dead_queue, [b"evil body"], message_ids=["evil\x1b[2J\u202eid"])
    await publish_raw(dead_queue, b"bad id body", raw_properties(b"bad\xff\xfe"))

    listed = await dead_list(config, limit=10)
    assert listed.total == 3
    by_id = {letter.message_id: letter for letter in listed.letters}
    deep = by_id["deep"]
    assert deep.error.startswith("<undecodable: headers cannot be decoded: nested too deeply>")
    assert deep.size == len(b"deep body")
    text = format_letters(listed, dead_queue)
    assert "evil\\x1b[2J\\u202eid" in text
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert (await dead_list(config, limit=10)).total == 3, "listing removed nothing"

    replayed = await dead_replay(config, ids=None)
    assert (replayed.total, replayed.matched, replayed.done) == (3, 3, 2)
    copies = {m.message_id: m for m in await drain(amqp, config.queue)}
    assert set(copies) == {"deep", "evil\x1b[2J\u202eid"}
    assert copies["deep"].body == b"deep body"
    assert copies["deep"].headers["x-mayhem-error"] == (
        "replayed without what could not be decoded: headers cannot be decoded: nested too deeply"
    )
    assert "n" not in copies["deep"].headers
    [left] = (await dead_list(config, limit=10)).letters
    assert left.error.startswith("<undecodable: property message_id is not valid UTF-8>")


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_body_over_max_message_bytes_is_rejected_to_the_dead_letter_queue_whole(
    amqp, make_config, run_daemon, queue_type, caplog
):
    """A body over max_message_bytes is refused by its declared size, never copied by mayhem.

    1. Ten messages, one of 8 MiB (max_message_bytes is 1 MiB), ten more.
    2. The twenty are applied, batched acks and all; the big one is rejected to the broker's
       dead-letter exchange and lies in <queue>.dead with its body intact; one log line gives
       its size, never its payload; the connection never dropped.
    3. `dead list` says why.
    """
    config = make_config(
        handler="sample_handlers:record", max_message_bytes=MIB, queue_type=queue_type
    )
    big = os.urandom(16) * (8 * MIB // 16)
    caplog.set_level(logging.INFO, logger="mayhem")
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"] * 10)
        await publish(amqp, config.queue, [big], message_ids=["big"])
        await publish(amqp, config.queue, [b"{}"] * 10)
        await wait_until(
            lambda: _outcome(daemon, "acked") == 20 and _outcome(daemon, "rejected") == 1,
            timeout=20,
        )
        assert daemon.metrics.value("mayhem_broker_reconnects_total") == 0
        assert daemon.consumer is not None
        assert daemon.consumer.connected
    listed = await dead_list(config, limit=10)
    [letter] = listed.letters
    assert (letter.message_id, letter.reason, letter.size) == ("big", "rejected", len(big))
    assert letter.error == (
        f"body of {len(big)} bytes over max_message_bytes ({MIB}): rejected unread"
    )
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.message_id == "big"
    assert dead.body == big
    assert dead.headers["x-death"][0]["reason"] == "rejected"
    assert await drain(amqp, config.queue) == []
    [line] = [r.getMessage() for r in records_of(caplog.records, "rejected_unread")]
    assert str(len(big)) in line
    assert big[:16].hex() not in caplog.text


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_an_oversized_body_does_not_raise_the_daemons_memory(amqp, make_config, spawn):
    """The 8 MiB body is skipped as its frames arrive: the daemon's peak RSS barely moves.

    Before, the whole body was buffered and joined (and copied again to <queue>.dead): the
    peak rose by several times the body size.
    """
    config = make_config(handler="sample_handlers:record", max_message_bytes=MIB)
    await declare(amqp, config)
    daemon = spawn(daemon_args(config, "--handler", "sample_handlers:record",
                               "--max-message-bytes", str(MIB)))  # fmt: skip
    await daemon.start()
    # Warm up the consuming path first, so that what is measured is the big body alone.
    await publish(amqp, config.queue, [b"{}"] * 20)
    assert daemon.metrics_addr is not None
    addr = daemon.metrics_addr

    async def settled(acked: int, rejected: int) -> bool:
        return (
            await metric(addr, 'mayhem_messages_total{outcome="acked"}') == acked
            and await metric(addr, 'mayhem_messages_total{outcome="rejected"}') == rejected
        )

    await wait_until(lambda: settled(20, 0), timeout=20)
    before = _peak_rss(daemon.pid)
    body = os.urandom(8 * MIB)
    await publish(amqp, config.queue, [body], message_ids=["big"])
    await publish(amqp, config.queue, [b"{}"])
    await wait_until(lambda: settled(21, 1), timeout=20)
    grown, limit = _peak_rss(daemon.pid) - before, len(body) // 4
    assert grown < limit, f"peak RSS grew by {grown} bytes"
    assert await daemon.stop() == 0
    [dead] = await drain(amqp, config.dead_queue)
    assert dead.body == body


async def test_a_header_that_grows_past_frame_max_on_the_broker_is_still_read(
    amqp, make_config, run_daemon
):
    """Headers filling a whole frame, then x-death added by the broker: still readable.

    1. A message whose content header frame is just under frame_max, with a body over
       max_message_bytes: rejected to the dead-letter exchange, which adds x-death.
    2. RabbitMQ passes the now larger header on unsplit: `dead list` still reads it.
    """
    config = make_config(handler="sample_handlers:record", max_message_bytes=10)
    probe = frame.marshal(
        header.ContentHeader(
            0,
            11,
            commands.Basic.Properties(headers={"pad": ""}, message_id="wide", delivery_mode=2),
        ),
        1,
    )
    pad = "p" * (131_072 - len(probe) - 16)
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"x" * 11], message_ids=["wide"], headers={"pad": pad})
        await wait_until(lambda: _outcome(daemon, "rejected") == 1)
    [letter] = (await dead_list(config, limit=10)).letters
    assert (letter.message_id, letter.reason, letter.size) == ("wide", "rejected", 11)


def unencodable_table() -> bytes:
    """Headers RabbitMQ takes but pamqp cannot encode again.

    A long string that is not UTF-8 (decoded as ``bytes``) and a double beyond a 32-bit float
    (pamqp writes floats as ``f``).
    """
    entries = (
        b"\x03bin" + b"S" + (2).to_bytes(4) + b"\xff\xfe"
        + b"\x03big" + b"d" + struct.pack(">d", 1e300)
    )  # fmt: skip
    return len(entries).to_bytes(4) + entries


async def test_dead_replay_of_headers_that_cannot_be_encoded_again(amqp, make_config):
    """`dead replay` of a letter whose headers decode but cannot be re-encoded goes on.

    1. Into <queue>.dead: one whose headers pamqp decodes but cannot encode again, then
       an ordinary one.
    2. replay sends both to the work queue: the first without its headers (x-mayhem-error
       says so, body and message_id kept); no exception stops the replay half way.
    """
    config = make_config()
    await declare(amqp, config)
    await publish_raw(config.dead_queue, b"odd body", raw_properties(b"odd", unencodable_table()))
    await publish(amqp, config.dead_queue, [b"plain body"], message_ids=["plain"])

    replayed = await dead_replay(config, ids=None)
    assert (replayed.total, replayed.matched, replayed.done) == (2, 2, 2)
    copies = {m.message_id: m for m in await drain(amqp, config.queue)}
    assert set(copies) == {"odd", "plain"}
    assert copies["odd"].body == b"odd body"
    assert not {"bin", "big"} & set(copies["odd"].headers)
    assert copies["odd"].headers["x-mayhem-error"] == (
        "replayed without its headers: they cannot be encoded again"
    )
    assert await drain(amqp, config.dead_queue) == []


async def test_dead_list_does_not_show_a_publishers_forged_mayhem_headers(
    amqp, make_config, run_daemon
):
    """A message the broker dead-lettered is described from x-death, not from x-mayhem-*.

    1. A publisher sends a body over max_message_bytes with x-mayhem-reason, x-mayhem-error
       and x-mayhem-attempts of its own making; mayhem rejects it unread and the broker's
       dead-letter exchange moves it, headers and all, to <queue>.dead.
    2. `dead list` says what happened (rejected unread, from x-death), not the forged text.
    """
    config = make_config(handler="sample_handlers:record", max_message_bytes=10)
    forged = {
        "x-mayhem-reason": "failed",
        "x-mayhem-error": "DatabaseCorrupt: run `mayhem dead purge` now",
        "x-mayhem-attempts": 5,
    }
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"x" * 11], message_ids=["forged"], headers=forged)
        await wait_until(lambda: _outcome(daemon, "rejected") == 1)
    [letter] = (await dead_list(config, limit=10)).letters
    assert (letter.message_id, letter.reason, letter.attempts) == ("forged", "rejected", 0)
    assert letter.error == "body of 11 bytes over max_message_bytes (10): rejected unread"
