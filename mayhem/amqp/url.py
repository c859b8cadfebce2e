"""Where and as whom the consuming connection connects: the broker URL, parsed once."""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import attrs

DEFAULT_HEARTBEAT: Final = 60


@attrs.frozen
class Endpoint:
    """Where and as whom to connect, from an ``amqp://`` or ``amqps://`` URL.

    Attributes:
        host: the broker's host.
        port: its port (5672, or 5671 for amqps).
        tls: connect with TLS (``amqps``).
        vhost: the virtual host (``/`` when the URL has no path).
        username: PLAIN user name.
        password: PLAIN password.
        heartbeat: the heartbeat we ask for (``?heartbeat=`` in the URL), seconds; 0 is off.
    """

    host: str
    port: int
    tls: bool
    vhost: str
    username: str
    password: str
    heartbeat: int = DEFAULT_HEARTBEAT

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """Parse the URL as aio-pika does: percent-decoded parts, ``guest`` by default."""
        parts = urlsplit(url)
        tls = parts.scheme == "amqps"
        path = parts.path.removeprefix("/")
        query = parse_qs(parts.query)
        heartbeat = query.get("heartbeat", [str(DEFAULT_HEARTBEAT)])[0]
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if tls else 5672),
            tls=tls,
            vhost=unquote(path) or "/",
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            heartbeat=int(heartbeat) if heartbeat.isdigit() else DEFAULT_HEARTBEAT,
        )


def split_hosts(url: str) -> list[str]:
    """One URL per host of a cluster URL such as ``amqp://u:p@h1:5681,h2:5682,h3/vhost``.

    The hosts share the scheme, credentials, vhost and query; a URL with one host comes back
    as it is.

    Raises:
        ValueError: a host in the list is empty (``h1,,h2``).
    """
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    hosts = hostlist.split(",")
    if len(hosts) == 1:
        return [url]
    if not all(hosts):
        msg = "an empty host in the broker URL's host list"
        raise ValueError(msg)
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}")) for host in hosts]


def join_hosts(urls: list[str]) -> str:
    """One cluster URL from URLs of its nodes (a repeated ``--amqp-url``).

    Raises:
        ValueError: the URLs differ in more than their host and port (scheme, credentials,
            vhost or query), or there are none.
    """
    singles = [single for url in urls for single in split_hosts(url)]
    if not singles:
        msg = "no broker URL"
        raise ValueError(msg)
    first = urlsplit(singles[0])
    userinfo, at, _ = first.netloc.rpartition("@")
    hosts = []
    for url in singles:
        parts = urlsplit(url)
        their_userinfo, _, host = parts.netloc.rpartition("@")
        if (parts.scheme, their_userinfo, parts.path, parts.query) != (
            first.scheme,
            userinfo,
            first.path,
            first.query,
        ):
            msg = "the broker URLs differ in more than their host and port"
            raise ValueError(msg)
        hosts.append(host)
    return urlunsplit(first._replace(netloc=f"{userinfo}{at}{','.join(hosts)}"))
