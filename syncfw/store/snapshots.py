"""Building and installing state snapshots in SQLite (:mod:`syncfw.sync.snapshot`).

Invariants:

1. Both run on the store's writer (``Store.snapshot``, ``Store.install_snapshot``),
   so no commit interleaves: a snapshot is the state of one instant and the
   vector and heads it names are those of that instant.
2. :func:`plan_install` is pure but for the reads it makes: it returns the
   steps of one transaction. Every state is joined under its kind's merge
   rule (lww through the one guarded upsert, ydoc by merging the checkpoint,
   the others by :meth:`CrdtType.merge`), so the install is idempotent and
   order-free (snapshot invariant 3).
3. Only origins the snapshot holds more of than the store move: their head,
   vector entry and compaction point become the snapshot's, their ops at or
   below it are deleted (the log of an origin is contiguous above its
   compaction point), and so are their held-back ops at or below it. An
   origin the store holds as far as the snapshot must have the same head,
   else the two histories differ and nothing is installed (``ForkError``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from syncfw.crdt import KINDS, YDOC
from syncfw.crdt.ydoc import EMPTY_UPDATE, merge
from syncfw.errors import ForkError
from syncfw.store import export, ydocs
from syncfw.store.planner import TRUST_STATE
from syncfw.store.sql import UPSERT_LWW, UPSERT_STATE, Step
from syncfw.sync.snapshot import DEFAULT_MAX_SNAPSHOT_BYTES, Snapshot, StateRow, check_size
from syncfw.zones import Grant

__all__ = ["Install", "build", "plan_install"]

Fetch = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]

_CRDT_KINDS = tuple(k for k in KINDS if k != YDOC.name)
UPSERT_CHECKPOINT = (
    "INSERT INTO ydoc_checkpoints (key, hlc, data) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET data = excluded.data, hlc = max(hlc, excluded.hlc)"
)
SET_HEAD = (
    "INSERT INTO heads (origin, seq, hash, compacted) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
    "compacted = excluded.compacted"
)


async def build(
    fetch: Fetch,
    vv: Mapping[str, int],
    heads: Mapping[str, bytes],
    max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
) -> Snapshot:
    """The store's state now (call on the writer: invariant 1).

    Raises:
        SnapshotTooLargeError: the stored state exceeds ``max_bytes``; measured with
            SQL before any row is read, so a sender never holds more than a receiver takes.
    """
    marks = ",".join("?" * len(_CRDT_KINDS))
    ((count, stored),) = await fetch(
        "SELECT count(*), coalesce(sum(length(key) + length(data)), 0) FROM ("
        "SELECT key, data FROM state UNION ALL SELECT key, data FROM ydoc_checkpoints "
        "UNION ALL SELECT key, data FROM ydoc_updates)",
        (),
    )
    check_size(int(count), int(stored), max_bytes)
    rows: list[StateRow] = [
        (str(k), str(key), int(h), str(o), bytes(d))
        for k, key, h, o, d in await fetch(
            f"SELECT kind, key, hlc, origin, data FROM state WHERE kind IN ({marks})",
            _CRDT_KINDS,
        )
    ]
    ykeys = sorted(
        {str(r[0]) for r in await fetch("SELECT key FROM ydoc_checkpoints", ())}
        | {str(r[0]) for r in await fetch("SELECT DISTINCT key FROM ydoc_updates", ())}
    )
    for key in ykeys:
        p = await ydocs.pile(fetch, key)
        rows.append((YDOC.name, key, p.newest(), "", p.state()))
    grants = [
        (str(p), int(e), tuple(sorted(msgpack.unpackb(o))))
        for p, e, o in await fetch("SELECT prefix, epoch, owners FROM grants", ())
    ]
    statements = [
        bytes(d) for (d,) in await fetch("SELECT data FROM state WHERE kind = ?", (TRUST_STATE,))
    ]
    live = {o: s for o, s in vv.items() if s > 0}
    return Snapshot(
        live, {o: heads[o] for o in live}, sorted(rows), sorted(grants), tuple(sorted(statements))
    )


@dataclass(slots=True)
class Install:
    """What installing a snapshot does: one transaction's steps and the mirror updates."""

    take: dict[str, int]
    """Origins that move: origin -> the snapshot's seq (also their compaction point)."""
    heads: dict[str, bytes] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    grants: list[Grant] = field(default_factory=list)
    statements: list[bytes] = field(default_factory=list)
    newest_hlc: int = 0


async def plan_install(
    fetch: Fetch, snap: Snapshot, vv: Mapping[str, int], heads: Mapping[str, bytes]
) -> Install:
    """The transaction that joins ``snap`` into the store (invariants 2-3).

    Raises:
        ForkError: an origin held as far as the snapshot has another head there.
        DecodeError: a stored state is damaged.
    """
    for origin, seq in snap.vv.items():
        if vv.get(origin, 0) == seq and heads.get(origin) != snap.heads[origin]:
            raise ForkError(
                f"the snapshot's head of {origin!r} at seq {seq} is not the one held here: "
                "two different histories; nothing installed"
            )
    take = {o: s for o, s in snap.vv.items() if s > vv.get(o, 0)}
    plan = Install(take, {o: snap.heads[o] for o in take})
    if not take:
        return plan  # this store covers the snapshot: nothing to join (idempotent)
    lww = [(key, h, o, d) for k, key, h, o, d in snap.states if k == "lww"]
    others = [(k, key, h, d) for k, key, h, _, d in snap.states if k not in ("lww", YDOC.name)]
    held = await export.load_states(fetch, [(k, key) for k, key, _, _ in others])
    merged = []
    for kind, key, h, data in others:
        crdt = KINDS[kind]
        merged.append((kind, key, h, crdt.encode(crdt.merge(held[(kind, key)], crdt.decode(data)))))
    ydoc = []
    for _, key, h, _, data in (r for r in snap.states if r[0] == YDOC.name):
        rows = await fetch("SELECT data FROM ydoc_checkpoints WHERE key = ?", (key,))
        mine = bytes(rows[0][0]) if rows else EMPTY_UPDATE
        ydoc.append((key, h, merge(mine, data)))
    plan.grants = [Grant(p, frozenset(o), e) for p, e, o in snap.grants]
    plan.statements = list(snap.statements)
    plan.newest_hlc = max((r[2] for r in snap.states), default=0)
    plan.steps = [
        (UPSERT_LWW, lww),
        (UPSERT_STATE, merged),
        (UPSERT_CHECKPOINT, ydoc),
        (
            "INSERT OR IGNORE INTO grants (prefix, epoch, owners) VALUES (?, ?, ?)",
            [(p, e, msgpack.packb(sorted(o))) for p, e, o in snap.grants],
        ),
        (
            "INSERT OR IGNORE INTO state (kind, key, data) VALUES (?, ?, ?)",
            [(TRUST_STATE, hashlib.sha256(v).hexdigest(), v) for v in snap.statements],
        ),
        ("DELETE FROM ops WHERE origin = ? AND seq <= ?", list(take.items())),
        ("DELETE FROM pending WHERE origin = ? AND seq <= ?", list(take.items())),
        (SET_HEAD, [(o, s, snap.heads[o], s) for o, s in take.items()]),
    ]
    return plan
