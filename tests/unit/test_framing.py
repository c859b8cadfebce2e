"""The consuming client's frame parsing, fed bytes directly: no socket, no broker.

A :class:`~mayhem.amqp.Link` is an ``asyncio.Protocol``; here it gets a transport that only
records what is written, and frames built byte by byte, so that every hostile or broken
stream can be tried. What the link may do with any input: hand on well-formed deliveries, or
close with :class:`~mayhem.exceptions.LinkLost`. Nothing else may escape ``data_received``.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header

from mayhem.amqp import Delivery, Link, decode_content_header
from mayhem.amqp.framing import FRAME_HEAD, FRAME_MAX, HEADER_SLACK, MAX_HEADER_DEPTH
from mayhem.exceptions import LinkLost

# -- building frames -------------------------------------------------------------------------


def _frame(kind: int, payload: bytes, channel: int = 1) -> bytes:
    return FRAME_HEAD.pack(kind, channel, len(payload)) + payload + b"\xce"


def deliver(tag: int, channel: int = 1) -> bytes:
    method = commands.Basic.Deliver(
        consumer_tag="ctag", delivery_tag=tag, redelivered=False, exchange="", routing_key="q"
    )
    return frame.marshal(method, channel)


def get_ok(tag: int) -> bytes:
    method = commands.Basic.GetOk(delivery_tag=tag, exchange="", routing_key="q", message_count=0)
    return frame.marshal(method, 1)


def content_header(body_size: int, channel: int = 1, **properties: Any) -> bytes:
    return frame.marshal(
        header.ContentHeader(0, body_size, commands.Basic.Properties(**properties)), channel
    )


def raw_content_header(body_size: int, headers_table: bytes, message_id: bytes) -> bytes:
    """A content header with headers given as encoded bytes (pamqp cannot encode every table)."""
    flags = (1 << 13) | (1 << 7)
    payload = (60).to_bytes(2) + bytes(2) + body_size.to_bytes(8) + flags.to_bytes(2)
    payload += headers_table + bytes((len(message_id),)) + message_id
    return _frame(2, payload)


def nested_table(depth: int) -> bytes:
    """A field table ``{"n": {"n": ... {}}}``, ``depth`` tables deep, built without recursion."""
    table = bytes(4)  # the innermost, empty table
    for _ in range(depth - 1):
        entry = b"\x01nF" + table
        table = len(entry).to_bytes(4) + entry
    return table


def body(data: bytes, channel: int = 1) -> bytes:
    return _frame(3, data, channel)


def message(tag: int, data: bytes, frame_size: int = 1000, **properties: Any) -> bytes:
    """basic.deliver, content header and the body cut into frames of ``frame_size`` bytes."""
    frames = [deliver(tag), content_header(len(data), **properties)]
    frames += [body(data[i : i + frame_size]) for i in range(0, len(data), frame_size)]
    return b"".join(frames)


class FakeTransport:
    """Records what the link writes; closing is only noted."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class Fed:
    """What a link fed some chunks of bytes did."""

    def __init__(self, max_body: int | None) -> None:
        self.deliveries: list[Delivery] = []
        self.lost: list[BaseException | None] = []
        self.link = Link(self.deliveries.append, lambda _, exc: self.lost.append(exc))
        self.link.connection_made(FakeTransport())  # type: ignore[arg-type]
        self.link.max_body = max_body

    @property
    def error(self) -> str:
        [cause] = self.lost
        assert isinstance(cause, LinkLost)
        return str(cause)


def feed(*chunks: bytes, max_body: int | None = None) -> Fed:
    """A new link fed ``chunks`` one ``data_received`` each (a loop runs, as in real use)."""

    async def run() -> Fed:
        fed = Fed(max_body)
        for chunk in chunks:
            fed.link.data_received(chunk)
        return fed

    return asyncio.run(run())


def well_formed(fed: Fed) -> None:
    """What any input may lead to: whole deliveries in tag order, and at most a LinkLost."""
    for delivery in fed.deliveries:
        assert isinstance(delivery.body, bytes)
        assert len(delivery.body) == delivery.body_size or delivery.body_dropped
        assert isinstance(delivery.headers, dict)
    assert len(fed.lost) <= 1
    if fed.lost:
        assert isinstance(fed.lost[0], LinkLost)
        assert fed.link.closed


# -- headers that cannot be decoded: the delivery is malformed, the link stays ----------------


@pytest.mark.parametrize(
    ("table", "why"),
    [
        (nested_table(500), "headers cannot be decoded: nested too deeply"),
        (nested_table(100), f"headers cannot be decoded: nested deeper than {MAX_HEADER_DEPTH}"),
        (b"\x00\x00\x00\x03\x01aZ", "headers cannot be decoded: Unknown type"),
        (b"\x00\x00\x00\x03\x01\xffS", "headers cannot be decoded: "),  # key not UTF-8
    ],
)
def test_undecodable_headers_make_the_delivery_malformed(table: bytes, why: str):
    """Headers nested 500 deep (RecursionError in pamqp), deeper than the limit, or refused.

    The delivery comes with ``headers == {}`` and ``malformed`` saying why; the next delivery
    on the same link is whole: the link is not dropped (which would bring the message back
    first, forever).
    """
    fed = feed(
        deliver(1) + raw_content_header(3, table, b"deep") + body(b"abc") + message(2, b"next")
    )
    assert fed.lost == []
    first, second = fed.deliveries
    assert first.malformed is not None
    assert first.malformed.startswith(why)
    assert (first.headers, first.message_id, first.body) == ({}, "deep", b"abc")
    assert (second.malformed, second.body) == (None, b"next")


def test_headers_at_the_depth_limit_are_decoded():
    """A table exactly MAX_HEADER_DEPTH deep is decoded; one level more is refused."""
    _, props = decode_content_header(
        raw_content_header(0, nested_table(MAX_HEADER_DEPTH), b"m")[7:-1]
    )
    assert props.malformed is None
    assert props.headers is not None
    assert "n" in props.headers
    _, props = decode_content_header(
        raw_content_header(0, nested_table(MAX_HEADER_DEPTH + 1), b"m")[7:-1]
    )
    assert props.malformed == (
        f"headers cannot be decoded: nested deeper than {MAX_HEADER_DEPTH} levels"
    )


def test_every_undecodable_property_is_named():
    """Two problems in one header are both reported, in wire order."""
    raw = content_header(0, message_id="m\xe9", timestamp=datetime(2024, 1, 1, tzinfo=UTC))
    bad = raw.replace("m\xe9".encode(), b"m\xff\xfe").replace(
        int(datetime(2024, 1, 1, tzinfo=UTC).timestamp()).to_bytes(8), (2**63 - 1).to_bytes(8)
    )
    _, props = decode_content_header(bad[7:-1])
    assert props.malformed == "property message_id is not valid UTF-8; timestamp out of range"


# -- frames out of line: the link closes with LinkLost, never merges or buffers ----------------


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (content_header(1) + body(b"x"), "content header without a basic.deliver"),
        (body(b"x"), "body frame without a content header"),
        (deliver(1) + body(b"x"), "body frame without a content header"),
        (deliver(1) + deliver(2), "method frame in the middle of a delivery's content"),
        (
            deliver(1) + content_header(5) + body(b"ab") + deliver(2),
            "method frame in the middle of a delivery's content",
        ),
        (
            deliver(1) + content_header(2) + content_header(2),
            "content header without a basic.deliver",
        ),
        (deliver(1) + content_header(2) + body(b"abc"), "body frames longer than"),
        (deliver(1) + content_header(4) + body(b"ab") + body(b"abc"), "body frames longer than"),
        (_frame(9, b""), "frame of unknown type 9"),
        (deliver(1) + content_header(1, channel=2), "frame of type 2 on channel 2"),
        (deliver(1, channel=3), "frame of type 1 on channel 3"),
        (deliver(1, channel=0), "frame of type 1 on channel 0"),
        (deliver(1) + content_header(1) + body(b"x", channel=0), "frame of type 3 on channel 0"),
        (deliver(1)[:-1] + b"\x00", "does not end with 0xCE"),
        (bytes((1, 0, 1, 0, 0, 0, 4)) + (0x003C003C).to_bytes(4) + b"\xce", "bad frame"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_frames_out_of_line_close_the_link(stream: bytes, error: str):
    """Content out of order, a body longer than declared, unknown types, other channels."""
    fed = feed(stream)
    assert fed.error.startswith(error) or error in fed.error
    assert fed.deliveries == []
    assert fed.link.closed


def test_a_frame_over_frame_max_is_refused_from_its_head():
    """A frame head declaring more than frame_max closes the link before the rest arrives."""
    fed = feed(FRAME_HEAD.pack(3, 1, FRAME_MAX) + b"x")
    assert fed.error == f"frame of {FRAME_MAX + 8} bytes over frame_max ({FRAME_MAX})"
    fed = feed(FRAME_HEAD.pack(1, 1, 2**32 - 1) + b"x")
    assert "over frame_max" in fed.error
    # The largest allowed frame is read whole.
    data = b"y" * (FRAME_MAX - 8)
    fed = feed(deliver(1) + content_header(len(data)) + body(data))
    assert fed.lost == []
    assert fed.deliveries[0].body == data


def test_a_content_header_may_exceed_frame_max_by_what_the_broker_adds():
    """RabbitMQ passes content headers on unsplit, with x-death added: they get some room.

    A header frame a little over frame_max is read; one past the room is refused from its head.
    """
    headers = {"pad": "p" * FRAME_MAX}
    fed = feed(deliver(1) + content_header(1, message_id="wide", headers=headers) + body(b"w"))
    assert fed.lost == []
    [delivery] = fed.deliveries
    assert (delivery.message_id, delivery.headers, delivery.body) == ("wide", headers, b"w")
    fed = feed(deliver(1) + FRAME_HEAD.pack(2, 1, FRAME_MAX + HEADER_SLACK) + b"x")
    assert fed.error.startswith("content header frame of")


def test_a_body_over_max_body_is_skipped_unread():
    """A declared body over max_body: its frames are skipped, the delivery comes without it.

    The next delivery is whole: the skipped frames are counted, not merged with anything.
    """
    big = b"z" * 2500
    fed = feed(message(1, big, frame_size=1000) + message(2, b"small"), max_body=100)
    assert fed.lost == []
    skipped, small = fed.deliveries
    assert (skipped.body, skipped.body_size, skipped.body_dropped) == (b"", 2500, True)
    assert skipped.delivery_tag == 1
    assert (small.body, small.body_dropped) == (b"small", False)
    # A declared size at the limit is read.
    fed = feed(message(1, b"a" * 100), max_body=100)
    assert fed.deliveries[0].body == b"a" * 100


def test_a_skipped_body_longer_than_declared_closes_the_link():
    fed = feed(deliver(1) + content_header(150) + body(b"q" * 200), max_body=100)
    assert fed.error.startswith("body frames longer than")
    assert fed.deliveries == []


def test_get_returns_after_get_ok_and_its_content_is_a_delivery():
    """``Link.get`` writes basic.get; get-ok's content goes to on_delivery; get-empty is False."""
    data = b"from get"
    start = commands.Connection.Start(server_properties={}, mechanisms="PLAIN", locales="en_US")

    async def run() -> tuple[Fed, bool, bool, bytes]:
        fed = Fed(None)
        fed.link.data_received(frame.marshal(start, 0))  # answers the link's first waiter
        got = asyncio.ensure_future(fed.link.get("q"))
        await asyncio.sleep(0)
        fed.link.data_received(get_ok(7) + content_header(len(data), message_id="g") + body(data))
        empty = asyncio.ensure_future(fed.link.get("q"))
        await asyncio.sleep(0)
        fed.link.data_received(frame.marshal(commands.Basic.GetEmpty(), 1))
        transport = fed.link._transport  # what was written
        assert isinstance(transport, FakeTransport)
        return fed, await got, await empty, b"".join(transport.written)

    fed, got, empty, written = asyncio.run(run())
    assert (got, empty) == (True, False)
    assert frame.marshal(commands.Basic.Get(queue="q"), 1) in written
    assert fed.lost == []
    [delivery] = fed.deliveries
    assert (delivery.delivery_tag, delivery.message_id, delivery.body) == (7, "g", data)


# -- property-based: arbitrary, truncated and mutated streams -----------------------------------

header_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-(2**31), 2**31 - 1), st.text(max_size=20)),
    lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
properties = st.fixed_dictionaries(
    {},
    optional={
        "content_type": st.text(max_size=30),
        "message_id": st.text(max_size=60),
        "headers": st.dictionaries(st.text(max_size=8), header_values, max_size=4),
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 9),
        "correlation_id": st.text(max_size=20),
        "app_id": st.text(max_size=20),
    },
)
messages = st.lists(
    st.tuples(st.binary(max_size=3000), properties, st.integers(1, 1200)), max_size=5
)


def _stream(batch: list[tuple[bytes, dict[str, Any], int]]) -> bytes:
    return b"".join(
        message(tag, data, frame_size, **props)
        for tag, (data, props, frame_size) in enumerate(batch, start=1)
    )


def _chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(batch=messages, cuts=st.lists(st.integers(0, 20_000), max_size=12))
def test_well_formed_streams_come_out_whole_however_cut(
    batch: list[tuple[bytes, dict[str, Any], int]], cuts: list[int]
):
    """Any deliveries, their bodies in frames of any size, read in chunks cut anywhere."""
    fed = feed(*_chunks(_stream(batch), cuts))
    assert fed.lost == []
    assert len(fed.deliveries) == len(batch)
    for tag, (delivery, (data, props, _)) in enumerate(zip(fed.deliveries, batch, strict=True), 1):
        assert (delivery.delivery_tag, delivery.body, delivery.malformed) == (tag, data, None)
        for name, value in props.items():
            # pamqp leaves out empty strings: they come back as absent.
            assert getattr(delivery.properties, name) == (None if value == "" else value)


@fast
@given(batch=messages, cut=st.integers(0, 20_000))
def test_a_truncated_stream_yields_the_whole_deliveries_before_the_cut(
    batch: list[tuple[bytes, dict[str, Any], int]], cut: int
):
    """A stream cut short waits for more: the deliveries before the cut, no error."""
    stream = _stream(batch)
    fed = feed(stream[: cut % (len(stream) + 1)])
    assert fed.lost == []
    assert [d.body for d in fed.deliveries] == [data for data, _, _ in batch][: len(fed.deliveries)]


@fast
@given(noise=st.binary(max_size=4000), cuts=st.lists(st.integers(0, 4000), max_size=6))
def test_arbitrary_bytes_never_escape_data_received(noise: bytes, cuts: list[int]):
    """Random bytes: whole deliveries at most, and LinkLost at most; nothing raises."""
    well_formed(feed(*_chunks(noise, cuts)))
    well_formed(feed(*_chunks(deliver(1) + noise, cuts)))
    well_formed(feed(*_chunks(deliver(1) + content_header(10**6) + noise, cuts)))


@fast
@given(
    batch=messages,
    flips=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 255)), min_size=1),
    max_body=st.one_of(st.none(), st.integers(0, 3000)),
)
def test_mutated_streams_never_escape_data_received(
    batch: list[tuple[bytes, dict[str, Any], int]],
    flips: list[tuple[int, int]],
    max_body: int | None,
):
    """A well-formed stream with bytes overwritten anywhere (sizes, types, tables, flags)."""
    stream = bytearray(_stream(batch) or deliver(1))
    for at, value in flips:
        stream[at % len(stream)] = value
    well_formed(feed(bytes(stream), max_body=max_body))


def test_a_callback_error_is_a_link_lost_not_an_event_loop_error():
    """A bug in on_delivery must not escape into the loop either: the link closes."""

    def boom(_: Delivery) -> None:
        raise RuntimeError("bug")

    async def run() -> list[BaseException | None]:
        lost: list[BaseException | None] = []
        link = Link(boom, lambda _, exc: lost.append(exc))
        link.connection_made(FakeTransport())  # type: ignore[arg-type]
        link.data_received(message(1, b"x"))
        return lost

    [cause] = asyncio.run(run())
    assert isinstance(cause, LinkLost)
    assert str(cause) == "bad frame: RuntimeError: bug"
