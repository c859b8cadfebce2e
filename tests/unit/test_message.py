"""Message.json() and build_message(), from deliveries decoded from the frames pamqp encodes."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from pamqp import commands, header

import mayhem
from mayhem.amqp import Delivery, decode_content_header
from mayhem.headers import ATTEMPT_HEADER
from mayhem.message import Message, build_message


def delivery(
    body: bytes = b'{"host": "h"}',
    *,
    message_id: str | None = "m-1",
    headers: dict[str, Any] | None = None,
    redelivered: bool = False,
    routing_key: str | None = "rk",
    content_type: str | None = None,
    header_bytes: Callable[[bytes], bytes] = lambda raw: raw,
) -> Delivery:
    """A Delivery as mayhem.amqp decodes it from a content header that pamqp encodes."""
    properties = commands.Basic.Properties(
        message_id=message_id, headers=headers, content_type=content_type
    )
    raw = header.ContentHeader(body_size=len(body), properties=properties).marshal()
    _, decoded = decode_content_header(header_bytes(raw))
    return Delivery(None, 1, redelivered, "", routing_key or "", decoded, body)  # type: ignore[arg-type]


def decode_error(message: Message) -> str:
    """message.json() must raise DecodeError, a Reject; return its one-line reason."""
    with pytest.raises(mayhem.DecodeError) as info:
        message.json()
    error = info.value
    assert isinstance(error, mayhem.Reject)
    assert isinstance(error, mayhem.MayhemError)
    assert error.reason == str(error)
    assert error.reason
    assert "\n" not in error.reason
    return error.reason


# -- Message.json() -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"host": "h", "n": [1, 2.5, null, true]}', {"host": "h", "n": [1, 2.5, None, True]}),
        (b"[]", []),
        (b'"caf\xc3\xa9"', "caf\u00e9"),
        (b"  42 \n", 42),
    ],
)
def test_json_decodes_valid_json(body, expected):
    """A UTF-8 JSON body decodes to its Python value."""
    assert Message(message_id="m", body=body).json() == expected


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "text/json",
    ],
)
def test_json_accepts_json_or_absent_content_type(content_type):
    """With a JSON content type (parameters and case aside) or none, the body is decoded."""
    message = Message(message_id="m", body=b'{"a": 1}', content_type=content_type)
    assert message.json() == {"a": 1}


@pytest.mark.parametrize(
    ("content_type", "media_type"),
    [
        ("text/plain", "text/plain"),
        ("text/plain; charset=utf-8", "text/plain"),
        ("application/octet-stream", "application/octet-stream"),
        ("application/jsonl", "application/jsonl"),
    ],
)
def test_json_rejects_other_content_types(content_type, media_type):
    """A content type that is set and is not JSON is a DecodeError naming it, even for JSON."""
    message = Message(message_id="m", body=b'{"a": 1}', content_type=content_type)
    assert decode_error(message) == f"content_type {media_type!r} is not JSON"


@pytest.mark.parametrize("body", [b"{", b"", b"{'a': 1}", b'{"a":1}{', b"hello"])
def test_json_invalid_json(body):
    """A body that is not JSON is a DecodeError that says where."""
    reason = decode_error(Message(message_id="m", body=body))
    assert reason.startswith("body is not valid JSON: ")
    assert " at offset " in reason


@pytest.mark.parametrize("body", [b'{"a": "\xff"}', b'"\xc3\x28"', b"[\x80]"])
def test_json_invalid_utf8(body):
    """A body that is not UTF-8 is a DecodeError."""
    assert decode_error(Message(message_id="m", body=body)) == "body is not valid UTF-8"


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000])
def test_json_deeply_nested(body):
    """A body nested too deeply for the decoder is a DecodeError, not a RecursionError."""
    assert decode_error(Message(message_id="m", body=body)) == "JSON nested too deeply"


@pytest.mark.parametrize("body", [b"1" * 100_000, b'{"n": -' + b"9" * 100_000 + b"}"])
def test_json_huge_integer(body):
    """An integer with 100,000 digits is a DecodeError, not a ValueError."""
    reason = decode_error(Message(message_id="m", body=body))
    assert reason.startswith("body is not decodable JSON: ")


@pytest.mark.parametrize(
    "body",
    [
        b"1e400",
        b"-1e400",
        b"1E+400",
        b"[1, 2.5, [3, 1.8e308]]",
        b'{"a": {"b": [-1e400]}}',
        b"1" + b"0" * 400 + b".0",  # no exponent, just long
    ],
)
def test_json_number_too_large_for_a_float(body):
    """A number that float() would make infinity is a DecodeError, wherever it is nested."""
    reason = decode_error(Message(message_id="m", body=body))
    assert reason.startswith("number ")
    assert reason.endswith(" is too large for a float")
    assert len(reason) < 80


def test_json_large_and_tiny_finite_numbers_decode():
    """The largest finite double and an underflow to zero are still numbers."""
    assert Message(message_id="m", body=b"[1.7976931348623157e308, 1e-400, -0.0]").json() == [
        1.7976931348623157e308,
        0.0,
        -0.0,
    ]


@pytest.mark.parametrize(
    "body",
    [b'"\xed\xa0\x80"', '{"host": "h"}'.encode("utf-16"), '{"a": 1}'.encode("utf-32")],
    ids=["surrogate", "utf16", "utf32"],
)
def test_json_other_encodings_are_not_utf8(body):
    """A body in another encoding (UTF-16, UTF-32, a UTF-8-encoded surrogate) is a DecodeError."""
    assert decode_error(Message(message_id="m", body=body)) == "body is not valid UTF-8"


def test_json_utf8_bom_is_invalid_json():
    """A UTF-8 byte order mark is not JSON: the body is a DecodeError."""
    reason = decode_error(Message(message_id="m", body=b"\xef\xbb\xbf{}"))
    assert reason.startswith("body is not valid JSON: ")


def test_message_is_frozen():
    """A Message cannot be changed: it is a frozen attrs class with slots."""
    message = Message(message_id="m", body=b"{}")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        message.body = b"[]"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        message.attempt = 2  # type: ignore[misc]
    assert not hasattr(message, "__dict__")


def test_message_defaults():
    """A Message built from an id and a body is a first, fresh delivery."""
    message = Message(message_id="m", body=b"{}")
    assert message.headers == {}
    assert message.routing_key == ""
    assert message.attempt == 1
    assert message.redelivered is False
    assert message.content_type is None


# -- build_message() ------------------------------------------------------------------------


def test_build_message_copies_the_delivery():
    """build_message takes id, body, headers, routing key and content type from the delivery.

    The attempt is the caller's (mayhem.policy.Attempts.of), not the header's.
    """
    incoming = delivery(
        b'{"host": "web-1"}',
        message_id="abc",
        headers={ATTEMPT_HEADER: 3, "trace": "t-1"},
        routing_key="jobs",
        content_type="application/json",
    )
    message = build_message(incoming, max_bytes=1024, attempt=3)
    assert build_message(incoming, max_bytes=1024).attempt == 1
    assert message == Message(
        message_id="abc",
        body=b'{"host": "web-1"}',
        headers={ATTEMPT_HEADER: 3, "trace": "t-1"},
        routing_key="jobs",
        attempt=3,
        redelivered=False,
        content_type="application/json",
    )
    assert message.json() == {"host": "web-1"}


@pytest.mark.parametrize("message_id", [None, ""])
def test_build_message_without_message_id(message_id):
    """A delivery without a message_id is rejected: it cannot be applied exactly once."""
    with pytest.raises(mayhem.Reject) as info:
        build_message(delivery(message_id=message_id), max_bytes=1024)
    assert "message_id" in info.value.reason


def test_build_message_missing_id_hashed_when_asked():
    """With hash_missing_id, a delivery without message_id gets sha256:<hex of the body>."""
    body = b'{"host": "h"}'
    message = build_message(delivery(body, message_id=None), max_bytes=1024, hash_missing_id=True)
    assert message.message_id == "sha256:" + hashlib.sha256(body).hexdigest()
    given = build_message(delivery(body, message_id="m-9"), max_bytes=1024, hash_missing_id=True)
    assert given.message_id == "m-9"


def test_build_message_body_over_limit():
    """A body over max_bytes is rejected with both sizes in the reason."""
    with pytest.raises(mayhem.Reject) as info:
        build_message(delivery(b"x" * 11), max_bytes=10)
    assert info.value.reason == "body of 11 bytes exceeds max_message_bytes (10)"


def test_build_message_body_at_limit():
    """A body of exactly max_bytes is accepted."""
    assert build_message(delivery(b"x" * 10), max_bytes=10).body == b"x" * 10


def test_build_message_empty_body():
    """An empty body is rejected."""
    with pytest.raises(mayhem.Reject) as info:
        build_message(delivery(b""), max_bytes=10)
    assert info.value.reason == "empty body"


@pytest.mark.parametrize("redelivered", [True, False])
def test_build_message_redelivered(redelivered):
    """The redelivered flag of basic.deliver is passed through."""
    message = build_message(delivery(redelivered=redelivered), max_bytes=1024)
    assert message.redelivered is redelivered


@pytest.mark.parametrize(("routing_key", "expected"), [("a.b.c", "a.b.c"), ("", ""), (None, "")])
def test_build_message_routing_key(routing_key, expected):
    """The routing key is passed through; a missing one becomes ''."""
    message = build_message(delivery(routing_key=routing_key), max_bytes=1024)
    assert message.routing_key == expected


def test_build_message_content_type_governs_json():
    """A delivery with content_type text/plain builds, but its json() is a DecodeError."""
    message = build_message(delivery(b"{}", content_type="text/plain"), max_bytes=1024)
    assert message.content_type == "text/plain"
    decode_error(message)


def test_build_message_rejects_a_message_id_that_is_not_utf8():
    """Bytes that are not UTF-8 in message_id: dead-lettered, never a broken connection."""
    incoming = delivery(
        message_id="m-1", header_bytes=lambda raw: raw.replace(b"\x03m-1", b"\x03m\xff1")
    )
    assert incoming.message_id == "m\ufffd1"
    with pytest.raises(mayhem.Reject, match="message_id is not valid UTF-8"):
        build_message(incoming, max_bytes=1024)


def test_build_message_rejects_headers_that_cannot_be_decoded():
    """A headers table with an unknown field type: dead-lettered, the rest still decoded."""
    incoming = delivery(
        message_id="m-1",
        headers={"k": "v"},
        # The field type of "k" from S (long string) to "?" (no such type).
        header_bytes=lambda raw: raw.replace(b"\x01kS", b"\x01k?"),
    )
    assert incoming.message_id == "m-1"
    assert incoming.headers == {}
    with pytest.raises(mayhem.Reject, match="headers cannot be decoded"):
        build_message(incoming, max_bytes=1024)


def test_content_header_with_every_property_decodes_as_pamqp_encodes_it():
    """Each basic property comes back as pamqp encoded it."""
    stamp = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    sent = commands.Basic.Properties(
        content_type="application/json",
        content_encoding="gzip",
        headers={"x-mayhem-attempt": 3, "nested": {"a": [1, "two"]}},
        delivery_mode=2,
        priority=7,
        correlation_id="c-1",
        reply_to="r",
        expiration="6000",
        message_id="m-1",
        timestamp=stamp,
        message_type="t",
        user_id="guest",
        app_id="app",
    )
    raw = header.ContentHeader(body_size=12345, properties=sent).marshal()
    size, got = decode_content_header(raw)
    assert size == 12345
    assert got.malformed is None
    for name in (
        "content_type", "content_encoding", "headers", "delivery_mode", "priority",
        "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "message_type",
        "user_id", "app_id",
    ):  # fmt: skip
        assert getattr(got, name) == getattr(sent, name), name


def test_content_header_cut_short_is_a_protocol_error():
    """A header frame shorter than its flags say: ValueError (the connection is dropped)."""
    raw = header.ContentHeader(
        body_size=1, properties=commands.Basic.Properties(message_id="m-1")
    ).marshal()
    with pytest.raises(ValueError, match="cut short"):
        decode_content_header(raw[:-2])


def test_build_message_rejects_a_timestamp_out_of_range():
    """A timestamp pamqp cannot turn into a date (microseconds since 1970): dead-lettered."""
    properties = commands.Basic.Properties(
        message_id="m-1", timestamp=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    )
    raw = header.ContentHeader(body_size=2, properties=properties).marshal()
    seconds = int(dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()).to_bytes(8, "big")
    huge = (1_700_000_000_000_000).to_bytes(8, "big")
    _, decoded = decode_content_header(raw.replace(seconds, huge))
    assert decoded.malformed == "timestamp out of range"
    assert decoded.message_id == "m-1"
    incoming = Delivery(
        None,  # type: ignore[arg-type]  # build_message never touches the link
        1,
        redelivered=False,
        exchange="",
        routing_key="rk",
        properties=decoded,
        body=b"{}",
    )
    with pytest.raises(mayhem.Reject, match="timestamp out of range"):
        build_message(incoming, max_bytes=1024)
