"""Joining after compaction: a fresh node catching up through a state snapshot.

Plain script (not a timed test). Prints a table; the last line is one JSON object.

    .venv/bin/python bench/snapshot.py [--keys 20000] [--writes 3] [--repeat 3]

A source node holds ``keys * writes`` lww writes of ``--keys`` keys (each key
written ``--writes`` times), relayed from one origin. Measured, median of
``--repeat`` runs:

- ``replay_join_s``: a fresh node catching up before compaction, by the ops
  (``ops_since`` / ``apply_remote`` in batches of 2,000, in-process);
- ``snapshot_join_s``: after ``compact()``, a fresh node taking the snapshot:
  ``snapshot()``, ``encode_snapshot``, ``decode_snapshot``, ``install_snapshot``
  (the same work an exchange does, without the network); also each step;
- ``snapshot_bytes`` and ``snapshot_bytes_per_key`` on the wire;
- ``floor_install_s``: raw ``sqlite3`` writing the same state rows and heads
  in one transaction (WAL, ``synchronous=FULL``, as the store), same run; and
  ``install_vs_floor`` = install / floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from syncfw import Fleet, Grant, Node
from syncfw.log import GENESIS, Op, encode_value, op_hash
from syncfw.store.schema import SCHEMA_V1
from syncfw.sync import decode_snapshot, encode_snapshot

FLEET = Fleet(fleet_id="bench", authority="cloud", grants=(Grant.of("site/", "*"),))


def make_ops(keys: int, writes: int) -> list[Op]:
    ops, prev = [], GENESIS
    t0 = 1_790_000_000_000 << 16
    for seq in range(1, keys * writes + 1):
        op = Op(
            "t7",
            seq,
            t0 + seq,
            "site/",
            1,
            f"site/k{seq % keys}",
            "lww",
            encode_value({"v": seq, "temp": 71.5}),
            prev,
        )
        prev = op_hash(op)
        ops.append(op)
    return ops


async def fill(node: Node, ops: list[Op]) -> None:
    for i in range(0, len(ops), 2000):
        await node.apply_remote(ops[i : i + 2000])


async def replay(src: Node, dst: Node) -> None:
    while batch := await src.ops_since(await dst.version_vector(), limit=2000):
        await dst.apply_remote(batch)


def floor(
    rows: list[tuple[str, str, int, str, bytes]], heads: dict[str, bytes], path: Path
) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    for stmt in SCHEMA_V1.split(";"):
        if stmt.strip():
            db.execute(stmt)
    t0 = time.perf_counter()
    db.execute("BEGIN")
    db.executemany("INSERT INTO state (kind, key, hlc, origin, data) VALUES (?, ?, ?, ?, ?)", rows)
    db.executemany(
        "INSERT INTO heads (origin, seq, hash, compacted) VALUES (?, ?, ?, ?)",
        [(o, 1, h, 1) for o, h in heads.items()],
    )
    db.execute("COMMIT")
    took = time.perf_counter() - t0
    db.close()
    return took


async def one_run(tmp: Path, ops: list[Op], i: int) -> dict[str, float]:
    src = await Node.open(tmp / f"src{i}.db", node_id="depot", fleet=FLEET)
    fresh = await Node.open(tmp / f"fresh{i}.db", node_id="t9", fleet=FLEET)
    late = await Node.open(tmp / f"late{i}.db", node_id="t8", fleet=FLEET)
    try:
        await fill(src, ops)
        t0 = time.perf_counter()
        await replay(src, fresh)
        replay_s = time.perf_counter() - t0
        await src.acknowledge("t9", await fresh.version_vector())
        await src.compact()
        t0 = time.perf_counter()
        snap = await src.snapshot()
        t1 = time.perf_counter()
        data = encode_snapshot(snap)
        t2 = time.perf_counter()
        back = decode_snapshot(data)
        t3 = time.perf_counter()
        await late.install_snapshot(back, source="depot")
        t4 = time.perf_counter()
        assert await late.state_digest() == await src.state_digest()
        floor_s = floor(list(snap.states), dict(snap.heads), tmp / f"floor{i}.db")
        return {
            "replay_join_s": replay_s,
            "snapshot_join_s": t4 - t0,
            "build_s": t1 - t0,
            "encode_s": t2 - t1,
            "decode_s": t3 - t2,
            "install_s": t4 - t3,
            "floor_install_s": floor_s,
            "snapshot_bytes": float(len(data)),
        }
    finally:
        for n in (src, fresh, late):
            await n.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=20_000)
    ap.add_argument("--writes", type=int, default=3, help="writes per key")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ops = make_ops(args.keys, args.writes)
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.repeat):
            runs.append(await one_run(Path(d), ops, i))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = {
        "keys": args.keys,
        "ops": len(ops),
        **{k: round(v, 4) for k, v in med.items()},
        "snapshot_bytes_per_key": round(med["snapshot_bytes"] / args.keys, 1),
        "snapshot_vs_replay": round(med["snapshot_join_s"] / med["replay_join_s"], 3),
        "install_vs_floor": round(med["install_s"] / med["floor_install_s"], 2),
    }
    for k, v in out.items():
        print(f"{k:>24}  {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
