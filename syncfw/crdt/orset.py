"""Add-wins observed-remove set.

State: ``(adds, removed)`` with ``adds = {element: {tag}}`` and ``removed`` the
set of tags removes have observed. An add is tagged with its op id; a remove
carries the tags its writer observed for the element, so a concurrent add (a
tag the remove did not see) survives: add wins. Elements are msgpack bytes.

Payloads: ``["a", element]`` and ``["r", element, [[origin, seq], ...]]``.
"""

from __future__ import annotations

from typing import Any

from syncfw.crdt.base import CrdtType, OpView, Tag, pack, tags_of, unpack
from syncfw.errors import DecodeError

OrSetState = tuple[dict[bytes, set[Tag]], set[Tag]]


class _OrSet(CrdtType):
    name = "orset"

    def empty(self) -> OrSetState:
        return ({}, set())

    def apply(self, state: OrSetState, op: OpView) -> OrSetState:
        adds, removed = state
        raw = unpack(op.payload, "orset op")
        if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], bytes):
            raise DecodeError("orset op payload must be ['a'|'r', element, ...]")
        element: bytes = raw[1]
        if raw[0] == "a" and len(raw) == 2:
            tag = (op.origin, op.seq)
            if tag not in removed:
                adds.setdefault(element, set()).add(tag)
        elif raw[0] == "r" and len(raw) == 3:
            tags = tags_of(raw[2], "orset remove")
            removed |= tags
            live = adds.get(element)
            if live is not None:
                live -= tags
                if not live:
                    del adds[element]
        else:
            raise DecodeError("orset op payload must be ['a', element] or ['r', element, tags]")
        return state

    def merge(self, a: OrSetState, b: OrSetState) -> OrSetState:
        removed = a[1] | b[1]
        adds: dict[bytes, set[Tag]] = {}
        for side in (a[0], b[0]):
            for element, tags in side.items():
                live = tags - removed
                if live:
                    adds.setdefault(element, set()).update(live)
        return (adds, removed)

    def encode(self, state: OrSetState) -> bytes:
        adds, removed = state
        return pack(
            [
                [[e, sorted(t)] for e, t in sorted(adds.items()) if t],
                sorted(removed),
            ]
        )

    def decode(self, data: bytes) -> OrSetState:
        raw = unpack(data, "orset state")
        if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], list)):
            raise DecodeError("malformed orset state")
        adds: dict[bytes, set[Tag]] = {}
        for row in raw[0]:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], bytes)):
                raise DecodeError("malformed orset state")
            adds[row[0]] = tags_of(row[1], "orset state")
        return (adds, tags_of(raw[1], "orset state"))

    def read(self, state: OrSetState) -> set[bytes]:
        """The present elements, as msgpack bytes."""
        return {e for e, tags in state[0].items() if tags}

    def items(self, state: OrSetState) -> list[Any]:
        """Present elements decoded, in a deterministic order."""
        return [unpack(e, "orset element") for e in sorted(self.read(state))]

    @staticmethod
    def add_payload(element: bytes) -> bytes:
        return pack(["a", element])

    @staticmethod
    def remove_payload(state: OrSetState, element: bytes) -> bytes:
        """A remove of ``element`` observing every tag it has in ``state``."""
        return pack(["r", element, sorted(state[0].get(element, set()))])


ORSET = _OrSet()
