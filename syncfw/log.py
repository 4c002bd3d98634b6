"""Ops, op ids, hash chains and version vectors: the protocol-free heart of the log.

Invariants:

1. An op is identified by ``(origin, seq)``; ``seq`` starts at 1 and is
   contiguous per origin.
2. Every op carries ``prev``, the hash of its origin's previous op
   (:data:`GENESIS` for seq 1). :func:`op_hash` covers every field but ``sig``,
   so a relayed op cannot be altered without breaking its origin's chain.
3. A version vector maps each origin to the highest *contiguous* seq held.
   Two replicas with equal version vectors hold the same set of ops.
4. Values are msgpack bytes; :func:`encode_value` refuses anything msgpack
   cannot carry before a single byte is written.
5. Ops are minted by :class:`OpChain` only: it alone assigns ``seq`` and
   ``prev``, so an origin's log is a chain by construction. A signer hook seals
   a chain head (the last op of a commit) with ``sig``; ``sig`` takes no part
   in what "the same op" means (:func:`same_op`), because it covers the chain
   up to that op, not the op alone.
6. Every string field of an op is bounded (:data:`MAX_ORIGIN_CHARS`,
   :data:`MAX_KEY_BYTES`, :data:`MAX_ZONE_BYTES`, :data:`MAX_KIND_BYTES`):
   :meth:`Op.from_tuple` refuses a longer one, so a peer cannot make a replica
   store and relay an unbounded key.

Nothing here touches SQLite, asyncio or the network.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NewType, Protocol

import msgpack

from syncfw.errors import DecodeError, ValueEncodingError

__all__ = [
    "GENESIS",
    "MAX_KEY_BYTES",
    "MAX_KIND_BYTES",
    "MAX_ORIGIN_CHARS",
    "MAX_SIG_BYTES",
    "NODE_ID_RE",
    "MAX_ZONE_BYTES",
    "ApplyResult",
    "Replica",
    "NodeId",
    "Op",
    "OpChain",
    "OpId",
    "Signer",
    "VersionVector",
    "decode_value",
    "encode_value",
    "check_node_id",
    "is_node_id",
    "op_hash",
    "ops_from_tuples",
    "op_size",
    "same_op",
    "tuple_hash",
    "utf8_len_over",
    "vv_digest",
    "vv_dominates",
    "vv_merge",
]

NodeId = NewType("NodeId", str)
OpId = tuple[str, int]
VersionVector = dict[str, int]

GENESIS = b"\x00" * 32
"""``prev`` of every origin's first op."""

MAX_ORIGIN_CHARS = 256

NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,255}")
"""A node id: letters, digits and ``. _ : @ + -``, at most 256 characters, starting with
a letter or digit. No ``/`` (a node's own zone is ``fleet/<id>/``: ``n1/x`` would
write inside ``n1``'s) and no ``*`` (the owner wildcard)."""


def is_node_id(node_id: object) -> bool:
    """True if ``node_id`` is a valid node id (:data:`NODE_ID_RE`)."""
    return isinstance(node_id, str) and NODE_ID_RE.fullmatch(node_id) is not None


def check_node_id(node_id: str) -> None:
    """Refuse a node id outside :data:`NODE_ID_RE`.

    Raises:
        ValueError: naming what is wrong.
    """
    if not is_node_id(node_id):
        shown = node_id[:64] if isinstance(node_id, str) else node_id
        raise ValueError(
            f"invalid node id {shown!r}: use 1 to 256 letters, digits and . _ : @ + - "
            "(starting with a letter or digit; no '/', no '*', no spaces)"
        )
"""Longest node id (an op's ``origin``, a ``Hello``'s ``node_id``), in characters."""
MAX_KEY_BYTES = 1024
"""Longest key, in UTF-8 bytes: remote ops are refused past it; local writes must be too."""
MAX_ZONE_BYTES = MAX_KEY_BYTES
"""Longest zone prefix, in UTF-8 bytes (a zone is a prefix of the key it covers)."""
MAX_KIND_BYTES = 32
"""Longest op kind (``lww``, ``counter``, ...), in UTF-8 bytes."""
MAX_SIG_BYTES = 64
"""Longest ``sig`` (an ed25519 signature): a longer one is refused, never stored or relayed."""

_HASH_PACKER = msgpack.Packer(use_bin_type=True)


def utf8_len_over(text: str, limit: int) -> bool:
    """True if ``text`` takes more than ``limit`` UTF-8 bytes (cheap when it clearly fits)."""
    n = len(text)
    if n > limit:  # every char takes at least one byte
        return True
    if 4 * n <= limit:  # and at most four
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


@dataclass(frozen=True, slots=True)
class Op:
    """One immutable entry of the replicated log.

    Attributes:
        origin: id of the node that wrote it.
        seq: position in the origin's own sequence, from 1, contiguous.
        hlc: hybrid logical timestamp at the origin (see :mod:`syncfw.clock`).
        zone: the zone prefix the origin wrote under.
        epoch: the ownership epoch of ``zone`` the origin saw.
        key: the key written.
        kind: the CRDT type the op applies to (``lww``, ``counter``, ...).
        value: msgpack payload, meaning defined by ``kind``.
        prev: hash of the origin's previous op (``GENESIS`` for seq 1).
        sig: optional signature over the chain head.
    """

    origin: str
    seq: int
    hlc: int
    zone: str
    epoch: int
    key: str
    kind: str
    value: bytes
    prev: bytes = GENESIS
    sig: bytes | None = None
    _hash: bytes | None = field(default=None, init=False, repr=False, compare=False, hash=False)
    """:func:`op_hash`, kept once computed (never compared, copied or sent: an op
    made with ``dataclasses.replace`` computes its own)."""

    @property
    def id(self) -> OpId:
        """``(origin, seq)``."""
        return (self.origin, self.seq)

    def to_tuple(self) -> tuple[Any, ...]:
        """A plain tuple, the form ops take on the wire and in SQLite rows."""
        return (
            self.origin,
            self.seq,
            self.hlc,
            self.zone,
            self.epoch,
            self.key,
            self.kind,
            self.value,
            self.prev,
            self.sig,
        )

    @classmethod
    def from_tuple(cls, t: Any) -> Op:
        """Build an op from :meth:`to_tuple`'s form, checking every field's type.

        Raises:
            DecodeError: the tuple is not a well-formed op.
        """
        try:
            origin, seq, hlc, zone, epoch, key, kind, value, prev, sig = t
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"an op has 10 fields: {exc}") from None
        if not (isinstance(origin, str) and origin and len(origin) <= MAX_ORIGIN_CHARS):
            raise DecodeError(
                f"op origin must be a non-empty string of at most {MAX_ORIGIN_CHARS} chars"
            )
        if type(seq) is not int or seq < 1:
            raise DecodeError("op seq must be an int >= 1")
        if type(hlc) is not int or not 0 <= hlc < 1 << 64:
            raise DecodeError("op hlc must be a 64-bit unsigned int")
        if type(epoch) is not int or epoch < 0:
            raise DecodeError("op epoch must be an int >= 0")
        if not (isinstance(zone, str) and isinstance(key, str) and isinstance(kind, str)):
            raise DecodeError("op zone, key and kind must be strings")
        if utf8_len_over(key, MAX_KEY_BYTES):
            raise DecodeError(f"op key of {len(key)} chars exceeds {MAX_KEY_BYTES} UTF-8 bytes")
        if utf8_len_over(zone, MAX_ZONE_BYTES):
            raise DecodeError(f"op zone of {len(zone)} chars exceeds {MAX_ZONE_BYTES} UTF-8 bytes")
        if utf8_len_over(kind, MAX_KIND_BYTES):
            raise DecodeError(f"op kind of {len(kind)} chars exceeds {MAX_KIND_BYTES} UTF-8 bytes")
        if not isinstance(value, bytes):
            raise DecodeError("op value must be bytes")
        if not (isinstance(prev, bytes) and len(prev) == 32):
            raise DecodeError("op prev must be 32 bytes")
        if sig is not None and not (isinstance(sig, bytes) and len(sig) <= MAX_SIG_BYTES):
            raise DecodeError(f"op sig must be absent or at most {MAX_SIG_BYTES} bytes")
        return cls(origin, seq, hlc, zone, epoch, key, kind, value, prev, sig)


def op_hash(op: Op) -> bytes:
    """SHA-256 over every field of ``op`` but ``sig``: the next op's ``prev``.

    Computed once per op object (an op is immutable): the sender's read-back check,
    its batch encoder and the receiver's decoder and planner each need it.
    """
    h = op._hash
    if h is None:
        h = hashlib.sha256(
            _HASH_PACKER.pack(
                (op.origin, op.seq, op.hlc, op.zone, op.epoch, op.key, op.kind, op.value, op.prev)
            )
        ).digest()
        _SET_HASH(op, h)
    return h


def tuple_hash(t: Sequence[Any]) -> bytes:
    """:func:`op_hash` of the op whose :meth:`Op.to_tuple` form is ``t`` (the same bytes)."""
    return hashlib.sha256(_HASH_PACKER.pack(t[:9])).digest()


_SET = tuple(
    getattr(Op, f).__set__
    for f in ("origin", "seq", "hlc", "zone", "epoch", "key", "kind", "value", "prev", "sig")
)
_SET_HASH: Callable[[Op, bytes | None], None] = vars(Op)["_hash"].__set__
_NEW = object.__new__


def built_op(t: Sequence[Any]) -> Op:
    """An op from a checked tuple of its ten fields: one :func:`ops_from_tuples` checked,
    or a row read back from this node's own file. Its fields are set through the slots
    (what the frozen dataclass's ``__init__`` does, at about a third of its cost)."""
    op = _NEW(Op)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _SET
    origin, seq, hlc, zone, epoch, key, kind, value, prev, sig = t
    s0(op, origin)
    s1(op, seq)
    s2(op, hlc)
    s3(op, zone)
    s4(op, epoch)
    s5(op, key)
    s6(op, kind)
    s7(op, value)
    s8(op, prev)
    s9(op, sig)
    _SET_HASH(op, None)
    return op


def _columns_ok(items: Sequence[tuple[Any, ...]], elided: bool) -> bool:
    """True if every tuple surely passes :meth:`Op.from_tuple`'s checks, judged by
    C-level passes over each column; False means "check op by op" (not "bad")."""
    if set(map(type, items)) != {tuple} or set(map(len, items)) != {10}:
        return False
    origin, seq, hlc, zone, epoch, key, kind, value, prev, sig = zip(*items, strict=True)
    str_t, int_t = {str}, {int}
    if not (
        set(map(type, origin)) == str_t
        and set(map(type, zone)) == str_t
        and set(map(type, key)) == str_t
        and set(map(type, kind)) == str_t
        and set(map(type, seq)) == int_t
        and set(map(type, hlc)) == int_t
        and set(map(type, epoch)) == int_t
        and set(map(type, value)) == {bytes}
    ):
        return False
    lens = set(map(len, origin))
    if min(lens) < 1 or max(lens) > MAX_ORIGIN_CHARS:
        return False
    if min(seq) < 1 or min(hlc) < 0 or max(hlc) >= 1 << 64 or min(epoch) < 0:
        return False
    # every char takes at most 4 UTF-8 bytes: beyond a quarter of a limit, op by op
    if (
        max(map(len, key)) * 4 > MAX_KEY_BYTES
        or max(map(len, zone)) * 4 > MAX_ZONE_BYTES
        or max(map(len, kind)) * 4 > MAX_KIND_BYTES
    ):
        return False
    prevs = [p for p in prev if p is not None] if elided else prev
    if prevs and (set(map(type, prevs)) != {bytes} or set(map(len, prevs)) != {32}):
        return False
    sigs = [x for x in sig if x is not None]
    return not sigs or (set(map(type, sigs)) == {bytes} and max(map(len, sigs)) <= MAX_SIG_BYTES)


def ops_from_tuples(items: Sequence[tuple[Any, ...]], *, elided: bool = False) -> list[Op]:
    """:meth:`Op.from_tuple` of each of ``items``, in order, with the same checks and errors,
    for a batch: the fields are checked a column at a time, and where that cannot
    vouch for every op, op by op.

    With ``elided``, a ``prev`` of None means "the hash of the op just before"
    (batch format 2, whose decoder checked the op before is its predecessor);
    it is rebuilt after the checks, so nothing unchecked is hashed.

    Raises:
        DecodeError: the first tuple that is not a well-formed op.
    """
    if not items:
        return []
    if not _columns_ok(items, elided):
        if not elided:
            return [Op.from_tuple(t) for t in items]
        for t in items:  # the error the first bad op raises; nothing is hashed
            Op.from_tuple(t if t[8] is not None else (*t[:8], GENESIS, t[9]))
    if not elided:
        return list(map(built_op, items))
    out: list[Op] = []
    append, before = out.append, None
    for t in items:
        if t[8] is None:
            if before is None:
                raise DecodeError("the first op of a batch leaves out its prev")
            h = tuple_hash(before)
            _SET_HASH(out[-1], h)  # the op before's own hash: kept (op_hash)
            t = (*t[:8], h, t[9])
        append(built_op(t))
        before = t
    return out


OP_SIZE_OVERHEAD = 80
"""What :func:`op_size` adds to an op's value and key (its other fields, roughly)."""


def op_size(op: Op) -> int:
    """What an op counts against ``ops_since``'s ``max_bytes``: value and key plus a
    fixed overhead. Part of the :class:`Replica` contract, so every replica counts alike."""
    return len(op.value) + len(op.key) + OP_SIZE_OVERHEAD


def same_op(a: Op, b: Op) -> bool:
    """True if ``a`` and ``b`` are the same op: every field but ``sig`` is equal.

    Two ops at one ``(origin, seq)`` that are not the same op are a fork.
    """
    return (
        a.origin == b.origin
        and a.seq == b.seq
        and a.hlc == b.hlc
        and a.zone == b.zone
        and a.epoch == b.epoch
        and a.key == b.key
        and a.kind == b.kind
        and a.value == b.value
        and a.prev == b.prev
    )


Signer = Callable[[Op], bytes]
"""Signs a chain head: given the last op of a commit, returns its ``sig``."""


class OpChain:
    """Mints one origin's ops: each continues the last one minted.

    Args:
        origin: the writing node's id.
        seq: the seq of the last op already in the chain (0 for none).
        head: the hash of that op (:data:`GENESIS` for none).
        signer: seals chain heads (:meth:`seal`); None leaves ops unsigned.

    The chain may run ahead of what is durable (a store plans the next group
    commit while the last one commits); :meth:`reset` moves it back to a
    committed tip when a planned batch is abandoned.
    """

    __slots__ = ("_head", "_seq", "origin", "signer")

    def __init__(
        self, origin: str, seq: int = 0, head: bytes = GENESIS, *, signer: Signer | None = None
    ) -> None:
        self.origin = origin
        self._seq = seq
        self._head = head
        self.signer = signer

    @property
    def tip(self) -> tuple[int, bytes]:
        """``(seq, hash)`` of the last op minted (or the chain's start)."""
        return (self._seq, self._head)

    def mint(self, hlc: int, zone: str, epoch: int, key: str, kind: str, value: bytes) -> Op:
        """The next op of this origin."""
        op = Op(self.origin, self._seq + 1, hlc, zone, epoch, key, kind, value, self._head)
        self._seq = op.seq
        self._head = op_hash(op)
        return op

    def seal(self, op: Op) -> Op:
        """``op`` with its ``sig`` set by the signer (``op`` itself when there is none)."""
        if self.signer is None:
            return op
        return Op(
            op.origin, op.seq, op.hlc, op.zone, op.epoch, op.key, op.kind, op.value, op.prev,
            self.signer(op),
        )

    def reset(self, seq: int, head: bytes) -> None:
        """Move the chain back (or forward) to ``(seq, head)``."""
        self._seq = seq
        self._head = head


def encode_value(value: Any) -> bytes:
    """Encode an application value as msgpack.

    Raises:
        ValueEncodingError: the value (or something inside it) is not
            representable: arbitrary objects, ints beyond 64 bits, sets, ...
    """
    try:
        return msgpack.packb(value, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueEncodingError(
            f"value of type {type(value).__name__} cannot be stored: {exc}"
        ) from None


def decode_value(data: bytes) -> Any:
    """Decode msgpack written by :func:`encode_value`.

    Raises:
        DecodeError: the bytes are not one well-formed msgpack object.
    """
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"malformed msgpack value: {exc}") from None


def vv_merge(*vvs: Mapping[str, int]) -> VersionVector:
    """Pointwise maximum of version vectors."""
    out: VersionVector = {}
    for vv in vvs:
        for origin, seq in vv.items():
            if seq > out.get(origin, 0):
                out[origin] = seq
    return out


def vv_dominates(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """True if ``a`` holds every op ``b`` holds."""
    return all(a.get(origin, 0) >= seq for origin, seq in b.items())


def vv_digest(vv: Mapping[str, int]) -> bytes:
    """A 16-byte digest of a version vector; equal vectors give equal digests."""
    items: Iterable[tuple[str, int]] = sorted((o, s) for o, s in vv.items() if s > 0)
    return hashlib.blake2b(msgpack.packb(list(items)), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :meth:`Replica.apply_remote` did with a batch of ops.

    Attributes:
        applied: ops newly merged into state.
        duplicates: ops already held (no-ops).
        pending: ops held back: a gap in their origin's sequence, a zone epoch
            not yet known, or a timestamp too far ahead (clock skew).
        rejected: ops recorded as rejected (zone ownership) and never merged.
    """

    applied: int = 0
    duplicates: int = 0
    pending: int = 0
    rejected: int = 0


class Replica(Protocol):
    """What the sync protocol, the mesh and the simulator need of a node.

    :class:`syncfw.node.Node` implements it over SQLite; the sync layer never
    knows more than this.
    """

    @property
    def node_id(self) -> str: ...

    @property
    def fleet_id(self) -> str: ...

    @property
    def fleet_digest(self) -> bytes:
        """Digest of this node's fleet bootstrap (``Fleet.bootstrap_digest``), sent in
        ``Hello``: peers with different bootstraps refuse to sync (b"" for unknown)."""
        ...

    def hlc_now(self) -> int:
        """A fresh hybrid timestamp of this node."""
        ...

    async def version_vector(self) -> VersionVector:
        """Highest contiguous seq held per origin (applied or rejected)."""
        ...

    async def ops_since(
        self, vv: Mapping[str, int], *, limit: int = 10_000, max_bytes: int | None = None
    ) -> list[Op]:
        """Ops this replica holds beyond ``vv``, each origin's in seq order.

        At most ``limit`` ops and (roughly) ``max_bytes`` of op values per call;
        call again with the grown vector for more.
        """
        ...

    async def apply_remote(self, ops: list[Op]) -> ApplyResult:
        """Merge a batch of remote ops, atomically.

        Raises:
            ChainError: an op's ``prev`` does not extend its origin's chain.
            ForkError: an op differs from the one held at its (origin, seq).
            In both cases nothing of the batch is applied.
        """
        ...

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        """Durably record the version vector ``peer`` acknowledged holding."""
        ...

    async def peer_ack(self, peer: str) -> VersionVector:
        """The last version vector ``peer`` acknowledged (empty if none)."""
        ...
