"""The member table kept across restarts, in the node's own SQLite file.

Invariants:

1. One small table, ``mesh_members`` (address, node id, last seen, wall-clock
   ms), part of the store's schema since version 3 (``syncfw.store.schema``;
   a version 2 file got it from its first save, which is why the migration
   and the save here both say ``CREATE TABLE IF NOT EXISTS`` with the same
   definition); this module reads and replaces its rows and touches nothing
   else in the file. It is never created in a file that is not already a
   syncfw store (``application_id``).
2. It never fails the mesh: a file that cannot be read or written is a
   WARNING (and the mesh runs on its seeds), never an exception out of
   :meth:`MemberFile.load` or :meth:`MemberFile.save`. Rows are checked again
   when folded in (:meth:`~syncfw.mesh.membership.Membership.restore`).
3. Bounded: at most ``limit`` rows are written or read, the most recently
   seen first.
3a. An in-memory store (``:memory:``, ``file::memory:...``) has no file to keep
   members in: loading gives none and saving does nothing, without a warning.
4. Blocking SQLite calls run on a worker thread, each on its own short-lived
   connection that waits for the store's writer (``busy_timeout``) rather
   than failing; the file is in WAL mode, so readers never block it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from syncfw.mesh.membership import Saved

__all__ = ["TABLE", "MemberFile"]

log = logging.getLogger("syncfw.mesh")

TABLE = "mesh_members"
_BUSY_MS = 5000
_APPLICATION_ID = 0x5359_4E43  # the store's mark (syncfw.store.schema), which mesh may not import
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    address TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL
) WITHOUT ROWID
"""


class MemberFile:
    """Members persisted in ``path`` (the node's SQLite file).

    Args:
        path: the node's file (``node.path``), already opened once by the
            store so its schema holds the table.
        limit: most rows kept.
    """

    def __init__(self, path: str | Path, *, limit: int = 1024) -> None:
        self.path = str(path)
        self.limit = limit

    @property
    def in_memory(self) -> bool:
        """True for an in-memory store's path: nothing is kept (invariant 3a)."""
        return self.path == ":memory:" or self.path.startswith("file::memory:")

    def _connect(self, *, create: bool) -> sqlite3.Connection:
        if not Path(self.path).is_file():
            raise sqlite3.OperationalError(f"no such file {self.path!r}")
        conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
            (app_id,) = conn.execute("PRAGMA application_id").fetchone()
            if app_id != _APPLICATION_ID:
                raise sqlite3.DatabaseError(f"{self.path!r} is not a syncfw store")
            if create:
                conn.execute(_CREATE)
        except BaseException:
            conn.close()
            raise
        return conn

    def _load(self) -> list[Saved]:
        conn = self._connect(create=False)
        try:
            known = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
            ).fetchone()
            if known is None:
                return []  # never saved: nothing to restore (reading creates nothing)
            rows = conn.execute(
                f"SELECT node_id, address, last_seen_ms FROM {TABLE} "
                "ORDER BY last_seen_ms DESC, address LIMIT ?",
                (self.limit,),
            ).fetchall()
        finally:
            conn.close()
        return [
            Saved(node_id, address, last_seen)
            for node_id, address, last_seen in rows
            if isinstance(node_id, str) and isinstance(address, str) and isinstance(last_seen, int)
        ]

    def _save(self, members: Sequence[Saved]) -> None:
        keep = sorted(members, key=lambda s: (-s.last_seen_ms, s.address))[: self.limit]
        conn = self._connect(create=True)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"DELETE FROM {TABLE}")
                conn.executemany(
                    f"INSERT OR REPLACE INTO {TABLE} (address, node_id, last_seen_ms) "
                    "VALUES (?, ?, ?)",
                    [(s.address, s.node_id, s.last_seen_ms) for s in keep],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()

    async def load(self) -> list[Saved]:
        """The members saved last (empty, with a WARNING, if the file cannot be read)."""
        if self.in_memory:
            return []
        try:
            return await asyncio.to_thread(self._load)
        except sqlite3.Error as exc:
            log.warning(
                "members of %s not restored (the mesh starts from its seeds): %s", self.path, exc
            )
            return []

    async def save(self, members: Sequence[Saved]) -> bool:
        """Replace the saved members; False (with a WARNING) if the file cannot be written,
        False (silently) for an in-memory store."""
        if self.in_memory:
            return False
        try:
            await asyncio.to_thread(self._save, members)
        except sqlite3.Error as exc:
            log.warning("members of %s not saved: %s", self.path, exc)
            return False
        return True
