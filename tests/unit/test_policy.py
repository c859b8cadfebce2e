"""The worker's decision and the failure policy, without a broker.

A delivery is decided by :class:`mayhem.worker.Applier` (the handler in a real SQLite store's
transaction, the inbox) and judged by :class:`mayhem.policy.Policy`: the same code the daemon
runs, with nothing published or acked. The settle stage acts on these verdicts on the real
broker (tests/integration).
"""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import commands, header

from mayhem.amqp import Delivery, decode_content_header
from mayhem.config import Config
from mayhem.exceptions import Reject, Retry, StoreUnavailable
from mayhem.metrics import Metrics
from mayhem.policy import (
    ACK,
    APPLIED,
    DUPLICATE,
    MAX_COUNTED,
    UNREAD,
    Action,
    Attempts,
    AttemptsExhausted,
    Kind,
    Outcome,
    Policy,
)
from mayhem.worker import Applier

QUEUE = "jobs"


def config(**flags: object) -> Config:
    return Config.load(flags={"queue": QUEUE, **flags}, environ={})


def delivery(
    message_id: str | None,
    body: bytes = b"{}",
    *,
    redelivered: bool = False,
    headers: dict[str, Any] | None = None,
    body_size: int | None = None,
) -> Delivery:
    properties = commands.Basic.Properties(message_id=message_id, headers=headers)
    raw = header.ContentHeader(body_size=len(body), properties=properties).marshal()
    _, decoded = decode_content_header(raw)
    return Delivery(None, 1, redelivered, "", QUEUE, decoded, body, body_size)  # type: ignore[arg-type]


RUNS: list[str] = []


async def handler(message, ctx) -> None:
    RUNS.append(message.message_id)
    await ctx.db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT)")
    await ctx.db.execute("INSERT INTO seen (id) VALUES (?)", message.message_id)
    if message.body == b"fail":
        raise ValueError("boom")
    if message.body == b"later":
        raise Retry(delay=1.5)
    if message.body == b"reject":
        raise Reject("not for us")


@pytest.fixture
def applier(store):
    RUNS.clear()

    def make(cfg: Config) -> Applier:
        return Applier(
            config=cfg, store=store, handler=handler, attempts=Attempts(cfg), metrics=Metrics()
        )

    return make


async def test_each_outcome_and_its_verdict(applier, store):
    """Applied, duplicate, failed, retry asked, rejected, unread: decided and judged as the daemon.

    Defaults: 5 attempts, tiers 1, 2, 4, 8 s. A failure on attempt 1 retries at the 1 s tier;
    Retry(delay=1.5) rounds up to the 2 s tier; Reject dead-letters as "rejected"; a body
    skipped unread is rejected to the broker's dead-letter exchange without a run.
    """
    cfg = config()
    decide, policy = applier(cfg).decide, Policy(cfg)

    assert await decide(delivery("a")) is APPLIED
    assert policy.verdict(APPLIED) is ACK
    assert await decide(delivery("a", redelivered=True)) is DUPLICATE
    assert policy.verdict(DUPLICATE).label == "duplicate"
    assert RUNS == ["a"]

    failed = await decide(delivery("f", b"fail"))
    assert (failed.kind, failed.attempt, type(failed.error)) == (Kind.FAILED, 1, ValueError)
    retry = policy.verdict(failed)
    assert (retry.action, retry.tier, retry.label) == (Action.RETRY, 1.0, "retried")

    later = policy.verdict(await decide(delivery("l", b"later")))
    assert (later.action, later.tier) == (Action.RETRY, 2.0)

    rejected = await decide(delivery("r", b"reject"))
    assert rejected.kind is Kind.REJECTED
    verdict = policy.verdict(rejected)
    assert (verdict.action, verdict.reason, verdict.label) == (
        Action.DEAD_LETTER,
        "rejected",
        "rejected",
    )

    assert await decide(delivery("u", b"", body_size=10**9)) is UNREAD
    assert policy.verdict(UNREAD).action is Action.REJECT_UNREAD
    assert policy.verdict(UNREAD).label == "rejected"
    assert RUNS == ["a", "f", "l", "r"]
    # What failed rolled back; only the applied message's row stayed.
    async with store.transaction() as tx:
        assert await tx.fetch("SELECT id FROM seen") == [{"id": "a"}]


async def test_a_failure_dead_letters_at_max_attempts():
    """Attempts 1 to 4 retry at 1, 2, 4, 8 s; attempt 5 dead-letters as "failed"."""
    policy = Policy(config())
    tiers = [policy.verdict(Outcome.failed(ValueError(), n)).tier for n in range(1, 5)]
    assert tiers == [1.0, 2.0, 4.0, 8.0]
    last = policy.verdict(Outcome.failed(ValueError(), 5))
    assert (last.action, last.reason, last.label) == (Action.DEAD_LETTER, "failed", "dead_lettered")
    # A requested delay rounds up to a tier, and past the longest one stays there.
    assert policy.verdict(Outcome.failed(Retry(delay=100), 1)).tier == 8.0
    assert policy.verdict(Outcome.failed(Retry(delay=0), 3)).tier == 1.0


async def test_an_outage_is_requeued_not_an_attempt():
    """The database down: requeue, whatever the attempt."""
    verdict = Policy(config()).verdict(Outcome.outage(StoreUnavailable("down")))
    assert verdict.action is Action.REQUEUE


async def test_past_max_attempts_the_handler_does_not_run(applier):
    """A quorum queue's redelivery count past max_attempts: dead-lettered as failed, not run.

    Redelivered with x-delivery-count 3 on a 3-attempt queue: attempt 4, AttemptsExhausted.
    """
    cfg = config(max_attempts=3)
    outcome = await applier(cfg).decide(
        delivery("x", redelivered=True, headers={"x-delivery-count": 3})
    )
    assert (outcome.kind, outcome.attempt) == (Kind.FAILED, 4)
    assert isinstance(outcome.error, AttemptsExhausted)
    assert Policy(cfg).verdict(outcome).label == "dead_lettered"
    assert RUNS == []


def test_requeued_runs_count_as_attempts_until_forgotten():
    """On a classic queue the runs requeued after a failed settle are this process's count."""
    attempts = Attempts(config(queue_type="classic"))
    first, again = delivery("m"), delivery("m", redelivered=True)
    assert attempts.of(first) == 1
    attempts.requeued(first)
    attempts.requeued(first)
    assert attempts.of(again) == 3
    assert attempts.of(first) == 1  # not redelivered: the count does not apply
    attempts.forget(again)
    assert attempts.of(again) == 1


def test_the_count_of_requeued_runs_is_bounded():
    """At most MAX_COUNTED messages are remembered; the oldest is forgotten first."""
    attempts = Attempts(config(queue_type="classic"))
    for n in range(MAX_COUNTED + 1):
        attempts.requeued(delivery(f"m-{n}"))
    assert attempts.of(delivery("m-0", redelivered=True)) == 1
    assert attempts.of(delivery(f"m-{MAX_COUNTED}", redelivered=True)) == 2
