"""Handler loading by import path, handler_setup, and the demo handler on a real SQLite store."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import sys
import textwrap
import uuid

import pytest

import mayhem
from mayhem.exceptions import ConfigError
from mayhem.handlers import DemoHandler, handler_setup, load_handler
from mayhem.message import Context, Message

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


# -- DemoHandler on SQLite ------------------------------------------------------------------


LOG = logging.LoggerAdapter(logging.getLogger("tests.demo"), {})


def demo_message(data: object, message_id: str = "m-1") -> Message:
    return Message(message_id=message_id, body=json.dumps(data).encode())


def restarts(store) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        return db.execute("SELECT message_id, host, delay FROM restarts").fetchall()


async def test_demo_setup_creates_restarts(store):
    """The demo handler's setup creates the restarts table, and running it twice is fine."""
    handler = DemoHandler(max_delay=0)
    await store.run_setup(handler.setup)
    await store.run_setup(handler.setup)
    assert restarts(store) == []


async def test_demo_records_the_restart(store):
    """A {"host": ...} message inserts one row through the message's transaction."""
    handler = DemoHandler(max_delay=0)
    await store.run_setup(handler.setup)
    async with store.transaction() as tx:
        await handler(demo_message({"host": "h"}), Context(db=tx, log=LOG))
        assert restarts(store) == []  # not committed yet
        assert await tx.claim("q", "m-1") is True
    assert restarts(store) == [("m-1", "h", 0.0)]


async def test_demo_rolls_back_with_the_transaction(store):
    """The demo's row rolls back when the message's transaction does."""
    handler = DemoHandler(max_delay=0)
    await store.run_setup(handler.setup)

    async def failing_worker() -> None:
        async with store.transaction() as tx:
            await handler(demo_message({"host": "h"}), Context(db=tx, log=LOG))
            raise RuntimeError

    with pytest.raises(RuntimeError):
        await failing_worker()
    assert restarts(store) == []


async def test_demo_same_message_twice_fails(store):
    """restarts.message_id is unique: the same message applied twice fails the second time."""
    handler = DemoHandler(max_delay=0)
    await store.run_setup(handler.setup)
    async with store.transaction() as tx:
        await handler(demo_message({"host": "h"}), Context(db=tx, log=LOG))
    with pytest.raises(sqlite3.IntegrityError):
        async with store.transaction() as tx:
            await handler(demo_message({"host": "h"}), Context(db=tx, log=LOG))
    assert len(restarts(store)) == 1


async def test_demo_delay_is_at_most_max_delay(store):
    """With max_delay > 0, the recorded delay lies between 0 and max_delay."""
    handler = DemoHandler(max_delay=0.01)
    await store.run_setup(handler.setup)
    async with store.transaction() as tx:
        await handler(demo_message({"host": "h"}), Context(db=tx, log=LOG))
    [(_, _, delay)] = restarts(store)
    assert 0.0 <= delay <= 0.01


@pytest.mark.parametrize(
    "data", [{}, {"hostname": "h"}, {"host": ""}, {"host": 5}, {"host": None}, ["h"], "h"]
)
async def test_demo_without_host_rejects(store, data):
    """A body without a non-empty string host raises Reject and writes nothing."""
    handler = DemoHandler(max_delay=0)
    await store.run_setup(handler.setup)
    with pytest.raises(mayhem.Reject) as info:
        async with store.transaction() as tx:
            await handler(demo_message(data), Context(db=tx, log=LOG))
    assert "host" in info.value.reason
    assert not isinstance(info.value, mayhem.DecodeError)
    assert restarts(store) == []


async def test_demo_non_json_is_a_decode_error(store):
    """A body that is not JSON raises DecodeError."""
    handler = DemoHandler(max_delay=0)
    async with store.transaction() as tx:
        with pytest.raises(mayhem.DecodeError):
            await handler(Message(message_id="m", body=b"restart h"), Context(db=tx, log=LOG))
