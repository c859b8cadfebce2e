"""mayhem against a 3-node RabbitMQ cluster: the node leading the queue stops mid-stream.

The cluster is deploy/rabbitmq-cluster.sh's (nodes mayhem-{a,b,c}@localhost on 127.0.0.1:5681
to 5683), started once for the session and torn down after it; the machine's default broker
on 5672 is left alone. The test stops and restarts only its own cluster's nodes.
"""

from __future__ import annotations

import asyncio
import subprocess

import aio_pika
import attrs
import pytest
from mayhem_testing import (
    ROOT,
    applied_at_least,
    daemon_args,
    declare,
    http_get,
    oracle,
    publish,
    wait_until,
)

pytestmark = pytest.mark.cluster

SCRIPT = ROOT / "deploy" / "rabbitmq-cluster.sh"
PORTS = {"a": 5681, "b": 5682, "c": 5683}
MESSAGES = 2000
BATCH = 100


def node_name(node: str) -> str:
    return f"mayhem-{node}@localhost"


def url_of(*nodes: str) -> str:
    return f"amqp://guest:guest@{','.join(f'127.0.0.1:{PORTS[n]}' for n in nodes)}/"


def ctl(node: str, *args: str, timeout: float = 120) -> str:
    """Run rabbitmqctl on one of the cluster's own nodes (never the default broker)."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", "-n", node_name(node), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    return done.stdout


def leader_of(queue: str, ask: str) -> str:
    """The node (a, b or c) leading the quorum queue ``queue``, as node ``ask`` sees it."""
    for line in ctl(ask, "list_queues", "name", "leader").splitlines():
        name, _, leader = line.partition("\t")
        if name == queue:
            return leader.removeprefix("mayhem-").split("@")[0]
    raise LookupError(queue)


@pytest.fixture(scope="session")
def cluster():
    """The three nodes, clustered; stopped (and their data deleted) after the session."""
    try:
        started = subprocess.run(["bash", str(SCRIPT), "start"], check=False, timeout=300)
        if started.returncode != 0:
            # Three Erlang nodes booting on two busy cores: the script has stopped what it
            # started; one more try before the test counts as failed.
            subprocess.run(["bash", str(SCRIPT), "start"], check=True, timeout=300)
        yield
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], check=False, timeout=300)


async def test_leader_node_stops_mid_stream(cluster, make_config, spawn):
    """The node that leads the queue, and holds both of mayhem's connections, stops.

    1. Declare the topology (quorum queues, three members each) through node a; find the
       queue's leader; give mayhem a URL that names the leader first, so that both its
       connections (consuming and publishing) are on the node that will stop.
    2. Publish 2,000 messages with confirms, in batches, through a node that stays up.
    3. Once 300 are applied, stop the leader's RabbitMQ application.
    4. The daemon reconnects to another node and goes on; /readyz answers 200 again.
    5. Every confirmed id is applied exactly once; then the node is started again.
    """
    config = make_config(amqp_url=url_of("a", "b", "c"))
    admin = await aio_pika.connect(url_of("a"))
    try:
        await declare(admin, config)
    finally:
        await admin.close()
    leader = leader_of(config.queue, "a")
    others = [n for n in PORTS if n != leader]
    members = ctl(others[0], "list_queues", "name", "members")
    assert all(node_name(n) in members for n in PORTS), members

    daemon = spawn(
        daemon_args(
            attrs.evolve(config, amqp_url=url_of(leader, *others)),
            "--handler",
            "sample_handlers:record",
            "--concurrency",
            "8",
        ),
        env={"SAMPLE_HANDLER_DELAY": "0.003"},
    )
    await daemon.start()
    assert daemon.metrics_addr is not None
    publisher = await aio_pika.connect(url_of(others[0]))
    stopped = False
    try:
        confirmed: list[str] = []

        async def stream() -> None:
            for _ in range(MESSAGES // BATCH):
                confirmed.extend(await publish(publisher, config.queue, [b'{"n": 1}'] * BATCH))

        streaming = asyncio.create_task(stream())
        await wait_until(lambda: applied_at_least(config.db_url, 300), timeout=60)
        await asyncio.to_thread(ctl, leader, "stop_app")
        stopped = True

        await streaming
        assert len(confirmed) == MESSAGES
        lost = await daemon.wait_for_event("broker_connection_lost", timeout=60)
        assert lost["broker"] == f"127.0.0.1:{PORTS[leader]}"
        reconnected = await daemon.wait_for_event("consuming_again", timeout=60)
        assert reconnected["broker"] in {f"127.0.0.1:{PORTS[n]}" for n in others}
        await wait_until(lambda: applied_at_least(config.db_url, MESSAGES), timeout=60)

        async def ready() -> bool:
            status, _ = await http_get(daemon.metrics_addr, "/readyz")
            return status == 200

        # /readyz needs the publishing connection too: it moved to another node as well.
        await wait_until(ready, timeout=30)
        assert await daemon.stop() == 0
        verdict = await oracle(publisher, config.queue, config.db_url, confirmed)
        assert verdict.lost == frozenset()
        assert verdict.duplicates == 0
        assert verdict.applied == MESSAGES
        assert daemon.tracebacks() == []
    finally:
        await publisher.close()
        if stopped:
            await asyncio.to_thread(ctl, leader, "start_app")
            await asyncio.to_thread(ctl, leader, "await_startup")
