"""The edge composition root: :class:`Node` and its CRDT handles.

Owns the wiring of store, zones, mesh, exchange, transport and metrics into
one :class:`Node` (``node``), the live Yjs documents bound to the log
(``docs``), the counter / set / register handles (``handles``) and the
awaitable-or-async-with opener (``opening``).

May import: everything below it (mesh, exchange, transport, store, sync,
codec, zones, keys, log, crdt, clock, metrics, errors).
"""

from syncfw.node.handles import Counter, ORSet, Register
from syncfw.node.node import Node

__all__ = ["Counter", "Node", "ORSet", "Register"]
