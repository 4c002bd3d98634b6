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
from syncfw.log import GENESIS, Op, op_hash
from syncfw.store.export import OP_COLUMNS
from syncfw.store.schema import APPLICATION_ID, SCHEMA_VERSION
from syncfw.store.sql import quick_check

__all__ = ["check_store", "inspect_store"]


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


async def check_store(path: str | Path) -> list[str]:
    """Check a store file without changing it: ``PRAGMA quick_check`` (every page, no
    time bound) and every origin's log (contiguous, hash-linked, ending at its head).

    Returns:
        the findings; empty when the file is sound.

    Raises:
        StorageError: the file does not exist or cannot be opened.
    """
    path, uri, _ = _file_facts(str(path))
    try:
        conn = await aiosqlite.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {path!r}: {exc}") from None
    try:
        try:
            found = await quick_check(conn, None) or []
        except CorruptDatabaseError as exc:
            return [str(exc)]
        try:
            found += await _check_logs(conn)
        except sqlite3.DatabaseError as exc:
            found.append(f"reading the log failed: {exc}")
    finally:
        await conn.close()
    return found


async def _check_logs(conn: aiosqlite.Connection) -> list[str]:
    found: list[str] = []
    heads = await conn.execute_fetchall("SELECT origin, seq, hash, compacted FROM heads ORDER BY origin")
    for origin, head_seq, head_hash, compacted in heads:
        expect, prev = compacted + 1, GENESIS if not compacted else None
        async with conn.execute(
            f"SELECT {OP_COLUMNS} FROM ops WHERE origin = ? AND seq > ? ORDER BY seq",
            (origin, compacted),
        ) as cur:
            async for row in cur:
                op = Op(*row)
                if op.seq != expect:
                    found.append(f"origin {origin!r}: ops {expect}..{op.seq - 1} are missing")
                    prev = None
                elif prev is not None and op.prev != prev:
                    found.append(f"origin {origin!r}: op {op.seq} does not name op {op.seq - 1}'s hash")
                prev, expect = op_hash(op), op.seq + 1
        if expect <= head_seq:
            found.append(f"origin {origin!r}: ops {expect}..{head_seq} are missing")
        elif prev is not None and expect == head_seq + 1 and prev != head_hash:
            found.append(f"origin {origin!r}: op {head_seq} does not hash to the chain head")
    return found
