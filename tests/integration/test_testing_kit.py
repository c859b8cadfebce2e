"""The test kit against the daemon's real decisions: the same inputs, the same outcomes.

Each input goes once through the daemon (in-process, with the real broker: published, retried
through the delay queues, dead-lettered) and once through ``mayhem.testing.Harness``. The
daemon's ``mayhem_messages_total``, its dead letters (``x-mayhem-reason``, ``x-mayhem-error``,
``x-mayhem-attempts``, the broker's ``x-death`` for a body rejected unread), the delay queues
its retries went through and what the handler saw on each run must match the harness's.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import json

import kit_handlers
import pytest
from mayhem_testing import drain, publish, publish_without_id, rows, wait_until

import mayhem.testing
from mayhem.amqp import Delivery
from mayhem.dead import DeadLetter
from mayhem.metrics import OUTCOMES

# The headers of the rich message: nested tables and arrays, every number width, bytes.
RICH = {
    "tenant": "acme",
    "n": 7,
    "big": 2**40,
    "neg": -5,
    "pi": 3.5,
    "flag": True,
    "nested": {"a": [1, "two", {"b": 2.5}], "deep": {"er": {"est": "yes"}}},
    "raw": bytearray(b"\x00\x01"),
    "price": decimal.Decimal("12.50"),
    "at": dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
}
SETTINGS = {"max_attempts": 3, "retry_delays": "0.1,0.2", "max_message_bytes": 1000}
HANDLER = "kit_handlers:judge"


def _body(do: str, **more: object) -> bytes:
    return json.dumps({"do": do, **more}).encode()


# (message_id or None, body, headers or None): in publishing order.
INPUTS = [
    ("ok-1", _body("ok"), None),
    ("ok-1", _body("ok"), None),  # a duplicate
    ("rich", _body("ok"), RICH),
    ("rej", _body("reject"), None),
    ("not-json", b"not json", None),
    ("poison", _body("fail"), None),
    ("retry", _body("retry", delay=0.15), None),  # asks for 0.15 s: the 0.2 s tier
    ("flaky", _body("flaky"), {"tenant": "acme"}),  # its copies keep headers and properties
    ("empty", b"", None),
    ("big", b"x" * 2000, None),  # over max_message_bytes: rejected unread
    (None, _body("ok", no="id"), None),  # no message_id
]


def _count(daemon, outcome: str) -> int:
    return int(daemon.metrics.value("mayhem_messages_total", {"outcome": outcome}))


def _dead_letters(messages, max_bytes: int) -> dict[bytes, tuple[object, ...]]:
    """By body: (reason, error, attempts), as ``mayhem dead list`` reads them.

    By body, not by id: the dead letter of a message without one has an id aiormq made up.
    """
    found = {}
    for message in messages:
        letter = DeadLetter.of(Delivery.of(message.body, headers=message.headers), 0, max_bytes)
        attempts = letter.attempts if "x-mayhem-attempts" in message.headers else None
        found[message.body] = (letter.reason, letter.error, attempts)
    return found


async def _through_the_daemon(amqp, config, run_daemon):
    kit_handlers.RUNS.clear()
    async with run_daemon(config) as daemon:
        for message_id, body, headers in INPUTS:
            if message_id is None:
                await publish_without_id(config.queue, body)
                continue
            extra = {"headers": headers, "content_type": "application/json"} if headers else {}
            await publish(amqp, config.queue, [body], message_ids=[message_id], **extra)
        settled = len(INPUTS)

        def done() -> bool:
            counted = sum(_count(daemon, o) for o in OUTCOMES if o not in {"retried", "requeued"})
            return counted == settled

        await wait_until(done, timeout=30)
        counts = {outcome: _count(daemon, outcome) for outcome in OUTCOMES}
    dead = _dead_letters(await drain(amqp, config.dead_queue), config.max_message_bytes)
    stored = sorted(await rows(config.db_url, "SELECT message_id, attempt FROM judged"))
    return counts, dead, sorted(kit_handlers.RUNS, key=repr), stored


async def _through_the_harness(queue: str):
    kit_handlers.RUNS.clear()
    async with mayhem.testing.Harness(HANDLER, queue=queue, **SETTINGS) as h:
        walks = []
        for message_id, body, headers in INPUTS:
            extra = {"headers": headers, "content_type": "application/json"} if headers else {}
            walks.append(await h.deliver_until_settled(body, message_id=message_id, **extra))
        stored = sorted(
            (row["message_id"], row["attempt"])
            for row in await h.fetch("SELECT message_id, attempt FROM judged")
        )
    return walks, sorted(kit_handlers.RUNS, key=repr), stored


async def test_the_harness_decides_as_the_daemon(amqp, make_config, run_daemon):
    """The same inputs through the daemon and the harness: the same outcomes.

    Acked, duplicate, retried at each tier, dead-lettered after max_attempts, rejected by
    Reject, by a DecodeError, for a missing id, an empty body and one over max_message_bytes:
    the same counts, dead letters, delay queues, handler runs and stored rows.
    """
    config = make_config(handler=HANDLER, concurrency=1, **SETTINGS)
    counts, dead, daemon_runs, daemon_stored = await _through_the_daemon(amqp, config, run_daemon)
    walks, harness_runs, harness_stored = await _through_the_harness(config.queue)

    outcomes = [outcome for walk in walks for outcome in walk]
    assert counts == {o: sum(x.status == o for x in outcomes) for o in OUTCOMES}
    assert counts == {
        "acked": 4,
        "duplicate": 1,
        "requeued": 0,
        "retried": 5,
        "dead_lettered": 1,
        "rejected": 5,
    }
    settled = [walk[-1] for walk in walks]
    harness_dead = {
        walk_input[1]: (o.reason, o.error, o.attempt if o.exception else None)
        for walk_input, o in zip(INPUTS, settled, strict=True)
        if o.status in {"dead_lettered", "rejected"}
    }
    assert dead == harness_dead
    assert dead[_body("fail")] == ("failed", "ValueError: poison pill", 3)
    assert dead[b"x" * 2000] == (
        "rejected",
        "body of 2000 bytes over max_message_bytes (1000): rejected unread",
        None,
    )
    # The retries went through the same delay queues: the handler saw each in x-death.
    assert daemon_runs == harness_runs
    tiers = {
        walk_input[0]: [o.tier for o in walk if o.status == "retried"]
        for walk_input, walk in zip(INPUTS, walks, strict=True)
    }
    assert tiers["poison"] == [0.1, 0.2]
    assert tiers["retry"] == [0.2]
    assert tiers["flaky"] == [0.1, 0.2]
    queues = collections.Counter(run[6] for run in daemon_runs if run[6])
    assert queues == collections.Counter(
        o.retry_queue for walk in walks for o in walk if o.status == "retried"
    )
    assert daemon_stored == harness_stored
    # The rich message's headers came out of the harness as they did out of the broker.
    (rich_run,) = [run for run in harness_runs if run[0] == "rich"]
    assert "Decimal('12.50')" in rich_run[3]
    assert "bytearray(b'\\x00\\x01')" in rich_run[3]


@pytest.mark.postgres
async def test_ctx_db_on_postgresql(pg_url):
    """The harness on PostgreSQL: setup, the handler's writes, the inbox, rollback on failure."""
    kit_handlers.RUNS.clear()
    async with mayhem.testing.Harness(HANDLER, db_url=pg_url, **SETTINGS) as h:
        assert (await h.deliver(_body("ok"), message_id="a")).status == "acked"
        assert (await h.deliver(_body("ok"), message_id="a")).status == "duplicate"
        flaky = await h.deliver_until_settled(_body("flaky"), message_id="f")
        assert [o.status for o in flaky] == ["retried", "retried", "acked"]
        assert await h.fetch("SELECT message_id, attempt FROM judged ORDER BY message_id") == [
            {"message_id": "a", "attempt": 1},
            {"message_id": "f", "attempt": 3},
        ]
        assert await h.seen("f")
    assert await rows(pg_url, "SELECT count(*) FROM mayhem_inbox") == [(2,)]
