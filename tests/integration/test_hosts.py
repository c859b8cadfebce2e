"""A broker URL naming several nodes (a cluster): both connections use the first that answers.

Nothing listens on 127.0.0.1:1, so a URL naming it first and the test broker second behaves
as a cluster whose first node is down.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from mayhem.amqp import Endpoint, Link, open_any, split_hosts
from mayhem.broker import connect
from mayhem.config import Config
from mayhem.exceptions import ConfigError, LinkLost, StartupError

DOWN = "127.0.0.1:1"


def cluster_url(amqp_url: str, *first: str) -> str:
    """``amqp_url`` with the hosts ``first`` put before its own host."""
    scheme, _, rest = amqp_url.partition("://")
    userinfo, _, hostpath = rest.rpartition("@")
    return f"{scheme}://{userinfo}@{','.join(first)},{hostpath}"


def test_split_hosts_keeps_credentials_vhost_and_query():
    url = "amqps://u:p%40ss@h1:5681,h2,[::1]:5683/v%2Fh?heartbeat=5"
    assert split_hosts(url) == [
        "amqps://u:p%40ss@h1:5681/v%2Fh?heartbeat=5",
        "amqps://u:p%40ss@h2/v%2Fh?heartbeat=5",
        "amqps://u:p%40ss@[::1]:5683/v%2Fh?heartbeat=5",
    ]
    assert [
        (e.host, e.port, e.vhost, e.password) for e in map(Endpoint.from_url, split_hosts(url))
    ] == [
        ("h1", 5681, "v/h", "p@ss"),
        ("h2", 5671, "v/h", "p@ss"),
        ("::1", 5683, "v/h", "p@ss"),
    ]
    assert split_hosts("amqp://guest:guest@127.0.0.1:5672/") == [
        "amqp://guest:guest@127.0.0.1:5672/"
    ]


@pytest.mark.parametrize("url", ["amqp://h1,,h2/", "amqp://h1,h2:x/", "amqp://h1,/"])
def test_a_bad_host_list_is_a_configuration_error(url):
    with pytest.raises(ConfigError, match="amqp_url"):
        Config.load(flags={"amqp_url": url}, environ={})


def _noop(*_: object) -> None:
    pass


async def _open(endpoints: list[Endpoint], after: Endpoint | None = None) -> Link:
    return await open_any(
        endpoints,
        after=after,
        client_properties={"connection_name": "mayhem-test hosts"},
        prefetch=10,
        on_delivery=_noop,
        on_lost=_noop,
    )


async def test_consuming_link_skips_a_node_that_is_down(amqp_url):
    endpoints = [Endpoint.from_url(u) for u in split_hosts(cluster_url(amqp_url, DOWN))]
    link = await _open(endpoints)
    try:
        assert link.endpoint == endpoints[1]
        assert not link.closed
    finally:
        await link.close()


async def test_consuming_link_starts_after_the_node_that_failed(amqp_url):
    """After losing node 1 of [1, 2, 3], node 2 is tried first, node 1 last."""
    good = Endpoint.from_url(amqp_url)
    endpoints = [good, Endpoint.from_url(f"amqp://guest:guest@{DOWN}/"), good]
    link = await _open(endpoints, after=endpoints[1])
    try:
        assert link.endpoint is endpoints[2]
    finally:
        await link.close()


async def test_no_node_answers_names_how_many_were_tried():
    endpoints = [Endpoint.from_url(f"amqp://guest:guest@{DOWN}/")] * 2
    with pytest.raises(LinkLost, match="none of the 2 broker hosts"):
        await _open(endpoints)


async def test_publishing_connection_skips_a_node_that_is_down(amqp_url, queue_name):
    config = Config.load(
        flags={"amqp_url": cluster_url(amqp_url, DOWN, DOWN), "queue": queue_name}, environ={}
    )
    connection = await connect(config, role="test")
    try:
        assert connection.url.port == Endpoint.from_url(amqp_url).port
        channel = await connection.channel()
        await channel.close()
    finally:
        await connection.close()


async def test_publishing_connection_fails_when_no_node_answers(queue_name):
    url = f"amqp://guest:guest@{DOWN},127.0.0.1:2/"
    config = Config.load(flags={"amqp_url": url, "queue": queue_name}, environ={})
    async with asyncio.timeout(30):
        with pytest.raises(StartupError, match="cannot connect"):
            await connect(config, role="test")


def test_one_url_per_node_joins_into_one_cluster_url():
    urls = ["amqp://u:p@h1:5681/v?heartbeat=5", "amqp://u:p@h2:5682/v?heartbeat=5"]
    config = Config.load(flags={"amqp_url": urls}, environ={})
    assert config.amqp_url == "amqp://u:p@h1:5681,h2:5682/v?heartbeat=5"


@pytest.mark.parametrize(
    "other",
    ["amqp://u:x@h2/v", "amqps://u:p@h2/v", "amqp://u:p@h2/w", "amqp://u:p@h2/v?heartbeat=1"],
)
def test_node_urls_must_differ_only_in_host_and_port(other):
    with pytest.raises(ConfigError, match="amqp_url") as raised:
        Config.load(flags={"amqp_url": ["amqp://u:p@h1/v", other]}, environ={})
    assert ":p@" not in str(raised.value), "the password is masked"


def test_repeated_amqp_url_flag_names_the_nodes():
    done = subprocess.run(
        [
            sys.executable, "-m", "mayhem", "check-config",
            "--amqp-url", "amqp://guest:secret@127.0.0.1:5681/",
            "--amqp-url", "amqp://guest:secret@127.0.0.1:5682/",
        ],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert 'amqp_url = "amqp://guest:***@127.0.0.1:5681,127.0.0.1:5682/"' in done.stdout
