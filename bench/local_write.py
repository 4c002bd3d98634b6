"""Local write path: apply_remote, group-committed puts and the HLC, against their floors.

Plain script (not a timed test). Prints a table; the last line is one JSON object.

    .venv/bin/python bench/local_write.py [--ops 200000] [--keys 2000] [--writers 256]

Floors, measured in the same run on the same disk:
- ``floor_ops_per_s``: raw ``sqlite3`` ``executemany`` inserting the same op rows
  plus the LWW state upserts, one transaction, WAL, ``synchronous=NORMAL``;
- ``put_floor_ops_per_s``: raw ``sqlite3`` (same pragmas) inserting the op rows
  of the put run plus their LWW upserts, in transactions of the mean size the
  store's group commit actually formed in the same run (its
  ``commit_batch_ops`` histogram);
- ``hlc_floor_ns_per_op``: ``time.time_ns()`` plus the packing, same loop.

Durability: ``put_full_ops_per_s`` is ``synchronous=FULL``, the store's default
(``default_synchronous``); ``put_ops_per_s`` (also ``put_normal_ops_per_s``) is
the opt-in ``NORMAL``, which may lose the last commits on power loss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from syncfw import Fleet, Grant, Node, StoreConfig
from syncfw.clock import HLC
from syncfw.log import GENESIS, Op, encode_value, op_hash
from syncfw.store.schema import SCHEMA_V1
from syncfw.testing import SignedFleet

FLEET = Fleet(fleet_id="bench", authority="cloud", grants=(Grant.of("site/", "*"),))


def make_ops(n: int, keys: int) -> list[Op]:
    ops = []
    prev = GENESIS
    t0 = 1_790_000_000_000 << 16
    for seq in range(1, n + 1):
        op = Op("t7", seq, t0 + seq, "site/", 1, f"site/k{seq % keys}", "lww",
                encode_value({"v": seq, "temp": 71.5}), prev)
        prev = op_hash(op)
        ops.append(op)
    return ops


def put_ops(writers: int, per_writer: int) -> list[Op]:
    """The op rows a put run writes (same keys and values, one origin's chain)."""
    ops = []
    prev = GENESIS
    t0 = 1_790_000_000_000 << 16
    for i in range(per_writer):
        for w in range(writers):
            seq = len(ops) + 1
            op = Op("t7", seq, t0 + seq, "site/", 1, f"site/w{w}/k{i % 8}", "lww",
                    encode_value({"v": i, "temp": 71.5}), prev)
            prev = op_hash(op)
            ops.append(op)
    return ops


def floor_sqlite(folder: Path, ops: list[Op], batch: int | None = None, name: str = "floor") -> float:
    """Raw sqlite3: the same op rows and LWW upserts, in transactions of ``batch`` ops (one: all)."""
    conn = sqlite3.connect(folder / f"{name}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    for stmt in SCHEMA_V1.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    size = batch or len(ops)
    groups = []
    for i in range(0, len(ops), size):
        chunk = ops[i : i + size]
        latest = {op.key: (op.key, op.hlc, op.origin, op.value) for op in chunk}
        groups.append(([(*op.to_tuple(), 0) for op in chunk], list(latest.values())))
    t = time.perf_counter()
    for rows, upserts in groups:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO ops (origin, seq, hlc, zone, epoch, key, kind, value, prev, sig, status) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany(
            "INSERT INTO state (kind, key, hlc, origin, data) VALUES ('lww', ?, ?, ?, ?) "
            "ON CONFLICT (kind, key) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, "
            "data = excluded.data", upserts)
        conn.execute("COMMIT")
    dt = time.perf_counter() - t
    conn.close()
    return len(ops) / dt


async def bench_apply(folder: Path, ops: list[Op], batch: int) -> float:
    # NORMAL, as the floor it is compared with (FULL is the store's default since
    # the durability change; the put figures report both).
    cfg = StoreConfig(synchronous="NORMAL")
    async with Node.open(folder / "apply.db", node_id="depot", fleet=FLEET, config=cfg) as node:
        t = time.perf_counter()
        for i in range(0, len(ops), batch):
            await node.apply_remote(ops[i : i + batch])
        dt = time.perf_counter() - t
        assert (await node.version_vector())["t7"] == len(ops)
    return len(ops) / dt


async def bench_put(
    folder: Path, name: str, sync: str, writers: int, per_writer: int, *, signed: bool = False
) -> tuple[float, float, float, float]:
    """Puts from ``writers`` concurrent writers: ops/s, p50 and p99 ms, mean group-commit size.

    ``signed``: in a signed fleet, every group commit's head sealed with ed25519."""
    cfg = StoreConfig(synchronous=sync)  # type: ignore[arg-type]
    fleet, keys = FLEET, None
    if signed:
        sf = SignedFleet(FLEET)
        fleet, keys = sf.fleet, sf.keys("t7")
    async with Node.open(
        folder / f"{name}.db", node_id="t7", fleet=fleet, config=cfg, keys=keys
    ) as node:
        lat: list[float] = []

        async def writer(w: int) -> None:
            for i in range(per_writer):
                t = time.perf_counter()
                await node.put(f"site/w{w}/k{i % 8}", {"v": i, "temp": 71.5})
                lat.append(time.perf_counter() - t)

        t = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        dt = time.perf_counter() - t
        m = node.store.metrics
        batches = m.value("syncfw_commit_batch_ops_count", source="local")
        mean_batch = m.value("syncfw_commit_batch_ops_sum", source="local") / max(batches, 1)
    lat.sort()
    p50 = lat[len(lat) // 2] * 1e3
    p99 = lat[int(len(lat) * 0.99)] * 1e3
    return writers * per_writer / dt, p50, p99, mean_batch


def bench_hlc(n: int) -> tuple[float, float]:
    clock = HLC()
    t = time.perf_counter_ns()
    for _ in range(n):
        clock.now()
    hlc_ns = (time.perf_counter_ns() - t) / n
    last = 0
    t = time.perf_counter_ns()
    for _ in range(n):
        pt = (time.time_ns() // 1_000_000) << 16
        last = pt if pt > last else last + 1
    floor_ns = (time.perf_counter_ns() - t) / n
    return hlc_ns, floor_ns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=200_000)
    ap.add_argument("--keys", type=int, default=2_000)
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--writers", type=int, default=256)
    ap.add_argument("--per-writer", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; medians are reported")
    args = ap.parse_args()

    ops = make_ops(args.ops, args.keys)
    pops = put_ops(args.writers, args.per_writer)
    floors, applies, puts, fulls, p99s, p50s, put_floors, means = [], [], [], [], [], [], [], []
    signed_puts: list[float] = []
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="syncfw-bench-") as tmp:
            folder = Path(tmp)
            floors.append(floor_sqlite(folder, ops))
            applies.append(asyncio.run(bench_apply(folder, ops, args.batch)))
            ops_s, p50, p99, mean = asyncio.run(
                bench_put(folder, f"put{r}", "NORMAL", args.writers, args.per_writer)
            )
            puts.append(ops_s)
            means.append(mean)
            signed_puts.append(asyncio.run(
                bench_put(folder, f"sput{r}", "NORMAL", args.writers, args.per_writer, signed=True)
            )[0])
            put_floors.append(floor_sqlite(folder, pops, max(1, round(mean)), name=f"putfloor{r}"))
            p50s.append(p50)
            p99s.append(p99)
            fulls.append(asyncio.run(bench_put(folder, f"full{r}", "FULL", args.writers, args.per_writer // 2))[0])
    hlc = [bench_hlc(200_000) for _ in range(5)]
    med = statistics.median
    fig = {
        "floor_ops_per_s": round(med(floors)),
        "apply_ops_per_s": round(med(applies)),
        # put_ops_per_s is the NORMAL (opt-in) run, kept under its old name;
        # put_normal_ops_per_s says so, put_full_ops_per_s is the default's.
        "put_ops_per_s": round(med(puts)),
        "put_normal_ops_per_s": round(med(puts)),
        "signed_put_ops_per_s": round(med(signed_puts)),
        "put_floor_ops_per_s": round(med(put_floors)),
        "put_mean_batch": round(med(means), 1),
        "put_p50_ms": round(med(p50s), 2),
        "put_p99_ms": round(med(p99s), 2),
        "put_full_ops_per_s": round(med(fulls)),
        "default_synchronous": StoreConfig().synchronous,
        "hlc_ns_per_op": round(med(h for h, _ in hlc), 1),
        "hlc_floor_ns_per_op": round(med(f for _, f in hlc), 1),
    }
    fl = fig["floor_ops_per_s"]
    rows = [
        ("raw sqlite3 floor (ops+upserts, 1 txn)", f"{fl:,.0f} ops/s", "1.00x floor"),
        (f"apply_remote {args.ops:,} ops, {args.keys:,} keys", f"{fig['apply_ops_per_s']:,.0f} ops/s",
         f"{fig['apply_ops_per_s'] / fl:.2f}x floor (target >= 0.6)"),
        (f"put floor (raw sqlite3, txns of {fig['put_mean_batch']})",
         f"{fig['put_floor_ops_per_s']:,.0f} ops/s", "1.00x put floor"),
        (f"put, {args.writers} writers, NORMAL (opt-in)", f"{fig['put_ops_per_s']:,.0f} ops/s",
         f"{fig['put_ops_per_s'] / fig['put_floor_ops_per_s']:.2f}x put floor (target >= 0.5)"),
        ("put, same writers, signed fleet (NORMAL)", f"{fig['signed_put_ops_per_s']:,.0f} ops/s",
         f"{fig['signed_put_ops_per_s'] / fig['put_ops_per_s']:.2f}x put (target >= 0.8)"),
        ("put latency p50 / p99", f"{fig['put_p50_ms']} / {fig['put_p99_ms']} ms", "target p99 <= 10"),
        (f"put, {args.writers} writers, FULL (default)", f"{fig['put_full_ops_per_s']:,.0f} ops/s",
         f"{fig['put_full_ops_per_s'] / fl:.2f}x floor"),
        ("HLC now()", f"{fig['hlc_ns_per_op']} ns", f"{fig['hlc_ns_per_op'] / fig['hlc_floor_ns_per_op']:.2f}x floor (target <= 3)"),
        ("floor: time_ns + pack", f"{fig['hlc_floor_ns_per_op']} ns", ""),
    ]
    print(f"median of {args.repeat} runs, python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}")
    for name, val, ratio in rows:
        print(f"  {name:<42} {val:>18}   {ratio}")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
