"""Sync throughput and cost: one node catches up with another over gRPC on loopback.

Usage: ``python bench/sync_throughput.py [--ops N] [--repeat R]`` (< 60 s).

Two SQLite nodes; A holds N ops (32-byte random hex values), B none. A runs in
its own process (``--serve``), as the sending node does in a real fleet; B
dials it. Figures:

- ``ops_per_s``: median over R fresh B's of N / (time of one gRPC exchange
  that brings B level with A).
- ``receiver_apply_ops_per_s``: the receiving store alone, ``apply_remote`` of
  the same ops in the session's batch size (2,000) into a fresh node, in this
  process: what catching up is bound by once the protocol costs nothing.
- ``floor_ops_per_s``: the same copy done in-process with no protocol, no
  codec and no network (``ops_since`` + ``apply_remote`` in 2,000-op batches):
  the store-bound ceiling sync can approach; their ratio is the protocol's cost.
- ``signed_ops_per_s``: the same catch-up in a signed fleet (the sender's heads
  sealed with ed25519, every covering head verified by the receiver);
  ``signed_ratio`` is it over ``ops_per_s`` of the same run (target >= 0.7).
- ``wire_bytes_per_op``: gRPC payload bytes both ways / N (zstd on).
- ``msgpack_bytes_per_op``: the same ops packed as plain msgpack / N.
- ``peak_rss_mb``: peak resident memory of this process.
- ``insync_bytes`` / ``insync_round_trips``: an exchange between replicas
  already in sync (frame bytes both ways, round trips the initiator waits).
- ``diff10_bytes`` / ``diff10_round_trips``: the same when A holds 10 ops B lacks.
- ``diff1_100_origins_bytes``: one new op between replicas holding 100 origins,
  with delta summaries; ``..._whole_vv`` the same with whole vectors.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from syncfw.codec import BatchLimits, encode_batch
from syncfw.exchange import ExchangeOutcome, SessionPair, run_exchange
from syncfw.keyfiles import NodeKeys
from syncfw.log import Op
from syncfw.node import Node
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.trust import SignedFleet
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import ChannelPool, GrpcServer
from syncfw.transport.wire import decode_frame, encode_frame
from syncfw.zones import Fleet

FLEET = Fleet(fleet_id="bench")


async def _fill(node: Node, n: int) -> None:
    for i in range(0, n, 1000):
        await asyncio.gather(
            *(
                node.put(f"fleet/{node.node_id}/k{j}", os.urandom(16).hex())
                for j in range(i, min(i + 1000, n))
            )
        )


def _save_keys(path: Path, sf: SignedFleet, node_id: str) -> None:
    """What the sender process needs to open ``node_id`` in the signed fleet."""
    k = sf.keys(node_id)
    path.write_bytes(
        msgpack.packb(
            [sf.fleet.authority_key, node_id, k.signing_key.private_bytes_raw(), k.registration]
        )
    )


def _load_keys(path: str) -> tuple[Fleet, NodeKeys]:
    auth, node_id, raw, reg = msgpack.unpackb(Path(path).read_bytes())
    fleet = dataclasses.replace(FLEET, authority_key=auth)
    keys = NodeKeys(
        fleet.fleet_id, fleet.authority, auth, node_id,
        Ed25519PrivateKey.from_private_bytes(raw), reg, b"", b"", b"",
    )
    return fleet, keys


async def serve_sender(db: str, keyfile: str | None = None) -> None:
    """``--serve DB [--keys FILE]``: the sending node in its own process, as in a real fleet.

    Opens the node stored at ``db`` (in the signed fleet ``FILE`` describes, if given),
    serves exchanges over gRPC on loopback, prints ``ADDR host:port`` and runs until its
    standard input closes.
    """
    fleet, keys = _load_keys(keyfile) if keyfile else (FLEET, None)
    node = await Node.open(db, node_id="a", fleet=fleet, keys=keys)

    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream)

    server = await GrpcServer.start("127.0.0.1:0", handler)
    print(f"ADDR {server.address}", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await server.aclose()
        await node.close()


async def _start_sender(
    db: Path, keyfile: Path | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    extra = ["--keys", str(keyfile)] if keyfile else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", str(db), *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    if not line.startswith("ADDR "):
        raise RuntimeError(f"the sender process did not start: {line!r}")
    return proc, line.split()[1]


async def _stop_sender(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def _grpc_sync(address: str, b: Node) -> tuple[float, ExchangeOutcome]:
    """B dials the sender's process and catches up in one exchange."""
    pool = ChannelPool()
    try:
        stream = await pool.open(address)
        t = time.perf_counter()
        out = await run_exchange(b, stream)
        elapsed = time.perf_counter() - t
    finally:
        await pool.aclose()
    assert out.ok, out
    return elapsed, out


async def _signed_figures(d: Path, n: int, repeat: int) -> list[float]:
    """``signed_ops_per_s``: the same catch-up in a signed fleet, the sender in its own
    process, every covering head verified by the receiver."""
    sf = SignedFleet(FLEET)
    a = await Node.open(d / "sa.db", node_id="a", fleet=sf.fleet, keys=sf.keys("a"))
    await _fill(a, n)
    want = await a.version_vector()
    await a.close()
    keyfile = d / "a.keys"
    _save_keys(keyfile, sf, "a")
    rates = []
    proc, address = await _start_sender(d / "sa.db", keyfile)
    try:
        for r in range(repeat):
            b = await Node.open(
                d / f"sb{r}.db", node_id=f"b{r}", fleet=sf.fleet, keys=sf.keys(f"b{r}")
            )
            elapsed, _ = await _grpc_sync(address, b)
            got = await b.version_vector()
            assert got.get("a") == want["a"], (got, want)
            rates.append(n / elapsed)
            await b.close()
    finally:
        await _stop_sender(proc)
    return rates


async def _receiver_apply(b: Node, ops: list[Op], batch: int = 2000) -> float:
    """The receiving store alone: ``apply_remote`` of the same ops, in the session's batch size."""
    t = time.perf_counter()
    for i in range(0, len(ops), batch):
        await b.apply_remote(ops[i : i + batch])
    return time.perf_counter() - t


async def _floor(a: Node, b: Node) -> float:
    t = time.perf_counter()
    vv: dict[str, int] = {}
    while ops := await a.ops_since(vv, limit=2000):
        await b.apply_remote(ops)
        vv = await b.version_vector()
    return time.perf_counter() - t


def _pair_cost(extra: int) -> tuple[int, int]:
    a, b = MemoryReplica("a", FLEET), MemoryReplica("b", FLEET)
    for i in range(1000):
        a.put(f"fleet/a/k{i}", "x" * 32)
    SessionPair(a, b).run()
    for i in range(extra):
        a.put(f"fleet/a/new{i}", "y" * 32)
    res = SessionPair(a, b, encode=encode_frame, decode=decode_frame).run()
    if res.a is None or res.a[0].name != "OK":
        raise RuntimeError(f"exchange failed: {res}")
    return res.wire_bytes, res.round_trips


def _many_origins_cost(delta: bool, origins: int = 100) -> int:
    """Bytes of an exchange moving one op when the replicas hold ``origins`` origins."""
    from syncfw.log import GENESIS, Op, encode_value
    from syncfw.sync import SessionConfig

    a, b = MemoryReplica("a", FLEET), MemoryReplica("b", FLEET)
    for i in range(origins):
        o = f"truck-{i:03}"
        op = Op(o, 1, 1, f"fleet/{o}/", 0, f"fleet/{o}/k", "lww", encode_value(i), GENESIS)
        a._append(op)
        a._merge(op)
    SessionPair(a, b).run()
    a.put("fleet/a/new", 1)
    cfg = SessionConfig(delta_summary=delta)
    res = SessionPair(
        a, b, config_a=cfg, config_b=cfg, encode=encode_frame, decode=decode_frame
    ).run()
    return res.wire_bytes


def _rss_mb() -> float:
    """Resident memory now (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def follow_figures(n: int, floor: float) -> dict[str, float]:
    """``follow_*``: ``node.follow()`` reading an ``n``-op backlog with decoded values.

    - ``follow_ops_per_s``: n / time to deliver the whole backlog (pages of 1,000).
    - ``follow_rss_mb``: resident memory growth while doing it (sampled every
      10k items); the feed holds one page, so it stays flat whatever n.
    - ``follow_ratio_to_floor``: against ``floor_ops_per_s`` of the same run.
    """
    with tempfile.TemporaryDirectory() as d:
        node = await Node.open(Path(d) / "f.db", node_id="f", fleet=FLEET)
        try:
            for i in range(0, n, 2000):
                batch = range(i, min(i + 2000, n))
                await node.put_many(
                    {f"fleet/f/k{j % 5000}": {"i": j, "v": f"{j:016x}"} for j in batch}
                )
            before = peak = _rss_mb()
            got, last = 0, None
            t = time.perf_counter()
            async with node.follow(page_ops=1000) as feed:
                async for item in feed:
                    got += 1
                    last = item.value
                    if got % 10_000 == 0:
                        peak = max(peak, _rss_mb())
                    if got == n:
                        break
            elapsed = time.perf_counter() - t
            if got != n or last is None or last["i"] != n - 1 or feed.position != {"f": n}:
                raise RuntimeError(f"follow delivered {got} ops, last {last}, at {feed.position}")
        finally:
            await node.close()
    rate = n / elapsed
    print(f"follow of a {n}-op backlog: {rate:,.0f} ops/s, RSS +{peak - before:.1f} MB")
    return {
        "follow_ops": n,
        "follow_ops_per_s": round(rate),
        "follow_ratio_to_floor": round(rate / floor, 3),
        "follow_rss_mb": round(max(peak - before, 0.0), 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--follow-ops", type=int, default=None, help="default: max(--ops, 50000)")
    parser.add_argument("--serve", metavar="DB", help=argparse.SUPPRESS)
    parser.add_argument("--keys", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve_sender(args.serve, args.keys)
        return
    n = args.ops
    with tempfile.TemporaryDirectory() as d:
        a = await Node.open(Path(d) / "a.db", node_id="a", fleet=FLEET)
        await _fill(a, n)
        ops = await a.ops_since({}, limit=n)
        msgpack_bytes = (
            len(
                encode_batch(
                    ops,
                    limits=BatchLimits(max_compressed=1 << 40, max_decompressed=1 << 40, max_ops=n),
                )
            )
            / n
        )
        floors, applies = [], []
        for r in range(args.repeat):
            c = await Node.open(Path(d) / f"c{r}.db", node_id=f"c{r}", fleet=FLEET)
            floors.append(n / await _floor(a, c))
            await c.close()
            e = await Node.open(Path(d) / f"e{r}.db", node_id=f"e{r}", fleet=FLEET)
            applies.append(n / await _receiver_apply(e, ops))
            await e.close()
        want = await a.version_vector()
        await a.close()
        rates, wire = [], []
        proc, address = await _start_sender(Path(d) / "a.db")
        try:
            for r in range(args.repeat):
                b = await Node.open(Path(d) / f"b{r}.db", node_id=f"b{r}", fleet=FLEET)
                elapsed, out = await _grpc_sync(address, b)
                assert (await b.version_vector()) == want
                rates.append(n / elapsed)
                wire.append((out.bytes_sent + out.bytes_received) / n)
                await b.close()
        finally:
            await _stop_sender(proc)
        signed_rates = await _signed_figures(Path(d), n, args.repeat)
    insync_bytes, insync_rt = _pair_cost(0)
    diff_bytes, diff_rt = _pair_cost(10)
    ops_per_s = statistics.median(rates)
    floor = statistics.median(floors)
    receiver = statistics.median(applies)
    result = {
        "ops": n,
        "ops_per_s": round(ops_per_s),
        "signed_ops_per_s": round(statistics.median(signed_rates)),
        "signed_ratio": round(statistics.median(signed_rates) / ops_per_s, 3),
        "floor_ops_per_s": round(floor),
        "ratio_to_floor": round(ops_per_s / floor, 3),
        "receiver_apply_ops_per_s": round(receiver),
        "ratio_to_receiver_apply": round(ops_per_s / receiver, 3),
        "wire_bytes_per_op": round(statistics.median(wire), 1),
        "msgpack_bytes_per_op": round(msgpack_bytes, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "insync_bytes": insync_bytes,
        "insync_round_trips": insync_rt,
        "diff10_bytes": diff_bytes,
        "diff10_round_trips": diff_rt,
        "diff1_100_origins_bytes": _many_origins_cost(True),
        "diff1_100_origins_bytes_whole_vv": _many_origins_cost(False),
    }
    print(
        f"sync of {n} ops over gRPC from a sender process: median {ops_per_s:,.0f} ops/s; "
        f"floor {floor:,.0f} ops/s ({ops_per_s / floor:.2f}x); receiver's apply_remote alone "
        f"{receiver:,.0f} ops/s ({ops_per_s / receiver:.2f}x)"
    )
    print(
        f"signed fleet, same catch-up (every covering head verified): "
        f"{result['signed_ops_per_s']:,} ops/s ({result['signed_ratio']:.2f}x unsigned, "
        "target >= 0.7)"
    )
    result.update(await follow_figures(args.follow_ops or max(n, 50_000), floor))
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
