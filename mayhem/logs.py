"""Logging: one JSON object a line for journald and shippers, or text for terminals.

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
from typing import Final

MESSAGE_ID: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "mayhem_message_id", default=None
)
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "message_id", "taskName"}
)


# The longest error text a log line or x-mayhem-error carries.
MAX_TEXT: Final = 1000
# Characters that could forge or garble a log line: C0 and C1 controls (newlines, ESC, NUL),
# the Unicode line separators and the bidirectional overrides.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
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
    """Formats a record as one JSON object: time, level, logger, event, message_id, fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
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
    r"""``time level logger [message_id] event`` for people at a terminal.

    Control characters in the message id and the event are escaped (``\n``, ``\x1b``).
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(mid)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of text (plus a traceback, if any)."""
        message_id = getattr(record, "message_id", None)
        record.mid = f" [{escape_controls(str(message_id))}]" if message_id else ""
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 -- logging's name
        """The line without its traceback: the event with its control characters escaped."""
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
