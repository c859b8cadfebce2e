"""The database: the inbox that makes effects exactly-once, on SQLite or PostgreSQL.

- :mod:`mayhem.store.api`: the handler's :class:`Transaction` and the :class:`Store` contract.
- :mod:`mayhem.store.inbox`: the inbox table, its SQL, and which message ids it keeps.
- :mod:`mayhem.store.sqlite` and :mod:`mayhem.store.group_commit`: SQLite (aiosqlite).
- :mod:`mayhem.store.postgres`: PostgreSQL (asyncpg).

:func:`open_store` imports the backend the URL names when it is called, so ``import mayhem``
(a handler module, a test) loads no database driver.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from mayhem.exceptions import ConfigError
from mayhem.store.api import BlockingTransaction, Row, Store, Transaction

__all__ = ["BlockingTransaction", "Row", "Store", "Transaction", "open_store", "sqlite_path"]


def open_store(db_url: str, *, pool_size: int) -> Store:
    """Pick the backend that ``db_url`` names (without connecting).

    Args:
        db_url: ``sqlite:///path`` or ``postgresql://...``.
        pool_size: PostgreSQL's connections; SQLite has one writer and one reader.

    Raises:
        ConfigError: the URL names no supported database.
    """
    scheme = urlsplit(db_url).scheme
    if scheme == "sqlite":
        from mayhem.store.sqlite import SQLiteStore  # noqa: PLC0415 -- the driver on demand

        return SQLiteStore(sqlite_path(db_url))
    if scheme in {"postgresql", "postgres"}:
        from mayhem.store.postgres import PostgresStore  # noqa: PLC0415 -- the driver on demand

        return PostgresStore(db_url, pool_size=pool_size)
    raise ConfigError(f"db_url: unsupported database {scheme!r}")


def sqlite_path(db_url: str) -> Path:
    """``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db`` not."""
    return Path(urlsplit(db_url).path[1:])
