"""Run one message through a store while this process is out of file descriptors.

Usage: ``python out_of_descriptors.py DB_URL``. Prints one line of JSON: how the message
ended (``applied``, ``outage`` or ``failed``, with the error), and whether the store applies
a message again once descriptors are free.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys

from mayhem.exceptions import StoreUnavailable
from mayhem.store import Transaction, open_store

# A temporary table larger than SQLite's page cache: SQLite must open a temporary file.
SQLITE_SPILL = (
    "CREATE TEMP TABLE spill AS WITH RECURSIVE c(x) AS "
    "(SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 200000) SELECT randomblob(100) FROM c"
)


def exhaust() -> list[int]:
    """Lower the soft limit and open descriptors until the next one fails (EMFILE)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    fds: list[int] = []
    try:
        while True:
            fds.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        return fds


async def main(url: str) -> None:
    store = open_store(url, pool_size=2)
    await store.open()
    postgres = not url.startswith("sqlite")
    held, release = asyncio.Event(), asyncio.Event()

    async def hold(tx: Transaction) -> None:
        await tx.execute("SELECT 1")
        held.set()
        await release.wait()

    async def work(tx: Transaction) -> None:
        await tx.execute("SELECT 1" if postgres else SQLITE_SPILL)

    holder = None
    if postgres:
        # The pool's one connection is taken: the next message needs a new one (a socket).
        holder = asyncio.create_task(store.apply("q", "holder", hold))
        await held.wait()
    fds = exhaust()
    result: dict[str, object]
    try:
        applied = await store.apply("q", "m", work)
        result = {"outcome": "applied" if applied else "duplicate"}
    except StoreUnavailable as exc:
        result = {"outcome": "outage", "error": str(exc)}
    except Exception as exc:
        result = {"outcome": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        for fd in fds:
            os.close(fd)
    release.set()
    if holder is not None:
        await holder

    async def plain(tx: Transaction) -> None:
        await tx.execute("SELECT 1")

    result["then"] = await store.apply("q", "m", plain)
    await store.close(5)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
