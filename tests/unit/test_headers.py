"""mayhem.headers: which attempt headers are trusted, error texts, and copies that fit a frame.

Deliveries are decoded by mayhem.amqp from content headers that pamqp encodes, as on the wire.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import aio_pika
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, header

from mayhem.amqp import Delivery, decode_content_header
from mayhem.headers import (
    ATTEMPT_HEADER,
    MAX_ERROR_HEADER,
    came_from_retry,
    copy_message,
    delivery_count,
    describe,
    first_failure,
    fits,
    header_frame_size,
    mayhem_headers,
    publishing_user,
    trusted_attempt,
)
from mayhem.logs import TextFormatter, clean_text, escape_controls

QUEUE = "jobs"
TIER = "jobs.retry.1000"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def trail(**changes: Any) -> list[dict[str, Any]]:
    """The x-death the broker writes when a retry copy expires from the 1 s tier."""
    entry: dict[str, Any] = {
        "count": 1,
        "reason": "expired",
        "queue": TIER,
        "exchange": "",
        "routing-keys": [TIER],
        "original-expiration": "950",
    }
    entry.update(changes)
    return [entry]


def delivery(
    headers: dict[str, Any] | None = None,
    *,
    user_id: str | None = "guest",
    exchange: str = "",
    routing_key: str = QUEUE,
    redelivered: bool = False,
) -> Delivery:
    properties = commands.Basic.Properties(message_id="m-1", headers=headers, user_id=user_id)
    raw = header.ContentHeader(body_size=2, properties=properties).marshal()
    _, decoded = decode_content_header(raw)
    return Delivery(None, 1, redelivered, exchange, routing_key, decoded, b"{}")  # type: ignore[arg-type]


def from_retry(attempt: object = 3, **changes: Any) -> Delivery:
    return delivery({ATTEMPT_HEADER: attempt, "x-death": trail(**changes)})


# -- the attempt number -----------------------------------------------------------------------


def test_a_copy_back_from_the_delay_queue_keeps_its_attempt():
    """Everything the broker writes, our user_id, the default exchange: the header counts."""
    assert came_from_retry(from_retry(), QUEUE, "guest")
    assert trusted_attempt(from_retry(), QUEUE, 5, "guest") == 3
    assert trusted_attempt(from_retry(5), QUEUE, 5, "guest") == 5


@pytest.mark.parametrize(
    ("incoming", "why"),
    [
        (delivery({ATTEMPT_HEADER: 3}), "no x-death at all"),
        (delivery({ATTEMPT_HEADER: 99}), "no x-death, and out of range"),
        (from_retry(queue="other.retry.1000", **{"routing-keys": ["other.retry.1000"]}), "other"),
        (from_retry(queue="jobs2.retry.1000", **{"routing-keys": ["jobs2.retry.1000"]}), "prefix"),
        (from_retry(queue="jobs.retry.x", **{"routing-keys": ["jobs.retry.x"]}), "not a tier"),
        (from_retry(queue="jobs", **{"routing-keys": ["jobs"]}), "the work queue itself"),
        (from_retry(reason="rejected"), "not expired"),
        (from_retry(count=2), "a trail mayhem strips would be one long"),
        (from_retry(exchange="jobs"), "published to an exchange, not to the delay queue"),
        (from_retry(**{"routing-keys": [TIER, "audit"]}), "CC'd elsewhere"),
        (delivery({ATTEMPT_HEADER: 3, "x-death": trail() * 2}), "two entries"),
        (delivery({ATTEMPT_HEADER: 3, "x-death": "forged"}), "not a list"),
        (delivery({ATTEMPT_HEADER: 3, "x-death": trail()}, user_id=None), "no user_id"),
        (delivery({ATTEMPT_HEADER: 3, "x-death": trail()}, user_id="eve"), "another user"),
        (delivery({ATTEMPT_HEADER: 3, "x-death": trail()}, exchange="jobs"), "via an exchange"),
        (delivery({ATTEMPT_HEADER: 3, "x-death": trail()}, routing_key="x"), "other routing key"),
        (from_retry(0), "zero"),
        (from_retry(1), "a retry is attempt 2 or later"),
        (from_retry(-3), "negative"),
        (from_retry(6), "past max_attempts"),
        (from_retry(2**40), "huge"),
        (from_retry("3"), "a string"),
        (from_retry(2.0), "a float"),
        (from_retry(attempt=True), "a bool"),
        (from_retry(None), "void"),
    ],
)
def test_anything_else_is_attempt_1(incoming, why):
    """A forged or inconsistent trail, or a value out of range, is attempt 1."""
    assert trusted_attempt(incoming, QUEUE, 5, "guest") == 1, why


def test_user_unknown_under_external_auth_is_not_checked():
    """With auth=external mayhem cannot know its user: the rest of the trail must do."""
    no_user = delivery({ATTEMPT_HEADER: 3, "x-death": trail()}, user_id=None)
    assert trusted_attempt(no_user, QUEUE, 5, None) == 3


_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.sampled_from(["expired", "", QUEUE, TIER]), st.none()
)
_ENTRIES = st.fixed_dictionaries(
    {},
    optional={
        "count": _VALUES,
        "reason": _VALUES,
        "queue": _VALUES,
        "exchange": _VALUES,
        "routing-keys": st.lists(_VALUES, max_size=2),
    },
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            ATTEMPT_HEADER: _VALUES,
            "x-death": st.one_of(_VALUES, st.lists(_ENTRIES, max_size=2)),
            "x-delivery-count": _VALUES,
        },
    ),
    st.sampled_from([None, "eve"]),
)
def test_a_publisher_without_our_user_never_gets_past_attempt_1(headers, user_id):
    """Whatever headers a publisher sets, without mayhem's user_id the attempt is 1."""
    assert trusted_attempt(delivery(headers, user_id=user_id), QUEUE, 100, "guest") == 1


@pytest.mark.parametrize(
    ("headers", "redelivered", "count"),
    [
        ({"x-delivery-count": 2}, True, 2),
        ({"x-delivery-count": 2}, False, 0),  # a first delivery: the publisher's header
        ({"x-delivery-count": -1}, True, 0),
        ({"x-delivery-count": "2"}, True, 0),
        ({}, True, 0),
    ],
)
def test_delivery_count(headers, redelivered, count):
    """x-delivery-count counts only on a redelivery, and only as a non-negative integer."""
    assert delivery_count(delivery(headers, redelivered=redelivered)) == count


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("amqp://guest:guest@127.0.0.1/", "guest"),
        ("amqp://127.0.0.1/", "guest"),
        ("amqp://al%40ice:pw@127.0.0.1/", "al@ice"),
        ("amqps://alice@broker/?auth=external", None),
        ("amqps://broker/?auth=EXTERNAL", None),
    ],
)
def test_publishing_user(url, user):
    """The user aiormq authenticates as: the URL's, guest by default, unknown for EXTERNAL."""
    assert publishing_user(url) == user


# -- copies and frames -----------------------------------------------------------------------


def test_copies_never_carry_cc_or_bcc():
    """CC/BCC would route mayhem's copy into queues the publisher names."""
    original = delivery({"CC": ["other"], "BCC": ["secret"], "trace": "t"})
    copy = copy_message(original, dict(original.headers))
    assert copy.headers == {"trace": "t"}


def test_a_shrunk_copy_keeps_only_mayhems_own_headers():
    """Dropping the original's headers drops a publisher's look-alikes too."""
    headers = {
        "x-mayhem-attempt": 2,
        "x-mayhem-error": "E",
        "x-mayhem-blob": "x" * 100_000,
        "x-death": trail(),
        "trace": "t",
    }
    assert mayhem_headers(headers) == {"x-mayhem-attempt": 2, "x-mayhem-error": "E"}


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("2026-01-02T03:04:05.678Z", True),
        ("2026-01-02T03:04:05.678Z" + " " * 100_000, False),
        ("not a time", False),
        (b"2026-01-02T03:04:05.678Z", False),
        (12, False),
        (None, False),
    ],
)
def test_first_failure_is_a_timestamp_or_now(value, kept):
    """x-mayhem-first-failure is carried on only as a timestamp mayhem could have written."""
    now = "2026-02-03T04:05:06.789Z"
    assert first_failure({"x-mayhem-first-failure": value}, now) == (value if kept else now)


def test_header_frame_size_is_the_frame_on_the_wire():
    """The measured size is the content header frame: 7 bytes of head, payload, frame end."""
    message = aio_pika.Message(b"{}", headers={"blob": "x" * 1000}, message_id="m")
    size = header_frame_size(message)
    payload = header.ContentHeader(body_size=2, properties=message.properties).marshal()
    assert size == len(payload) + 8
    assert fits(message, size)
    assert not fits(message, size - 1)


def test_an_unencodable_copy_does_not_fit():
    """Headers pamqp cannot encode make a copy that never fits (and is never published)."""
    message = aio_pika.Message(b"{}", headers={"bad": object()})  # type: ignore[dict-item]
    assert header_frame_size(message) is None
    assert not fits(message, 10**9)


# -- error text --------------------------------------------------------------------------------


def test_describe_makes_one_safe_line():
    """Whitespace runs become one space; other control characters become escapes."""
    error = RuntimeError("line 1\n  line 2\r\n\x1b[31mred\x00\u2028x")
    assert describe(error) == r"RuntimeError: line 1 line 2 \x1b[31mred\x00 x"
    assert describe(KeyError()) == "KeyError"


def test_describe_caps_a_megabyte():
    """A huge exception text is cut to MAX_ERROR_HEADER characters, ending in an ellipsis."""
    text = describe(ValueError("\x1b" * 1_000_000))
    assert len(text) == MAX_ERROR_HEADER
    assert text.endswith("…")
    assert not CONTROL.search(text)


def test_describe_survives_a_broken_str():
    """An exception whose __str__ raises is still described (settling must not fail on it)."""

    class Broken(Exception):  # noqa: N818 -- a handler's, named as it likes
        def __str__(self) -> str:
            raise RuntimeError

    class Evil(Exception):  # noqa: N818
        pass

    Evil.__name__ = "Evil\nERROR forged"
    assert describe(Broken()) == "Broken: <str() failed>"
    assert describe(Evil("x")) == "Evil ERROR forged: x"


@given(st.text(), st.integers(2, 2000))
def test_clean_text_is_always_one_short_line(text, limit):
    """Any text comes out within the limit and without a control character."""
    line = clean_text(text, limit)
    assert len(line) <= limit
    assert not CONTROL.search(line)


@given(st.text())
def test_escape_controls_keeps_everything_else(text):
    """Only control characters change; text without them is returned as it is."""
    escaped = escape_controls(text)
    assert not CONTROL.search(escaped)
    if not CONTROL.search(text):
        assert escaped == text


def test_text_log_line_escapes_message_id_and_event():
    """A message id or event with a newline or an ANSI escape stays on its one log line."""
    record = logging.LogRecord(
        "mayhem.worker", logging.WARNING, __file__, 1, "handler failed: %s", ("a\nb\x1b[2J",), None
    )
    record.message_id = "evil\n2026-01-01 INFO forged\x00"
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert line.endswith(r" [evil\n2026-01-01 INFO forged\x00] handler failed: a\nb\x1b[2J")
