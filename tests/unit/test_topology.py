"""mayhem.topology: the names and arguments in deploy/rabbitmq/definitions.json are its own."""

from __future__ import annotations

import json
from pathlib import Path

from mayhem.config import Config
from mayhem.topology import (
    dead_letter_exchange,
    dead_queue,
    dead_queue_arguments,
    queue_arguments,
    retry_queue,
    retry_queue_arguments,
    retry_tiers,
)

DEFINITIONS = Path(__file__).parents[2] / "deploy" / "rabbitmq" / "definitions.json"


def test_the_deployed_definitions_are_what_mayhem_declares():
    """The example broker definitions: the default configuration's exchanges, queues, bindings.

    Every queue and its arguments, both exchanges and both bindings as the daemon declares
    them for queue "mayhem" on exchange "mayhem" (quorum, 5 attempts: 4 delay tiers).
    """
    config = Config.load(flags={}, environ={})
    definitions = json.loads(DEFINITIONS.read_text(encoding="utf-8"))

    exchanges = {e["name"]: e["type"] for e in definitions["exchanges"]}
    assert exchanges == {config.exchange: "direct", dead_letter_exchange(config.exchange): "direct"}

    declared = {config.queue: queue_arguments(config)}
    declared[dead_queue(config.queue)] = dead_queue_arguments(config)
    for tier in retry_tiers(config):
        declared[retry_queue(config.queue, tier)] = retry_queue_arguments(config, tier)
    queues = {q["name"]: q["arguments"] for q in definitions["queues"]}
    assert queues == declared
    assert all(q["durable"] for q in definitions["queues"])

    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert bindings == {
        (config.exchange, config.queue, config.queue),
        (dead_letter_exchange(config.exchange), config.dead_queue, config.dead_queue),
    }


def test_names():
    """Delay queues are named by their delay in milliseconds; the rest by a suffix."""
    assert retry_queue("jobs", 0.05) == "jobs.retry.50"
    assert retry_queue("jobs", 300) == "jobs.retry.300000"
    assert dead_queue("jobs") == "jobs.dead"
    assert dead_letter_exchange("ex") == "ex.dlx"
