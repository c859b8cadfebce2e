"""mayhem's own consuming AMQP 0-9-1 client: lean, for the hot path only.

Why not aio-pika here: on the hot path aio-pika (over aiormq) reads every frame with three
``readexactly`` calls under a lock, passes it through two queues, and creates two tasks and an
``IncomingMessage`` per delivery; that alone costs more CPU per message than mayhem's whole
budget (``bench/RESULTS.md``, ``docs/adr/0001-own-consuming-client.md``).

- :mod:`mayhem.amqp.url`: the broker URL, parsed once (:class:`Endpoint`; a cluster's URL
  names several nodes, one endpoint each: :func:`endpoints`);
- :mod:`mayhem.amqp.framing`: frame layouts and content-header decoding;
- :mod:`mayhem.amqp.delivery`: what is handed on (:class:`Delivery`, :class:`Properties`);
- :mod:`mayhem.amqp.reader`: frames cut from the byte stream, deliveries assembled;
- :mod:`mayhem.amqp.link`: the connection itself (:class:`Link`, :func:`open_link`): the
  handshake, the broker's methods, acks; :func:`open_any` for the first of a cluster's nodes
  that answers.

The dead-letter tools (:mod:`mayhem.dead`) read ``<queue>.dead`` through it too (``basic.get``),
because it decodes hostile properties per message where aio-pika's reader drops the connection.
Everything else on the broker (topology, publishing with confirms) stays on aio-pika, in
:mod:`mayhem.broker`.
"""

from mayhem.amqp.delivery import Delivery, Properties
from mayhem.amqp.framing import decode_content_header
from mayhem.amqp.link import Link, open_any, open_link
from mayhem.amqp.url import Endpoint, endpoints, split_hosts

__all__ = [
    "Delivery",
    "Endpoint",
    "Link",
    "Properties",
    "decode_content_header",
    "endpoints",
    "open_any",
    "open_link",
    "split_hosts",
]
