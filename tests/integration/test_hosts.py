"""A broker URL naming several nodes (a cluster): both connections use the first that answers.

Nothing listens on 127.0.0.1:1, so a URL naming it first and the test broker second behaves
as a cluster whose first node is down. Every node's URL goes through the one parser
(``Endpoint.from_url``), with every check it makes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from mayhem.amqp import Endpoint, Link, endpoints, open_any, split_hosts
from mayhem.amqp.url import UrlError, join_hosts
from mayhem.broker import connect
from mayhem.config import Config
from mayhem.exceptions import BrokerRefused, ConfigError, LinkLost, StartupError

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


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("amqp://h1,,h2/", "empty host"),
        ("amqp://h1,/", "empty host"),
        ("amqp://h1,h2:x/", "the port must be a number"),
        ("amqp://h1,h2:0/", "the port must be a number"),
        ("amqp://u:secret@h1,h2/?cafile=/ca.pem", "'cafile' needs an amqps:// URL"),
        ("amqp://u:secret@h1,h2/?heartbeat=x", "option 'heartbeat' must be"),
        ("amqp://u:secret@h1,h2/?colour=red", "unknown option 'colour'"),
        ("amqps://u:secret@h1,h2/?capath=/nonexistent", "capath /nonexistent"),
        ("amqp://u:sec#ret@h1,h2/", "has a '#'"),
    ],
)
def test_every_check_of_the_parser_applies_to_a_host_list(url, why):
    """One line naming amqp_url and what is wrong; the password masked."""
    with pytest.raises(ConfigError, match="amqp_url") as raised:
        Config.load(flags={"amqp_url": url}, environ={})
    assert why in str(raised.value)
    assert "secret" not in str(raised.value)


def test_every_node_gets_its_own_checked_endpoint():
    nodes = endpoints("amqps://u:p@h1:5681,h2:5682/v?heartbeat=7&no_verify_ssl=1")
    assert [(e.host, e.port, e.tls, e.vhost, e.heartbeat, e.verify) for e in nodes] == [
        ("h1", 5681, True, "v", 7, False),
        ("h2", 5682, True, "v", 7, False),
    ]
    assert all(e.ssl_context is not None for e in nodes)
    assert endpoints("amqp://h/") == (Endpoint.from_url("amqp://h/"),)


def test_join_checks_each_url_with_the_parser_first():
    with pytest.raises(UrlError, match="unknown option 'x'"):
        join_hosts(["amqp://h1/?x=1", "amqp://h2/?x=1"])
    assert join_hosts(["amqp://h1/"]) == "amqp://h1/"


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


async def test_a_node_that_refuses_the_credentials_ends_the_search(amqp_url):
    """The nodes of a cluster share their users: a refusal is final, not a node that is down."""
    scheme, _, rest = amqp_url.partition("://")
    wrong = Endpoint.from_url(f"{scheme}://guest:wrong@{rest.rpartition('@')[2]}")
    with pytest.raises(BrokerRefused):
        await _open([wrong, Endpoint.from_url(amqp_url)])


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
    assert "may differ only in host and port" in str(raised.value)
    assert ":p@" not in str(raised.value), "the password is masked"
    assert ":x@" not in str(raised.value), "every URL's password is masked"
    assert "\n" not in str(raised.value)


def test_a_toml_array_names_the_nodes(tmp_path):
    path = tmp_path / "mayhem.toml"
    path.write_text(
        'amqp_url = ["amqp://u:p@h1:5681/", "amqp://u:p@h2:5682/", "amqp://u:p@h3:5683/"]\n'
    )
    config = Config.load(file=str(path), environ={})
    assert config.amqp_url == "amqp://u:p@h1:5681,h2:5682,h3:5683/"
    assert config.masked()["amqp_url"] == "amqp://u:***@h1:5681,h2:5682,h3:5683/"


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
