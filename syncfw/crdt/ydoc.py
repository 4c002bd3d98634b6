"""Yjs documents (pycrdt): an op's payload is one Yjs update, format v1.

State: the merge of every update applied (bytes, Yjs update format v1), kept
with ``pycrdt.merge_updates`` and never re-encoded through a document: a
document leaves out structs and deletions still waiting for their
dependencies (an edit of one origin built on another origin's op not yet
applied here), and re-encoding would lose them for good. :func:`canonical`
gives comparable bytes for digests.

Invariants:

1. Every update this module accepts is checked by :func:`check_update` first:
   it must read as a Yjs **v1** update with nothing left over, walked here
   byte by byte before yrs sees it, and then decode in yrs too. yrs reads a
   v2 update as v1 without complaint (a v2 rich-text update read as v1 became
   a delete set that wiped another client's text), so v2 is refused, never
   guessed at: pycrdt has no v2 decoder to convert with.
2. No count read from an update is trusted before the bytes behind it are
   there: the walk fails at the first count that runs past the end, so a
   4-byte ``ff ff ff 7f`` costs nothing (yrs alone allocated ~0.5 GB for it).
3. Merging is order-free (``merge_updates`` keeps structs still waiting for
   their dependencies), so a stored state never loses content; applying
   updates to a ``pycrdt.Doc`` is not, which is why the live documents of
   :mod:`syncfw.node.docs` are fed merged state or each origin's updates in
   that origin's order (yrs does not recover from an out-of-order set:
   measured while building this, a shuffled set left a document at 125 of
   its 295 characters). Merging a batch first is ~9x faster than applying
   updates one by one, hence :meth:`apply_many`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pycrdt

from syncfw.crdt.base import CrdtType, OpView
from syncfw.errors import DecodeError

__all__ = ["EMPTY_UPDATE", "YDOC", "canonical", "check_update", "digest_form", "merge"]

EMPTY_UPDATE = b"\x00\x00"
"""The v1 update of an empty document (no structs, no deletions)."""

V1_ONLY = (
    "syncfw takes Yjs update format v1 only (Y.encodeStateAsUpdate, the 'update' event); "
    "v2 updates (encodeStateAsUpdateV2, 'updateV2') are refused"
)

_MAX_DEPTH = 128  # nesting of Any values (objects in arrays in objects...)


class _Reader:
    """A lib0 decoder over one update that fails, never over-reads."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)

    def fail(self, what: str) -> DecodeError:
        return DecodeError(f"not a Yjs v1 update: {what} at byte {self.pos} of {self.end} ({V1_ONLY})")

    def byte(self) -> int:
        if self.pos >= self.end:
            raise self.fail("truncated")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def uint(self) -> int:
        buf, pos, end = self.buf, self.pos, self.end
        n = shift = 0
        while pos < end:
            b = buf[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                self.pos = pos
                return n
            shift += 7
            if shift > 63:
                self.pos = pos
                raise self.fail("integer out of range")
        self.pos = pos
        raise self.fail("truncated")

    def count(self, what: str) -> int:
        """A count of items that take at least one byte each (invariant 2)."""
        n = self.uint()
        if n > self.end - self.pos:
            raise self.fail(f"impossible {what} count {n}")
        return n

    def varint(self) -> None:
        b = self.byte()
        while b & 0x80:
            b = self.byte()

    def skip(self, n: int) -> None:
        if n > self.end - self.pos:
            raise self.fail("truncated")
        self.pos += n

    def bytes_(self) -> None:
        self.skip(self.uint())

    def any(self, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise self.fail("values nested too deep")
        tag = self.byte()
        if tag in (127, 126, 121, 120):  # undefined, null, false, true
            return
        if tag == 125:
            self.varint()
        elif tag == 124:
            self.skip(4)
        elif tag in (123, 122):  # float64, bigint64
            self.skip(8)
        elif tag in (119, 116):  # string, bytes
            self.bytes_()
        elif tag == 118:
            for _ in range(self.count("object entry")):
                self.bytes_()
                self.any(depth + 1)
        elif tag == 117:
            for _ in range(self.count("array entry")):
                self.any(depth + 1)
        else:
            raise self.fail(f"unknown value tag {tag}")

    def content(self, ref: int) -> None:
        if ref in (1,):  # deleted: a length
            self.uint()
        elif ref == 2:  # JSON: strings
            for _ in range(self.count("JSON entry")):
                self.bytes_()
        elif ref in (3, 4, 5):  # binary, string, embed (JSON text)
            self.bytes_()
        elif ref == 6:  # format: key, JSON value
            self.bytes_()
            self.bytes_()
        elif ref == 7:  # type: its ref, and a node name for XML elements and hooks
            type_ref = self.uint()
            if type_ref in (3, 5):
                self.bytes_()
            elif type_ref > 6:
                raise self.fail(f"unknown type ref {type_ref}")
        elif ref == 8:  # Any values
            for _ in range(self.count("value")):
                self.any()
        elif ref == 9:  # subdocument: guid, options
            self.bytes_()
            self.any()
        else:
            raise self.fail(f"unknown content ref {ref}")

    def structs(self) -> None:
        for _ in range(self.count("client")):
            n = self.count("struct")
            self.uint()  # client
            self.uint()  # clock
            for _ in range(n):
                info = self.byte()
                ref = info & 0x1F
                if ref in (0, 10):  # GC, Skip: a length
                    self.uint()
                    continue
                if info & 0x80:  # origin id
                    self.uint()
                    self.uint()
                if info & 0x40:  # right origin id
                    self.uint()
                    self.uint()
                if not info & 0xC0:  # parent: a root's name or an item's id
                    if self.uint() == 1:
                        self.bytes_()
                    else:
                        self.uint()
                        self.uint()
                    if info & 0x20:  # parent sub (map key)
                        self.bytes_()
                self.content(ref)

    def delete_set(self, into: dict[int, list[tuple[int, int]]] | None = None) -> None:
        for _ in range(self.count("delete-set client")):
            client = self.uint()
            ranges = None if into is None else into.setdefault(client, [])
            for _ in range(self.count("deleted range")):
                clock = self.uint()
                length = self.uint()
                if ranges is not None:
                    ranges.append((clock, length))


def check_update(update: bytes) -> None:
    """Refuse anything but one well-formed Yjs v1 update (invariants 1 and 2).

    Raises:
        DecodeError: truncated, garbage, v2, an impossible count, bytes left
            over, or content yrs cannot decode.
    """
    if not isinstance(update, bytes | bytearray | memoryview):
        raise DecodeError(f"a Yjs update is bytes, not {type(update).__name__}")
    r = _Reader(bytes(update))
    r.structs()
    r.delete_set()
    if r.pos != r.end:
        raise r.fail(f"{r.end - r.pos} bytes left over")
    try:
        pycrdt.get_state(r.buf)
    except Exception as exc:  # yrs raises plain exceptions on malformed updates
        raise DecodeError(f"malformed Yjs update: {exc}") from None


def digest_form(update: bytes) -> bytes:
    """What identifies the ops an update holds, encoded the same however it was made.

    The state vector and the delete set, each sorted and coalesced. Two
    updates merged from the same set of updates, in any order, give equal
    bytes; :func:`canonical` does not guarantee that (yrs writes an object
    value's keys in hash-map order, which differs from one decode to the next).

    Raises:
        DecodeError: not a v1 update.
    """
    r = _Reader(bytes(update))
    r.structs()
    deletes: dict[int, list[tuple[int, int]]] = {}
    r.delete_set(deletes)
    if r.pos != r.end:
        raise r.fail(f"{r.end - r.pos} bytes left over")
    try:
        sv = _Reader(pycrdt.get_state(r.buf))
    except Exception as exc:
        raise DecodeError(f"malformed Yjs update: {exc}") from None
    clocks = sorted((sv.uint(), sv.uint()) for _ in range(sv.count("client")))
    out: list[Any] = [clocks]
    for client in sorted(deletes):
        merged: list[list[int]] = []
        for clock, length in sorted(deletes[client]):
            if merged and clock <= merged[-1][0] + merged[-1][1]:
                last = merged[-1]
                last[1] = max(last[1], clock + length - last[0])
            else:
                merged.append([clock, length])
        out.append([client, merged])
    return repr(out).encode()


def merge(*updates: bytes) -> bytes:
    """``pycrdt.merge_updates`` of checked updates, errors translated."""
    if len(updates) == 1:
        return updates[0]
    try:
        return pycrdt.merge_updates(*updates)
    except Exception as exc:
        raise DecodeError(f"malformed Yjs update: {exc}") from None


def canonical(update: bytes) -> bytes:
    """The document an update describes, re-encoded: equal content, equal bytes.

    Only for comparing states (digests): structs and deletions still waiting
    for their dependencies are left out, so it is never stored.
    """
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    try:
        doc.apply_update(update)
    except Exception as exc:  # yrs raises plain exceptions on malformed updates
        raise DecodeError(f"malformed Yjs update: {exc}") from None
    return doc.get_update()


class _YDoc(CrdtType):
    name = "ydoc"

    def empty(self) -> bytes:
        return EMPTY_UPDATE

    def apply(self, state: bytes, op: OpView) -> bytes:
        return self.apply_many(state, (op,))

    def apply_many(self, state: bytes, ops: Iterable[OpView]) -> bytes:
        payloads = [op.payload for op in ops]
        if not payloads:
            return state
        for payload in payloads:
            check_update(payload)
        return merge(state, *payloads)

    def merge(self, a: bytes, b: bytes) -> bytes:
        check_update(a)
        check_update(b)
        return merge(a, b)

    def encode(self, state: bytes) -> bytes:
        return state

    def decode(self, data: bytes) -> bytes:
        check_update(data)
        return data

    def read(self, state: bytes) -> bytes:
        """The merged update: apply it to a ``pycrdt.Doc`` to read the document."""
        return state


YDOC = _YDoc()
