"""Last-writer-wins register (and, key by key, map).

State: ``None`` or ``(hlc, origin, payload)``. The write with the greatest
``(hlc, origin)`` wins; payload bytes break the (impossible in a well-formed
log) tie so the rule is a total order. An empty payload is a tombstone
(a delete): msgpack never encodes a value as zero bytes.

:func:`lww_wins` is the rule, written once: every replica (the SQLite store's
planner, its guarded SQL upsert, the in-memory replica) decides with it or,
for SQL, with a statement a property test proves agrees with it.
"""

from __future__ import annotations

from typing import Any

from syncfw.crdt.base import CrdtType, OpView, pack, unpack
from syncfw.errors import DecodeError

TOMBSTONE = b""

LwwState = tuple[int, str, bytes] | None
LwwWrite = tuple[int, str, bytes]
"""``(hlc, origin, payload)`` of one lww write."""


def lww_wins(candidate: LwwWrite, current: LwwState) -> bool:
    """True if ``candidate`` replaces ``current`` under last-writer-wins.

    The greatest ``(hlc, origin, payload)`` wins: hlc first, then origin
    (compared by code point, which is UTF-8 byte order, as SQLite compares
    TEXT), then payload bytes. A total order, so the result never depends on
    arrival order.
    """
    return current is None or candidate > current


class _Lww(CrdtType):
    name = "lww"

    def empty(self) -> LwwState:
        return None

    def apply(self, state: LwwState, op: OpView) -> LwwState:
        cand = (op.hlc, op.origin, op.payload)
        return cand if lww_wins(cand, state) else state

    def merge(self, a: LwwState, b: LwwState) -> LwwState:
        if a is None:
            return b
        if b is None:
            return a
        return b if lww_wins(b, a) else a

    def encode(self, state: LwwState) -> bytes:
        return pack(None if state is None else list(state))

    def decode(self, data: bytes) -> LwwState:
        raw = unpack(data, "lww state")
        if raw is None:
            return None
        try:
            hlc, origin, payload = raw
        except (TypeError, ValueError):
            raise DecodeError("malformed lww state") from None
        if not (isinstance(hlc, int) and isinstance(origin, str) and isinstance(payload, bytes)):
            raise DecodeError("malformed lww state")
        return (hlc, origin, payload)

    def read(self, state: LwwState) -> bytes | None:
        """The winning payload (msgpack bytes), or None when absent or deleted."""
        if state is None or state[2] == TOMBSTONE:
            return None
        return state[2]

    @staticmethod
    def winner(state: LwwState) -> tuple[int, str] | None:
        """``(hlc, origin)`` of the winning write, if any."""
        return None if state is None else (state[0], state[1])

    def value(self, state: LwwState) -> Any:
        """Decoded winning value, or None."""
        payload = self.read(state)
        return None if payload is None else unpack(payload, "lww value")


LWW = _Lww()
