"""The SQLite schema of a node's store, its version, and the checks made at open.

A syncfw file is marked by ``PRAGMA application_id`` (:data:`APPLICATION_ID`)
and carries its schema version in ``PRAGMA user_version``. Opening a file
checks both *before* writing anything: a foreign SQLite file, a file from a
newer schema, or a damaged file is refused with a clear error and left exactly
as it was. Migrations are recorded steps, each run in its own transaction.
"""

from __future__ import annotations

APPLICATION_ID = 0x5359_4E43  # "SYNC"
SCHEMA_VERSION = 3

# Version 1. Ops are kept in one table keyed by their id; ``status`` is 0 for
# applied, 1 for rejected (a rejected op is still part of its origin's chain and
# is still relayed, so every replica records the same rejection).
SCHEMA_V1 = """
CREATE TABLE meta (
    k TEXT PRIMARY KEY,
    v
) WITHOUT ROWID;

CREATE TABLE ops (
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    zone TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    value BLOB NOT NULL,
    prev BLOB NOT NULL,
    sig BLOB,
    status INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (origin, seq)
) WITHOUT ROWID;

-- The version vector: highest contiguous seq per origin, the hash of that op
-- (the chain head the next op must name as prev) and how far the log of that
-- origin has been compacted (ops at or below it are only in state).
CREATE TABLE heads (
    origin TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    compacted INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Ops held back: a gap in their origin's sequence, a zone epoch not yet
-- granted here, or a timestamp too far ahead of local time.
CREATE TABLE pending (
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    op BLOB NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (origin, seq)
) WITHOUT ROWID;

CREATE TABLE rejected (
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (origin, seq)
) WITHOUT ROWID;

-- Materialized state, one row per (kind, key). For lww rows, hlc/origin hold
-- the winning write so a remote write can be merged by one guarded upsert.
CREATE TABLE state (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    hlc INTEGER NOT NULL DEFAULT 0,
    origin TEXT NOT NULL DEFAULT '',
    data BLOB NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;

CREATE TABLE grants (
    prefix TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    owners BLOB NOT NULL,
    PRIMARY KEY (prefix, epoch)
) WITHOUT ROWID;

-- The version vector each peer last acknowledged: drives compaction and
-- avoids resending after a restart.
CREATE TABLE peers (
    peer TEXT PRIMARY KEY,
    vv BLOB NOT NULL
) WITHOUT ROWID;
"""

# Version 2: Yjs documents are stored by the edit, not by the document
# (syncfw.store.ydocs). Each accepted ydoc op's update is one row of
# ``ydoc_updates`` (so an edit writes a row the size of the edit); a
# checkpoint (the merge of the updates folded so far) lives apart in
# ``ydoc_checkpoints`` and is rewritten only when the updates since it have
# grown to a share of its size. A ydoc key's state is its checkpoint merged
# with its updates; ydoc states kept in ``state`` by version 1 become
# checkpoints.
SCHEMA_V2 = """
CREATE TABLE ydoc_updates (
    key TEXT NOT NULL,
    origin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hlc INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (key, origin, seq)
) WITHOUT ROWID;

CREATE TABLE ydoc_checkpoints (
    key TEXT PRIMARY KEY,
    hlc INTEGER NOT NULL,
    data BLOB NOT NULL
);

INSERT INTO ydoc_checkpoints (key, hlc, data) SELECT key, hlc, data FROM state WHERE kind = 'ydoc';

DELETE FROM state WHERE kind = 'ydoc'
"""

# Version 3: the mesh's member table (syncfw.mesh.persist) is part of the schema. A
# version 2 file may already hold it (the mesh created it on first save), hence
# IF NOT EXISTS; its rows are the mesh's alone (members ever reached, bounded).
SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS mesh_members (
    address TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL
) WITHOUT ROWID
"""

MIGRATIONS: dict[int, str] = {1: SCHEMA_V1, 2: SCHEMA_V2, 3: SCHEMA_V3}
"""Schema version -> the script that brings version ``n - 1`` to ``n``."""
