"""TLS for the tests: a private CA with server and client certificates, and a TLS listener.

The certificates come from the ``openssl`` command line. The listener is opened on the
running RabbitMQ at run time (``rabbitmqctl eval``), on a free loopback port, and closed
afterwards; the broker is never restarted and its plain listener (5672) is untouched:

- ``rabbit_networking:start_ssl_listener`` with ``verify_peer`` and ``fail_if_no_peer_cert``;
- for ``auth=external``: the EXTERNAL mechanism of the bundled ``rabbitmq_auth_mechanism_ssl``
  plugin is registered (its boot step, run by hand; the plugin is not enabled on disk), added
  to ``auth_mechanisms``, and ``ssl_options``/``ssl_cert_login_from`` are set, because the
  mechanism reads them from the broker's environment (it refuses a login as "unsafe" unless
  ``ssl_options`` has ``verify_peer`` and ``fail_if_no_peer_cert``). EXTERNAL is offered only on
  TLS connections that present a certificate, so plain connections see no change.

Every environment value changed is read first and put back when the listener closes.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterator

# rabbit's environment keys the listener and EXTERNAL need, restored afterwards.
_ENV_KEYS = ("ssl_options", "auth_mechanisms", "ssl_cert_login_from")


def openssl(*args: str) -> None:
    """Run the openssl command line; raise with its output if it fails."""
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@attrs.frozen
class Pki:
    """PEM files of a private CA, a server certificate (127.0.0.1) and a client one.

    Attributes:
        ca: the CA's certificate.
        server_cert, server_key: the broker's certificate (for IP 127.0.0.1 and localhost).
        client_cert, client_key: a client certificate whose common name is ``user``.
        other_ca: a second CA that signed none of them (the wrong CA).
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-days", "2"),
        *("-subj", f"/CN=mayhem test {name}", "-keyout", str(key), "-out", str(cert)),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return cert, key


def _issue(folder: Path, name: str, subject: str, extensions: str, ca: tuple[Path, Path]) -> Path:
    key, request, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-subj", subject),
        *("-keyout", str(key), "-out", str(request)),
    )
    openssl(
        *("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1])),
        *("-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext)),
    )
    return cert


def make_pki(folder: Path, client_user: str) -> Pki:
    """Generate the CA, the server and client certificates, and another CA, in ``folder``."""
    ca = _ca(folder, "ca")
    other_ca, _ = _ca(folder, "other-ca")
    server = _issue(
        folder,
        "server",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth\n",
        ca,
    )
    client = _issue(
        folder,
        "client",
        f"/CN={client_user}",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        ca,
    )
    # The broker runs as its own user: it must read the server's files.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
    return Pki(
        ca=ca[0],
        server_cert=server,
        server_key=folder / "server.key",
        client_cert=client,
        client_key=folder / "client.key",
        other_ca=other_ca,
    )


def _eval(expression: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", "eval", expression],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _erlang_string(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextlib.contextmanager
def tls_listener(client_user: str = "guest") -> Iterator[tuple[int, Pki]]:
    """A TLS listener on 127.0.0.1 (verify_peer, client certificate required) and its PKI.

    Yields:
        the port, and the certificates (the client's common name is ``client_user``).
    """
    with tempfile.TemporaryDirectory(prefix="mayhem-tls-") as folder:
        pki = make_pki(Path(folder), client_user)
        port = _free_port()
        options = (
            f"[{{cacertfile, {_erlang_string(pki.ca)}}}, "
            f"{{certfile, {_erlang_string(pki.server_cert)}}}, "
            f"{{keyfile, {_erlang_string(pki.server_key)}}}, "
            "{verify, verify_peer}, {fail_if_no_peer_cert, true}]"
        )
        # One call (each rabbitmqctl start costs a second of CPU): the values, one a line.
        listing = _eval(
            'io:format("~0p~n~0p~n~0p~n~0p~n", ['
            + ", ".join(f"application:get_env(rabbit, {key})" for key in _ENV_KEYS)
            + ", rabbit_registry:lookup_module(auth_mechanism, 'EXTERNAL')])."
        ).splitlines()
        saved = dict(zip(_ENV_KEYS, listing[:3], strict=True))
        registered = listing[3]
        _eval(
            f"ok = application:set_env(rabbit, ssl_options, {options}), "
            "{ok, Mechanisms} = application:get_env(rabbit, auth_mechanisms), "
            "ok = application:set_env(rabbit, auth_mechanisms, "
            "Mechanisms ++ (['EXTERNAL'] -- Mechanisms)), "
            "ok = application:set_env(rabbit, ssl_cert_login_from, common_name), "
            "application:load(rabbitmq_auth_mechanism_ssl), "
            'rabbit_registry:register(auth_mechanism, <<"EXTERNAL">>, '
            "rabbit_auth_mechanism_ssl), "
            f'ok = rabbit_networking:start_ssl_listener({{"127.0.0.1", {port}}}, {options}, 1, 1).'
        )
        try:
            yield port, pki
        finally:
            restore = [
                f"application:set_env(rabbit, {key}, V{i})"
                if value.startswith("{ok,")
                else f"application:unset_env(rabbit, {key})"
                for i, (key, value) in enumerate(saved.items())
            ]
            bindings = [
                f"{{ok, V{i}}} = {value}"
                for i, value in enumerate(saved.values())
                if value.startswith("{ok,")
            ]
            unregister = (
                ['rabbit_registry:unregister(auth_mechanism, <<"EXTERNAL">>)']
                if registered.startswith("{error")
                else []
            )
            _eval(
                ", ".join(
                    [
                        f'rabbit_networking:stop_tcp_listener({{"127.0.0.1", {port}}})',
                        *bindings,
                        *restore,
                        *unregister,
                    ]
                )
                + "."
            )
