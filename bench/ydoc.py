"""Yjs documents: one-character edits on a small and a 5 MB document, and remote applies.

Plain script (not a timed test). Prints a table; the last line is one JSON object.

    .venv/bin/python bench/ydoc.py [--edits 200] [--doc-mb 5] [--updates 10000] [--quick]

- ``edit_ms_small_doc`` / ``edit_ms_5mb_doc``: p50 of ``Node.apply_update`` of a
  one-character edit (durable, default ``synchronous=FULL``; the live doc is
  open, so it follows each edit too) on a 1 KB and on a 5 MB document (built
  by 50 ops, as no one op may exceed ``max_value_bytes``, then checkpointed).
  The small figure is the mean of a run before and one after the large.
  Target: the 5 MB figure at most 2x the small one.
- ``wal_bytes_per_edit_5mb`` / ``wal_bytes_per_edit_small``: WAL bytes one edit
  appends (the WAL is truncated first; no checkpoint runs during the edits).
  ``edit_update_bytes`` is the edit's own update. The issue's target is at
  most 10x the update; SQLite's WAL appends whole 4 KiB pages per commit
  (each page an edit touches), so its floor is the small document's figure,
  and what matters is that the 5 MB figure equals it.
  ``wal_bytes_per_edit_5mb_burst``: the same, for ``--wal-edits`` edits handed
  to ``apply_update`` at once (a browser reconnecting with queued keystrokes),
  which the store group-commits.
- ``remote_apply_ops_per_s``: ``--updates`` real Yjs updates (npm ``yjs``, one
  client typing; pycrdt-made if Node.js is absent, said in the output) as ops
  through ``Node.apply_remote`` in batches of 1000, to the committed state.
  ``merge_floor_ops_per_s``: ``pycrdt.merge_updates`` of the same updates at
  once; ``merge_batched_floor_ops_per_s``: folded into a state 1000 at a time.
  Target: at least 0.3x the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pycrdt

from syncfw import Fleet, Grant, Node
from syncfw.log import OpChain
from syncfw.store import ydocs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from yjs.client import YjsPeer, unavailable  # noqa: E402  (the tests' Yjs driver)

FLEET = Fleet(fleet_id="bench", authority="cloud", grants=(Grant.of("site/", "*"),))
KEY = "site/doc"


def wal_bytes(path: Path) -> int:
    wal = Path(str(path) + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def truncate_wal(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def edits_on(path: Path, doc_bytes: int, n_edits: int, wal_edits: int) -> dict[str, float]:
    """p50 ms and WAL bytes per one-character edit on a document of ``doc_bytes``."""
    rnd = random.Random(doc_bytes)
    browser: pycrdt.Doc[Any] = pycrdt.Doc(client_id=77)
    text = browser.get("t", type=pycrdt.Text)
    chunk = max(1, doc_bytes // 50)
    node = await Node.open(path, node_id="n1", fleet=FLEET)
    try:
        for _ in range(min(50, doc_bytes)):  # one op carries at most max_value_bytes
            sv = browser.get_state()
            text.insert(rnd.randint(0, len(text)), "x" * chunk)
            await node.apply_update(KEY, browser.get_update(sv))
        await ydocs.checkpoint(node.store, KEY, force=True)  # the steady state
        live = await node.doc(KEY)
        sv = browser.get_state()

        async def edit() -> tuple[float, int]:
            nonlocal sv
            text.insert(rnd.randint(0, len(text)), "k")
            update = browser.get_update(sv)
            sv = browser.get_state()
            t0 = time.perf_counter()
            await node.apply_update(KEY, update)
            return (time.perf_counter() - t0) * 1000, len(update)

        for _ in range(5):  # warm-up
            await edit()
        timed = [await edit() for _ in range(n_edits)]
        truncate_wal(path)
        before = wal_bytes(path)
        for _ in range(wal_edits):
            await edit()
        per_edit = (wal_bytes(path) - before) / wal_edits
        # a burst (a browser reconnecting with its queued keystrokes): group-committed
        burst = []
        for _ in range(wal_edits):
            text.insert(rnd.randint(0, len(text)), "k")
            burst.append(browser.get_update(sv))
            sv = browser.get_state()
        truncate_wal(path)
        before = wal_bytes(path)
        await asyncio.gather(*(node.apply_update(KEY, u) for u in burst))
        per_burst_edit = (wal_bytes(path) - before) / wal_edits
        assert str(live.get("t", type=pycrdt.Text)) == str(text), "the live doc fell out of step"
        return {
            "p50_ms": statistics.median(t for t, _ in timed),
            "wal_per_edit": per_edit,
            "wal_per_burst_edit": per_burst_edit,
            "update_bytes": statistics.median(b for _, b in timed),
            "doc_bytes": len(browser.get_update()),
        }
    finally:
        await node.close()


def real_updates(n: int) -> tuple[list[bytes], str]:
    """``n`` single-edit updates of one client typing: real Yjs when Node.js is here."""
    if unavailable() is None:
        with YjsPeer() as peer:
            return peer.stream("typist", n, seed=1, client=4242), "yjs"
    doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=4242)
    text = doc.get("t", type=pycrdt.Text)
    rnd, out = random.Random(1), []
    for i in range(n):
        sv = doc.get_state()
        text.insert(rnd.randint(0, len(text)), "ab"[i % 2])
        out.append(doc.get_update(sv))
    return out, "pycrdt"


async def remote(path: Path, updates: list[bytes]) -> float:
    """ops/s of the updates as one origin's ops through ``apply_remote``, batches of 1000."""
    node = await Node.open(path, node_id="n2", fleet=FLEET)
    try:
        zone, epoch = node.zones.zone_for_write("b1", KEY)
        chain = OpChain("b1")
        hlc0 = node.hlc_now()
        ops = [chain.mint(hlc0 + i, zone, epoch, KEY, "ydoc", u) for i, u in enumerate(updates)]
        t0 = time.perf_counter()
        for i in range(0, len(ops), 1000):
            result = await node.apply_remote(ops[i : i + 1000])
            assert result.applied == len(ops[i : i + 1000]), result
        elapsed = time.perf_counter() - t0
        check: pycrdt.Doc[Any] = pycrdt.Doc()
        check.apply_update(await node.doc_state(KEY))
        assert len(str(check.get("t", type=pycrdt.Text))) == len(updates)
        return len(ops) / elapsed
    finally:
        await node.close()


def merge_floor(updates: list[bytes], batch: int | None = None) -> float:
    """ops/s of ``pycrdt.merge_updates``: all at once, or folded in batches as applied."""
    t0 = time.perf_counter()
    if batch is None:
        pycrdt.merge_updates(*updates)
    else:
        state = b"\x00\x00"
        for i in range(0, len(updates), batch):
            state = pycrdt.merge_updates(state, *updates[i : i + batch])
    return len(updates) / (time.perf_counter() - t0)


def wal_floor(path: Path, commits: int, update: bytes) -> float:
    """WAL bytes per commit of raw ``sqlite3`` (WAL, FULL) writing what one edit writes
    (an op row, an update row, the chain head, the clock's mark), one commit each:
    the floor the WAL figures are bound by, at the same batch size (one edit)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.executescript(
        "CREATE TABLE ops (o TEXT, s INTEGER, v BLOB, PRIMARY KEY (o, s)) WITHOUT ROWID;"
        "CREATE TABLE upd (k TEXT, s INTEGER, v BLOB, PRIMARY KEY (k, s)) WITHOUT ROWID;"
        "CREATE TABLE heads (o TEXT PRIMARY KEY, s INTEGER, h BLOB) WITHOUT ROWID;"
        "CREATE TABLE meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;"
    )
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = Path(str(path) + "-wal")
    before = wal.stat().st_size if wal.exists() else 0
    for i in range(commits):
        con.execute("BEGIN")
        con.execute("INSERT INTO ops VALUES ('n1', ?, ?)", (i, update))
        con.execute("INSERT INTO upd VALUES ('doc', ?, ?)", (i, update))
        con.execute("INSERT OR REPLACE INTO heads VALUES ('n1', ?, ?)", (i, b"h" * 32))
        con.execute("INSERT OR REPLACE INTO meta VALUES ('hlc', ?)", (i,))
        con.execute("COMMIT")
    after = wal.stat().st_size
    con.close()
    return (after - before) / commits


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=200)
    ap.add_argument("--wal-edits", type=int, default=50)
    ap.add_argument("--doc-mb", type=float, default=5.0)
    ap.add_argument("--updates", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="small sizes (the smoke test)")
    a = ap.parse_args()
    if a.quick:
        a.edits, a.wal_edits, a.doc_mb, a.updates = 30, 10, 0.5, 1000
    with tempfile.TemporaryDirectory() as tmp:
        # small, large, small again: the disk's fsync time drifts; both small runs count
        small = await edits_on(Path(tmp) / "small.db", 1024, a.edits, a.wal_edits)
        large = await edits_on(
            Path(tmp) / "large.db", int(a.doc_mb * 1024 * 1024), a.edits, a.wal_edits
        )
        again = await edits_on(Path(tmp) / "small2.db", 1024, a.edits, a.wal_edits)
        small["p50_ms"] = (small["p50_ms"] + again["p50_ms"]) / 2
        updates, source = real_updates(a.updates)
        remote_ops = await remote(Path(tmp) / "remote.db", updates)
        floor = merge_floor(updates)
        floor_batched = merge_floor(updates, 1000)
        wal_commit_floor = wal_floor(Path(tmp) / "floor.db", a.wal_edits, b"u" * 21)
    figures = {
        "edit_ms_small_doc": round(small["p50_ms"], 3),
        "edit_ms_5mb_doc": round(large["p50_ms"], 3),
        "large_doc_bytes": int(large["doc_bytes"]),
        "wal_bytes_per_edit_small": round(small["wal_per_edit"]),
        "wal_bytes_per_edit_5mb": round(large["wal_per_edit"]),
        "wal_bytes_per_edit_5mb_burst": round(large["wal_per_burst_edit"]),
        "edit_update_bytes": round(large["update_bytes"]),
        "wal_floor_bytes_per_commit": round(wal_commit_floor),
        "remote_apply_ops_per_s": round(remote_ops),
        "merge_floor_ops_per_s": round(floor),
        "merge_batched_floor_ops_per_s": round(floor_batched),
        "updates_from": source,
    }
    ratios = {
        "edit_5mb_over_small (target <= 2)": figures["edit_ms_5mb_doc"]
        / figures["edit_ms_small_doc"],
        "wal_5mb_over_small (floor: 1)": large["wal_per_edit"] / max(small["wal_per_edit"], 1),
        "wal_5mb_over_update (issue target <= 10)": large["wal_per_edit"] / large["update_bytes"],
        "wal_5mb_over_sqlite_commit_floor": large["wal_per_edit"] / max(wal_commit_floor, 1),
        "wal_5mb_burst_over_update": large["wal_per_burst_edit"] / large["update_bytes"],
        "remote_over_merge_floor (target >= 0.3)": remote_ops / floor,
        "remote_over_batched_merge_floor": remote_ops / floor_batched,
    }
    for k, v in figures.items():
        print(f"{k:32} {v}")
    for k, v in ratios.items():
        print(f"{k:44} {v:.2f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
