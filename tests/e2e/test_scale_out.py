"""Competing daemons on one queue and one PostgreSQL schema: nothing lost, nothing applied twice.

Operators scale mayhem out by running N daemons (``mayhem@.service``) on the same queue; the
broker spreads the deliveries and the shared inbox makes sure that a message redelivered to
another daemon (its first daemon died before the ack) is not applied again.
"""

from __future__ import annotations

import signal

import pytest
from mayhem_testing import (
    applied_at_least,
    daemon_args,
    declare,
    oracle,
    publish,
    rabbitmqctl,
    wait_until,
)

pytestmark = pytest.mark.postgres

MESSAGES = 3000


def unacked(queue: str) -> int:
    """The broker's count of deliveries of ``queue`` not yet acknowledged."""
    for line in rabbitmqctl("list_queues", "name", "messages_unacknowledged").splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    raise LookupError(queue)


async def test_three_daemons_one_killed_one_stopped(amqp, make_config, pg_url, spawn):
    """Three daemons share a queue and an inbox; one is SIGKILLed, one SIGTERMed mid-stream.

    1. Publish 3,000 messages with confirms; start three daemons (8 workers each, a 5 ms
       handler that records each message in ``applied``, one PostgreSQL schema).
    2. Once 500 are applied, SIGKILL the first: its unacked deliveries go back to the queue,
       some of them already applied (committed, not yet acked).
    3. Once 1,200 are applied, SIGTERM the second: it exits 0.
    4. The third consumes the rest; then it is stopped too.
    5. The oracle: every confirmed id applied exactly once, none lost, none left queued, and
       nothing unacknowledged on the broker.
    """
    config = make_config(db_url=pg_url)
    await declare(amqp, config)
    ids = await publish(amqp, config.queue, [b'{"n": 1}'] * MESSAGES)
    args = daemon_args(config, "--handler", "sample_handlers:record", "--concurrency", "8")
    daemons = [spawn(args, env={"SAMPLE_HANDLER_DELAY": "0.005"}) for _ in range(3)]
    for daemon in daemons:
        await daemon.start()
    killed, stopped, survivor = daemons

    await wait_until(lambda: applied_at_least(pg_url, 500), timeout=60)
    killed.signal(signal.SIGKILL)
    assert await killed.wait(timeout=10) == -signal.SIGKILL

    await wait_until(lambda: applied_at_least(pg_url, 1200), timeout=60)
    assert await stopped.stop() == 0

    await wait_until(lambda: applied_at_least(pg_url, MESSAGES), timeout=90)
    assert await survivor.stop() == 0

    assert unacked(config.queue) == 0
    verdict = await oracle(amqp, config.queue, pg_url, ids)
    assert verdict.lost == frozenset()
    assert verdict.duplicates == 0
    assert verdict.applied == MESSAGES
    assert verdict.queued == 0
    assert verdict.dead == 0
    for daemon in (stopped, survivor):
        assert daemon.tracebacks() == []
        assert len(daemon.events("shutdown_complete")) == 1
