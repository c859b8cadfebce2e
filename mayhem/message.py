"""What a handler sees: the immutable :class:`Message` and the per-message :class:`Context`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import attrs

from mayhem.exceptions import DecodeError, Reject

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mayhem.amqp import Delivery
    from mayhem.store import BlockingTransaction, Transaction

JSON_TYPES: Final = frozenset({"application/json", "text/json"})


@attrs.frozen(slots=True)
class Message:
    """One delivery from the work queue, as the handler sees it.

    Attributes:
        message_id: the AMQP ``message_id`` property; it survives retries and dead-lettering.
        body: the raw body.
        headers: the AMQP headers.
        routing_key: the routing key it was published with.
        attempt: 1 on the first run, counting retries (and runs whose failure could not be
            settled); see :mod:`mayhem.policy`. A publisher cannot set it.
        redelivered: the broker delivered it before (to us or another consumer).
        content_type: the AMQP ``content_type`` property, or ``None``.
    """

    message_id: str
    body: bytes
    headers: Mapping[str, Any] = attrs.field(factory=dict)
    routing_key: str = ""
    attempt: int = 1
    redelivered: bool = False
    content_type: str | None = None

    def json(self) -> Any:  # noqa: ANN401 -- JSON is any of its types
        """Decode the body as JSON.

        Raises:
            DecodeError: the content type is set and is not JSON, or the body is not UTF-8
                JSON, is nested too deeply, holds a number too long to convert or too large
                for a float (``1e400``); the message is dead-lettered.
        """
        if self.content_type:
            media_type = self.content_type.partition(";")[0].strip().lower()
            if media_type not in JSON_TYPES:
                raise DecodeError(f"content_type {media_type!r} is not JSON")
        try:
            # RFC 8259: JSON between systems is UTF-8; json.loads would guess UTF-16 too.
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("body is not valid UTF-8") from None
        try:
            return json.loads(text, parse_float=_finite_float, parse_constant=_reject_constant)
        except RecursionError:
            raise DecodeError("JSON nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise DecodeError(f"body is not valid JSON: {exc.msg} at offset {exc.pos}") from None
        except ValueError as exc:  # e.g. an integer past sys.get_int_max_str_digits()
            raise DecodeError(f"body is not decodable JSON: {exc}") from None


def _reject_constant(name: str) -> None:
    raise DecodeError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON syntax, but float() makes it infinity, which NaN/Infinity's refusal
    # above keeps out of handlers: a handler would store or compute with it unawares.
    number = float(text)
    if math.isinf(number):
        shown = text if len(text) <= 24 else text[:24] + "..."  # noqa: PLR2004
        raise DecodeError(f"number {shown} is too large for a float")
    return number


@attrs.frozen(slots=True)
class Context:
    """What the handler may use beside the message.

    Attributes:
        db: the open transaction in which mayhem also records the message id; the handler's
            writes and the "done" mark commit or roll back together.
        log: a logger bound to the message id.
    """

    db: Transaction
    log: logging.LoggerAdapter[logging.Logger]


@attrs.frozen(slots=True)
class SyncContext:
    """What a plain ``def`` handler gets: ``db`` calls block the handler's thread.

    Attributes:
        db: the message's transaction, with blocking ``execute``, ``fetch``, ``fetchrow`` and
            ``fetchval``.
        log: a logger bound to the message id.
    """

    db: BlockingTransaction
    log: logging.LoggerAdapter[logging.Logger]


def content_id(body: bytes) -> str:
    """The id of a message published without ``message_id`` (``missing_id = "content-hash"``).

    Copies mayhem republishes (retries) carry it as their ``message_id``, so a copy and its
    original are one message to the inbox.
    """
    return "sha256:" + hashlib.sha256(body).hexdigest()


def build_message(
    delivery: Delivery, max_bytes: int, *, hash_missing_id: bool = False, attempt: int = 1
) -> Message:
    """Turn an AMQP delivery into a :class:`Message`.

    Args:
        delivery: the AMQP delivery.
        max_bytes: larger bodies are rejected.
        hash_missing_id: a delivery without ``message_id`` gets ``sha256:<hex of body>``
            instead of being rejected (two equal bodies are then the same message).
        attempt: the attempt it runs as (:meth:`mayhem.policy.Attempts.of`).

    Raises:
        Reject: the delivery cannot be handled at all (no ``message_id``, a body over the
            size limit or an empty one, properties that are not valid UTF-8); it is
            dead-lettered at once.
    """
    if delivery.malformed:
        raise Reject(delivery.malformed)
    message_id = delivery.message_id
    if not message_id:
        if not hash_missing_id:
            raise Reject("missing message_id: cannot be applied exactly once")
        message_id = content_id(delivery.body)
    size = len(delivery.body)
    if size > max_bytes:
        raise Reject(f"body of {size} bytes exceeds max_message_bytes ({max_bytes})")
    if size == 0:
        raise Reject("empty body")
    headers = MappingProxyType(dict(delivery.headers or {}))
    return Message(
        message_id=message_id,
        body=delivery.body,
        headers=headers,
        routing_key=delivery.routing_key or "",
        attempt=attempt,
        redelivered=bool(delivery.redelivered),
        content_type=delivery.content_type,
    )
