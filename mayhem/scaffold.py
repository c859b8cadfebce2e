"""``mayhem init NAME``: a handler package, its test and a configuration file to start from.

It writes, in the target directory (the current one by default)::

    NAME/__init__.py
    NAME/handler.py        the handler, run by ``--handler NAME.handler:handle``
    tests/test_handler.py  its tests, in-process with mayhem.testing: no broker needed
    mayhem.toml            every setting, commented, with its help, default and variable

It writes nothing if any of these files exists already.
"""

from __future__ import annotations

import json
import keyword
import sys
import textwrap
from pathlib import Path
from typing import Final

from mayhem.cli import setting_help
from mayhem.config import SETTINGS, Config
from mayhem.exceptions import MayhemError

CONFIG_FILE: Final = "mayhem.toml"

HANDLER: Final = '''\
"""{name}'s handler: mayhem runs it once per message, in one transaction.

Run it with ``mayhem run --config mayhem.toml``.
Test it with ``python -m pytest tests`` (no broker needed).
"""

from __future__ import annotations

import mayhem


async def setup(db: mayhem.Transaction) -> None:
    """Create the table the handler writes to; mayhem runs this once at start."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS orders ("
        " message_id TEXT PRIMARY KEY, order_id TEXT NOT NULL, total INTEGER NOT NULL)"
    )


async def handle(message: mayhem.Message, ctx: mayhem.Context) -> None:
    """Store one order, such as ``{{"id": "A-1", "total": 1200}}``.

    Returning commits the handler's writes together with the message's id, then
    acknowledges the message: a redelivery of the same id is acknowledged without
    running this again. Raising rolls the writes back:

    - ``mayhem.Reject`` (or the ``mayhem.DecodeError`` of ``message.json()``): the
      message goes to the dead-letter queue at once;
    - ``mayhem.Retry`` or any other exception: it is retried later, up to
      ``max_attempts``.
    """
    order = message.json()
    if not isinstance(order, dict) or not isinstance(order.get("id"), str):
        raise mayhem.Reject("an order needs a string 'id'")
    total = order.get("total")
    if type(total) is not int or total < 0:
        raise mayhem.Reject("an order needs a whole 'total' of 0 or more")
    await ctx.db.execute(
        "INSERT INTO orders (message_id, order_id, total) VALUES ($1, $2, $3)",
        message.message_id,
        order["id"],
        total,
    )
    ctx.log.info("order %s stored", order["id"])


handle.setup = setup  # mayhem runs a handler's setup(db) once at start
'''

TEST: Final = '''\
"""Tests of {name}'s handler, run in-process by mayhem's test kit: no broker needed.

Run them with ``python -m pytest tests``. The harness decides each delivery's outcome
as the daemon would (acked, duplicate, retried, dead_lettered, rejected), with the error
as the dead letter would carry it (``outcome.error``). In a plain ``def`` test, the
``mayhem_harness`` fixture gives a harness without ``await``:
``h = mayhem_harness(handle); h.deliver(body, message_id="m-1")``.
"""

from __future__ import annotations

import asyncio
import json

import mayhem.testing

from {name}.handler import handle


def deliver(*messages: tuple[bytes, str]):
    """Deliver (body, message_id) pairs in order to one harness.

    Returns the outcomes, and the orders the handler stored (committed).
    """

    async def run():
        async with mayhem.testing.Harness(handle, db_url="sqlite:///:memory:") as h:
            outcomes = []
            for body, message_id in messages:
                outcomes.append(await h.deliver(body, message_id=message_id))
            return outcomes, await h.fetch("SELECT order_id, total FROM orders")

    return asyncio.run(run())


def order(order_id: str, total: int) -> bytes:
    return json.dumps({{"id": order_id, "total": total}}).encode()


def test_an_order_is_stored_and_acked() -> None:
    (outcome,), orders = deliver((order("A-1", 1200), "message-1"))
    assert outcome.status == "acked"
    assert orders == [{{"order_id": "A-1", "total": 1200}}]


def test_a_redelivered_order_is_applied_once() -> None:
    same = (order("A-1", 1200), "message-1")
    (first, again), orders = deliver(same, same)
    assert first.status == "acked"
    assert again.status == "duplicate"
    assert len(orders) == 1


def test_a_negative_total_is_rejected() -> None:
    (outcome,), orders = deliver((order("A-2", -5), "message-2"))
    assert outcome.status == "rejected"
    assert "total" in outcome.error
    assert orders == []


def test_a_body_that_is_not_json_is_rejected() -> None:
    (outcome,), _ = deliver((b"not json", "message-3"))
    assert outcome.status == "rejected"
    assert outcome.error.startswith("DecodeError")
'''


class ScaffoldError(MayhemError):
    """``mayhem init`` cannot write its files: a bad name, or a file that exists already."""


def check_name(name: str) -> None:
    """Check that ``name`` can be a package of its own.

    Raises:
        ScaffoldError: it is not a Python identifier, is a keyword, or would shadow a module
            of the standard library or mayhem itself.
    """
    if not name.isidentifier() or not name.isascii():
        raise ScaffoldError(f"{name!r} is not a valid package name (letters, digits and _)")
    if keyword.iskeyword(name) or name in sys.stdlib_module_names or name in {"mayhem", "tests"}:
        raise ScaffoldError(f"{name!r} would shadow a module of that name; choose another")


def files(name: str) -> dict[str, str]:
    """The files ``mayhem init NAME`` writes: relative path to text."""
    check_name(name)
    return {
        f"{name}/__init__.py": f'"""{name}: a mayhem handler."""\n',
        f"{name}/handler.py": HANDLER.format(name=name),
        "tests/test_handler.py": TEST.format(name=name),
        CONFIG_FILE: config_file(name),
    }


def init(name: str, directory: Path) -> list[Path]:
    """Write the files of :func:`files` under ``directory``; return their paths.

    Raises:
        ScaffoldError: the name is bad, a file exists already (then nothing is written), or a
            file cannot be written.
    """
    planned = {directory / path: text for path, text in files(name).items()}
    for path in planned:
        if path.exists():
            raise ScaffoldError(f"{path} already exists; nothing was written")
    written: list[Path] = []
    try:
        for path, text in planned.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("x", encoding="utf-8") as out:  # "x": never over a file made meanwhile
                out.write(text)
            written.append(path)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise ScaffoldError(f"cannot write {exc.filename}: {exc.strerror}") from None
    return list(planned)


def config_file(name: str) -> str:
    """A TOML file for ``name``: every setting in the order declared, with its help.

    Each setting's comment comes from its declaration (mayhem.config), as in ``--help``: what
    it does, the values it takes, its default and its variable. The settings of ``name`` (its
    handler, queue, exchange and database) are set; every other line is commented out and
    holds the default, so uncommenting one changes nothing until its value is edited. (A
    computed default is written as the value it comes to here: ``prefetch`` and
    ``retry_delays`` then no longer follow ``concurrency`` and ``max_attempts``.)
    """
    own = {
        "handler": f"{name}.handler:handle",
        "queue": name,
        "exchange": name,
        "db_url": f"sqlite:///{name}.db",
    }
    lines = [
        f"# mayhem's configuration for {name}: mayhem run --config {CONFIG_FILE}",
        "# (publish and dead take --config too). A MAYHEM_* variable or a flag wins over this",
        f"# file; mayhem check-config --config {CONFIG_FILE} shows what comes of it.",
        "",
        "[mayhem]",
    ]
    defaults = Config.load(flags={}, environ={})
    for key, each in SETTINGS.items():
        what = (each.parse.__doc__ or "").strip().rstrip(".")
        text = setting_help(each)
        text += f". Takes {what}." if what else "."
        if each.reloadable:
            text += " SIGHUP applies a new value without a restart."
        lines.append("")
        lines.extend(
            textwrap.wrap(
                text,
                width=88,
                initial_indent="# ",
                subsequent_indent="# ",
                break_on_hyphens=False,
            )
        )
        if key in own:
            lines.append(f"{key} = {_toml(own[key])}")
        else:
            # The real default (a secret's too: it is in mayhem's source), so that the line
            # still works uncommented; a computed one as it comes out here.
            value = each.default if each.default is not None else _effective(defaults, key)
            lines.append(f"# {key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _effective(config: Config, key: str) -> object:
    return config.masked()[key] if key in {"prefetch", "retry_delays"} else getattr(config, key)


def _toml(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(value)  # a JSON string or number is a TOML one
