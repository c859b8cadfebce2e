"""The one broker-URL parser (mayhem.amqp.url.Endpoint) and the configuration errors it gives.

Both broker connections take their settings from it: every option it accepts is one aio-pika
(aiormq) reads with the same name and meaning; anything else is a configuration error (exit
2, one line, no traceback, no password).
"""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path

import pytest
from tls_testing import openssl

from mayhem.amqp.url import Endpoint, UrlError
from mayhem.cli import EXIT_USAGE, main


@pytest.fixture(autouse=True)
def no_mayhem_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MAYHEM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, Path]:
    """A self-signed certificate, its key, the key encrypted, and a file that is not PEM."""
    folder = tmp_path_factory.mktemp("pem")
    key, cert = folder / "key.pem", folder / "cert.pem"
    openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-days", "1", "-subj", "/CN=mayhem test", "-keyout", str(key)),
        *("-out", str(cert)),
    )
    encrypted = folder / "encrypted.pem"
    openssl("pkey", "-in", str(key), "-aes256", "-passout", "pass:x", "-out", str(encrypted))
    garbage = folder / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {"key": key, "cert": cert, "encrypted": encrypted, "garbage": garbage}


def _fields(endpoint: Endpoint) -> tuple[object, ...]:
    return (
        endpoint.host,
        endpoint.port,
        endpoint.tls,
        endpoint.vhost,
        endpoint.username,
        endpoint.password,
        endpoint.heartbeat,
        endpoint.auth,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # host, port, tls, vhost, username, password, heartbeat, auth
        ("amqp://h", ("h", 5672, False, "/", "guest", "guest", 60, "PLAIN")),
        ("amqp://h/", ("h", 5672, False, "/", "guest", "guest", 60, "PLAIN")),
        ("amqps://h", ("h", 5671, True, "/", "guest", "guest", 60, "PLAIN")),
        ("amqps://h:5999/v", ("h", 5999, True, "v", "guest", "guest", 60, "PLAIN")),
        ("amqp://u:p@h:1234/%2F", ("h", 1234, False, "/", "u", "p", 60, "PLAIN")),
        (
            "amqp://us%40er:p%3Aw%2Fd%23@h/my%2Fvhost?heartbeat=5",
            ("h", 5672, False, "my/vhost", "us@er", "p:w/d#", 5, "PLAIN"),
        ),
        ("amqp://h/?heartbeat=0", ("h", 5672, False, "/", "guest", "guest", 0, "PLAIN")),
        ("amqp://h/?heartbeat=65535", ("h", 5672, False, "/", "guest", "guest", 65535, "PLAIN")),
        ("amqp://h/?auth=PLAIN", ("h", 5672, False, "/", "guest", "guest", 60, "PLAIN")),
    ],
)
def test_endpoint_reads_the_url_as_aio_pika_does(url: str, expected: tuple[object, ...]):
    """guest/guest, 5672 (5671 for amqps), vhost "/"; user, password, vhost percent-decoded."""
    assert _fields(Endpoint.from_url(url)) == expected


def test_tls_options_make_the_context_both_connections_use(pem):
    """cafile, certfile/keyfile, cadata, no_verify_ssl and auth=external, as aiormq reads them.

    The context verifies by default (host name too), trusts the CA given, presents the
    client certificate; ``no_verify_ssl=1`` turns verification off, as in aiormq.
    """
    cert, key = pem["cert"], pem["key"]
    url = f"amqps://h/?cafile={cert}&certfile={cert}&keyfile={key}&auth=external"
    endpoint = Endpoint.from_url(url)
    assert (endpoint.auth, endpoint.cafile, endpoint.certfile, endpoint.keyfile) == (
        "EXTERNAL",
        str(cert),
        str(cert),
        str(key),
    )
    context = endpoint.ssl_context
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert [ca["subject"] for ca in context.get_ca_certs()] == [((("commonName", "mayhem test"),),)]

    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    cadata = base64.b64encode(der).decode().replace("+", "%2B").replace("/", "%2F")
    by_data = Endpoint.from_url(f"amqps://h/?cadata={cadata}").ssl_context
    assert by_data is not None
    assert len(by_data.get_ca_certs()) == 1

    unverified = Endpoint.from_url(f"amqps://h/?cafile={cert}&no_verify_ssl=1").ssl_context
    assert unverified is not None
    assert unverified.verify_mode == ssl.CERT_NONE
    assert not unverified.check_hostname
    assert Endpoint.from_url("amqp://h/").ssl_context is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://h/", "the scheme must be amqp:// or amqps://"),
        ("amqp:///", "the URL has no host"),
        ("amqp://h:0/", "the port must be a number from 1 to 65535"),
        ("amqp://h:65536/", "the port must be a number from 1 to 65535"),
        ("amqp://h:port/", "the port must be a number from 1 to 65535"),
        ("amqp://u:pa#ss@h/", "the URL has a '#'"),
        ("amqp://h/?heartbeat=-1", "option 'heartbeat' must be a whole number"),
        ("amqp://h/?heartbeat=65536", "option 'heartbeat' must be a whole number"),
        ("amqp://h/?heartbeat=soon", "option 'heartbeat' must be a whole number"),
        ("amqp://h/?heartbeat=1.5", "option 'heartbeat' must be a whole number"),
        ("amqp://h/?heartbeat=", "option 'heartbeat' is empty"),
        ("amqp://h/?heartbeat=5&heartbeat=6", "option 'heartbeat' is given twice"),
        ("amqp://h/?heartbeat", "the query string is malformed"),
        ("amqp://h/?hearbeat=5", "unknown option 'hearbeat'"),
        ("amqp://h/?name=x", "unknown option 'name'"),
        ("amqp://h/?reconnect_interval=1", "unknown option 'reconnect_interval'"),
        ("amqp://h/?auth=amqplain", "option 'auth' must be plain or external"),
        ("amqp://h/?auth=external", "auth=external needs an amqps:// URL"),
        ("amqps://h/?auth=external", "auth=external needs an amqps:// URL"),
        ("amqp://h/?cafile=/ca.pem", "option 'cafile' needs an amqps:// URL"),
        ("amqp://h/?no_verify_ssl=1", "option 'no_verify_ssl' needs an amqps:// URL"),
        # aiormq would turn verification OFF for "false": only 0 and 1 are taken.
        ("amqps://h/?no_verify_ssl=false", "option 'no_verify_ssl' must be 0 or 1"),
        ("amqps://h/?no_verify_ssl=yes", "option 'no_verify_ssl' must be 0 or 1"),
        ("amqps://h/?keyfile=/k.pem", "option 'keyfile' needs 'certfile'"),
        ("amqps://h/?cadata=***", "option 'cadata' must be base64"),
        ("amqps://h/?cafile=/no/such/ca.pem", "cannot load the CA certificates (cafile /no/such"),
        ("amqps://h/?capath=/no/such/dir", "cannot load the CA certificates (capath /no/such"),
        ("amqps://h/?certfile=/no/such.pem", "cannot load the client certificate (certfile /no"),
    ],
)
def test_a_bad_url_is_refused_with_the_reason(url: str, why: str):
    """Each malformed URL, unknown option or bad value is a UrlError that says which."""
    with pytest.raises(UrlError) as raised:
        Endpoint.from_url(url)
    assert str(raised.value).startswith(why)


@pytest.mark.parametrize(
    ("option", "why"),
    [
        ("cafile={garbage}", "cannot load the CA certificates (cafile "),
        ("certfile={garbage}", "cannot load the client certificate (certfile "),
        ("certfile={cert}&keyfile={garbage}", "cannot load the client certificate (certfile "),
        ("certfile={cert}&keyfile={encrypted}", "the private key is encrypted"),
    ],
)
def test_a_tls_file_that_is_not_what_it_should_be_is_refused(pem, option: str, why: str):
    """A file that is not PEM, or a key that needs a password: refused at once, never a prompt.

    OpenSSL would ask for the password on the terminal, and a daemon would hang there.
    """
    with pytest.raises(UrlError, match="^" + why.replace("(", r"\(")):
        Endpoint.from_url("amqps://h/?" + option.format(**{k: str(v) for k, v in pem.items()}))


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:secret@h/?heartbeat=-1",
        "amqp://u:secret@h/?heartbeat=99999",
        "amqp://u:secret@h/?heartbeat=x",
        "amqp://u:secret@h/?frame_max=1",
        "amqp://u:secret@h:99999/",
        "amqp://u:sec#ret@h/",
        "amqps://u:secret@h/?cafile=/no/such/ca.pem",
    ],
)
def test_a_bad_amqp_url_exits_2_with_one_line(capsys, url: str):
    """``mayhem run`` with a bad URL: exit 2, one line with the reason, no password, no trace."""
    assert main(["run", "--amqp-url", url]) == EXIT_USAGE
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith("mayhem: configuration error: amqp_url must be ")
    assert "(from --amqp-url): " in line
    assert "secret" not in line
    assert "ret@" not in line
    assert "Traceback" not in captured.err
