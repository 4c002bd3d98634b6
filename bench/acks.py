"""Acknowledgements landing together: ``Store.acknowledge`` from 64 peers at once.

An aggregator ends many exchanges at about the same moment, and each records what
its peer holds (``Store.acknowledge``, the ``peers`` table), each in a transaction
of its own. This measures 64 concurrent acks against two floors in raw ``sqlite3``
on a file of the same mode: the 64 rows upserted in one transaction (what coalescing
them could reach), and in 64 transactions (what the store does).

    .venv/bin/python bench/acks.py            # ~10 s
    .venv/bin/python bench/acks.py --rounds 50

Keys of the last line, each with the ``synchronous`` mode before it (``full_``, the
store's default, and ``normal_``): ``acks_64_ms`` (median of the rounds),
``floor_one_txn_ms``, ``floor_64_txns_ms``, ``ratio`` (floor_one_txn_ms / acks_64_ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import msgpack

from syncfw import Fleet, Grant, Node
from syncfw.store import StoreConfig

FLEET = Fleet(fleet_id="bench-acks", grants=(Grant.of("site/", "*"),))
PEERS = 64


def _floor(path: Path, synchronous: str, rounds: int, one_txn: bool) -> float:
    """Median ms to upsert PEERS rows of (peer, packed vector), raw sqlite3, WAL."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("CREATE TABLE peers (peer TEXT PRIMARY KEY, vv BLOB NOT NULL)")
        sql = "INSERT OR REPLACE INTO peers (peer, vv) VALUES (?, ?)"
        times = []
        for r in range(rounds):
            rows = [(f"p{i}", msgpack.packb({"a": r + 1})) for i in range(PEERS)]
            t = time.perf_counter()
            if one_txn:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(sql, rows)
                db.execute("COMMIT")
            else:
                for row in rows:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute(sql, row)
                    db.execute("COMMIT")
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


async def _acks(path: Path, synchronous: str, rounds: int) -> float:
    node = await Node.open(path, node_id="a", fleet=FLEET,
                           config=StoreConfig(synchronous=synchronous))  # type: ignore[arg-type]
    try:
        times = []
        for r in range(rounds):
            t = time.perf_counter()
            await asyncio.gather(
                *(node.store.acknowledge(f"p{i}", {"a": r + 1}) for i in range(PEERS))
            )
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3
    finally:
        await node.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as d:  # a real disk: FULL fsyncs
        folder = Path(d)
        for mode in ("FULL", "NORMAL"):
            acks = await _acks(folder / f"node-{mode}.db", mode, args.rounds)
            one = _floor(folder / f"one-{mode}.db", mode, args.rounds, one_txn=True)
            many = _floor(folder / f"many-{mode}.db", mode, args.rounds, one_txn=False)
            m = mode.lower()
            out[f"{m}_acks_64_ms"] = round(acks, 2)
            out[f"{m}_floor_one_txn_ms"] = round(one, 2)
            out[f"{m}_floor_64_txns_ms"] = round(many, 2)
            out[f"{m}_ratio"] = round(one / acks, 3)
            print(f"synchronous={mode}: {PEERS} concurrent acks {acks:.2f} ms; raw sqlite3 "
                  f"upsert of {PEERS} rows in one transaction {one:.2f} ms (ratio "
                  f"{one / acks:.2f}), in {PEERS} transactions {many:.2f} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
