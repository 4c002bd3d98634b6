"""CRDT types as pure code: op application and state merge rules.

Owns: the op kinds (``lww``, ``counter``, ``orset``, ``mvreg``, ``ydoc``), how an
op's payload changes a state, how two states merge, and the byte encoding of
states. May import: the standard library, msgpack, pycrdt. Knows nothing of
SQLite, asyncio, the log or the network.

Laws every type keeps (property-tested in ``tests/test_crdt_laws.py``):
``merge`` is commutative, associative and idempotent; applying a set of ops in
any order that keeps each origin's seq order, with duplicates, gives the same
state; ``apply(empty, op)`` merged with a state equals ``apply(state, op)``.
"""

from syncfw.crdt.base import CrdtType, OpView
from syncfw.crdt.counter import COUNTER
from syncfw.crdt.lww import LWW, lww_wins
from syncfw.crdt.mvreg import MVREG
from syncfw.crdt.orset import ORSET
from syncfw.crdt.ydoc import YDOC

KINDS: dict[str, CrdtType] = {t.name: t for t in (LWW, COUNTER, ORSET, MVREG, YDOC)}
"""Every CRDT type, by op kind."""

__all__ = ["COUNTER", "KINDS", "LWW", "MVREG", "ORSET", "YDOC", "CrdtType", "OpView", "lww_wins"]
