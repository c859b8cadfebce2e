"""What the consuming connection hands on: a delivery, with its decoded basic properties."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

if TYPE_CHECKING:
    from datetime import datetime

    from mayhem.amqp.link import Link


class Delivery:
    """One ``basic.deliver`` with its properties and body, tied to the link it came on.

    Its tag means something only on that link: once the link is closed the broker has
    requeued the message, and the delivery is stale.

    ``body_size`` is the size the content header declared; when it is over the link's limit the
    body frames are skipped as they come, never buffered, and ``body`` stays empty
    (:attr:`body_dropped`).
    """

    __slots__ = ("body", "body_size", "delivery_tag", "exchange", "link", "properties",
                 "redelivered", "routing_key")  # fmt: skip

    def __init__(  # noqa: PLR0917 -- built positionally, once per message
        self,
        link: Link,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: Properties,
        body: bytes,
        body_size: int | None = None,
    ) -> None:
        self.link = link
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        self.body = body
        self.body_size = len(body) if body_size is None else body_size

    @classmethod
    def of(
        cls,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        redelivered: bool = False,
        delivery_tag: int = 1,
        max_body: int | None = None,
        **properties: Any,  # noqa: ANN401 -- pamqp's property types
    ) -> Delivery:
        """A delivery as the consuming link hands it on, built without a broker (for tests).

        The properties are encoded by pamqp, as a publisher's client would, and decoded by
        mayhem's own :func:`~mayhem.amqp.framing.decode_content_header`, so the headers
        (nested tables, arrays, numbers, timestamps) come out as the link would decode them.
        The delivery belongs to no link (it is never stale).

        Args:
            body: the message body.
            exchange: the exchange it was published to (``""``: the default exchange).
            routing_key: the routing key it was published with.
            redelivered: the broker's ``redelivered`` flag.
            delivery_tag: the delivery tag.
            max_body: like the link's limit: a larger body is dropped unread (``body`` empty,
                ``body_size`` kept).
            **properties: basic properties by pamqp's names: ``message_id``, ``headers``,
                ``content_type``, ``message_type``, ``user_id``, ``timestamp``, ...; an empty
                string or ``None`` is absent.

        Raises:
            TypeError: a property that pamqp cannot encode (a publisher could not send it).
            ValueError: the same, for a value out of range.
        """
        # Imported here: framing imports this module.
        from pamqp.commands import Basic  # noqa: PLC0415
        from pamqp.header import ContentHeader  # noqa: PLC0415

        from mayhem.amqp.framing import decode_content_header  # noqa: PLC0415

        header = ContentHeader(0, len(body), Basic.Properties(**properties)).marshal()
        size, decoded = decode_content_header(header)
        dropped = max_body is not None and size > max_body
        link = cast("Link", _DETACHED)
        return cls(
            link, delivery_tag, redelivered, exchange, routing_key, decoded,
            b"" if dropped else bytes(body), size,
        )  # fmt: skip

    @property
    def stale(self) -> bool:
        """The link it came on is closed: its tag is void, the broker redelivers it."""
        return self.link.closed

    @property
    def body_dropped(self) -> bool:
        """The body was over the link's size limit and was not read (``body`` is empty)."""
        return self.body_size != len(self.body)

    @property
    def malformed(self) -> str | None:
        """What in its properties could not be decoded, if anything."""
        return self.properties.malformed

    @property
    def message_id(self) -> str | None:
        """The ``message_id`` property."""
        return self.properties.message_id

    @property
    def headers(self) -> dict[str, Any]:
        """The ``headers`` property (empty when absent)."""
        return self.properties.headers or {}

    @property
    def content_type(self) -> str | None:
        """The ``content_type`` property."""
        return self.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        """The ``content_encoding`` property."""
        return self.properties.content_encoding

    @property
    def correlation_id(self) -> str | None:
        """The ``correlation_id`` property."""
        return self.properties.correlation_id

    @property
    def timestamp(self) -> datetime | None:
        """The ``timestamp`` property."""
        return self.properties.timestamp

    @property
    def type(self) -> str | None:
        """The ``type`` property (pamqp's ``message_type``)."""
        return self.properties.message_type

    @property
    def app_id(self) -> str | None:
        """The ``app_id`` property."""
        return self.properties.app_id


class _Detached:
    """The link of a delivery built by :meth:`Delivery.of`: none, so never closed."""

    closed = False


_DETACHED: Final = _Detached()


class Properties:
    """A delivery's AMQP basic properties; ``None`` where absent.

    ``malformed`` says what could not be decoded (a short string that is not UTF-8, a
    headers table pamqp refuses or that nests too deeply, a timestamp out of range; several
    joined by ``"; "``): such a delivery is dead-lettered, never allowed to break the
    connection over and over. Undecodable headers are ``{}``.
    """

    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime | None = None
    message_type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    cluster_id: str | None = None
    malformed: str | None = None
