"""What the store hands out: ops for peers, reads of state, stats and the digest.

Invariants:

1. Read-only: nothing here writes (:func:`load_mirrors` reads what a store
   keeps in memory, at open); every function runs on the store's
   connection between writer jobs and sees committed data only.
2. :func:`ops_since` returns each origin's ops in seq order, contiguous from
   the asked vector, at most ``limit`` ops and, past the first, no more than
   ``max_bytes`` counted as :func:`syncfw.log.op_size` (the in-memory replica counts the
   same way). Origins whose next ops touch higher-priority zones go first.
3. The digest covers materialized state and the rejected set, in a canonical
   order, so replicas holding the same ops have the same digest.
4. What :func:`ops_since` serves is verified as it is read: each origin's
   rows are contiguous from the asked seq, each names the hash of the one
   before as ``prev`` (the first, the op at the asked seq, read too), the
   last one served is named by the one after it (read too, when held), and
   the origin's last op hashes to its chain head. A gap or a broken link is
   a :class:`CorruptDatabaseError`, never a silent skip: a damaged file
   must not tell a peer "synced" while it holds less than its vector says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from syncfw.crdt import KINDS, LWW, YDOC
from syncfw.crdt.ydoc import canonical as ydoc_canonical
from syncfw.errors import CorruptDatabaseError
from syncfw.log import (
    GENESIS,
    OP_SIZE_OVERHEAD,
    Op,
    OpId,
    VersionVector,
    built_op,
    decode_value,
    op_hash,
    op_size,
)
from syncfw.store import ydocs
from syncfw.store.sql import chunks
from syncfw.zones import Fleet, Grant

__all__ = ["StoreStats", "ops_since"]

log = logging.getLogger("syncfw.store")

Fetch = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]
"""Runs one read query on the store's connection (errors translated)."""

OP_COLUMNS = "origin, seq, hlc, zone, epoch, key, kind, value, prev, sig"


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a store keeps in memory, as read from its file at open."""

    vv: dict[str, int]
    heads: dict[str, bytes]
    compacted: dict[str, int]
    grants: list[Grant]
    pending: dict[str, dict[int, tuple[Op, str]]]
    high_water: int


async def load_mirrors(fetch: Fetch, node_id: str) -> Loaded:
    """Read the mirrors (and the clock's high-water mark) from the file.

    Raises:
        DecodeError: a pending op is damaged.
    """
    out = Loaded({}, {}, {}, [], {}, 0)
    for origin, seq, hsh, compacted in await fetch("SELECT origin, seq, hash, compacted FROM heads", ()):
        out.vv[origin] = seq
        out.heads[origin] = hsh
        if compacted:
            out.compacted[origin] = compacted
    for prefix, epoch, owners in await fetch(
        "SELECT prefix, epoch, owners FROM grants ORDER BY prefix, epoch", ()
    ):
        out.grants.append(Grant(prefix, frozenset(msgpack.unpackb(owners)), epoch))
    for origin, seq, blob, reason in await fetch("SELECT origin, seq, op, reason FROM pending", ()):
        op = Op.from_tuple(msgpack.unpackb(blob, raw=False))
        out.pending.setdefault(origin, {})[seq] = (op, reason)
    rows = await fetch("SELECT v FROM meta WHERE k = 'hlc'", ())
    high = int(rows[0][0]) if rows else 0
    rows = await fetch("SELECT max(hlc) FROM ops WHERE origin = ?", (node_id,))
    if rows and rows[0][0] is not None:
        high = max(high, int(rows[0][0]))
    return dataclasses.replace(out, high_water=high)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Sizes and counts, for ``syncfw inspect`` and node status."""

    file_bytes: int
    ops: int
    pending: int
    rejected: int
    keys: int
    peers: int


async def ops_since(
    fetch: Fetch,
    have: Mapping[str, int],
    compacted: Mapping[str, int],
    fleet: Fleet,
    vv: Mapping[str, int],
    *,
    limit: int,
    max_bytes: int | None,
    heads: Mapping[str, bytes] | None = None,
) -> list[Op]:
    """Ops held (``have``: the store's vector, ``heads`` its chain heads) beyond ``vv``
    (invariants 2 and 4).

    Raises:
        CorruptDatabaseError: the rows read have a gap or a broken hash link.
    """
    out: list[Op] = []
    size = 0
    wanted: list[tuple[int, str]] = []
    for origin in sorted(have):
        start = vv.get(origin, 0)
        if have[origin] <= start:
            continue
        if start < compacted.get(origin, 0):
            log.warning(
                "peer lacks ops (%s, %d..%d) already compacted here", origin, start + 1,
                compacted[origin],
            )
            continue
        wanted.append((await _priority(fetch, fleet, origin, start, limit), origin))
    wanted.sort(key=lambda po: (-po[0], po[1]))
    for _, origin in wanted:
        if len(out) >= limit:
            break
        start = vv.get(origin, 0)
        want = min(limit - len(out), have[origin] - start)
        if max_bytes is not None:
            if out and size >= max_bytes:  # any further op (>= OP_SIZE_OVERHEAD) is past it
                break
            # No more rows than can fit: each op counts at least OP_SIZE_OVERHEAD. Read (and
            # hashed) whole, a small batch out of a long backlog read it all every time.
            want = min(want, max(1, (max_bytes - size) // OP_SIZE_OVERHEAD + 1))
        # From the op at ``start`` too (when held): the first link is checked; and the
        # op after the last one served, whose ``prev`` checks that one.
        rows = await fetch(
            f"SELECT {OP_COLUMNS} FROM ops WHERE origin = ? AND seq >= ? ORDER BY seq LIMIT ?",
            (origin, start, want + 2),
        )
        ops = verified(
            origin, start, want, list(map(built_op, rows)), heads, have[origin],
            compacted.get(origin, 0),
        )
        for op in ops:
            size += op_size(op)
            if max_bytes is not None and out and size > max_bytes:
                return out
            out.append(op)
    return out


def verified(
    origin: str,
    start: int,
    want: int,
    rows: list[Op],
    heads: Mapping[str, bytes] | None,
    have: int,
    compacted: int = 0,
) -> list[Op]:
    """The ``want`` ops after ``start`` from ``rows`` (which may begin at ``start``),
    checked for contiguity and hash links (invariant 4).

    Raises:
        CorruptDatabaseError: a gap or a broken link.
    """
    prev: bytes | None = GENESIS if start == 0 else None
    if rows and rows[0].seq == start:
        prev = op_hash(rows[0])
        rows = rows[1:]
    elif start > compacted:
        raise _damaged(origin, f"op {start} is missing")
    # ``prev`` None: the op at ``start`` is compacted away; its link was checked at apply.
    after = rows[want : want + 1]  # the op after the last one served (when read and held)
    rows = rows[:want]
    expect = start + 1
    for op in rows:
        if op.seq != expect:
            raise _damaged(origin, f"ops {expect}..{op.seq - 1} are missing")
        if prev is not None and op.prev != prev:
            raise _damaged(origin, f"op {op.seq} does not name op {op.seq - 1}'s hash")
        prev = op_hash(op)
        expect += 1
    if len(rows) < want:
        raise _damaged(origin, f"ops {expect}..{have} are missing")
    # The last op served is checked too: by the next op's ``prev`` (its own link only
    # checks the op before it), else by the chain head below.
    if after and after[0].seq == expect and after[0].prev != prev:
        raise _damaged(origin, f"op {expect} does not name op {expect - 1}'s hash")
    head = heads.get(origin) if heads is not None else None
    if head is not None and rows and rows[-1].seq == have and prev != head:
        raise _damaged(origin, f"op {have} does not hash to the recorded chain head")
    return rows


def _damaged(origin: str, what: str) -> CorruptDatabaseError:
    return CorruptDatabaseError(
        f"the log of origin {origin!r} is damaged: {what} (the file is corrupt; "
        "run `syncfw inspect --check` and restore this node from a peer or a backup)"
    )


async def _priority(fetch: Fetch, fleet: Fleet, origin: str, start: int, window: int) -> int:
    """The highest zone priority among the next ``window`` ops of ``origin`` after ``start``."""
    prios = fleet.priorities
    if not prios:
        return 0
    # One CASE over the configured prefixes; prefix ranges use the key index order.
    case = " ".join("WHEN key >= ? AND key < ? THEN ?" for _ in prios)
    params: list[Any] = [v for p, pr in prios for v in (p, prefix_end(p) or p + "\U0010ffff", pr)]
    rows = await fetch(
        f"SELECT max(CASE {case} ELSE 0 END) FROM "
        "(SELECT key FROM ops WHERE origin = ? AND seq > ? ORDER BY seq LIMIT ?)",
        (*params, origin, start, min(window, 1000)),
    )
    best = rows[0][0]
    return int(best) if best is not None else 0


async def stored_ops(fetch: Fetch, held: Iterable[Op]) -> dict[OpId, Op]:
    """The stored copies of ``held`` (compacted ones are absent), ``sig`` as stored."""
    by_origin: dict[str, list[int]] = defaultdict(list)
    for op in held:
        by_origin[op.origin].append(op.seq)
    out: dict[OpId, Op] = {}
    for origin, seqs in by_origin.items():
        for chunk in chunks(sorted(set(seqs))):
            marks = ",".join("?" * len(chunk))
            for row in await fetch(
                f"SELECT {OP_COLUMNS} FROM ops WHERE origin = ? AND seq IN ({marks})",
                (origin, *chunk),
            ):
                out[(row[0], row[1])] = Op(*row)
    return out


async def present_kinds(fetch: Fetch) -> set[str]:
    """The CRDT kinds some key of this store holds (one indexed probe per kind)."""
    present: set[str] = set()
    for kind in KINDS:
        if kind == YDOC.name:
            rows = await fetch(
                "SELECT 1 FROM ydoc_checkpoints UNION ALL SELECT 1 FROM ydoc_updates LIMIT 1", ()
            )
        else:
            rows = await fetch("SELECT 1 FROM state WHERE kind = ? LIMIT 1", (kind,))
        if rows:
            present.add(kind)
    return present


async def held_kinds(
    fetch: Fetch, keys: Iterable[str], kinds: Iterable[str]
) -> dict[str, set[str]]:
    """The kinds among ``kinds`` that each of ``keys`` holds (absent: holds none)."""
    held: dict[str, set[str]] = defaultdict(set)
    klist = sorted(set(keys))
    for kind in sorted(set(kinds)):
        for chunk in chunks(klist):
            marks = ",".join("?" * len(chunk))
            if kind == YDOC.name:
                sql = (
                    f"SELECT key FROM ydoc_checkpoints WHERE key IN ({marks}) UNION "
                    f"SELECT DISTINCT key FROM ydoc_updates WHERE key IN ({marks})"
                )
                params: tuple[Any, ...] = (*chunk, *chunk)
            else:
                sql = f"SELECT key FROM state WHERE kind = ? AND key IN ({marks})"
                params = (kind, *chunk)
            for (key,) in await fetch(sql, params):
                held[key].add(kind)
    return held


async def load_states(fetch: Fetch, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """Decoded states of non-lww ``(kind, key)`` pairs, empty where absent.

    Raises:
        DecodeError: a stored state is damaged.
    """
    states: dict[tuple[str, str], Any] = {}
    by_kind: dict[str, list[str]] = defaultdict(list)
    for kind, key in sorted(set(keys)):
        by_kind[kind].append(key)
        states[(kind, key)] = KINDS[kind].empty()
    for kind, klist in by_kind.items():
        crdt = KINDS[kind]
        for chunk in chunks(klist):
            marks = ",".join("?" * len(chunk))
            for key, data in await fetch(
                f"SELECT key, data FROM state WHERE kind = ? AND key IN ({marks})", (kind, *chunk)
            ):
                states[(kind, key)] = crdt.decode(data)
    return states


async def read_lww(fetch: Fetch, key: str) -> bytes | None:
    """The winning payload of an lww key (None when absent or deleted)."""
    rows = await fetch("SELECT hlc, origin, data FROM state WHERE kind = 'lww' AND key = ?", (key,))
    if not rows:
        return None
    hlc, origin, data = rows[0]
    return LWW.read((hlc, origin, data))


async def scan_lww(fetch: Fetch, prefix: str) -> dict[str, Any]:
    """Every present lww key under ``prefix`` with its decoded value."""
    end = prefix_end(prefix)
    if end is None:  # no upper bound: every key from the prefix on, filtered
        rows = await fetch(
            "SELECT key, data FROM state WHERE kind = 'lww' AND key >= ? ORDER BY key", (prefix,)
        )
        rows = [r for r in rows if r[0].startswith(prefix)]
    else:
        rows = await fetch(
            "SELECT key, data FROM state WHERE kind = 'lww' AND key >= ? AND key < ? ORDER BY key",
            (prefix, end),
        )
    return {key: decode_value(data) for key, data in rows if data}


def prefix_end(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix``
    (None: there is none, the prefix is all U+10FFFF).

    ``prefix + "\U0010ffff"`` is not it: that misses keys whose rest starts
    with U+10FFFF. Trailing U+10FFFF characters cannot be incremented and
    are dropped first; surrogates are skipped (SQLite text is UTF-8).
    """
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    last = ord(stripped[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:
        last = 0xE000
    return stripped[:-1] + chr(last)


async def rejected(fetch: Fetch) -> list[tuple[str, int, str, str]]:
    """Rejected ops as ``(origin, seq, key, reason)``, by origin and seq."""
    rows = await fetch("SELECT origin, seq, key, reason FROM rejected ORDER BY origin, seq", ())
    return [(str(o), int(s), str(k), str(r)) for o, s, k, r in rows]


async def rejected_bytes(fetch: Fetch) -> int:
    """The bytes the stored rejected ops take, as :func:`~syncfw.log.op_size` counts them.

    Read through ``rejected`` (one row per rejected op, kept beside it), so the cost is
    the rejected ops', not a scan of the whole log at every open (CROSS JOIN keeps
    ``rejected`` the outer loop); ops compacted away drop out of the join."""
    rows = await fetch(
        "SELECT count(*), coalesce(sum(length(o.key) + length(o.value)), 0) "
        "FROM rejected AS r CROSS JOIN ops AS o ON o.origin = r.origin AND o.seq = r.seq",
        (),
    )
    n, size = rows[0]
    return int(size) + int(n) * OP_SIZE_OVERHEAD


async def peer_acks(fetch: Fetch) -> dict[str, VersionVector]:
    """Every known peer's acknowledged version vector."""
    rows = await fetch("SELECT peer, vv FROM peers", ())
    return {peer: msgpack.unpackb(blob, strict_map_key=False) for peer, blob in rows}


async def file_bytes(fetch: Fetch) -> int:
    """The database size: page count times page size."""
    (pc,), (ps,) = (await fetch("PRAGMA page_count", ()))[0], (await fetch("PRAGMA page_size", ()))[0]
    return int(pc) * int(ps)


async def stats(fetch: Fetch) -> StoreStats:
    """Counts and the file size."""
    counts = [
        int((await fetch(f"SELECT count(*) FROM {t}", ()))[0][0])
        for t in ("ops", "pending", "rejected", "state", "peers")
    ]
    return StoreStats(await file_bytes(fetch), *counts)


async def state_digest(fetch: Fetch) -> str:
    """A hex digest of the whole materialized state and rejected set (invariant 3)."""
    h = hashlib.blake2b(digest_size=16)
    for kind, key, hlc, origin, data in await fetch(
        "SELECT kind, key, hlc, origin, data FROM state ORDER BY kind, key", ()
    ):
        if kind == YDOC.name:  # merged Yjs updates: equal content, unequal bytes
            data = ydoc_canonical(data)
        h.update(msgpack.packb([kind, key, hlc, origin, data], use_bin_type=True))
    for ydoc_row in await ydocs.digest_rows(fetch):  # ydoc keys live apart (.ydocs)
        h.update(msgpack.packb(list(ydoc_row), use_bin_type=True))
    for row in await rejected(fetch):
        h.update(msgpack.packb(list(row), use_bin_type=True))
    return h.hexdigest()
