"""Yjs documents stored by the edit: one row per update, merged lazily into a checkpoint.

A ydoc key's state is its checkpoint (``ydoc_checkpoints``) merged with the
updates stored since (``ydoc_updates``, one row per accepted op, exactly the
bytes the op carries). See schema version 2 in :mod:`.schema`.

Invariants:

1. An edit writes its own update and nothing else of the document: staging a
   ydoc op (:class:`~syncfw.store.stage.Stage`) inserts one row and never
   reads or rewrites the checkpoint, so an edit's cost and the WAL it writes
   do not depend on the document's size.
2. The checkpoint moves only by :func:`checkpoint`, on the store's writer
   (so no commit interleaves), in one transaction that writes the merge of
   the checkpoint and the rows read and deletes exactly those rows. A crash
   on either side of it leaves a state equal to the one before.
3. Merging is order-free and keeps structs still waiting for their
   dependencies (:mod:`syncfw.crdt.ydoc`, invariant 3), so a read never loses
   what a live document would leave out.
4. :func:`checkpoint` rewrites the document only once the updates since the
   last one reach :data:`CHECKPOINT_SHARE` of its size (and at least
   :data:`CHECKPOINT_MIN_BYTES`), or :data:`CHECKPOINT_MAX_UPDATES` rows: the
   rewrite costs O(document) once per O(document) bytes of edits, so its
   amortized cost per edit is a small multiple of the edit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pycrdt

from syncfw.crdt.ydoc import EMPTY_UPDATE, digest_form, merge
from syncfw.errors import DecodeError

if TYPE_CHECKING:
    from syncfw.store.store import Store

__all__ = [
    "CHECKPOINT_MAX_UPDATES",
    "CHECKPOINT_MIN_BYTES",
    "CHECKPOINT_SHARE",
    "INSERT_UPDATE",
    "Pile",
    "checkpoint",
    "diff",
    "digest_rows",
    "other_kind",
    "pile",
    "read",
]

Fetch = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]

INSERT_UPDATE = (
    "INSERT OR IGNORE INTO ydoc_updates (key, origin, seq, hlc, data) VALUES (?, ?, ?, ?, ?)"
)
"""One accepted ydoc op's update (the op id makes a replay a no-op)."""

CHECKPOINT_MIN_BYTES = 256 * 1024
CHECKPOINT_SHARE = 0.5
CHECKPOINT_MAX_UPDATES = 20_000


@dataclass(frozen=True, slots=True)
class Pile:
    """What a ydoc key holds: the checkpoint and the updates stored since."""

    checkpoint: bytes
    hlc: int
    updates: tuple[tuple[str, int, int, bytes], ...]
    """``(origin, seq, hlc, update)`` rows."""

    def state(self) -> bytes:
        """The merged update of the whole document (invariant 3)."""
        if not self.updates:
            return self.checkpoint
        return merge(self.checkpoint, *(u for _, _, _, u in self.updates))

    def newest(self) -> int:
        """The greatest hlc folded into this key."""
        return max([self.hlc, *(h for _, _, h, _ in self.updates)])


async def pile(fetch: Fetch, key: str) -> Pile:
    """Read everything stored for ``key`` (an empty document when absent).

    One statement, so one snapshot: a fold committing between a read of the
    checkpoint and a read of the updates would otherwise lose the updates it
    folded (the old checkpoint without them, the update rows already gone).
    """
    rows = await fetch(
        "SELECT 0, '', 0, hlc, data FROM ydoc_checkpoints WHERE key = ? "
        "UNION ALL SELECT 1, origin, seq, hlc, data FROM ydoc_updates WHERE key = ?",
        (key, key),
    )
    hlc, data = 0, EMPTY_UPDATE
    updates = []
    for is_update, o, s, h, d in rows:
        if is_update:
            updates.append((str(o), int(s), int(h), bytes(d)))
        else:
            hlc, data = int(h), bytes(d)
    return Pile(data, hlc, tuple(updates))


async def read(fetch: Fetch, key: str) -> bytes:
    """The merged state of ``key``: one v1 update (``EMPTY_UPDATE`` when absent)."""
    return (await pile(fetch, key)).state()


def diff(state: bytes, state_vector: bytes | None) -> bytes:
    """What a client at ``state_vector`` lacks of ``state`` (all of it for None).

    Raises:
        DecodeError: ``state_vector`` is not a Yjs state vector.
    """
    if state_vector is None:
        return state
    if not isinstance(state_vector, bytes | bytearray | memoryview):
        raise DecodeError(f"a Yjs state vector is bytes, not {type(state_vector).__name__}")
    try:
        return pycrdt.get_update(state, bytes(state_vector))
    except Exception as exc:  # yrs raises plain exceptions on malformed input
        raise DecodeError(f"malformed Yjs state vector: {exc}") from None


async def other_kind(fetch: Fetch, key: str) -> str | None:
    """The kind other than ydoc that ``key`` holds, if any (a key holds one kind)."""
    rows = await fetch("SELECT kind FROM state WHERE key = ? AND kind != 'ydoc' LIMIT 1", (key,))
    return str(rows[0][0]) if rows else None


async def sizes(fetch: Fetch, key: str) -> tuple[int, int, int]:
    """``(checkpoint bytes, update rows, update bytes)`` of ``key``, without reading them."""
    cp = await fetch("SELECT length(data) FROM ydoc_checkpoints WHERE key = ?", (key,))
    up = await fetch(
        "SELECT count(*), coalesce(sum(length(data)), 0) FROM ydoc_updates WHERE key = ?", (key,)
    )
    return (int(cp[0][0]) if cp else 0), int(up[0][0]), int(up[0][1])


def due(checkpoint_bytes: int, rows: int, update_bytes: int) -> bool:
    """Whether the updates since the checkpoint warrant rewriting it (invariant 4)."""
    if rows >= CHECKPOINT_MAX_UPDATES:
        return True
    return rows > 1 and update_bytes >= max(CHECKPOINT_MIN_BYTES, checkpoint_bytes * CHECKPOINT_SHARE)


async def checkpoint(store: Store, key: str, *, force: bool = False) -> bool:
    """Fold ``key``'s stored updates into its checkpoint, if due (or ``force``).

    Runs on the store's writer (invariant 2). Returns True if it rewrote the
    checkpoint.

    Raises:
        StoreClosedError: the store is closed.
        DecodeError: the stored updates do not merge (a damaged file).
    """

    async def run() -> bool:
        fetch = store._read
        if not force and not due(*await sizes(fetch, key)):
            return False
        p = await pile(fetch, key)
        if not p.updates:
            return False
        merged = p.state()
        await store._txn(
            [
                (
                    "INSERT OR REPLACE INTO ydoc_checkpoints (key, hlc, data) VALUES (?, ?, ?)",
                    [(key, p.newest(), merged)],
                ),
                (
                    "DELETE FROM ydoc_updates WHERE key = ? AND origin = ? AND seq = ?",
                    [(key, o, s) for o, s, _, _ in p.updates],
                ),
            ]
        )
        return True

    # Imported here: the writer imports the stage, which imports this module.
    from syncfw.store.writer import Priority

    return await store._call(run, Priority.MAINTENANCE)


async def digest_rows(fetch: Fetch) -> list[tuple[str, str, int, str, bytes]]:
    """Every ydoc key as a digest row ``(kind, key, hlc, origin, digest form)``.

    Replicas holding the same ops give the same rows, however their updates
    are split between checkpoint and update rows and in whatever order they
    were merged (:func:`~syncfw.crdt.ydoc.digest_form`).
    """
    keys = sorted(
        {str(r[0]) for r in await fetch("SELECT key FROM ydoc_checkpoints", ())}
        | {str(r[0]) for r in await fetch("SELECT DISTINCT key FROM ydoc_updates", ())}
    )
    out = []
    for key in keys:
        p = await pile(fetch, key)
        out.append(("ydoc", key, p.newest(), "", digest_form(p.state())))
    return out
