"""Fixtures for unit tests: a real SQLite store in tmp_path, and logging put back as it was."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest

from mayhem.store.sqlite import SQLiteStore


@pytest.fixture
async def store(tmp_path):
    """An open SQLiteStore on a file of this test's own; closed afterwards."""
    sqlite = SQLiteStore(tmp_path / "db" / "mayhem.db")
    await sqlite.open()
    try:
        yield sqlite
    finally:
        await sqlite.close(5.0)


@pytest.fixture
def restored_logging():
    """A context manager for the test body: the root handlers and logger levels are put back.

    ``logs.setup()`` replaces the root logger's handlers, pytest's among them; this undoes it
    inside the same test phase, so pytest's own handlers are not lost.
    """

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        root = logging.getLogger()
        handlers, root_level = list(root.handlers), root.level
        levels = {
            name: logger.level
            for name, logger in logging.root.manager.loggerDict.items()
            if isinstance(logger, logging.Logger)
        }
        try:
            yield
        finally:
            for handler in list(root.handlers):
                root.removeHandler(handler)
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(root_level)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)

    return restore
