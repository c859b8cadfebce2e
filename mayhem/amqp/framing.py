"""AMQP 0-9-1 framing for the consuming connection: frame layouts and content-header decoding.

Frames are decoded and encoded by pamqp, the codec aiormq itself uses; only ``basic.deliver``
and ``basic.ack``, two fixed layouts on the hot path, and the content header (decoded in one
pass) are handled here by hand.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from pamqp import constants, decode

from mayhem.amqp.delivery import Properties

FRAME_HEAD: Final = struct.Struct(">BHI")  # type, channel, size; then payload and 0xCE
FRAME_MIN: Final = 8
# The largest frame the consuming connection agrees to (the broker may ask for less).
FRAME_MAX: Final = 131_072
# RabbitMQ does not split a content header to frame_max: it passes on what publishers sent
# (up to the broker's own frame_max, which may be larger than ours) plus the headers it adds
# when dead-lettering (x-death). Header frames get this much room beyond the larger of the two.
HEADER_SLACK: Final = 1 << 20
DELIVER_INDEX: Final = 0x003C003C  # basic.deliver: class 60, method 60
ACK: Final = struct.Struct(">BHIIQBB")  # method frame, basic.ack, tag, multiple, 0xCE
ACK_INDEX: Final = 0x003C0050
GET_OK_INDEX: Final = 0x003C0047  # basic.get-ok: class 60, method 71
FRAME_END_BYTE: Final = bytes((constants.FRAME_END,))
HEARTBEAT_FRAME: Final = FRAME_HEAD.pack(constants.FRAME_HEARTBEAT, 0, 0) + FRAME_END_BYTE
# Headers nested deeper are refused (the delivery is dead-lettered): pamqp decodes and encodes
# tables recursively, two stack frames a level, so ~500 levels fail with RecursionError, and a
# table that decodes near that depth could still fail when a copy is republished from a deeper
# stack. Real headers nest a few levels (x-death: a table in an array in a table).
MAX_HEADER_DEPTH: Final = 64
# Every nested table or array takes at least 5 bytes in its parent (type, 4-byte size): a
# smaller table cannot be too deep, and is not walked.
_DEPTH_SCAN_BYTES: Final = 5 * MAX_HEADER_DEPTH


def short_string(data: bytes, offset: int) -> tuple[str, int]:
    """A short string at ``offset`` (undecodable bytes replaced) and where it ends."""
    size = data[offset]
    end = offset + 1 + size
    return data[offset + 1 : end].decode("utf-8", "replace"), end


# The basic properties in wire order, by flag bit (15 first), with their kind.
_SHORT, _OCTET, _TABLE, _TIMESTAMP = range(4)
_PROPERTIES: Final = (
    (1 << 15, "content_type", _SHORT),
    (1 << 14, "content_encoding", _SHORT),
    (1 << 13, "headers", _TABLE),
    (1 << 12, "delivery_mode", _OCTET),
    (1 << 11, "priority", _OCTET),
    (1 << 10, "correlation_id", _SHORT),
    (1 << 9, "reply_to", _SHORT),
    (1 << 8, "expiration", _SHORT),
    (1 << 7, "message_id", _SHORT),
    (1 << 6, "timestamp", _TIMESTAMP),
    (1 << 5, "message_type", _SHORT),
    (1 << 4, "user_id", _SHORT),
    (1 << 3, "app_id", _SHORT),
    (1 << 2, "cluster_id", _SHORT),
)
_CONTENT_HEADER: Final = struct.Struct(">HHQH")  # class, weight, body size, property flags


def decode_content_header(data: bytes) -> tuple[int, Properties]:
    """The body size and properties of a content header frame's payload.

    A property that cannot be decoded (a short string that is not UTF-8, a headers table pamqp
    refuses or that nests too deeply, a timestamp out of range) never raises: it is noted in
    ``Properties.malformed`` and the delivery is dead-lettered.

    Raises:
        ValueError: the frame is cut short (a protocol error: the connection is dropped).
    """
    _, _, body_size, flags = _CONTENT_HEADER.unpack_from(data)
    properties = Properties()
    offset = _CONTENT_HEADER.size
    for bit, name, kind in _PROPERTIES:
        if flags & bit:
            if offset >= len(data):
                msg = "content header cut short"
                raise ValueError(msg)
            value, offset = _decode_property(data, offset, name, kind, properties)
            if offset > len(data):
                msg = "content header cut short"
                raise ValueError(msg)
            setattr(properties, name, value)
    return body_size, properties


def _decode_property(
    data: bytes, offset: int, name: str, kind: int, properties: Properties
) -> tuple[Any, int]:
    """One property's value and where the next begins; notes what cannot be decoded."""
    value: Any
    if kind == _SHORT:
        end = offset + 1 + data[offset]
        raw = data[offset + 1 : end]
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            _malformed(properties, f"property {name} is not valid UTF-8")
            value = raw.decode("utf-8", "replace")
    elif kind == _OCTET:
        value, end = data[offset], offset + 1
    elif kind == _TABLE:
        end = offset + 4 + int.from_bytes(data[offset : offset + 4])
        value = _decode_headers(data[offset:end], properties)
    else:
        end = offset + 8
        try:
            value = decode.timestamp(data[offset:end])[1]
        except (ValueError, OverflowError, OSError):
            _malformed(properties, "timestamp out of range")
            value = None
    return value, end


def _decode_headers(raw: bytes, properties: Properties) -> dict[str, Any]:
    """The headers table, or ``{}`` with the reason noted when it cannot be decoded."""
    try:
        headers: dict[str, Any] = decode.field_table(raw)[1]
    except RecursionError:
        problem = "nested too deeply"
    except Exception as exc:
        # pamqp's errors on hostile bytes are of many types (ValueError, struct.error,
        # UnicodeDecodeError, ...): whichever it is, it is this delivery's, not the link's.
        problem = str(exc) or type(exc).__name__
    else:
        if len(raw) < _DEPTH_SCAN_BYTES or _depth(headers) <= MAX_HEADER_DEPTH:
            return headers
        problem = f"nested deeper than {MAX_HEADER_DEPTH} levels"
    _malformed(properties, f"headers cannot be decoded: {problem}")
    return {}


def _depth(table: dict[str, Any]) -> int:
    """How deep tables and arrays nest in ``table`` (1 for a flat one), without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(table, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_HEADER_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _malformed(properties: Properties, problem: str) -> None:
    """Note one more thing that could not be decoded (all of them, in wire order)."""
    known = properties.malformed
    properties.malformed = f"{known}; {problem}" if known else problem
