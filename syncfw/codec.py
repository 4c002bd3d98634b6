"""The versioned op-batch format carried inside ``Ops`` frames.

Layout of a batch::

    byte 0      format version: 1, or 2 (``BATCH_VERSION``) when ``prev`` may be elided
    byte 1      compression: 0 = none, 1 = zstd
    bytes 2..   msgpack array of op tuples (:meth:`syncfw.log.Op.to_tuple`),
                zstd-compressed when byte 1 says so

In version 2 an op's ``prev`` is nil when it is the hash of the op just before
it in the batch (the next seq of the same origin): the receiver recomputes it.
A chained run then costs 1 byte per op instead of 33 of incompressible hash,
and nothing is weakened: the store still checks the first op of every run
against the chain head it holds, and every later hash follows from the ops.

Invariants:

1. :func:`decode_batch` either returns every op of the batch, each validated by
   :meth:`Op.from_tuple`, or raises :class:`DecodeError` (or :class:`ChainError`
   for a ``prev`` that breaks the chain within the batch, invariant 4); never a
   partial list.
2. Nothing larger than the caps is ever allocated while decoding: the
   compressed size is checked first, the zstd frame's declared content size is
   checked before decompressing, and decompression reads through a bounded
   stream so a frame that lies about (or omits) its size is cut at
   ``max_decompressed + 1`` bytes and refused (a zstd bomb costs at most the cap).
3. Compression is used only when the peer advertised ``zstd`` and the packed
   batch is at least ``compress_threshold`` bytes.
4. Cheap checks come before expensive ones: sizes and the op count first (an
   op takes at least ``_MIN_OP_BYTES``, so a count the payload cannot hold is
   refused unread), then, slice by slice (``_SLICE`` ops: a worker thread
   decoding a batch hands the GIL back between ops and holds it for one
   slice's C-level pass at most), each op tuple's shape, origin and seq, each
   origin's seqs contiguous within the batch and continuing ``after``, and in
   format 2 where ``prev`` is left out; only then are ops built and elided
   ``prev`` hashes recomputed. These checks are column passes (``map``,
   ``set``, ``compress``) with Python code once per *run* of one origin's
   consecutive ops, so refusing a bad batch costs little more than unpacking
   it, a small fraction of decoding a good one. In format 2 a ``prev`` is
   left out wherever the op before implies it, so an explicit ``prev`` right
   after its own predecessor is refused unhashed: it is either redundant or a
   broken chain, and a run's first op must name its ``prev``.

Pure: no I/O, no asyncio; imports only :mod:`syncfw.log` and :mod:`syncfw.errors`.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import add, and_, eq, is_not, itemgetter, le, not_, sub
from typing import Any

import msgpack
import zstandard

from syncfw.errors import ChainError, DecodeError
from syncfw.log import Op, op_hash, ops_from_tuples
from syncfw.notices import PEER_TEXT_CHARS, clip_text

__all__ = [
    "BATCH_VERSION",
    "COMPRESS_NONE",
    "COMPRESS_ZSTD",
    "DEFAULT_LIMITS",
    "PEER_TEXT_CHARS",
    "BatchLimits",
    "clip_text",
    "decode_batch",
    "encode_batch",
    "packed_size",
]

BATCH_VERSION = 2
_VERSIONS = (1, 2)
COMPRESS_NONE = 0
COMPRESS_ZSTD = 1
_HEADER = 2


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """Hard caps on one batch.

    Attributes:
        max_compressed: largest batch accepted on the wire, header included.
        max_decompressed: largest msgpack payload accepted after decompression.
        max_ops: most ops in one batch: 4x the 2,000 a sender puts in one by default
            (``SessionConfig.batch_ops``), so the work one batch can cost a receiver
            before its last op is checked is bounded (a chain broken at the end
            of 8,192 ops costs about 13 ms to refuse).
        compress_threshold: packed size from which :func:`encode_batch` compresses.
        zstd_level: compression level used when compressing.
    """

    max_compressed: int = 4 * 1024 * 1024
    max_decompressed: int = 16 * 1024 * 1024
    max_ops: int = 8_192
    compress_threshold: int = 1024
    zstd_level: int = 3


DEFAULT_LIMITS = BatchLimits()

_PACKER = msgpack.Packer(use_bin_type=True)
# zstandard's (de)compressor objects must never be used by two threads at once, and
# batches are encoded on the event loop and decoded on worker threads: one set per
# thread.
_LOCAL = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cs: dict[int, zstandard.ZstdCompressor] | None = getattr(_LOCAL, "zc", None)
    if cs is None:
        cs = _LOCAL.zc = {}
    zc = cs.get(level)
    if zc is None:
        zc = cs[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return zc


def _decompressor() -> zstandard.ZstdDecompressor:
    zd: zstandard.ZstdDecompressor | None = getattr(_LOCAL, "zd", None)
    if zd is None:
        zd = _LOCAL.zd = zstandard.ZstdDecompressor()
    return zd


def packed_size(op: Op) -> int:
    """The msgpack size of one op inside a batch (for batching decisions)."""
    return len(_PACKER.pack(op.to_tuple()))


def _elided(ops: Sequence[Op]) -> list[tuple[object, ...]]:
    """Op tuples with ``prev`` set to nil where the op before it implies it."""
    rows: list[tuple[object, ...]] = []
    before: Op | None = None
    for op in ops:
        row = op.to_tuple()
        if (
            before is not None
            and before.origin == op.origin
            and before.seq + 1 == op.seq
            and op.prev == op_hash(before)
        ):
            row = (*row[:8], None, row[9])
        rows.append(row)
        before = op
    return rows


def encode_batch(
    ops: Sequence[Op],
    *,
    zstd: bool = False,
    elide_prev: bool = False,
    limits: BatchLimits = DEFAULT_LIMITS,
) -> bytes:
    """Pack ops into one batch.

    Args:
        ops: the ops, in the order the receiver should apply them.
        zstd: the peer advertised zstd; compress if the batch is large enough.
        elide_prev: the peer reads format 2: leave out ``prev`` hashes implied
            by the op before (otherwise format 1 is written).
        limits: caps; the batch must fit in them (the receiver enforces the same).

    Returns:
        The batch bytes.

    Raises:
        ValueError: the batch exceeds ``limits`` (the caller batched wrongly).
    """
    if len(ops) > limits.max_ops:
        raise ValueError(f"{len(ops)} ops exceed the batch cap of {limits.max_ops}")
    version = BATCH_VERSION if elide_prev else 1
    payload = _PACKER.pack(_elided(ops) if elide_prev else [op.to_tuple() for op in ops])
    if len(payload) > limits.max_decompressed:
        raise ValueError(f"batch of {len(payload)} bytes exceeds {limits.max_decompressed}")
    mode = COMPRESS_NONE
    if zstd and len(payload) >= limits.compress_threshold:
        compressed = _compressor(limits.zstd_level).compress(payload)
        if len(compressed) < len(payload):
            payload, mode = compressed, COMPRESS_ZSTD
    data = bytes((version, mode)) + payload
    if len(data) > limits.max_compressed:
        raise ValueError(f"encoded batch of {len(data)} bytes exceeds {limits.max_compressed}")
    return data


def _frame_length(data: bytes) -> int | None:
    """The length of the zstd frame ``data`` opens with (header, blocks, checksum), walked
    from its block headers; None if they run past the end (a truncated frame)."""
    at = zstandard.frame_header_size(data)
    checksum = 4 if data[4] & 0x04 else 0
    n = len(data)
    while at + 3 <= n:
        head = int.from_bytes(data[at : at + 3], "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        at += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte
        if last:
            return at + checksum if at + checksum <= n else None
    return None


def _inflate(data: bytes, cap: int) -> bytes:
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"malformed zstd frame: {exc}") from None
    declared = params.content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN:
        if declared > cap:
            raise DecodeError(f"zstd frame declares {declared} bytes, over the cap of {cap}")
        # the size it declares bounds what one call writes (zstd refuses more)
        try:
            out = _decompressor().decompress(data)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"corrupt zstd data: {exc}") from None
        if len(out) != declared:
            raise DecodeError(f"zstd frame declares {declared} bytes but holds {len(out)}")
        length = _frame_length(data)
        if length is None:
            raise DecodeError("corrupt zstd data: a truncated frame")
        if length != len(data):
            raise DecodeError("zstd frame longer than its stream")
        return out
    try:
        with _decompressor().stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
            out = reader.read(cap + 1)
            # a truncated or corrupt frame raises here or returns short; a frame
            # followed by junk leaves bytes unread
            tail = reader.read(1) if len(out) <= cap else b""
    except zstandard.ZstdError as exc:
        raise DecodeError(f"corrupt zstd data: {exc}") from None
    if len(out) > cap:
        raise DecodeError(f"zstd payload inflates beyond the cap of {cap} bytes")
    if tail:
        raise DecodeError("zstd frame longer than its stream")
    return out


_SLICE = 4096
"""Ops unpacked and checked per slice: bounded work between GIL hand-backs."""
_MIN_OP_BYTES = 12
"""The smallest msgpack op tuple: fixarray, a 1-char origin and nine 1-byte fields."""
_WHOLE_BYTES = 4 << 20
"""Payloads up to this size are unpacked by one C call (see :func:`_unpack`)."""


def _array_len(body: bytes) -> int | None:
    """The element count of the msgpack array ``body`` opens with, or None if it opens no array."""
    if not body:
        return None
    b = body[0]
    if 0x90 <= b <= 0x9F:
        return b & 0x0F
    if b == 0xDC and len(body) >= 3:
        return int.from_bytes(body[1:3], "big")
    if b == 0xDD and len(body) >= 5:
        return int.from_bytes(body[1:5], "big")
    return None


def _unpack(
    body: bytes, limits: BatchLimits, version: int, after: Mapping[str, int] | None
) -> list[tuple[Any, ...]] | tuple[tuple[Any, ...], ...]:
    """The op tuples of a batch payload, headers checked before any op is built (invariant 4).

    A payload of at most :data:`_WHOLE_BYTES` is unpacked by one C call (about a
    third of the cost of unpacking op by op, holding the GIL a few milliseconds);
    a larger one op by op in slices, so a worker thread decoding it hands the
    GIL back between ops. Either way the checks run a slice at a time, before
    any op is built.
    """
    n = _array_len(body)
    if n is None:
        raise DecodeError("a batch must be a msgpack array of ops")
    if n > limits.max_ops:
        raise DecodeError(f"{n} ops exceed the batch cap of {limits.max_ops}")
    if n * _MIN_OP_BYTES > len(body):
        raise DecodeError(
            f"a batch of {len(body)} bytes cannot hold the {n} ops it declares "
            f"(an op takes at least {_MIN_OP_BYTES} bytes)"
        )
    caps: dict[str, Any] = {
        "raw": False,
        "use_list": False,  # tuples: cheaper to build, and untracked by the collector
        "strict_map_key": True,
        "max_array_len": max(limits.max_ops, 16),
        "max_map_len": 0,
        "max_ext_len": 0,
    }
    runs = _Runs(version, after)
    if len(body) <= _WHOLE_BYTES:
        trailing = False
        try:
            whole = msgpack.unpackb(body, **caps)
        except msgpack.ExtraData as extra:  # the ops' own faults are named first
            whole, trailing = extra.unpacked, True  # type: ignore[attr-defined]
        except Exception as exc:  # msgpack raises several unrelated types
            raise DecodeError(f"malformed batch msgpack: {exc}") from None
        for lo in range(0, n, _SLICE):
            runs.check(list(whole[lo : lo + _SLICE]), lo)
        if trailing:
            raise DecodeError("trailing bytes after the batch's msgpack array")
        return whole  # type: ignore[no-any-return]
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(body), 1), **caps)
    unpacker.feed(body)
    unpacker.read_array_header()
    items: list[tuple[Any, ...]] = []
    unpack = unpacker.unpack
    for lo in range(0, n, _SLICE):
        k = min(_SLICE, n - lo)
        try:
            chunk = [unpack() for _ in range(k)]
        except Exception as exc:
            raise DecodeError(f"malformed batch msgpack in ops {lo}..{lo + k - 1}: {exc}") from None
        runs.check(chunk, lo)
        items.extend(chunk)
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        return items
    except Exception:  # any further bytes at all are trailing junk
        pass
    raise DecodeError("trailing bytes after the batch's msgpack array")


_ORIGIN, _SEQ, _PREV = itemgetter(0), itemgetter(1), itemgetter(8)


class _Runs:
    """Shape, origin, seq and run checks over a batch, one slice of op tuples at a time.

    A *run* is a stretch of ops of one origin with consecutive seqs. Per op the
    checks are C-level passes over the slice's columns (``map``, ``set``,
    ``compress``, slice comparisons); Python code runs once per run, where each
    origin's first op must continue ``after`` (or the origin's previous run in
    the batch) and, in format 2, carry an explicit ``prev``, while every later
    op of a run must leave it out (invariant 4). In format 2 the explicit
    ``prev`` fields mark where the sender says runs start, so each run is
    checked whole (one origin, consecutive seqs) rather than op by op: a batch
    of long chained runs, the honest case and the expensive hostile one, costs
    little more than its unpacking.
    """

    def __init__(self, version: int, after: Mapping[str, int] | None) -> None:
        self.version = version
        self.after = after
        self.last: dict[str, int] = {}  # each origin's last seq in the batch so far
        self.tail: tuple[Any, Any] = (None, None)  # the last op's (origin, seq)

    def check(self, chunk: list[tuple[Any, ...]], lo: int) -> None:
        """Check ``chunk``, the op tuples from index ``lo`` of the batch."""
        if set(map(type, chunk)) != {tuple} or set(map(len, chunk)) != {10}:
            i = next(i for i, it in enumerate(chunk) if not (type(it) is tuple and len(it) == 10))
            raise DecodeError(f"op {lo + i} does not have 10 fields")
        origins = list(map(_ORIGIN, chunk))
        seqs = list(map(_SEQ, chunk))
        if set(map(type, origins)) != {str} or set(map(type, seqs)) != {int} or min(seqs) < 1:
            i = next(
                i
                for i, (o, s) in enumerate(zip(origins, seqs, strict=True))
                if type(o) is not str or type(s) is not int or s < 1
            )
            raise DecodeError(f"op {lo + i} has a malformed origin or seq")
        t_origin, t_seq = self.tail
        follows = list(
            map(
                and_,
                map(eq, origins, [t_origin, *origins[:-1]]),
                map(eq, seqs, map(add, [t_seq if t_seq is not None else -1, *seqs[:-1]], repeat(1))),
            )
        )
        if self.version == 2:
            # an explicit prev must start a run (not follow the op before), and an
            # elided one must follow it: the first op where both or neither hold is wrong
            explicit = list(map(is_not, map(_PREV, chunk), repeat(None)))
            misplaced = list(map(eq, follows, explicit))
            if True in misplaced:
                wrong = misplaced.index(True)
                self._runs(origins[:wrong], seqs[:wrong], list(compress(range(wrong), explicit)), lo)
                if explicit[wrong]:
                    raise ChainError(
                        f"op ({clip_text(origins[wrong])!r}, {seqs[wrong]}) names a prev "
                        "other than the op before it"
                    )
                raise DecodeError(
                    f"op {lo + wrong} leaves out prev but does not follow its predecessor"
                )
            starts = list(compress(range(len(chunk)), explicit))
        else:
            starts = list(compress(range(len(chunk)), map(not_, follows)))
        self._runs(origins, seqs, starts, lo)
        self.tail = (origins[-1], seqs[-1])

    def _runs(self, origins: list[Any], seqs: list[Any], starts: list[int], lo: int) -> None:
        """Each run's first op continues its origin (``after``, or its last run in the batch)."""
        last, after = self.last, self.after
        if not origins:
            return
        if not starts or starts[0] != 0:  # the slice opens inside the last slice's run
            last[origins[0]] = seqs[starts[0] - 1 if starts else -1]
            if not starts:
                return
        ends = [*starts[1:], len(origins)]
        firsts = list(map(origins.__getitem__, starts))
        # each run a new origin of the batch: only ``after`` can be contradicted
        if (
            len(set(firsts)) == len(firsts)
            and not any(map(last.__contains__, firsts))
            and (
                after is None
                or all(map(le, map(seqs.__getitem__, starts), map(add, map(after.get, firsts, repeat(0)), repeat(1))))
            )
        ):
            last.update(zip(firsts, map(seqs.__getitem__, map(sub, ends, repeat(1))), strict=True))
            return
        for s, e in zip(starts, ends, strict=True):
            origin, seq = origins[s], seqs[s]
            prior = last.get(origin)
            if prior is None:
                have = after.get(origin, 0) if after is not None else seq - 1
                if seq > have + 1:
                    raise DecodeError(
                        f"gap in origin {clip_text(origin)!r}: op {seq} after {have}; "
                        "nothing applied"
                    )
            elif seq != prior + 1:
                raise DecodeError(
                    f"gap in origin {clip_text(origin)!r}: op {seq} after {prior} in one batch"
                )
            last[origin] = seq + (e - s - 1)


def decode_batch(
    data: bytes,
    *,
    limits: BatchLimits = DEFAULT_LIMITS,
    after: Mapping[str, int] | None = None,
) -> list[Op]:
    """Unpack a batch made by :func:`encode_batch`.

    Args:
        data: the batch bytes, from the wire.
        limits: caps enforced before anything large is allocated.
        after: the receiver's vector: an origin whose first op in the batch
            is beyond ``after[origin] + 1`` is a gap, refused before any op
            is built. None skips that check (each origin must still be
            contiguous within the batch).

    Returns:
        The ops, every field validated.

    Raises:
        DecodeError: anything malformed: unknown version or compression, over a
            cap, corrupt zstd, bad msgpack, trailing bytes, a malformed op, a
            gap (within the batch or after ``after``).
        ChainError: in format 2, an op names a ``prev`` although the op just
            before it is its predecessor (which the format implies instead).
    """
    try:
        return _decode(data, limits, after)
    except (DecodeError, ChainError) as exc:
        # without the frames below: their payload, unpacker and op tuples (tens of MB
        # for a large batch) would live as long as anyone holds the error
        raise exc.with_traceback(None) from None


def _decode(data: bytes, limits: BatchLimits, after: Mapping[str, int] | None) -> list[Op]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("a batch must be bytes")
    if len(data) > limits.max_compressed:
        raise DecodeError(f"batch of {len(data)} bytes exceeds the cap of {limits.max_compressed}")
    if len(data) < _HEADER:
        raise DecodeError("batch shorter than its header")
    version, mode = data[0], data[1]
    if version not in _VERSIONS:
        raise DecodeError(f"unknown batch format version {version}")
    body = bytes(data[_HEADER:])
    if mode == COMPRESS_ZSTD:
        body = _inflate(body, limits.max_decompressed)
    elif mode != COMPRESS_NONE:
        raise DecodeError(f"unknown batch compression {mode}")
    elif len(body) > limits.max_decompressed:
        raise DecodeError(f"batch payload exceeds the cap of {limits.max_decompressed}")
    items = _unpack(body, limits, version, after)
    # in format 2, _unpack checked that an op leaving out prev follows its predecessor
    return ops_from_tuples(items, elided=version == 2)
