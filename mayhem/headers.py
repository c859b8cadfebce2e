"""mayhem's ``x-mayhem-*`` headers, and the copies of a message it republishes.

What a publisher controls is hostile until proven otherwise, and that includes headers that
look like mayhem's own.

**The attempt number.** ``x-mayhem-attempt`` is trusted only on a message that came back from
one of mayhem's delay queues, as far as the protocol lets a consumer tell:

- the broker's ``x-death`` trail has exactly one entry, ``reason`` ``expired``, ``count`` 1,
  naming ``<queue>.retry.<ms>`` as the queue and as the only routing key, through the default
  exchange (mayhem strips the trail from every copy, so a real one is always this short);
- the delivery came through the default exchange with the work queue as its routing key (where
  a delay queue dead-letters to);
- its ``user_id`` is the user mayhem publishes as. mayhem sets ``user_id`` on its retry copies
  and the broker refuses a publish whose ``user_id`` is not the publishing connection's user,
  so this is the one mark a publisher with other credentials cannot forge;
- the value is an ``int`` from 2 to ``max_attempts`` (a retry is published only then).

Anything else is attempt 1. What is left: a publisher that logs in as mayhem's own user (or,
with ``auth=external``, where mayhem cannot know its user name, any publisher that may write
to the default exchange) can forge the whole trail. The most it achieves is to skip retries:
the handler still runs at least once and the message ends in ``<queue>.dead`` with a reason.

**Fitting a frame.** A content header must fit in one frame of the negotiated ``frame_max``
(the broker closes the connection otherwise), so a copy is measured before it is published.
A copy that would not fit goes without the original's headers (body, ``message_id`` and the
other properties stay; ``x-mayhem-error`` says so). Retry copies also leave room for what the
broker adds when they expire from the delay queue (``x-death`` and friends).

**Routing headers.** ``CC`` and ``BCC`` are dropped from every copy: on a republish they would
route mayhem's copy into any queue the publisher named, with mayhem's permissions.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import aio_pika
import pamqp.frame
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader
from yarl import URL

from mayhem.amqp.url import split_hosts
from mayhem.logs import MAX_TEXT, clean_text
from mayhem.message import content_id
from mayhem.topology import RETRY_QUEUE_TAIL

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from mayhem.amqp import Delivery

# mayhem's own headers: on a retry copy (the first three), on a dead letter (all but the first).
ATTEMPT_HEADER: Final = "x-mayhem-attempt"  # the attempt the copy runs as
ERROR_HEADER: Final = "x-mayhem-error"
FIRST_FAILURE_HEADER: Final = "x-mayhem-first-failure"
LAST_FAILURE_HEADER: Final = "x-mayhem-last-failure"
REASON_HEADER: Final = "x-mayhem-reason"  # failed | rejected
ATTEMPTS_HEADER: Final = "x-mayhem-attempts"  # the attempts made before dead-lettering
HOST_HEADER: Final = "x-mayhem-host"
QUEUE_HEADER: Final = "x-mayhem-queue"
# The broker's: on a redelivery from a quorum queue, and when it dead-letters a message.
DELIVERY_COUNT_HEADER: Final = "x-delivery-count"
DEATH_HEADER: Final = "x-death"
FIRST_DEATH_REASON_HEADER: Final = "x-first-death-reason"
FIRST_DEATH_QUEUE_HEADER: Final = "x-first-death-queue"
# The longest x-mayhem-error, and the longest error text a log line carries.
MAX_ERROR_HEADER: Final = MAX_TEXT
# What the broker adds when a message expires from a delay queue.
BROKER_DEATH_HEADERS: Final = frozenset(
    {
        DEATH_HEADER,
        "x-first-death-exchange",
        FIRST_DEATH_QUEUE_HEADER,
        FIRST_DEATH_REASON_HEADER,
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
# Headers mayhem adds; a replay from the dead-letter queue strips them (and the broker's).
MAYHEM_HEADERS: Final = BROKER_DEATH_HEADERS | {
    ATTEMPT_HEADER,
    REASON_HEADER,
    ERROR_HEADER,
    ATTEMPTS_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER,
    HOST_HEADER,
    QUEUE_HEADER,
}
_OWN_HEADERS: Final = MAYHEM_HEADERS - BROKER_DEATH_HEADERS
# Sender-selected distribution: the broker routes a message to these too.
ROUTING_HEADERS: Final = frozenset({"CC", "BCC"})
# Room left in a retry copy's frame for the broker's x-death trail (about 1.2 KB at most:
# queue names and routing keys are short strings) and x-delivery-count.
BROKER_RESERVE: Final = 2048
# What the AMQP spec lets a peer assume when frame_max is 0 ("no limit").
DEFAULT_FRAME_MAX: Final = 131_072


def describe(exc: BaseException, limit: int = MAX_ERROR_HEADER) -> str:
    """``Type: message`` on one line, control characters escaped, at most ``limit`` characters.

    Safe on any exception: one whose ``__str__`` fails is described by its type.
    """
    try:
        text = str(exc)
    except Exception:  # a handler's exception class may be broken in any way
        text = "<str() failed>"
    name = type(exc).__name__
    return clean_text(f"{name}: {text}" if text and not text.isspace() else name, limit)


def timestamp(at: float | None = None) -> str:
    """UTC time as ISO 8601 with milliseconds: AMQP floats are 32-bit, too coarse for epochs."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: object) -> float | None:
    """Epoch seconds from :func:`timestamp`'s text, or ``None``."""
    if not isinstance(text, str | bytes):
        return None
    try:
        raw = text.decode() if isinstance(text, bytes) else text
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:  # UnicodeDecodeError is one
        return None


def publishing_user(amqp_url: str) -> str | None:
    """The user a connection to ``amqp_url`` authenticates as, read as aiormq reads it.

    ``None`` with ``auth=external``: the user then comes from the client certificate. A
    cluster's nodes share the user: the first node's URL is read.
    """
    url = URL(split_hosts(amqp_url)[0])
    if url.query.get("auth", "plain").lower() == "external":
        return None
    return url.user or "guest"


def carried_headers(delivery: Delivery) -> dict[str, Any]:
    """The headers a copy takes from the original: not the broker's trail, nor CC/BCC."""
    # The broker's own trail from the delay queue goes: our headers say it better.
    return {
        key: value
        for key, value in delivery.headers.items()
        if key not in BROKER_DEATH_HEADERS and key not in ROUTING_HEADERS
    }


def mayhem_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """Only mayhem's own headers (what a copy keeps when it must shrink)."""
    return {key: value for key, value in headers.items() if key in _OWN_HEADERS}


def first_failure(headers: dict[str, Any], now: str) -> str:
    """When the message first failed: the header's :func:`timestamp`, or ``now``.

    A publisher may have set the header to anything (say, 100 KB): only a timestamp stays.
    """
    value = headers.get(FIRST_FAILURE_HEADER)
    if isinstance(value, str) and len(value) <= len(now) and parse_timestamp(value) is not None:
        return value
    return now


def strip_mayhem_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers a message had before mayhem handled it (for a replay)."""
    return {key: value for key, value in headers.items() if key not in MAYHEM_HEADERS}


def copy_message(
    delivery: Delivery | AbstractIncomingMessage,
    headers: dict[str, Any],
    expiration: float | None = None,
    user_id: str | None = None,
) -> aio_pika.Message:
    """The same message (body, id, properties) with new headers, persistent.

    ``CC`` and ``BCC`` are never copied (see the module's docstring). A message without a
    ``message_id`` gets its content id (:func:`mayhem.message.content_id`): without one,
    aiormq would invent a random id, and a copy must stay the same message to the inbox.
    """
    return aio_pika.Message(
        delivery.body,
        headers={key: value for key, value in headers.items() if key not in ROUTING_HEADERS},
        content_type=delivery.content_type,
        content_encoding=delivery.content_encoding,
        message_id=delivery.message_id or content_id(delivery.body),
        correlation_id=delivery.correlation_id,
        timestamp=delivery.timestamp,
        type=delivery.type,
        app_id=delivery.app_id,
        user_id=user_id,
        expiration=expiration,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def header_frame_size(message: aio_pika.Message) -> int | None:
    """Bytes of the content header frame ``message`` is published with; ``None``: unencodable."""
    properties = message.properties
    if not properties.message_id:
        properties.message_id = "0" * 32  # aiormq adds a uuid4 hex
    try:
        return len(pamqp.frame.marshal(ContentHeader(0, len(message.body), properties), 1))
    except (PAMQPException, TypeError, ValueError, OverflowError, RecursionError):
        return None


def fits(message: aio_pika.Message, limit: int) -> bool:
    """The message's content header fits a frame of ``limit`` bytes and can be encoded."""
    size = header_frame_size(message)
    return size is not None and size <= limit


def frame_limit(frame_max: int) -> int:
    """The largest frame a peer accepts after negotiating ``frame_max`` (0 is "no limit")."""
    return frame_max if frame_max > 0 else DEFAULT_FRAME_MAX


def came_from_retry(delivery: Delivery, queue: str, user: str | None) -> bool:
    """The delivery bears every mark of a copy that expired from one of ``queue``'s delay queues.

    Args:
        delivery: a delivery from the work queue.
        queue: the work queue's name.
        user: the user mayhem publishes its retry copies as (``None``: unknown, not checked).
    """
    if delivery.exchange or delivery.routing_key != queue:
        return False
    if user is not None and delivery.properties.user_id != user:
        return False
    trail = delivery.headers.get(DEATH_HEADER)
    if not isinstance(trail, list) or len(trail) != 1 or not isinstance(trail[0], dict):
        return False
    death = trail[0]
    died_in = death.get("queue")
    return (
        isinstance(died_in, str)
        and died_in.startswith(queue)
        and RETRY_QUEUE_TAIL.fullmatch(died_in, len(queue)) is not None
        and death.get("reason") == "expired"
        and type(death.get("count")) is int
        and death.get("count") == 1
        and death.get("exchange") == ""
        and death.get("routing-keys") == [died_in]
    )


def trusted_attempt(delivery: Delivery, queue: str, max_attempts: int, user: str | None) -> int:
    """The attempt number ``x-mayhem-attempt`` says, when it can be trusted; otherwise 1."""
    value = delivery.headers.get(ATTEMPT_HEADER)
    if value is None:
        return 1
    if type(value) is not int or not 2 <= value <= max_attempts:  # noqa: PLR2004 -- first retry
        return 1
    return value if came_from_retry(delivery, queue, user) else 1


def delivery_count(delivery: Delivery) -> int:
    """Earlier deliveries of this message from this queue that the broker counted, or 0.

    A quorum queue sets ``x-delivery-count`` on every redelivery (a requeue, a consumer or
    connection gone with it unacked). On a first delivery the header may be the publisher's,
    so it only counts when the broker says ``redelivered``.
    """
    if not delivery.redelivered:
        return 0
    count = delivery.headers.get(DELIVERY_COUNT_HEADER)
    return count if type(count) is int and count > 0 else 0
