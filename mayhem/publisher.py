"""Publishing with confirms: ``mayhem publish`` and the demo publisher of ``mayhem run --demo``."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Final

import aio_pika
import attrs
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError

from mayhem.broker import connect, declare_topology
from mayhem.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from aio_pika.abc import AbstractExchange

    from mayhem.config import Config

log = logging.getLogger(__name__)

# Publishes awaiting their confirm at once: enough to keep the broker busy.
CONFIRM_WINDOW: Final = 256
DEMO_HOSTS: Final = ("web", "db", "cache", "queue", "search", "auth", "edge", "batch")


@attrs.define
class PublishReport:
    """What a publish run did."""

    published: int = 0
    confirmed: int = 0
    failed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for people."""
        rate = self.confirmed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"published {self.published}, confirmed {self.confirmed}, failed {self.failed} "
            f"in {self.seconds:.2f} s ({rate:.0f} msg/s)"
        )


def demo_body(n: int) -> bytes:
    """A demo message: a host for the demo handler to "restart"."""
    host = f"{DEMO_HOSTS[n % len(DEMO_HOSTS)]}-{n % 997:03d}.example"
    return json.dumps({"host": host, "n": n, "reason": "chaos drill"}).encode()


def read_jsonl(path: str) -> list[bytes]:
    """Read one JSON document per line, skipping blank lines.

    Raises:
        ConfigError: the file cannot be read or a line is not JSON.
    """
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    bodies = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except (ValueError, RecursionError):
            raise ConfigError(f"{path}:{number}: not a JSON document") from None
        bodies.append(line.strip())
    return bodies


def make_message(body: bytes) -> aio_pika.Message:
    """A persistent JSON message with a fresh ``message_id``."""
    return aio_pika.Message(
        body,
        message_id=uuid.uuid4().hex,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def publish_bodies(
    exchange: AbstractExchange,
    routing_key: str,
    bodies: Iterable[bytes],
    *,
    rate: float | None = None,
    report: PublishReport | None = None,
) -> PublishReport:
    """Publish each body with confirms, at most ``rate`` per second.

    Args:
        exchange: an exchange on a channel with publisher confirms.
        routing_key: the work queue's routing key.
        bodies: the message bodies.
        rate: messages per second, or ``None`` for as fast as confirms allow.
        report: counts to update as it goes (for a caller that may cancel this).
    """
    report = report if report is not None else PublishReport()
    window = asyncio.Semaphore(CONFIRM_WINDOW)
    pending: set[asyncio.Task[None]] = set()
    started = time.monotonic()

    async def send(message: aio_pika.Message) -> None:
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True)
        except (DeliveryError, PublishError, *CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            report.failed += 1
            log.warning("publish of %s not confirmed: %s", message.message_id, exc)
        else:
            report.confirmed += 1
        finally:
            window.release()

    try:
        for n, body in enumerate(bodies):
            if rate is not None:
                delay = started + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await window.acquire()
            task = asyncio.create_task(send(make_message(body)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            report.published += 1
        if pending:
            await asyncio.gather(*pending)
    finally:
        # Cancelled (the daemon stops its demo publisher): wait for the confirms in flight.
        if pending:
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
        report.seconds = time.monotonic() - started
    return report


async def publish(
    config: Config, *, count: int, rate: float | None, file: str | None
) -> PublishReport:
    """``mayhem publish``: demo messages, or one per line of a JSONL file, with confirms."""
    bodies: Iterable[bytes] = read_jsonl(file) if file else (demo_body(n) for n in range(count))
    connection = await connect(config, role="publisher")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if config.declare:
            await declare_topology(channel, config)
        exchange = await channel.get_exchange(config.exchange, ensure=False)
        return await publish_bodies(exchange, config.queue, bodies, rate=rate)
    finally:
        await connection.close()


def demo_stream() -> Iterator[bytes]:
    """Demo bodies without end."""
    return (demo_body(n) for n in itertools.count())
