"""Where and as whom both broker connections connect: the broker URL, parsed and checked once.

The consuming connection (:mod:`mayhem.amqp.link`) and the aio-pika one (:mod:`mayhem.broker`)
both take their settings from one :class:`Endpoint`: aio-pika gets the same URL (which this
module has checked) and the same :class:`ssl.SSLContext`, so a TLS option means the same on
both. The query options are aio-pika's (aiormq's), with the same names and meanings; mayhem
takes only those both connections honour, and refuses any other, or a bad value, at once.

A cluster's URL names its nodes in one host list (``amqp://u:p@h1:5681,h2:5682,h3/``), or each
node has a URL of its own (a repeated ``--amqp-url``, a TOML array) that :func:`join_hosts`
joins into one. :func:`endpoints` splits it (:func:`split_hosts`) and parses every node's URL
with :meth:`Endpoint.from_url`, so every check applies to every node.
"""

from __future__ import annotations

import base64
import binascii
import ssl
from pathlib import Path
from typing import Final, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import attrs

DEFAULT_HEARTBEAT: Final = 60
MAX_SHORT: Final = 65535  # heartbeat and port are AMQP/TCP unsigned shorts
MECHANISMS: Final = ("PLAIN", "EXTERNAL")
TLS_OPTIONS: Final = ("cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl")
OPTIONS: Final = ("heartbeat", "auth", *TLS_OPTIONS)


class UrlError(ValueError):
    """The broker URL is malformed or has an unknown or bad option.

    The message says what is wrong without repeating the URL (it may hold a password).
    """


def _refuse(message: str) -> NoReturn:
    raise UrlError(message)


@attrs.frozen
class Endpoint:
    """Where and as whom to connect, from an ``amqp://`` or ``amqps://`` URL.

    Build it with :meth:`from_url`, which checks everything; the attributes are the result.

    Attributes:
        host: the broker's host.
        port: its port (5672, or 5671 for amqps).
        tls: connect with TLS (``amqps``).
        vhost: the virtual host (``/`` when the URL has no path).
        username: PLAIN user name.
        password: PLAIN password.
        heartbeat: the heartbeat we ask for (``?heartbeat=``), seconds; 0 is off.
        auth: the SASL mechanism (``?auth=plain`` or ``external``): ``PLAIN`` or ``EXTERNAL``
            (the broker takes the user from the client certificate).
        cafile: ``?cafile=``, a PEM file of the CAs to trust instead of the system's.
        capath: ``?capath=``, a directory of hashed CA files to trust.
        cadata: ``?cadata=``, base64 of the DER certificate of a CA to trust.
        certfile: ``?certfile=``, the client certificate (PEM) to present.
        keyfile: ``?keyfile=``, its private key (PEM, unencrypted) when not in ``certfile``.
        verify: check the broker's certificate and host name; ``?no_verify_ssl=1`` turns the
            check off.
        ssl_context: the TLS context both connections use (``None`` without TLS).
    """

    host: str
    port: int
    tls: bool
    vhost: str
    username: str
    password: str
    heartbeat: int = DEFAULT_HEARTBEAT
    auth: str = "PLAIN"
    cafile: str | None = None
    capath: str | None = None
    cadata: bytes | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    ssl_context: ssl.SSLContext | None = attrs.field(init=False, eq=False, repr=False)

    @ssl_context.default
    def _make_ssl_context(self) -> ssl.SSLContext | None:
        return self._tls_context() if self.tls else None

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """Parse and check the URL as aio-pika reads it: percent-decoded, ``guest`` by default.

        Raises:
            UrlError: the URL is malformed, has an unknown option or a bad value, or a TLS
                file cannot be read.
        """
        if "#" in url:
            _refuse("the URL has a '#': percent-encode it (%23) in the password or vhost")
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            # urlsplit's own message may quote part of the password: say it in our words.
            _refuse("the port must be a number from 1 to 65535 (or the URL is malformed)")
        if parts.scheme not in {"amqp", "amqps"}:
            _refuse("the scheme must be amqp:// or amqps://")
        if not parts.hostname:
            _refuse("the URL has no host")
        if port == 0:
            _refuse("the port must be a number from 1 to 65535")
        tls = parts.scheme == "amqps"
        options = _options(parts.query)
        if not tls and set(options) & set(TLS_OPTIONS):
            _refuse(f"option {min(set(options) & set(TLS_OPTIONS))!r} needs an amqps:// URL")
        auth = options.get("auth", "plain").upper()
        if auth not in MECHANISMS:
            _refuse("option 'auth' must be plain or external")
        certfile, keyfile = options.get("certfile"), options.get("keyfile")
        if keyfile and not certfile:
            _refuse("option 'keyfile' needs 'certfile'")
        if auth == "EXTERNAL" and not (tls and certfile):
            _refuse("auth=external needs an amqps:// URL and a client certificate (certfile)")
        return cls(
            host=parts.hostname,
            port=port or (5671 if tls else 5672),
            tls=tls,
            vhost=unquote(parts.path.removeprefix("/")) or "/",
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            heartbeat=_heartbeat(options.get("heartbeat")),
            auth=auth,
            cafile=options.get("cafile"),
            capath=options.get("capath"),
            cadata=_cadata(options.get("cadata")),
            certfile=certfile,
            keyfile=keyfile,
            verify=_no_verify(options.get("no_verify_ssl")),
        )

    def _tls_context(self) -> ssl.SSLContext:
        """The client context, built as aiormq builds it from the same options."""
        if self.capath and not Path(self.capath).is_dir():
            # OpenSSL reads the directory only when it verifies: say it now.
            _refuse(f"cannot load the CA certificates (capath {self.capath}): not a directory")
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=self.cafile, capath=self.capath, cadata=self.cadata
            )
        except (OSError, ssl.SSLError) as exc:
            sources = [
                f"{key} {value}"
                for key, value in (("cafile", self.cafile), ("capath", self.capath))
                if value
            ]
            shown = ", ".join(sources) or "cadata"
            _refuse(f"cannot load the CA certificates ({shown}): {_why(exc)}")
        if self.certfile:
            try:
                context.load_cert_chain(self.certfile, self.keyfile, password=_no_password)
            except (OSError, ssl.SSLError) as exc:
                shown = f"certfile {self.certfile}" + (
                    f", keyfile {self.keyfile}" if self.keyfile else ""
                )
                _refuse(f"cannot load the client certificate ({shown}): {_why(exc)}")
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def split_hosts(url: str) -> list[str]:
    """One URL per node of a cluster URL such as ``amqp://u:p@h1:5681,h2:5682,h3/vhost``.

    The nodes share the scheme, credentials, vhost and query; a URL with one host comes back
    as it is. Nothing else is checked here: :func:`endpoints` parses each node's URL.

    Raises:
        UrlError: a host in the list is empty (``h1,,h2``).
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return [url]  # malformed: Endpoint.from_url says how, in its words
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    hosts = hostlist.split(",")
    if len(hosts) == 1 or "#" in url:
        return [url]  # Endpoint.from_url refuses a '#' (urlsplit would cut the URL there)
    if not all(host.strip() for host in hosts):
        _refuse("the URL's host list has an empty host (h1,,h2)")
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}")) for host in hosts]


def join_hosts(urls: list[str]) -> str:
    """One cluster URL from the URLs of its nodes (a repeated ``--amqp-url``, a TOML array).

    Each URL may itself name several hosts; one URL comes back as it is.

    Raises:
        UrlError: there are none, one is not valid (:meth:`Endpoint.from_url`), or they differ
            in more than their host and port (scheme, credentials, vhost or query).
    """
    if not urls:
        _refuse("no broker URL")
    singles = [single for url in urls for single in split_hosts(url)]
    for single in singles:
        Endpoint.from_url(single)  # each is checked whole before they are compared
    if len(urls) == 1:
        return urls[0]
    first = urlsplit(singles[0].strip())
    userinfo, at, _ = first.netloc.rpartition("@")
    hosts = []
    for url in singles:
        parts = urlsplit(url.strip())
        theirs, _, host = parts.netloc.rpartition("@")
        if (parts.scheme, theirs, parts.path, parts.query) != (
            first.scheme,
            userinfo,
            first.path,
            first.query,
        ):
            _refuse(
                "the broker URLs of a cluster may differ only in host and port (not in scheme, "
                "user, password, vhost or options)"
            )
        hosts.append(host)
    return urlunsplit(first._replace(netloc=f"{userinfo}{at}{','.join(hosts)}"))


def endpoints(url: str) -> tuple[Endpoint, ...]:
    """Every node a broker URL names, each parsed and checked by :meth:`Endpoint.from_url`.

    The one parser both connections use: one endpoint for a plain URL, one per node for a
    cluster's (``amqp://u:p@h1:5681,h2:5682/``).

    Raises:
        UrlError: the URL, or the URL of one of its nodes, is not valid.
    """
    return tuple(Endpoint.from_url(single) for single in split_hosts(url))


def _options(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        _refuse("the query string is malformed (expected key=value&key=value)")
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in OPTIONS:
            _refuse(f"unknown option {key!r} (mayhem takes {', '.join(OPTIONS)})")
        if key in options:
            _refuse(f"option {key!r} is given twice")
        if not value.strip():
            _refuse(f"option {key!r} is empty")
        options[key] = value.strip()
    return options


def _heartbeat(value: str | None) -> int:
    if value is None:
        return DEFAULT_HEARTBEAT
    if not value.isdigit() or not 0 <= int(value) <= MAX_SHORT:
        _refuse(f"option 'heartbeat' must be a whole number of seconds from 0 to {MAX_SHORT}")
    return int(value)


def _no_verify(value: str | None) -> bool:
    # aiormq turns verification off for any value but "0" (so "false" would turn it off):
    # only the two unambiguous values are taken.
    if value not in {None, "0", "1"}:
        _refuse("option 'no_verify_ssl' must be 0 or 1")
    return value != "1"


def _cadata(value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _refuse("option 'cadata' must be base64 (of a DER certificate)")


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal, and a daemon would hang.
    msg = "the private key is encrypted; mayhem needs an unencrypted key file"
    raise UrlError(msg)


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
