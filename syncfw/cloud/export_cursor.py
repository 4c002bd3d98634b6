"""The exporter's durable cursor: a version vector in the node's own SQLite file.

Invariants:

1. One sidecar table, ``export_cursor (exporter, origin, seq)``, created by
   this module with ``CREATE TABLE IF NOT EXISTS`` (like the mesh's
   ``mesh_members``: the store's checks at open accept a syncfw file with
   it; no store migration is involved). It is never created in a file that
   is not already a syncfw store.
2. A row says: every op of ``origin`` up to ``seq`` is in the stream
   (acknowledged by JetStream, to this exporter or, read from the shared
   progress, to another). It is written only after that acknowledgement and
   never moves backwards (``max``).
3. Blocking SQLite calls run on a worker thread with a ``busy_timeout``: the
   store's writer is waited for, never failed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from pathlib import Path

__all__ = ["TABLE", "CursorFile"]

TABLE = "export_cursor"
_BUSY_MS = 5000
_APPLICATION_ID = 0x5359_4E43  # the store's mark (syncfw.store.schema)
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    exporter TEXT NOT NULL,
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (exporter, origin)
) WITHOUT ROWID
"""
_UPSERT = (
    f"INSERT INTO {TABLE} (exporter, origin, seq) VALUES (?, ?, ?) "
    "ON CONFLICT (exporter, origin) DO UPDATE SET seq = max(seq, excluded.seq)"
)


class CursorFile:
    """The cursor of exporter ``name`` in the node's file ``path``."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.path = str(path)
        self.name = name
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if not Path(self.path).is_file():
                raise FileNotFoundError(f"no syncfw store at {self.path!r}")
            conn = sqlite3.connect(
                self.path, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
                (app_id,) = conn.execute("PRAGMA application_id").fetchone()
                if app_id != _APPLICATION_ID:
                    raise ValueError(f"{self.path!r} is not a syncfw store")
                conn.execute(_CREATE)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _load(self) -> dict[str, int]:
        rows = self._connect().execute(
            f"SELECT origin, seq FROM {TABLE} WHERE exporter = ?", (self.name,)
        )
        return {str(o): int(s) for o, s in rows}

    def _save(self, moved: Mapping[str, int]) -> None:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_UPSERT, [(self.name, o, s) for o, s in moved.items()])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def load(self) -> dict[str, int]:
        """The committed cursor (``{}`` for a new exporter)."""
        async with self._lock:
            return await asyncio.to_thread(self._load)

    async def save(self, moved: Mapping[str, int]) -> None:
        """Commit ``moved`` (origin -> seq now in the stream) in one transaction."""
        if not moved:
            return
        async with self._lock:
            await asyncio.to_thread(self._save, dict(moved))

    async def aclose(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await asyncio.to_thread(conn.close)
