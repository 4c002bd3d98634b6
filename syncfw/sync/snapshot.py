"""State snapshots: what a replica sends a peer that is below its compaction point.

A replica that compacted an origin's ops up to seq ``c`` can no longer send a
peer holding less than ``c`` of that origin the ops it lacks. It sends a
:class:`Snapshot` instead: its materialized state, the version vector that
state stands for and the chain head of every origin in it; then the ops after
it, as usual. Both replicas of the contract (the SQLite store and the test
replica) build and install the same snapshot, so :func:`syncfw.testing.check_replica`
holds them to one rule.

Layout of an encoded snapshot::

    bytes 0..3    b"SFS1" (format 1)
    bytes 4..19   blake2b-128 of the body
    bytes 20..    zstd frame (content size declared) of a msgpack array:
                  [vv, heads, states, grants, statements]

Invariants:

1. :func:`decode_snapshot` returns a snapshot that passed every check, or
   raises :class:`DecodeError` naming what is wrong; nothing larger than
   ``max_bytes`` is ever allocated (the frame's declared size is checked
   before it is inflated, and one that declares none is refused).
2. A snapshot is checked against its vector before anything uses it: one
   head per origin of the vector, each a 32-byte hash at that origin's seq;
   every lww winner's origin is in the vector; every state decodes under its
   kind's rules (:mod:`syncfw.crdt`); keys, kinds and origins are within the
   op limits of :mod:`syncfw.log`.
3. Installing one is a join: every state is merged under its kind's merge
   rule with what the receiver holds, so installing a snapshot the receiver
   already covers changes nothing, and installing it in either order with any
   ops gives the state of the union.
4. A snapshot is the claim of the peer that sends it. The digest proves it
   arrived as it was sent, and the checks above that it is well formed; that
   the state truly is the fold of the origins' signed chains cannot be checked
   once their ops are compacted away, so a receiver takes snapshots only from
   authenticated peers in a signed fleet (see ``docs/architecture.md``).

Pure: no I/O, no asyncio.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import msgpack
import zstandard

from syncfw.crdt import KINDS
from syncfw.errors import DecodeError, SnapshotTooLargeError
from syncfw.log import MAX_KEY_BYTES, MAX_KIND_BYTES, MAX_ORIGIN_CHARS

__all__ = [
    "DEFAULT_MAX_SNAPSHOT_BYTES",
    "MAGIC",
    "Snapshot",
    "SnapshotReplica",
    "StateRow",
    "check_size",
    "decode_snapshot",
    "encode_snapshot",
]

MAGIC = b"SFS1"
_DIGEST = 16
_HEADER = len(MAGIC) + _DIGEST
DEFAULT_MAX_SNAPSHOT_BYTES = 256 << 20
"""The largest decoded snapshot a replica takes by default (``SessionConfig.max_snapshot_bytes``)."""
_SEQ_LIMIT = 1 << 63

StateRow = tuple[str, str, int, str, bytes]
"""``(kind, key, hlc, origin, data)``: for ``lww`` the winning write's hlc, origin and
payload; for other kinds the newest op's hlc, ``""`` and the kind's encoded state."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A replica's materialized state and the vector it stands for.

    Attributes:
        vv: the version vector the state stands for.
        heads: each origin's chain head (the hash of its op at ``vv[origin]``).
        states: the state rows (:data:`StateRow`), sorted by kind and key.
        grants: zone grants ``(prefix, epoch, owners)``.
        statements: verified authority statements (signed fleets), as op values.
    """

    vv: Mapping[str, int]
    heads: Mapping[str, bytes]
    states: Sequence[StateRow] = ()
    grants: Sequence[tuple[str, int, tuple[str, ...]]] = ()
    statements: Sequence[bytes] = field(default_factory=tuple)

    def below(self, vv: Mapping[str, int]) -> dict[str, int]:
        """The origins where ``vv`` holds less than this snapshot (origin -> its seq)."""
        return {o: s for o, s in self.vv.items() if vv.get(o, 0) < s}


def encode_snapshot(snap: Snapshot, *, level: int = 3) -> bytes:
    """The wire form of ``snap`` (module docstring); the same bytes for the same snapshot."""
    body = msgpack.packb(
        [
            dict(sorted(snap.vv.items())),
            dict(sorted(snap.heads.items())),
            [list(r) for r in sorted(snap.states)],
            [[p, e, sorted(o)] for p, e, o in sorted(snap.grants)],
            sorted(snap.statements),
        ],
        use_bin_type=True,
    )
    packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    return MAGIC + hashlib.blake2b(packed, digest_size=_DIGEST).digest() + packed


def decode_snapshot(data: bytes, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES) -> Snapshot:
    """Check and read an encoded snapshot (invariants 1-2).

    Raises:
        DecodeError: it is damaged, over ``max_bytes``, or not a well-formed snapshot.
    """
    if len(data) < _HEADER or data[: len(MAGIC)] != MAGIC:
        raise DecodeError("not a syncfw snapshot (format 1)")
    digest, packed = data[len(MAGIC) : _HEADER], data[_HEADER:]
    if hashlib.blake2b(packed, digest_size=_DIGEST).digest() != digest:
        raise DecodeError("snapshot digest does not match: damaged in transit or truncated")
    try:
        size = zstandard.frame_content_size(packed)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"snapshot is not a zstd frame: {exc}") from None
    if size < 0:
        raise DecodeError("snapshot frame declares no content size")
    if size > max_bytes:
        raise DecodeError(f"snapshot of {size} bytes exceeds the cap of {max_bytes}")
    try:
        body = zstandard.ZstdDecompressor().decompress(packed, max_output_size=max_bytes)
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (zstandard.ZstdError, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError(f"snapshot does not unpack: {exc}") from None
    return _checked(raw)


def _checked(raw: Any) -> Snapshot:
    if not isinstance(raw, list) or len(raw) != 5:
        raise DecodeError("snapshot body is not [vv, heads, states, grants, statements]")
    vv_raw, heads_raw, states_raw, grants_raw, stmts_raw = raw
    if not isinstance(vv_raw, dict) or not isinstance(heads_raw, dict):
        raise DecodeError("snapshot vector or heads is not a map")
    vv: dict[str, int] = {}
    for origin, seq in vv_raw.items():
        _text(origin, MAX_ORIGIN_CHARS, "origin")
        if type(seq) is not int or not 0 < seq < _SEQ_LIMIT:
            raise DecodeError(f"snapshot seq {seq!r} of {origin!r} is out of range")
        vv[origin] = seq
    heads: dict[str, bytes] = {}
    for origin, h in heads_raw.items():
        if origin not in vv:
            raise DecodeError(f"snapshot head of {origin!r}, an origin not in its vector")
        if not isinstance(h, bytes) or len(h) != 32:
            raise DecodeError(f"snapshot head of {origin!r} is not a 32-byte hash")
        heads[origin] = h
    if len(heads) != len(vv):
        missing = sorted(set(vv) - set(heads))[:3]
        raise DecodeError(f"snapshot has no chain head for {missing}")
    if not isinstance(states_raw, list):
        raise DecodeError("snapshot states is not a list")
    states: list[StateRow] = []
    for row in states_raw:
        states.append(_state_row(row, vv))
    grants: list[tuple[str, int, tuple[str, ...]]] = []
    if not isinstance(grants_raw, list):
        raise DecodeError("snapshot grants is not a list")
    for g in grants_raw:
        if (
            not isinstance(g, list)
            or len(g) != 3
            or not isinstance(g[0], str)
            or type(g[1]) is not int
            or not isinstance(g[2], list)
            or not all(isinstance(o, str) for o in g[2])
        ):
            raise DecodeError(f"malformed grant in snapshot: {str(g)[:80]}")
        grants.append((g[0], g[1], tuple(g[2])))
    if not isinstance(stmts_raw, list) or not all(isinstance(s, bytes) for s in stmts_raw):
        raise DecodeError("snapshot statements is not a list of bytes")
    return Snapshot(vv, heads, states, grants, tuple(stmts_raw))


def _state_row(row: Any, vv: Mapping[str, int]) -> StateRow:
    if not isinstance(row, list) or len(row) != 5:
        raise DecodeError("snapshot state row is not [kind, key, hlc, origin, data]")
    kind, key, hlc, origin, data = row
    _text(kind, MAX_KIND_BYTES, "kind")
    _text(key, MAX_KEY_BYTES, "key")
    if type(hlc) is not int or not 0 <= hlc < _SEQ_LIMIT:
        raise DecodeError(f"snapshot state of {key!r} has a timestamp out of range")
    if not isinstance(origin, str) or not isinstance(data, bytes):
        raise DecodeError(f"snapshot state of {key!r} is malformed")
    crdt = KINDS.get(kind)
    if crdt is None:
        raise DecodeError(f"snapshot state of {key!r} has unknown kind {kind!r}")
    if kind == "lww":
        if origin not in vv:
            raise DecodeError(f"snapshot lww winner of {key!r} names {origin!r}, not in its vector")
    else:
        crdt.decode(data)  # raises DecodeError on a damaged state
    return kind, key, hlc, origin, data


def _text(s: Any, limit: int, what: str) -> None:
    if not isinstance(s, str) or not s or len(s.encode()) > limit:
        raise DecodeError(f"snapshot {what} {str(s)[:40]!r} is empty, not text or too long")


ROW_BYTES = 48
"""What one state row adds to a snapshot beyond its key and data (kind, hlc, origin, framing)."""


def check_size(rows: int, stored: int, max_bytes: int) -> None:
    """Refuse to build a snapshot of ``rows`` state rows holding ``stored`` bytes of keys and
    data past ``max_bytes`` (the sender's bound: the same cap a receiver applies).

    Raises:
        SnapshotTooLargeError: naming both sizes.
    """
    size = stored + rows * ROW_BYTES
    if size > max_bytes:
        raise SnapshotTooLargeError(
            f"the state ({rows} rows, about {size} bytes) is larger than the largest "
            f"snapshot a peer takes ({max_bytes} bytes, SessionConfig.max_snapshot_bytes)"
        )


@runtime_checkable
class SnapshotReplica(Protocol):
    """A replica that compacts, and so sends and takes snapshots (invariant 3)."""

    def compacted(self) -> Mapping[str, int]:
        """Each compacted origin's compaction point (the log holds only ops after it)."""
        ...

    async def snapshot(self, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES) -> Snapshot:
        """This replica's state and the vector it stands for, read at one instant.

        Raises:
            SnapshotTooLargeError: the state's stored bytes exceed ``max_bytes``
                (checked before anything is read into memory).
        """
        ...

    async def install_snapshot(self, snap: Snapshot, *, source: str) -> None:
        """Join ``snap`` into this replica, atomically; ``source`` names the peer it came from.

        Raises:
            SyncfwError: it cannot be installed (nothing changed).
        """
        ...
