"""The final metrics at shutdown: to node_exporter's textfile collector and/or a Pushgateway.

Only mayhem's own metrics (:attr:`Metrics.own <mayhem.metrics.Metrics.own>`) leave the
process: node_exporter and the Pushgateway export process_* metrics of their own, and a second
copy would collide with them.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from prometheus_client import generate_latest
from prometheus_client.exposition import basic_auth_handler, default_handler, push_to_gateway

from mayhem.redact import mask_url, redact, url_secrets

if TYPE_CHECKING:
    from collections.abc import Callable

    from mayhem.metrics import Metrics, OwnMetrics

log = logging.getLogger(__name__)

# The metrics textfile's mode before the umask: never readable by others (see _write_textfile).
TEXTFILE_MODE: Final = 0o640


def flush_metrics(
    metrics: Metrics,
    textfile: str | None,
    pushgateway: str | None,
    job: str,
    grouping: dict[str, str] | None = None,
) -> None:
    """Write the final values to a textfile and/or a Pushgateway; log and go on on failure.

    Blocking (file and HTTP I/O): call it in a thread.

    Args:
        metrics: whose own families (``mayhem_*``) are written.
        textfile: a path for node_exporter's textfile collector, written atomically.
        pushgateway: the Pushgateway's URL.
        job: the Pushgateway job name.
        grouping: the Pushgateway grouping key, so that daemons do not overwrite each
            other's final values.
    """
    # Only mayhem's own metrics leave the process (see the module doc).
    if textfile:
        try:
            _write_textfile(textfile, metrics.own)
        except OSError as exc:
            log.warning(
                "metrics textfile %s not written: %s",
                textfile,
                exc,
                extra={"event": "metrics_not_written", "path": textfile},
            )
        else:
            log.info(
                "metrics written to %s",
                textfile,
                extra={"event": "metrics_written", "path": textfile},
            )
    if pushgateway:
        shown = mask_url(pushgateway)
        try:
            _push(pushgateway, job, metrics.own, grouping)
        except Exception as exc:
            # One line without a traceback: an error about the URL (e.g. http.client's
            # InvalidURL) may quote it, password and all.
            error = redact(f"{type(exc).__name__}: {exc}", url_secrets(pushgateway))
            log.warning(
                "metrics not pushed to %s: %s", shown, error, extra={"event": "metrics_not_pushed"}
            )
        else:
            log.info("metrics pushed to %s", shown, extra={"event": "metrics_pushed"})


def _push(url: str, job: str, registry: OwnMetrics, grouping: dict[str, str] | None) -> None:
    """PUT the metrics to the Pushgateway at ``url``, with the URL's user and password if any.

    urllib does not take credentials from a URL (it reads ``user:password@host`` as a host
    and a port), so they are taken out of it and sent as HTTP Basic authentication.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    # The same rule as mask_url: the credentials run up to the last '@'.
    userinfo, at, hostpart = rest.rpartition("@")
    gateway = f"{scheme}://{hostpart}"
    handler: Callable[..., Callable[[], None]] = default_handler
    if at:
        user, _, password = userinfo.partition(":")

        def handler(**request: Any) -> Callable[[], None]:  # noqa: ANN401 -- urllib's arguments
            return basic_auth_handler(**request, username=unquote(user), password=unquote(password))

    push_to_gateway(
        gateway, job=job, registry=registry, grouping_key=grouping, timeout=5, handler=handler
    )


def _write_textfile(path: str, registry: OwnMetrics) -> None:
    """Write the metrics to ``path`` atomically, readable by its owner and at most its group.

    The file is created with mode 0640 less the process umask: 0600 under UMask=0077 (the
    systemd units' default), 0640 under 0027 or 0022; never readable by others. Its group is
    the process's, or the directory's when the directory is setgid, which is how a group
    such as node_exporter's is given read access.
    """
    # A temporary file beside the target, renamed over it, so that node_exporter never reads
    # half a file; its name does not end in .prom, so node_exporter never reads it at all.
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.unlink(missing_ok=True)  # left by a crash of an earlier process of this pid
    data = generate_latest(registry)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, TEXTFILE_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
