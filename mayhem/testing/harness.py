"""The test kit's harness: a handler run in-process, decided as the daemon decides, no broker.

What is the daemon's own code here, not a copy of it:

- the decision: :meth:`mayhem.worker.Applier.decide` (the handler in the store's transaction,
  the inbox claim, ``handler_timeout``, the attempt from :class:`mayhem.policy.Attempts`, the
  checks of :func:`mayhem.message.build_message`);
- what comes of it: :meth:`mayhem.policy.Policy.verdict` (ack, duplicate, retry at a tier,
  dead-letter with a reason, reject unread, requeue);
- the database: :func:`mayhem.store.open_store` and the handler's ``setup(db)``, run as the
  daemon runs it at start;
- the delivery: :meth:`mayhem.amqp.Delivery.of` encodes the properties as a publisher's
  client does and decodes them with the consuming link's decoder;
- the settings: :meth:`mayhem.config.Config.load`, with the same validation.

What stands in for the broker: a retry is not waited for; :meth:`Harness.deliver_until_settled`
delivers the next attempt at once, as the broker would deliver the retry copy after its delay
(with the same ``x-mayhem-*`` headers and the broker's ``x-death`` trail, which the daemon
checks before it trusts the attempt number). What the broker itself can refuse is not modelled:
a retry copy whose headers no longer fit a frame (over about 128 KB of headers) is shown as
retried, where the daemon dead-letters it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

import attrs

from mayhem.amqp import Delivery
from mayhem.config import SETTINGS, Config
from mayhem.exceptions import ConfigError
from mayhem.handlers import handler_setup, load_handler
from mayhem.headers import (
    ATTEMPT_HEADER,
    DEATH_HEADER,
    ERROR_HEADER,
    FIRST_DEATH_QUEUE_HEADER,
    FIRST_DEATH_REASON_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER,
    ROUTING_HEADERS,
    carried_headers,
    describe,
    first_failure,
    publishing_user,
    timestamp,
)
from mayhem.logs import MESSAGE_ID
from mayhem.message import content_id
from mayhem.metrics import Metrics
from mayhem.policy import REJECTED, Action, Attempts, Policy
from mayhem.store import open_store, sqlite_path
from mayhem.topology import retry_queue
from mayhem.worker import Applier

if TYPE_CHECKING:
    from types import TracebackType

    from mayhem.policy import Outcome as Decision
    from mayhem.policy import Verdict
    from mayhem.store import Row, Store

T = TypeVar("T")

MEMORY: Final = "sqlite:///:memory:"
JSON: Final = "application/json"
# How long closing the store may take at the end of a test.
CLOSE_TIMEOUT: Final = 5.0


class _NewId:
    """The default ``message_id``: a fresh one per delivery, as aio-pika's publisher adds."""

    def __repr__(self) -> str:
        return "NEW_ID"


NEW_ID: Final = _NewId()


@attrs.frozen
class Outcome:
    """What became of one delivery, as the daemon would settle it.

    Attributes:
        status: the ``mayhem_messages_total`` outcome it is counted as: ``acked``,
            ``duplicate`` (the inbox had the id: the handler did not run), ``retried``,
            ``dead_lettered`` (failed ``max_attempts`` times), ``rejected`` (``mayhem.Reject``,
            a ``DecodeError``, or a delivery that cannot be handled at all), or ``requeued``
            (the database could not be reached: not the message's fault).
        message_id: the id the inbox keeps it under (the content hash with
            ``missing_id="content-hash"``), or ``None`` when it has none.
        attempt: the attempt it ran as (1 first), as a dead letter's ``x-mayhem-attempts``
            says it; 0 when the handler did not run because the inbox had the id, or the
            body was over ``max_message_bytes``.
        reason: for ``dead_lettered`` and ``rejected``, the ``x-mayhem-reason`` of the dead
            letter: ``"failed"`` or ``"rejected"``; otherwise ``None``.
        error: the error as the dead letter or retry copy carries it in ``x-mayhem-error``
            (``"Reject: an order needs an 'id'"``); ``None`` when nothing failed.
        exception: the exception itself, for ``isinstance`` checks.
        tier: for ``retried``, the delay tier in seconds (the copy waits 80-100 % of it).
        retry_queue: for ``retried``, the delay queue it goes to (``<queue>.retry.<ms>``).
        delivery: the delivery as the daemon would have received it.
    """

    status: str
    message_id: str | None
    attempt: int
    reason: str | None = None
    error: str | None = None
    exception: BaseException | None = attrs.field(default=None, eq=False)
    tier: float | None = None
    retry_queue: str | None = None
    delivery: Delivery | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def settled(self) -> bool:
        """It left the work queue for good: not ``retried`` nor ``requeued``."""
        return self.status not in {Action.RETRY.value, Action.REQUEUE.value}


def _in_memory(db_url: str) -> bool:
    return db_url.startswith("sqlite:") and str(sqlite_path(db_url)) == ":memory:"


def encode_body(body: object) -> tuple[bytes, str | None]:
    """The bytes of a body and the content type it implies.

    ``bytes`` (and ``bytearray``, ``memoryview``) go as they are, ``str`` as UTF-8, anything
    else as JSON with ``content_type`` ``application/json``, as ``mayhem publish`` sends it.
    """
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), None
    if isinstance(body, str):
        return body.encode("utf-8"), None
    return json.dumps(body).encode("utf-8"), JSON


class Harness:
    """A handler, run in-process as the daemon runs it, with no broker.

    ``async with Harness(handle) as h``: opens the database, creates mayhem's inbox, runs the
    handler's ``setup(db)`` as the daemon does at start; ``await h.deliver(body, ...)`` then
    decides each delivery with the daemon's own code (see the module's docstring) and says
    what became of it (:class:`Outcome`). Closing closes the database.

    Args:
        handler: the handler (``async def`` or plain ``def``, which runs in a thread pool as
            in the daemon), or its import path ``"package.module:attribute"``.
        db_url: the database. ``sqlite:///:memory:`` (the default) is a new SQLite file in a
            temporary directory, removed on close: the daemon's SQLite store has a writer and
            a reader connection, which an in-memory database cannot share. PostgreSQL works
            as in the daemon; the inbox and the handler's tables go to the URL's schema.
        config_file: a TOML configuration file (``mayhem.toml``) to take settings from;
            ``settings`` and ``db_url`` win over it. The environment is not read, so that a
            test does not depend on the shell it runs in.
        **settings: any daemon setting by name, such as ``max_attempts=3``,
            ``retry_delays="1,10"``, ``missing_id="content-hash"``, ``handler_timeout=0.5``,
            validated as the daemon validates them.

    Attributes:
        config: the effective configuration.
        outcomes: every outcome so far, in order.

    Raises:
        ConfigError: an unknown setting, or an invalid value; a handler path that cannot be
            imported.
    """

    def __init__(
        self,
        handler: Callable[..., Any] | str,
        *,
        db_url: str = MEMORY,
        config_file: str | None = None,
        **settings: object,
    ) -> None:
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} (settings: {', '.join(SETTINGS)})")
        self.config = Config.load(
            file=config_file, flags={**settings, "db_url": db_url}, environ={}
        )
        self.handler = load_handler(handler) if isinstance(handler, str) else handler
        self.policy = Policy(self.config)
        self.outcomes: list[Outcome] = []
        self._user = publishing_user(self.config.amqp_url)
        self._store: Store | None = None
        self._applier: Applier | None = None
        self._directory: str | None = None
        self._attempts = Attempts(self.config)

    @property
    def store(self) -> Store:
        """The open database (the daemon's store: the inbox and the handler's tables)."""
        self._check_open()
        if self._store is None:
            raise AssertionError
        return self._store

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the database, create the inbox and run the handler's ``setup(db)``.

        Raises:
            StartupError: the database cannot be opened, or ``setup`` failed.
        """
        if self._store is not None:
            raise RuntimeError("the harness is open already")
        url = self.config.db_url
        if _in_memory(url):
            self._directory = tempfile.mkdtemp(prefix="mayhem-testing-")
            url = f"sqlite:///{self._directory}/mayhem.db"
        store = open_store(url, pool_size=self.config.concurrency + 2)
        try:
            await store.open()
            setup = handler_setup(self.handler)
            if setup is not None:
                await store.run_setup(setup)
        except BaseException:
            await store.close(CLOSE_TIMEOUT)
            self._remove_directory()
            raise
        self._store = store
        self._attempts = attempts = Attempts(self.config)
        self._applier = Applier(
            config=self.config,
            store=store,
            handler=self.handler,
            attempts=attempts,
            metrics=Metrics(),
        )

    async def close(self) -> None:
        """Let go of the handler threads, close the database, remove a temporary one."""
        applier, self._applier = self._applier, None
        store, self._store = self._store, None
        try:
            if applier is not None:
                applier.close()
            if store is not None:
                await store.close(CLOSE_TIMEOUT)
        finally:
            self._remove_directory()

    def _remove_directory(self) -> None:
        directory, self._directory = self._directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def _check_open(self) -> Applier:
        if self._applier is None:
            raise RuntimeError("the harness is not open: use `async with Harness(...) as h`")
        return self._applier

    # -- deliveries ------------------------------------------------------------------------

    def delivery(
        self,
        body: object,
        *,
        message_id: str | _NewId | None = NEW_ID,
        headers: Mapping[str, Any] | None = None,
        content_type: str | None = None,
        attempt: int = 1,
        redelivered: bool = False,
        **properties: Any,  # noqa: ANN401 -- pamqp's property types
    ) -> Delivery:
        """The delivery the daemon would get for a message published so; see :meth:`deliver`.

        Raises:
            ValueError: ``attempt`` is not from 1 to ``max_attempts``, or a property cannot be
                encoded.
        """
        data, implied = encode_body(body)
        if isinstance(message_id, _NewId):
            message_id = uuid.uuid4().hex
        properties.update(
            message_id=message_id,
            headers=dict(headers) if headers else None,
            content_type=content_type or implied,
        )
        if not 1 <= attempt <= self.config.max_attempts:
            msg = f"attempt must be from 1 to max_attempts ({self.config.max_attempts})"
            raise ValueError(msg)
        if attempt > 1:
            retry_headers = {
                key: value for key, value in (headers or {}).items() if key not in ROUTING_HEADERS
            }
            retry_headers[ATTEMPT_HEADER] = attempt
            properties["headers"] = retry_headers
            tier = self.policy.delay_for(attempt - 1, None)
            return self._from_delay_queue(data, tier, properties, redelivered=redelivered)
        return _delivery(
            data,
            exchange=self.config.exchange,
            routing_key=self.config.queue,
            redelivered=redelivered,
            max_body=self.config.max_message_bytes,
            properties=properties,
        )

    async def deliver(
        self,
        body: object,
        *,
        message_id: str | _NewId | None = NEW_ID,
        headers: Mapping[str, Any] | None = None,
        content_type: str | None = None,
        attempt: int = 1,
        redelivered: bool = False,
        **properties: Any,  # noqa: ANN401 -- pamqp's property types
    ) -> Outcome:
        """Deliver one message to the handler; say what the daemon would make of it.

        Args:
            body: ``bytes``; a ``str`` goes as UTF-8; anything else as JSON, with
                ``content_type`` ``application/json`` (as ``mayhem publish`` sends it).
            message_id: the ``message_id`` property; by default a new one for each call (as
                aio-pika adds one); ``None`` for none at all.
            headers: the AMQP headers, encoded and decoded as on the wire (nested tables,
                arrays, timestamps).
            content_type: the ``content_type`` property.
            attempt: deliver it as the retry copy of this attempt (2 up to ``max_attempts``)
                arrives from its delay queue; 1 is a first delivery.
            redelivered: the broker's ``redelivered`` flag (with a quorum queue's
                ``x-delivery-count`` header, it counts as runs already made).
            **properties: other basic properties by pamqp's names: ``correlation_id``,
                ``message_type``, ``app_id``, ``timestamp``, ``user_id``, ...

        Returns:
            The outcome; it is also appended to :attr:`outcomes`.
        """
        delivery = self.delivery(
            body,
            message_id=message_id,
            headers=headers,
            content_type=content_type,
            attempt=attempt,
            redelivered=redelivered,
            **properties,
        )
        return await self.process(delivery)

    async def deliver_until_settled(
        self,
        body: object,
        *,
        message_id: str | _NewId | None = NEW_ID,
        headers: Mapping[str, Any] | None = None,
        content_type: str | None = None,
        **properties: Any,  # noqa: ANN401 -- pamqp's property types
    ) -> list[Outcome]:
        """Deliver a message, then each retry copy at once, until it is settled.

        Each retry copy is delivered as the broker delivers it from its delay queue (the
        delay is not waited for): with the headers the daemon gives it (``x-mayhem-attempt``,
        ``x-mayhem-error``, the failure times) and the broker's ``x-death`` trail.

        Returns:
            One outcome per attempt: ``retried`` ones, then the last one, which is
            ``acked``, ``dead_lettered`` (after ``max_attempts``), ``rejected``,
            ``duplicate`` or ``requeued``.
        """
        delivery = self.delivery(
            body, message_id=message_id, headers=headers, content_type=content_type, **properties
        )
        outcomes = [await self.process(delivery)]
        while outcomes[-1].status == Action.RETRY.value:
            if len(outcomes) > self.config.max_attempts:
                raise AssertionError("retried past max_attempts")
            outcomes.append(await self.process(self._retry_copy(outcomes[-1])))
        return outcomes

    async def process(self, delivery: Delivery) -> Outcome:
        """Decide one delivery (as built by :meth:`delivery` or :meth:`Delivery.of`)."""
        applier = self._check_open()
        token = MESSAGE_ID.set(delivery.message_id)
        try:
            decided = await applier.decide(delivery)
        finally:
            MESSAGE_ID.reset(token)
        outcome = self._outcome(delivery, decided, self.policy.verdict(decided))
        self.outcomes.append(outcome)
        return outcome

    def _outcome(self, delivery: Delivery, decided: Decision, verdict: Verdict) -> Outcome:
        error = decided.error
        text = describe(error) if error is not None else None
        reason = verdict.reason or None
        tier = queue = None
        if verdict.action is Action.RETRY:
            tier, queue = verdict.tier, retry_queue(self.config.queue, verdict.tier)
        elif verdict.action is Action.REJECT_UNREAD:
            # The broker dead-letters it whole; `mayhem dead list` describes it so.
            reason = REJECTED
            text = (
                f"body of {delivery.body_size} bytes over max_message_bytes "
                f"({self.config.max_message_bytes}): rejected unread"
            )
        message_id = delivery.message_id or None
        if message_id is None and self.config.missing_id == "content-hash":
            message_id = None if delivery.body_dropped else content_id(delivery.body)
        attempt = decided.attempt
        if verdict.action is Action.ACK:
            # The hot path's APPLIED carries no attempt: the one the worker ran it as.
            attempt = self._attempts.of(delivery)
        return Outcome(
            status=verdict.label,
            message_id=message_id,
            attempt=attempt,
            reason=reason,
            error=text,
            exception=error,
            tier=tier,
            retry_queue=queue,
            delivery=delivery,
        )

    def _retry_copy(self, failed: Outcome) -> Delivery:
        """The retry copy of ``failed``'s delivery, as it comes back from its delay queue."""
        original = failed.delivery
        if original is None or failed.tier is None:
            raise AssertionError
        now = timestamp()
        headers = carried_headers(original)
        headers.update(
            {
                ATTEMPT_HEADER: failed.attempt + 1,
                FIRST_FAILURE_HEADER: first_failure(headers, now),
                LAST_FAILURE_HEADER: now,
                ERROR_HEADER: failed.error or "",
            }
        )
        properties: dict[str, Any] = {
            "headers": headers,
            "content_type": original.content_type,
            "content_encoding": original.content_encoding,
            "message_id": original.message_id or content_id(original.body),
            "correlation_id": original.correlation_id,
            "timestamp": original.timestamp,
            "message_type": original.type,
            "app_id": original.app_id,
            "delivery_mode": 2,
        }
        return self._from_delay_queue(original.body, failed.tier, properties)

    def _from_delay_queue(
        self, body: bytes, tier: float, properties: dict[str, Any], *, redelivered: bool = False
    ) -> Delivery:
        """A copy as the broker delivers it when it expires from ``tier``'s delay queue."""
        delay_queue = retry_queue(self.config.queue, tier)
        headers = dict(properties.get("headers") or {})
        headers[DEATH_HEADER] = [
            {
                "count": 1,
                "reason": "expired",
                "queue": delay_queue,
                "time": datetime.now(UTC).replace(microsecond=0),
                "exchange": "",
                "routing-keys": [delay_queue],
            }
        ]
        headers["x-first-death-exchange"] = ""
        headers[FIRST_DEATH_QUEUE_HEADER] = delay_queue
        headers[FIRST_DEATH_REASON_HEADER] = "expired"
        # mayhem publishes its copies as its own user; the broker vouches for user_id.
        properties = {**properties, "headers": headers, "user_id": self._user}
        return _delivery(
            body,
            exchange="",
            routing_key=self.config.queue,
            redelivered=redelivered,
            max_body=self.config.max_message_bytes,
            properties=properties,
        )

    # -- the database ----------------------------------------------------------------------

    async def execute(self, sql: str, *args: object) -> None:
        """Run a statement in a transaction of its own (to arrange a test's data)."""
        async with self.store.transaction() as tx:
            await tx.execute(sql, *args)

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        """Run a query in a transaction of its own; every row as a dict."""
        async with self.store.transaction() as tx:
            return await tx.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        """Run a query in a transaction of its own; its first row, or ``None``."""
        async with self.store.transaction() as tx:
            return await tx.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: object) -> Any:  # noqa: ANN401 -- any column type
        """Run a query in a transaction of its own; the first column of its first row."""
        async with self.store.transaction() as tx:
            return await tx.fetchval(sql, *args)

    async def seen(self, message_id: str) -> bool:
        """Whether the inbox has ``message_id`` (a redelivery of it would be a duplicate)."""
        return await self.store.seen(self.config.queue, message_id)


def _delivery(
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    redelivered: bool,
    max_body: int,
    properties: dict[str, Any],
) -> Delivery:
    try:
        return Delivery.of(
            body,
            exchange=exchange,
            routing_key=routing_key,
            redelivered=redelivered,
            max_body=max_body,
            **{key: value for key, value in properties.items() if value is not None},
        )
    except (TypeError, ValueError, OverflowError) as exc:
        # pamqp's own errors (also for an unknown property): no publisher could send this.
        raise ValueError(f"cannot be published: {describe(exc)}") from exc
