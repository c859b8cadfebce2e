"""Publishing with confirms: ``mayhem publish`` and the demo publisher of ``mayhem run --demo``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, Final

import aio_pika
import attrs
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError

from mayhem import tracing
from mayhem.broker import connect, declare_topology
from mayhem.exceptions import DecodeError, MayhemError
from mayhem.message import Message

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

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


class InputError(MayhemError):
    """A message file cannot be read, or one of its lines is not a JSON document."""


def check_jsonl(path: str, stdin: BinaryIO | None = None) -> tuple[int, Iterator[bytes]]:
    """Check every line of a JSON-lines file first; then hand out its messages.

    One JSON document a line is one message; blank lines are skipped. A line must be what the
    daemon's :meth:`~mayhem.message.Message.json` accepts (UTF-8, no ``NaN``, not nested too
    deeply...). Every line is checked before the first is published, so a bad line publishes
    nothing: the run can be fixed and repeated without duplicates. The file is read twice,
    never held in memory; standard input (``-``) is spooled to a temporary file on the way.

    Args:
        path: the file, or ``-`` for standard input.
        stdin: standard input's binary stream (``sys.stdin.buffer`` when ``None``).

    Returns:
        The number of messages, and an iterator over their bodies.

    Raises:
        InputError: the file cannot be read, or a line is bad (its number is in the message).
    """
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            spool = tempfile.TemporaryFile()  # noqa: SIM115 -- _bodies closes it
            try:
                count = _check(stdin if stdin is not None else sys.stdin.buffer, name, spool)
            except BaseException:
                spool.close()
                raise
            spool.seek(0)
            return count, _bodies(spool, count)
        with Path(path).open("rb") as source:
            count = _check(source, name)
        return count, _bodies(Path(path).open("rb"), count)
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None


def _check(source: IO[bytes], name: str, copy: IO[bytes] | None = None) -> int:
    count = 0
    for number, line in enumerate(source, start=1):
        if copy is not None:
            copy.write(line)
        body = line.strip()
        if not body:
            continue
        try:
            Message(message_id="-", body=body, content_type="application/json").json()
        except DecodeError as exc:
            raise InputError(f"{name}:{number}: {exc}; nothing was published") from None
        count += 1
    return count


def _bodies(source: IO[bytes], count: int) -> Iterator[bytes]:
    # At most the lines checked: a file that grew since is not published past them.
    with source:
        bodies = (body for body in (line.strip() for line in source) if body)
        yield from itertools.islice(bodies, count)


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
    on_settled: Callable[[], object] | None = None,
) -> PublishReport:
    """Publish each body with confirms, at most ``rate`` per second.

    With tracing on, each publish is a PRODUCER span whose context goes in the headers.

    Args:
        exchange: an exchange on a channel with publisher confirms.
        routing_key: the work queue's routing key.
        bodies: the message bodies.
        rate: messages per second, or ``None`` for as fast as confirms allow.
        report: counts to update as it goes (for a caller that may cancel this).
        on_settled: called as each publish is confirmed or fails (a progress bar).
    """
    report = report if report is not None else PublishReport()
    window = asyncio.Semaphore(CONFIRM_WINDOW)
    pending: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    tracing.active()  # decided before the first message, once

    async def send(message: aio_pika.Message) -> None:
        try:
            with tracing.publishing(message, exchange.name, routing_key):
                await exchange.publish(message, routing_key=routing_key, mandatory=True)
        except (DeliveryError, PublishError, *CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            report.failed += 1
            log.warning("publish of %s not confirmed: %s", message.message_id, exc)
        else:
            report.confirmed += 1
        finally:
            window.release()
            if on_settled is not None:
                on_settled()

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
    config: Config,
    *,
    count: int,
    rate: float | None,
    file: str | None,
    progress: bool = False,
    stdin: BinaryIO | None = None,
) -> PublishReport:
    """``mayhem publish``: demo messages, or one per line of a JSON-lines file, with confirms.

    Args:
        config: the broker, exchange and queue.
        count: how many demo messages (when there is no ``file``).
        rate: messages per second, or ``None`` for no limit.
        file: a JSON-lines file, ``-`` for standard input; every line is checked before the
            first message is published.
        progress: show a progress bar with the rate on stderr.
        stdin: standard input's binary stream, for ``file="-"`` (``sys.stdin.buffer``).

    Raises:
        InputError: the file cannot be read or a line is not JSON; nothing was published.
    """
    bodies: Iterable[bytes]
    if file:
        count, bodies = check_jsonl(file, stdin)
    else:
        bodies = (demo_body(n) for n in range(count))
    connection = await connect(config, role="publisher")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if config.declare:
            await declare_topology(channel, config)
        exchange = await channel.get_exchange(config.exchange, ensure=False)
        with _progress_bar(count, enabled=progress) as update:
            return await publish_bodies(
                exchange, config.queue, bodies, rate=rate, on_settled=update
            )
    finally:
        await connection.close()


@contextlib.contextmanager
def _progress_bar(total: int, *, enabled: bool) -> Iterator[Callable[[], object] | None]:
    """A progress bar on stderr (tqdm: count, rate, time left), one step per confirm."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # noqa: PLC0415 -- only when a bar is shown

    with tqdm(total=total, unit="msg", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


def demo_stream() -> Iterator[bytes]:
    """Demo bodies without end."""
    return (demo_body(n) for n in itertools.count())
