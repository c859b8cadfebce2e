"""Logging: one JSON object a line for journald and shippers, or text for terminals.

A JSON line carries the human text in ``message`` and, for the lines listed in
:data:`EVENTS`, a stable snake_case name in ``event`` (given as ``extra={"event": ...}``):
tests, alerts and log queries match the name and the fields beside it, never the text, which
may be reworded.

The message id of the message being handled is added to every record from a context variable,
so log lines of a handler, a worker or the store can all be found by id.

A publisher controls the message id and, through a handler, exception texts: in the text
format control characters (newlines, ANSI escapes, NUL) in the id and the message are written
as escapes, so no input can forge a log line or drive a terminal. The JSON format escapes them
by itself. Tracebacks (at DEBUG, or of mayhem's own bugs) stay as they are, several lines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from types import MappingProxyType
from typing import Final

MESSAGE_ID: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "mayhem_message_id", default=None
)
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "message_id", "taskName"}
)


# Every ``event`` a log line may carry, with what it means and the fields logged beside it
# (besides time, level, logger, message and message_id). A unit test checks that each name
# used in mayhem/ is listed here, and each listed name is used.
EVENTS: Final = MappingProxyType(
    {
        "started": "the daemon is up and consuming; metrics_addr (host:port, or null)",
        "shutdown_begins": "a shutdown began; signal (its name, or null after a failed start)",
        "shutdown_step": (
            "a shutdown step ended; step (its stable name), duration (s), and the step's counts "
            "(requeued; in_flight, cancelled, late_requeued)"
        ),
        "shutdown_step_failed": "a shutdown step raised (traceback in exception); step",
        "shutdown_step_timed_out": "a shutdown step passed its time limit; the step goes on",
        "shutdown_complete": (
            "the shutdown ended; duration (s), delivered, acked, requeued, cancelled, duplicates, "
            "dead_lettered"
        ),
        "handlers_cancelled": (
            "the drain stopped waiting and cancelled the handlers still running (their messages "
            "are requeued); why (second_signal or drain_timeout), cancelled"
        ),
        "handler_tasks_left": "the process exits with handlers that ignored their cancellation "
        "still running; count",
        "handler_threads_left": "the process exits with handler threads still running; count",
        "config_reloaded": "SIGHUP applied the configuration; log_level, concurrency",
        "database_outage": "a worker could not reach the database",
        "consumption_paused": "consumption paused for a database outage; requeued",
        "database_still_unavailable": "the database did not answer a probe; retry_in (s)",
        "database_back": "the database answers again and consumption resumed; outage (s)",
        "broker_connection_lost": (
            "the consuming connection was lost; it reconnects with backoff, to a cluster's other "
            "nodes first; broker (the node lost, host:port)"
        ),
        "consuming_again": "the consuming connection is back and consuming; broker (host:port)",
        "consumer_timeout_unknown": "what handler_timeout is checked against (logged at start)",
        "handler_failed": "a handler raised; the message is retried or dead-lettered",
        "rejected_unread": "a body over max_message_bytes, rejected unread (to <queue>.dead)",
        "dead_lettered": "a message was copied to <queue>.dead; reason, attempts",
        "metrics_written": "the final metrics were written to the textfile; path",
        "metrics_not_written": "the metrics textfile could not be written; path",
        "metrics_pushed": "the final metrics were pushed to the Pushgateway",
        "metrics_not_pushed": "the push to the Pushgateway failed (URL and error masked)",
        "http_connections_refused": (
            "the metrics endpoint refuses connections beyond its limit (once a minute at most); "
            "open, refused"
        ),
    }
)

# The longest error text a log line or x-mayhem-error carries.
MAX_TEXT: Final = 1000
# Characters that could forge or garble a log line: C0 and C1 controls (newlines, ESC, NUL),
# the Unicode line separators and the bidirectional overrides; and lone surrogates (JSON's
# "\ud800" decodes to one), which UTF-8 cannot encode: in x-mayhem-error they would make
# every copy of the message unpublishable.
_CONTROL: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_LATIN1: Final = 0xFF
_SHORT_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code <= _LATIN1 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    r"""``text`` with control characters written as escapes (``\n``, ``\x1b``, ``\u2028``)."""
    return _CONTROL.sub(_escape_one, text) if _CONTROL.search(text) else text


def clean_text(text: str, limit: int = MAX_TEXT) -> str:
    """One line of at most ``limit`` characters: whitespace runs become a space, controls escapes.

    A cut text ends in ``…``.
    """
    cut = len(text) > limit
    line = escape_controls(" ".join(text[:limit].split()))
    if len(line) > limit:
        line, cut = line[:limit], True
    return line[: limit - 1] + "…" if cut else line


class _MessageIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "message_id", None) is None:
            record.message_id = MESSAGE_ID.get()
        return True


_NOISY: Final = ("aio_pika", "aiormq", "asyncpg")


class _LibraryTracebacks(logging.Filter):
    """aio-pika, aiormq and asyncpg log connection losses as errors with tracebacks.

    mayhem survives those by design, so they become one-line warnings; the traceback stays
    available at DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(_NOISY) and record.levelno >= logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            if not logging.getLogger().isEnabledFor(logging.DEBUG):
                record.exc_info = None
                record.exc_text = None
        return True


class JSONFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, event, message, message_id, fields.

    ``event`` is there when the call gave one (:data:`EVENTS`); ``message`` is the human text.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event is not None:
            entry["event"] = event
        entry["message"] = record.getMessage()
        message_id = getattr(record, "message_id", None)
        if message_id is not None:
            entry["message_id"] = message_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    r"""``time level logger [message_id] message`` for people at a terminal.

    Control characters in the message id and the message are escaped (``\n``, ``\x1b``).
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(mid)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of text (plus a traceback, if any)."""
        message_id = getattr(record, "message_id", None)
        record.mid = f" [{escape_controls(str(message_id))}]" if message_id else ""
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 -- logging's name
        """The line without its traceback: the message with its control characters escaped."""
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup(log_format: str, level: str) -> None:
    """Send every log record to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_MessageIdFilter())
    handler.addFilter(_LibraryTracebacks())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Change mayhem's log level (also on SIGHUP); libraries stay at WARNING unless DEBUG."""
    logging.getLogger().setLevel(level)
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("aio_pika", "aiormq", "asyncpg", "aiosqlite", "aiohttp.access"):
        logging.getLogger(name).setLevel(max(quiet, logging.getLevelName(level)))
