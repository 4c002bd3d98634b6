"""The shape every CRDT type has."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgpack

from syncfw.errors import DecodeError

Tag = tuple[str, int]
"""An op id ``(origin, seq)`` used as a unique tag (OR-set adds, register writes)."""


class OpView(NamedTuple):
    """The parts of an op a CRDT looks at."""

    origin: str
    seq: int
    hlc: int
    payload: bytes


class CrdtType(ABC):
    """A CRDT type: an empty state, op application, merge, and a byte encoding.

    States are plain Python values owned by the caller; ``apply`` and ``merge``
    may mutate and return their first argument (callers never share states).
    """

    name: str

    @abstractmethod
    def empty(self) -> Any:
        """The state of a key no op has touched."""

    @abstractmethod
    def apply(self, state: Any, op: OpView) -> Any:
        """Apply one op's payload; returns the new state."""

    def apply_many(self, state: Any, ops: Iterable[OpView]) -> Any:
        """Apply ops in order (types with a faster batch path override this)."""
        for op in ops:
            state = self.apply(state, op)
        return state

    @abstractmethod
    def merge(self, a: Any, b: Any) -> Any:
        """Join two states (commutative, associative, idempotent)."""

    @abstractmethod
    def encode(self, state: Any) -> bytes:
        """Canonical bytes of a state: equal states give equal bytes."""

    @abstractmethod
    def decode(self, data: bytes) -> Any:
        """Inverse of :meth:`encode`. Raises :class:`DecodeError` on bad bytes."""

    @abstractmethod
    def read(self, state: Any) -> Any:
        """The application-level value of a state."""


def pack(obj: Any) -> bytes:
    """msgpack with the options every state encoding uses."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, what: str) -> Any:
    """Decode msgpack, translating every failure to :class:`DecodeError`."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"malformed {what}: {exc}") from None


def is_u63(v: Any) -> bool:
    """True for an int in ``[0, 2**63)`` (what seqs, hlcs and totals fit in)."""
    return type(v) is int and 0 <= v < 1 << 63


def tags_of(items: Any, what: str) -> set[Tag]:
    """Decode a list of ``[origin, seq]`` pairs into a set of tags."""
    if not isinstance(items, list):
        raise DecodeError(f"malformed {what} tags: not a list")
    out: set[Tag] = set()
    for item in items:
        if not (isinstance(item, list) and len(item) == 2):
            raise DecodeError(f"malformed {what} tag: {item!r:.80}")
        origin, seq = item
        if not (isinstance(origin, str) and is_u63(seq)):
            raise DecodeError(f"malformed {what} tag: {item!r:.80}")
        out.add((origin, seq))
    return out
