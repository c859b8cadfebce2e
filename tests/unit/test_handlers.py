"""Handler loading by import path, handler_setup, and the demo handler run by the test kit."""

from __future__ import annotations

import json
import sqlite3
import sys
import textwrap
import uuid

import pytest

import mayhem
from mayhem.exceptions import ConfigError
from mayhem.handlers import DemoHandler, handler_setup, load_handler
from mayhem.message import Context, Message
from mayhem.testing import Harness

HANDLER_SOURCE = """
    async def handle(message, ctx):
        return "handled"

    async def setup(db):
        pass

    handle.setup = setup

    class Handlers:
        class Inner:
            @staticmethod
            async def deep(message, ctx):
                return "deep"

        @staticmethod
        async def handle(message, ctx):
            return "nested"

    def plain(message, ctx):
        return "plain"

    NOT_CALLABLE = 42
"""


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """Write a module under a unique name to tmp_path, importable for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def make(source: str) -> str:
        name = f"handlers_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def load_error(path: str) -> str:
    """load_handler(path) must raise a one-line ConfigError naming the path; return it."""
    with pytest.raises(ConfigError) as info:
        load_handler(path)
    message = str(info.value)
    assert message.startswith(f"handler {path!r}: ")
    assert "\n" not in message
    return message


async def test_module_attr(make_module):
    """module:attr returns that very function."""
    name = make_module(HANDLER_SOURCE)
    handler = load_handler(f"{name}:handle")
    assert handler is sys.modules[name].handle
    assert await handler(None, None) == "handled"


async def test_nested_attribute(make_module):
    """module:Class.attr and module:Class.Inner.attr follow the dotted attribute path."""
    name = make_module(HANDLER_SOURCE)
    assert await load_handler(f"{name}:Handlers.handle")(None, None) == "nested"
    assert await load_handler(f"{name}:Handlers.Inner.deep")(None, None) == "deep"


def test_module_in_a_package(tmp_path, monkeypatch):
    """package.module:attr imports a module inside a package."""
    package = f"pkg_{uuid.uuid4().hex[:12]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / package / "work.py").write_text(
        "def handle(message, ctx):\n    return 'pkg'\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert load_handler(f"{package}.work:handle")(None, None) == "pkg"
    finally:
        sys.modules.pop(f"{package}.work", None)
        sys.modules.pop(package, None)


def test_module_from_the_working_directory(tmp_path, monkeypatch):
    """A module in the working directory is importable, as with python -m."""
    name = f"cwd_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("def handle(m, c):\n    return 'cwd'\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in {"", str(tmp_path)}])
    try:
        assert load_handler(f"{name}:handle")(None, None) == "cwd"
    finally:
        sys.modules.pop(name, None)


def test_missing_module():
    """A module that does not exist is a ConfigError naming the handler and the module."""
    message = load_error("no_such_module_for_mayhem:handle")
    assert "cannot import 'no_such_module_for_mayhem'" in message


def test_module_raising_at_import(make_module):
    """A module that raises when imported is a ConfigError with the cause, and is not kept."""
    name = make_module("raise RuntimeError('boom at import')\n")
    message = load_error(f"{name}:handle")
    assert f"cannot import {name!r}" in message
    assert "boom at import" in message
    assert name not in sys.modules


def test_module_with_syntax_error(make_module):
    """A module that does not compile is a ConfigError naming it."""
    name = make_module("def handle(:\n")
    assert f"cannot import {name!r}" in load_error(f"{name}:handle")


def test_module_with_failing_import(make_module):
    """A module whose own import fails is a ConfigError naming the missing dependency."""
    name = make_module("import no_such_dependency_for_mayhem\n")
    assert "no_such_dependency_for_mayhem" in load_error(f"{name}:handle")


@pytest.mark.parametrize("attr", ["nope", "Handlers.nope", "Handlers.Inner.nope.deeper"])
def test_missing_attribute(make_module, attr):
    """An attribute that does not exist is a ConfigError naming the module and the attribute."""
    name = make_module(HANDLER_SOURCE)
    message = load_error(f"{name}:{attr}")
    assert message.endswith(f"{name!r} has no attribute {attr!r}")


def test_not_callable(make_module):
    """An attribute that cannot be called is a ConfigError naming it."""
    name = make_module(HANDLER_SOURCE)
    assert load_error(f"{name}:NOT_CALLABLE").endswith("'NOT_CALLABLE' is not callable")


def test_config_error_is_a_mayhem_error(make_module):
    """A handler that cannot be loaded is a MayhemError the command line turns into exit 2."""
    with pytest.raises(mayhem.MayhemError):
        load_handler("no_such_module_for_mayhem:handle")


# -- handler_setup --------------------------------------------------------------------------


def test_handler_setup_finds_async_setup(make_module):
    """handler_setup returns the handler's async setup attribute."""
    name = make_module(HANDLER_SOURCE)
    handler = load_handler(f"{name}:handle")
    assert handler_setup(handler) is sys.modules[name].setup


def test_handler_setup_none():
    """A handler without setup, or with a plain-def setup, has no setup to run."""

    async def bare(message, ctx):
        return None

    def sync_setup(db):
        return None

    async def with_sync(message, ctx):
        return None

    with_sync.setup = sync_setup  # type: ignore[attr-defined]
    assert handler_setup(bare) is None
    assert handler_setup(with_sync) is None


def test_handler_setup_of_demo_handler():
    """The demo handler's setup is its bound async setup method."""
    handler = DemoHandler(max_delay=0)
    setup = handler_setup(handler)
    assert setup is not None
    assert setup.__self__ is handler  # type: ignore[attr-defined]
    assert setup.__func__ is DemoHandler.setup  # type: ignore[attr-defined]


# -- DemoHandler, run by the test kit as the daemon runs it -----------------------------------


def host(name: object) -> bytes:
    return json.dumps({"host": name}).encode()


async def restarts(h) -> list[tuple[object, ...]]:
    found = await h.fetch("SELECT message_id, host, delay FROM restarts ORDER BY message_id")
    return [(row["message_id"], row["host"], row["delay"]) for row in found]


async def test_demo_setup_creates_restarts(tmp_path):
    """The demo handler's setup creates the restarts table, and running it twice is fine."""
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    for _ in range(2):
        async with Harness(DemoHandler(max_delay=0), db_url=url) as h:
            assert await restarts(h) == []


async def test_demo_records_the_restart_once(db_url):
    """A {"host": ...} message inserts one row with its inbox row; a redelivery is a duplicate.

    On SQLite and PostgreSQL.
    """
    async with Harness(DemoHandler(max_delay=0), db_url=db_url) as h:
        first = await h.deliver(host("h"), message_id="m-1")
        again = await h.deliver(host("h"), message_id="m-1")
        assert (first.status, again.status) == ("acked", "duplicate")
        assert await restarts(h) == [("m-1", "h", 0.0)]
        assert await h.seen("m-1")


async def test_demo_rolls_back_with_the_transaction():
    """The demo's row rolls back when the message's transaction does (a failure after it)."""
    demo = DemoHandler(max_delay=0)

    async def then_fails(message: Message, ctx: Context) -> None:
        await demo(message, ctx)
        raise RuntimeError("after the insert")

    then_fails.setup = demo.setup  # type: ignore[attr-defined]
    async with Harness(then_fails, max_attempts=2) as h:
        outcomes = await h.deliver_until_settled(host("h"), message_id="m-1")
        assert [o.status for o in outcomes] == ["retried", "dead_lettered"]
        assert outcomes[-1].error == "RuntimeError: after the insert"
        assert await restarts(h) == []


async def test_demo_restarts_are_unique_by_message_id():
    """restarts.message_id is unique: the same message's row cannot be inserted twice."""
    async with Harness(DemoHandler(max_delay=0)) as h:
        await h.deliver(host("h"), message_id="m-1")
        with pytest.raises(sqlite3.IntegrityError):
            await h.execute("INSERT INTO restarts VALUES ($1, $2, $3, $4)", "m-1", "h", 0.0, 0.0)
        assert len(await restarts(h)) == 1


async def test_demo_delay_is_at_most_max_delay():
    """With max_delay > 0, the recorded delay lies between 0 and max_delay."""
    async with Harness(DemoHandler(max_delay=0.01)) as h:
        assert (await h.deliver(host("h"))).status == "acked"
        [(_, _, delay)] = await restarts(h)
    assert 0.0 <= delay <= 0.01


@pytest.mark.parametrize(
    "data", [{}, {"hostname": "h"}, {"host": ""}, {"host": 5}, {"host": None}, ["h"], "h"]
)
async def test_demo_without_host_rejects(data):
    """A body without a non-empty string host is rejected (dead-lettered) and writes nothing."""
    async with Harness(DemoHandler(max_delay=0)) as h:
        outcome = await h.deliver(json.dumps(data).encode())
        assert (outcome.status, outcome.reason, outcome.attempt) == ("rejected", "rejected", 1)
        assert outcome.error == "Reject: demo message needs a non-empty string 'host'"
        assert not isinstance(outcome.exception, mayhem.DecodeError)
        assert await restarts(h) == []


async def test_demo_non_json_is_a_decode_error():
    """A body that is not JSON is rejected as a DecodeError."""
    async with Harness(DemoHandler(max_delay=0)) as h:
        outcome = await h.deliver(b"restart h")
    assert (outcome.status, outcome.reason) == ("rejected", "rejected")
    assert isinstance(outcome.exception, mayhem.DecodeError)
    assert outcome.error.startswith("DecodeError: body is not valid JSON")
