"""Read-only inspection of a store file, for ``syncfw inspect``."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import msgpack

from syncfw.clock import hlc_logical, hlc_physical
from syncfw.errors import (
    CorruptDatabaseError,
    ForeignDatabaseError,
    SchemaVersionError,
    StorageError,
)
from syncfw.store.schema import APPLICATION_ID, SCHEMA_VERSION

__all__ = ["inspect_store"]


def _file_facts(path: str) -> tuple[str, str, int]:
    """The path, a read-only URI for it, and the size of its WAL."""
    if not os.path.exists(path):
        raise StorageError(f"{path!r} does not exist")
    wal = path + "-wal"
    wal_bytes = os.path.getsize(wal) if os.path.exists(wal) else 0
    return path, "file:" + Path(path).resolve().as_posix() + "?mode=ro", wal_bytes


async def inspect_store(path: str | Path, *, rejected_limit: int = 50) -> dict[str, Any]:
    """Describe a store file without changing it.

    Returns:
        node id, fleet id, HLC high-water mark, version vector, zones (grants),
        pending and rejected ops, peers' acknowledgements, sizes.

    Raises:
        StorageError: the file does not exist.
        CorruptDatabaseError, ForeignDatabaseError, SchemaVersionError: as at open.
    """
    path, uri, wal_bytes = _file_facts(str(path))
    try:
        conn = await aiosqlite.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {path!r}: {exc}") from None
    try:
        try:
            app_id = (await conn.execute_fetchall("PRAGMA application_id"))[0][0]  # type: ignore[index]
            version = (await conn.execute_fetchall("PRAGMA user_version"))[0][0]  # type: ignore[index]
        except sqlite3.DatabaseError as exc:
            raise CorruptDatabaseError(f"{path!r} is not a readable SQLite database: {exc}") from None
        if app_id != APPLICATION_ID:
            raise ForeignDatabaseError(f"{path!r} is not a syncfw store")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(f"{path!r} has unknown schema version {version}")
        try:
            meta: dict[str, Any] = dict(await conn.execute_fetchall("SELECT k, v FROM meta"))  # type: ignore[arg-type]
            heads = await conn.execute_fetchall(
                "SELECT origin, seq, compacted FROM heads ORDER BY origin"
            )
            grants = await conn.execute_fetchall(
                "SELECT prefix, epoch, owners FROM grants ORDER BY prefix, epoch"
            )
            pending = await conn.execute_fetchall(
                "SELECT origin, seq, reason FROM pending ORDER BY origin, seq LIMIT 100"
            )
            rejected = await conn.execute_fetchall(
                "SELECT origin, seq, key, reason FROM rejected ORDER BY origin, seq LIMIT ?",
                (rejected_limit,),
            )
            peers = await conn.execute_fetchall("SELECT peer, vv FROM peers ORDER BY peer")
            counts = {
                t: (await conn.execute_fetchall(f"SELECT count(*) FROM {t}"))[0][0]  # type: ignore[index]
                for t in ("ops", "pending", "rejected", "state")
            }
            page_count = (await conn.execute_fetchall("PRAGMA page_count"))[0][0]  # type: ignore[index]
            page_size = (await conn.execute_fetchall("PRAGMA page_size"))[0][0]  # type: ignore[index]
        except sqlite3.DatabaseError as exc:
            raise CorruptDatabaseError(f"{path!r} is damaged: {exc}") from None
    finally:
        await conn.close()
    hlc = int(meta.get("hlc", 0))
    return {
        "path": path,
        "schema_version": version,
        "node_id": meta.get("node_id"),
        "fleet_id": meta.get("fleet_id"),
        "hlc": {"value": hlc, "physical_ms": hlc_physical(hlc), "logical": hlc_logical(hlc)},
        "version_vector": {o: s for o, s, _ in heads},
        "compacted": {o: c for o, _, c in heads if c},
        "zones": [
            {"prefix": p, "epoch": e, "owners": msgpack.unpackb(o)} for p, e, o in grants
        ],
        "pending": [{"origin": o, "seq": s, "reason": r} for o, s, r in pending],
        "rejected": [{"origin": o, "seq": s, "key": k, "reason": r} for o, s, k, r in rejected],
        "peers": {p: msgpack.unpackb(v, strict_map_key=False) for p, v in peers},
        "counts": counts,
        "sizes": {
            "db_bytes": page_count * page_size,
            "wal_bytes": wal_bytes,
        },
    }
