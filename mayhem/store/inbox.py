"""The inbox: its schema, its SQL, and what a message id may hold.

Both backends use PostgreSQL's ``$1`` placeholders (SQLite rewrites them as ``?1``).
"""

from __future__ import annotations

from typing import Final

from mayhem.exceptions import DecodeError

SCHEMA_VERSION: Final = 1
INBOX_TABLE: Final = "mayhem_inbox"
# The advisory lock that serializes schema changes of daemons starting together.
SCHEMA_LOCK: Final = 0x6D61796865
SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS mayhem_schema (version INTEGER NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (
        queue TEXT NOT NULL,
        message_id TEXT NOT NULL,
        processed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (queue, message_id)
    )""",
    f"CREATE INDEX IF NOT EXISTS {INBOX_TABLE}_processed_at ON {INBOX_TABLE} (processed_at)",
)
SEEN: Final = f"SELECT 1 FROM {INBOX_TABLE} WHERE queue = $1 AND message_id = $2"
# With literals in place of the {} for the PostgreSQL claim sent with its BEGIN, $n otherwise.
CLAIM_TEXT: Final = (
    f"INSERT INTO {INBOX_TABLE} (queue, message_id, processed_at) VALUES ({{}}, {{}}, {{}}) "
    "ON CONFLICT DO NOTHING"
)
CLAIM: Final = CLAIM_TEXT.format("$1", "$2", "$3")
PRUNE: Final = f"DELETE FROM {INBOX_TABLE} WHERE processed_at < $1 RETURNING 1"


def check_message_id(message_id: str) -> None:
    """Refuse an id the inbox cannot keep the same on both backends: one with a NUL.

    PostgreSQL's text cannot hold U+0000 at all, and SQLite would keep it; so that a
    message means the same on either backend, such an id is refused on both, before
    anything runs. The message is dead-lettered (``rejected``), never retried: it can
    never be claimed.

    Raises:
        DecodeError: the id holds a NUL character.
    """
    if "\0" in message_id:
        raise DecodeError(
            "message_id contains a NUL character, which the inbox cannot store: rejected"
        )
