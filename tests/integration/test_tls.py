"""TLS options from the URL, on both broker connections, against a real TLS listener.

The module's listener is opened on the running broker (``tls_testing.tls_listener``: a free
loopback port, a private CA made for the test, client certificates required) and closed at
the end. The URL's ``cafile``, ``certfile``/``keyfile``, ``no_verify_ssl`` and ``auth=external``
must mean the same on mayhem's consuming link as on the aio-pika connection.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid

import aio_pika
import pytest
from mayhem_testing import publish, wait_until
from tls_testing import Pki, tls_listener

from mayhem.amqp import Endpoint, Link, open_link
from mayhem.broker import connect
from mayhem.exceptions import LinkLost, StartupError

NOT_TRUSTED = "TLS: the broker's certificate was not accepted"


@pytest.fixture(scope="module")
def tls():
    with tls_listener(client_user="guest") as (port, pki):
        yield port, pki


def _url(port: int, pki: Pki, *, user: str = "guest:guest", **options: object) -> str:
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"amqps://{user}@127.0.0.1:{port}/?{query}"


def _client(pki: Pki) -> dict[str, object]:
    return {"certfile": pki.client_cert, "keyfile": pki.client_key}


async def _listed(*fields: str) -> list[list[str]]:
    """The broker's connections: name, then ``fields``, one list per connection."""
    done = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_connections", "client_properties", *fields],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [line.split("\t") for line in done.stdout.splitlines()]


async def _open(endpoint: Endpoint, name: str, delivered: list[object]) -> Link:
    return await open_link(
        endpoint,
        client_properties={"connection_name": name},
        prefetch=10,
        on_delivery=delivered.append,
        on_lost=lambda *_: None,
    )


async def _declare(amqp: aio_pika.abc.AbstractConnection, queue: str) -> None:
    channel = await amqp.channel()
    await channel.declare_queue(queue, durable=True)
    await channel.close()


@pytest.mark.parametrize("auth", ["plain", "external"])
async def test_both_connections_use_the_private_ca_and_client_certificate(
    tls, amqp, queue_name, make_config, auth
):
    """The CA, client certificate and auth=external work on the link and on aio-pika alike.

    1. A queue with one message, reached over TLS (the broker requires the client certificate).
    2. The consuming link connects (trusting the private CA only), consumes the message.
    3. aio-pika, given the same URL through ``broker.connect``, declares the queue passively.
    4. The broker lists both connections as TLS, with the mechanism asked for; with EXTERNAL
       the user is the certificate's (the URL's user and password are wrong on purpose).
    """
    port, pki = tls
    user = "guest:guest" if auth == "plain" else "nobody:wrong"
    url = _url(port, pki, user=user, cafile=pki.ca, auth=auth, **_client(pki))
    await _declare(amqp, queue_name)
    await publish(amqp, queue_name, [b"over tls"])

    name = f"mayhem-test tls {uuid.uuid4().hex}"
    delivered: list[object] = []
    link = await _open(Endpoint.from_url(url), name, delivered)
    try:
        await link.consume(queue_name)
        await wait_until(lambda: len(delivered) == 1, timeout=5)
        link.ack(1)
        config = make_config(amqp_url=url)
        connection = await connect(config, role="tls-test")
        try:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue_name, passive=True)
            assert declared.declaration_result.consumer_count == 1
            listed = await _listed("ssl", "auth_mechanism", "user")
        finally:
            await connection.close()
    finally:
        await link.close()
    ours = [
        row[1:]
        for row in listed
        if name in row[0] or f"pid={os.getpid()} queue={queue_name}" in row[0]
    ]
    assert ours == [["true", auth.upper(), "guest"]] * 2


async def test_the_daemon_runs_over_tls_with_external(tls, amqp, make_config, run_daemon):
    """The whole daemon on an amqps URL with auth=external: both its connections, one message.

    The consuming link and the publishing connection both come up (READY), and a message
    is handled and acked: nothing of the URL is lost on the way to either.
    """
    port, pki = tls
    url = _url(port, pki, user="nobody:wrong", cafile=pki.ca, auth="external", **_client(pki))
    await _both_connections_over_tls_with_external(url, amqp, make_config, run_daemon)


async def test_a_cluster_url_keeps_tls_for_every_node(tls, amqp, make_config, run_daemon):
    """A host list whose first node is down: both connections reach the second over TLS.

    Every node's URL is parsed by the one parser, so the second node gets the same CA, client
    certificate and mechanism as the first would have (and the host name checked is its own).
    """
    port, pki = tls
    url = _url(port, pki, user="nobody:wrong", cafile=pki.ca, auth="external", **_client(pki))
    url = url.replace("@127.0.0.1:", "@127.0.0.1:1,127.0.0.1:")
    await _both_connections_over_tls_with_external(url, amqp, make_config, run_daemon)


async def test_a_wrong_ca_fails_with_a_clear_error(tls, make_config):
    """A CA that did not sign the broker's certificate: both connections refuse, saying so."""
    port, pki = tls
    url = _url(port, pki, cafile=pki.other_ca, **_client(pki))
    with pytest.raises(LinkLost) as raised:
        await _open(Endpoint.from_url(url), "mayhem-test wrong ca", [])
    assert str(raised.value).startswith(NOT_TRUSTED)
    assert "cafile" in str(raised.value)

    with pytest.raises(StartupError) as failed:
        await connect(make_config(amqp_url=url), role="tls-test")
    assert NOT_TRUSTED in str(failed.value)
    assert "guest:guest" not in str(failed.value)


async def test_no_verify_ssl_connects_whatever_the_ca(tls, make_config, queue_name, amqp):
    """``no_verify_ssl=1``: both connections come up though the CA given is the wrong one."""
    port, pki = tls
    url = _url(port, pki, cafile=pki.other_ca, no_verify_ssl=1, **_client(pki))
    await _declare(amqp, queue_name)
    link = await _open(Endpoint.from_url(url), f"mayhem-test {uuid.uuid4().hex}", [])
    try:
        assert await link.consume(queue_name)
    finally:
        await link.close()
    connection = await connect(make_config(amqp_url=url), role="tls-test")
    await connection.close()


async def test_without_the_client_certificate_the_broker_refuses(tls):
    """The listener requires a client certificate: without certfile the handshake fails."""
    port, pki = tls
    with pytest.raises(LinkLost, match=r"TLS|closed|reset"):
        await _open(Endpoint.from_url(_url(port, pki, cafile=pki.ca)), "mayhem-test no cert", [])


async def _both_connections_over_tls_with_external(url, amqp, make_config, run_daemon) -> None:
    """A message is handled and acked; both of the daemon's connections are TLS + EXTERNAL."""
    config = make_config(amqp_url=url, handler="sample_handlers:record")
    async with run_daemon(config) as daemon:
        await publish(amqp, config.queue, [b"{}"])
        await wait_until(
            lambda: daemon.metrics.value("mayhem_messages_total", {"outcome": "acked"}) == 1
        )
        listed = await _listed("ssl", "auth_mechanism")
    ours = [row[1:] for row in listed if f"pid={os.getpid()} queue={config.queue}" in row[0]]
    assert sorted(ours) == [["true", "EXTERNAL"]] * 2
