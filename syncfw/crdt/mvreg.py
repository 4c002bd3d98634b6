"""Multi-value register: concurrent writes are all kept until one write sees them.

State: ``(entries, superseded)`` with ``entries = {tag: (hlc, payload)}``. A
write carries the tags it observed (the values it replaces); a concurrent
write, not observed, survives beside it. ``read`` gives every surviving value,
oldest first.

Payload: ``[value, [[origin, seq], ...]]``.
"""

from __future__ import annotations

from typing import Any

from syncfw.crdt.base import CrdtType, OpView, Tag, is_u63, pack, tags_of, unpack
from syncfw.errors import DecodeError

MvState = tuple[dict[Tag, tuple[int, bytes]], set[Tag]]


class _MvReg(CrdtType):
    name = "mvreg"

    def empty(self) -> MvState:
        return ({}, set())

    def apply(self, state: MvState, op: OpView) -> MvState:
        entries, superseded = state
        raw = unpack(op.payload, "mvreg op")
        if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], bytes)):
            raise DecodeError("mvreg op payload must be [value, observed tags]")
        ctx = tags_of(raw[1], "mvreg")
        superseded |= ctx
        for tag in ctx:
            entries.pop(tag, None)
        tag = (op.origin, op.seq)
        if tag not in superseded:
            entries[tag] = (op.hlc, raw[0])
        return state

    def merge(self, a: MvState, b: MvState) -> MvState:
        superseded = a[1] | b[1]
        entries = {t: v for side in (a[0], b[0]) for t, v in side.items() if t not in superseded}
        return (entries, superseded)

    def encode(self, state: MvState) -> bytes:
        entries, superseded = state
        return pack(
            [[[t[0], t[1], h, v] for t, (h, v) in sorted(entries.items())], sorted(superseded)]
        )

    def decode(self, data: bytes) -> MvState:
        raw = unpack(data, "mvreg state")
        if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], list)):
            raise DecodeError("malformed mvreg state")
        entries: dict[Tag, tuple[int, bytes]] = {}
        for row in raw[0]:
            if not (isinstance(row, list) and len(row) == 4):
                raise DecodeError("malformed mvreg state")
            o, s, h, v = row
            if not (isinstance(o, str) and is_u63(s) and is_u63(h) and isinstance(v, bytes)):
                raise DecodeError("malformed mvreg state")
            entries[(o, s)] = (h, v)
        return (entries, tags_of(raw[1], "mvreg state"))

    def read(self, state: MvState) -> list[bytes]:
        """Surviving payloads, ordered by (hlc, tag)."""
        return [v for _, (_, v) in sorted(state[0].items(), key=lambda kv: (kv[1][0], kv[0]))]

    def values(self, state: MvState) -> list[Any]:
        return [unpack(v, "mvreg value") for v in self.read(state)]

    @staticmethod
    def write_payload(state: MvState, value: bytes) -> bytes:
        """A write of ``value`` that supersedes every value visible in ``state``."""
        return pack([value, sorted(state[0])])


MVREG = _MvReg()
