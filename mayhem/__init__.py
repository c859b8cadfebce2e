"""mayhem: a RabbitMQ consumer daemon that never loses a message and never applies one twice.

The handler API::

    import mayhem

    async def handle(message: mayhem.Message, ctx: mayhem.Context) -> None:
        await ctx.db.execute("INSERT INTO seen (id) VALUES ($1)", message.message_id)
"""

from mayhem._version import __version__
from mayhem.exceptions import DecodeError, MayhemError, Reject, Retry
from mayhem.message import Context, Message, SyncContext
from mayhem.store import BlockingTransaction, Transaction

__all__ = [
    "BlockingTransaction",
    "Context",
    "DecodeError",
    "MayhemError",
    "Message",
    "Reject",
    "Retry",
    "SyncContext",
    "Transaction",
    "__version__",
]
