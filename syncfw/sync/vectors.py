"""Version vectors that carry their digest, and a live vector that keeps it up to date.

A session compares vectors by :func:`syncfw.log.vv_digest` (``Digest``, a delta
``Summary``'s base). Computed from scratch that is a sort and a msgpack pass over
every entry, whether anything changed or not. These types let a replica keep it
at the cost of what changed.

Invariants:

1. :meth:`Vector.digest` equals :func:`syncfw.log.vv_digest` of the same
   entries, byte for byte (the wire's digest: peers running code without these
   types compute the same value).
2. A :class:`Vector` never changes after it is made (its mutators raise), so a
   session may hold one without copying it, and its digest, once computed,
   stays right.
3. :class:`LiveVector` keeps each origin's msgpack entry in origin order: a
   change costs a binary search and one entry's packing; a digest costs one
   join and one hash of bytes already packed, and only when asked, once per
   change (:meth:`LiveVector.snapshot` is cached until the next change).
4. Pure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import msgpack

from syncfw.log import vv_digest

__all__ = ["LiveVector", "Vector", "digest_of"]

# packb's defaults, one Packer for every entry (packb builds one per call); a pack is
# one C call under the GIL, so threads never interleave inside it
_PACK = msgpack.Packer().pack


def _frozen(*_: Any, **__: Any) -> NoReturn:
    raise TypeError("a Vector never changes (copy it with dict(v))")


class Vector(dict[str, int]):
    """An immutable version vector (a ``dict``) with its digest cached (invariant 2)."""

    __slots__ = ("_digest",)

    def __init__(self, entries: Mapping[str, int] | Iterable[tuple[str, int]] = (), /) -> None:
        super().__init__(entries)
        self._digest: bytes | None = None

    def digest(self) -> bytes:
        """:func:`syncfw.log.vv_digest` of this vector, computed once."""
        if self._digest is None:
            self._digest = vv_digest(self)
        return self._digest

    __setitem__ = __delitem__ = _frozen
    clear = pop = popitem = setdefault = update = _frozen
    __ior__ = _frozen

    def __reduce__(self) -> tuple[Any, ...]:
        return (Vector, (dict(self),))


def digest_of(vv: Mapping[str, int]) -> bytes:
    """The digest of ``vv``: cached for a :class:`Vector`, computed otherwise."""
    if isinstance(vv, Vector):
        return vv.digest()
    return vv_digest(vv)


def _header(n: int) -> bytes:
    """The msgpack array header for ``n`` entries (as ``msgpack.packb`` writes it)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


class LiveVector:
    """A replica's own version vector, changed in place, with snapshots and digests (invariant 3).

    Attributes:
        changes: entries set since it was made (a cost figure for tests and benches).
    """

    __slots__ = ("_keys", "_parts", "_snap", "_vec", "changes")

    def __init__(self, entries: Mapping[str, int] | None = None) -> None:
        self._vec: dict[str, int] = {}
        self._keys: list[str] = []
        self._parts: list[bytes] = []
        self._snap: Vector | None = None
        self.changes = 0
        for o, s in sorted((entries or {}).items()):
            self.set(o, s)

    def get(self, origin: str, default: int = 0) -> int:
        """The seq held of ``origin``."""
        return self._vec.get(origin, default)

    def __len__(self) -> int:
        return len(self._vec)

    def set(self, origin: str, seq: int) -> None:
        """Hold ``seq`` of ``origin`` (seq 0 or less removes it)."""
        vec = self._vec
        old = vec.get(origin)
        if old == seq or (seq <= 0 and old is None):
            return
        self.changes += 1
        self._snap = None
        keys = self._keys
        i = bisect.bisect_left(keys, origin)
        if seq <= 0:
            del vec[origin], keys[i], self._parts[i]
            return
        part = _PACK((origin, seq))
        if old is not None:
            self._parts[i] = part
        else:
            keys.insert(i, origin)
            self._parts.insert(i, part)
        vec[origin] = seq

    def snapshot(self) -> Vector:
        """The vector now, immutable, with its digest; the same object until the next change."""
        snap = self._snap
        if snap is None:
            snap = Vector(self._vec)
            snap._digest = hashlib.blake2b(
                _header(len(self._parts)) + b"".join(self._parts), digest_size=16
            ).digest()
            self._snap = snap
        return snap
