"""Log formatting: one JSON object a line, or text; the message id from the context variable."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mayhem import logs
from mayhem.logs import EVENTS, MESSAGE_ID, JSONFormatter, TextFormatter

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def setup_logs(monkeypatch, restored_logging):
    """Run logs.setup() writing to a buffer, inside ``with``; logging is put back after."""

    @contextlib.contextmanager
    def run(log_format: str, level: str = "DEBUG") -> Iterator[io.StringIO]:
        buffer = io.StringIO()
        with restored_logging():
            monkeypatch.setattr(sys, "stderr", buffer)
            logs.setup(log_format, level)
            yield buffer

    return run


@contextlib.contextmanager
def message_id(value: str) -> Iterator[None]:
    token = MESSAGE_ID.set(value)
    try:
        yield
    finally:
        MESSAGE_ID.reset(token)


def json_lines(buffer: io.StringIO) -> list[dict[str, object]]:
    text = buffer.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def make_record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("mayhem.worker", logging.INFO, __file__, 1, "n=%d", (3,), None)
    record.__dict__.update(extra)
    return record


def test_json_one_object_per_line(setup_logs):
    """Each record is one line holding a JSON object with time, level, logger and message."""
    with setup_logs("json") as buffer:
        log = logging.getLogger("mayhem.test_logs")
        log.info("acked %d of %s", 3, "q")
        log.warning("two\nlines")
    first, second = json_lines(buffer)
    assert first["level"] == "info"
    assert first["logger"] == "mayhem.test_logs"
    assert first["message"] == "acked 3 of q"
    assert "event" not in first  # no stable name given
    assert TIME.match(str(first["time"]))
    assert "message_id" not in first
    assert "exception" not in first
    assert second["level"] == "warning"
    assert second["message"] == "two\nlines"


def test_json_message_id_from_context(setup_logs):
    """A record logged while MESSAGE_ID is set carries that message_id, and not after."""
    with setup_logs("json") as buffer:
        log = logging.getLogger("mayhem.test_logs")
        with message_id("m-42"):
            log.info("inside")
        log.info("outside")
    inside, outside = json_lines(buffer)
    assert inside["message_id"] == "m-42"
    assert "message_id" not in outside


def test_json_explicit_message_id_wins(setup_logs):
    """A message_id given as an extra field is kept over the context variable's."""
    with setup_logs("json") as buffer, message_id("from-context"):
        logging.getLogger("mayhem.test_logs").info("x", extra={"message_id": "explicit"})
    [entry] = json_lines(buffer)
    assert entry["message_id"] == "explicit"


def test_json_extra_fields(setup_logs):
    """Extra fields are added: scalars as they are, anything else as its repr."""
    with setup_logs("json") as buffer:
        logging.getLogger("mayhem.test_logs").info(
            "done",
            extra={"count": 3, "seconds": 0.5, "ok": True, "queue": "q", "ids": [1, 2], "x": None},
        )
    [entry] = json_lines(buffer)
    assert entry["count"] == 3
    assert entry["seconds"] == 0.5
    assert entry["ok"] is True
    assert entry["queue"] == "q"
    assert entry["ids"] == "[1, 2]"
    assert entry["x"] == "None"
    for internal in ("args", "msg", "levelno", "pathname", "taskName", "mid"):
        assert internal not in entry


def test_json_exception(setup_logs):
    """A logged exception is in the 'exception' field, and the entry stays on one line."""
    with setup_logs("json") as buffer:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("mayhem.test_logs").exception("handler failed")
    [entry] = json_lines(buffer)
    assert entry["level"] == "error"
    assert entry["message"] == "handler failed"
    assert str(entry["exception"]).startswith("Traceback (most recent call last):")
    assert str(entry["exception"]).endswith("ValueError: boom")


def test_json_keeps_non_ascii(setup_logs):
    """Non-ASCII text is written as UTF-8 text, not escaped."""
    with setup_logs("json") as buffer:
        logging.getLogger("mayhem.test_logs").info("host %s", "caf\u00e9")
    assert "caf\u00e9" in buffer.getvalue()
    assert json_lines(buffer)[0]["message"] == "host caf\u00e9"


def test_json_formatter_alone():
    """JSONFormatter formats a record that carries message_id and extra fields."""
    line = JSONFormatter().format(make_record(message_id="m-7", attempt=2))
    entry = json.loads(line)
    assert entry["message"] == "n=3"
    assert entry["logger"] == "mayhem.worker"
    assert entry["message_id"] == "m-7"
    assert entry["attempt"] == 2
    assert "\n" not in line


def test_text_includes_message_id(setup_logs):
    """Text lines show level, logger, [message id] and the message."""
    with setup_logs("text") as buffer:
        log = logging.getLogger("mayhem.test_logs")
        with message_id("m-42"):
            log.info("acked %d", 1)
        log.warning("idle")
    inside, outside = buffer.getvalue().splitlines()
    assert re.search(r" INFO +mayhem\.test_logs \[m-42\] acked 1$", inside)
    assert re.search(r" WARNING mayhem\.test_logs idle$", outside)
    assert "[" not in outside


def test_text_formatter_alone():
    """TextFormatter puts the record's message_id in brackets after the logger name."""
    assert (
        TextFormatter()
        .format(make_record(message_id="m-7"))
        .endswith("INFO    mayhem.worker [m-7] n=3")
    )
    assert TextFormatter().format(make_record()).endswith("INFO    mayhem.worker n=3")


def test_setup_sets_the_level(setup_logs):
    """logs.setup() drops records below the chosen level."""
    with setup_logs("json", "WARNING") as buffer:
        log = logging.getLogger("mayhem.test_logs")
        log.info("hidden")
        log.warning("shown")
    assert [entry["message"] for entry in json_lines(buffer)] == ["shown"]


def test_json_event_is_the_stable_name_beside_the_message(setup_logs):
    """extra={"event": ...} is the line's ``event``; the human text stays in ``message``."""
    with setup_logs("json") as buffer:
        logging.getLogger("mayhem.test_logs").info(
            "shutdown complete in %.2f s", 1.5, extra={"event": "shutdown_complete", "acked": 3}
        )
    [entry] = json_lines(buffer)
    assert entry["event"] == "shutdown_complete"
    assert entry["message"] == "shutdown complete in 1.50 s"
    assert entry["acked"] == 3


def test_text_lines_keep_the_human_text_only(setup_logs):
    """The text format shows the message, not the event name."""
    with setup_logs("text") as buffer:
        logging.getLogger("mayhem.test_logs").info(
            "database back", extra={"event": "database_back"}
        )
    assert buffer.getvalue().rstrip("\n").endswith(" mayhem.test_logs database back")


def _events_in_source() -> dict[str, list[str]]:
    """Every ``extra={"event": "<name>", ...}`` in mayhem/: name -> where."""
    root = Path(logs.__file__).parent
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                if keyword.arg != "extra" or not isinstance(keyword.value, ast.Dict):
                    continue
                for key, value in zip(keyword.value.keys, keyword.value.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "event":
                        assert isinstance(value, ast.Constant), f"{path}:{node.lineno}"
                        where = f"{path.relative_to(root)}:{node.lineno}"
                        found.setdefault(value.value, []).append(where)
    return found


def test_every_event_is_listed_once_and_used():
    """The event names in the code are the ones EVENTS lists, all snake_case."""
    assert sorted(_events_in_source()) == sorted(EVENTS)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", name) for name in EVENTS)


def test_clean_text_escapes_lone_surrogates():
    r"""A lone surrogate (JSON's "\ud800" decodes to one) is escaped: the text encodes as UTF-8.

    x-mayhem-error carries clean_text; with the surrogate left in, no copy of the message
    could be published.
    """
    text = logs.clean_text("name \ud800 and \udfff end")
    assert text == r"name \ud800 and \udfff end"
    assert text.encode("utf-8")
