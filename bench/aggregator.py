"""The cloud aggregator: ingest from 64 edges over real gRPC, and the change feed's latency.

Usage: ``python bench/aggregator.py [--edges 64] [--backlog 500] [--rate 10000]
[--seconds 15] [--soak MINUTES] [--quick] [--feed-only]`` (< 60 s by default).

One :class:`~syncfw.cloud.Aggregator` (its own SQLite file, the mesh and the
feed on one gRPC port) runs in this process. The edges (``--edges`` nodes,
each its own SQLite file) run together in a second process and dial it, as
edges do in a fleet. Figures:

- ``ingest_ops_per_s``: every edge holds ``--backlog`` ops; all sync to the
  aggregator at once (one gRPC exchange each, concurrently); edges x backlog
  / the time until the aggregator holds them all. Edges sync upward only
  (:class:`FanInEdge`): in syncfw every node replicates the whole log, so 64
  real edges would also pull each other's ops through the aggregator, 63
  times the ingest; that fan-out is not what this measures.
- ``floor_ops_per_s``: ``apply_remote`` of the same ops, read back from the
  aggregator, in 2,000-op batches into a fresh node in this process (the
  store-bound ceiling; the median of three runs); ``ingest_ratio`` = ingest /
  floor (target >= 0.5).
- The ingest is measured twice: at first contact (``ingest_cold_*``: the
  links' batches start at 8 KiB), and after the steady phase, with the same
  backlog again (an outage) synced over links that learned their batch size
  (``ingest_*``). Each time ``ingest_cpu_s_*`` is the CPU of each process;
  after the outage also ``ingest_cpu_s_aggregator_main`` / ``..._edges_main``
  (each process's main thread, its event loop) and ``ingest_writer_busy_s``
  (the aggregator's one writer, from ``syncfw_writer_busy_seconds``): a writer
  busy for nearly all of ``ingest_s`` while the main threads are not is what
  bounds the ingest.
- ``feed_p50_ms`` / ``feed_p99_ms``: the edges then write at ``--rate`` ops/s
  in all (every second each writes its share and syncs), and a gRPC
  :class:`~syncfw.cloud.Consumer` in this process follows the feed; latency
  is from the commit that applied an op at the aggregator (its commit
  listener) to the consumer yielding it. ``feed_rate_ops_per_s`` is the rate
  the aggregator actually applied during that phase (the edges' process may
  not sustain ``--rate`` on a small machine: this is the rate measured at).
- ``rss_growth_mb``: resident memory of this process (aggregator and
  consumer), mean of the last minute minus the first of ``--soak MINUTES``
  (without ``--soak``: the last fifth of the steady phase minus the first,
  ``rss_window`` says which).

``--feed-only`` measures the feed alone, without the edges' process: the
aggregator's own loop applies ``--edges`` origins' ops (``apply_remote``, a few
origins' batches every 20 ms, as edges' syncs land) at up to ``--rate`` for
``--seconds``, and the same gRPC consumer follows; keys ``feed_only_*``. It
shows what the feed path costs apart from 64 concurrent gRPC exchanges.

``--breakdown`` measures the ingest's parts alone, with the default sizes: the
same ops (``--edges`` origins x ``--backlog``, in 250-op batches, every origin's
submitted at once as the exchanges do) applied in this process to a plain node
and to an aggregator (``inproc_*``: what the fleet view and the aggregator's
services add to ``apply_remote``); and one edge's exchanges with an aggregator
over real gRPC, one after another, of 1 op and of ``--backlog`` ops
(``exchange_cpu_ms_1_op``, ``exchange_cpu_ms_backlog``: both sides' CPU in this process: the fixed cost of an
exchange, and ``exchange_cpu_us_per_op``, the wire's cost per op: read back,
encode, decode, apply).

``--profile FILE`` (cProfile of this process) and ``--spy FILE`` (py-spy, sampling
every thread of both processes) profile the ingest after an outage.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from syncfw import Fleet, Node
from syncfw.cloud import Aggregator, AggregatorConfig, Consumer
from syncfw.exchange import run_exchange
from syncfw.mesh import MeshConfig
from syncfw.store import StoreConfig
from syncfw.transport.rpc import ChannelPool, TransportConfig

FLEET = Fleet(fleet_id="bench-cloud")
STORE = StoreConfig(synchronous="NORMAL")
FLOOR_RUNS = 3  # the floor is the median of this many runs
SYNC_EVERY_S = 1.0  # each edge syncs once a second, as a LAN mesh round does


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid``'s main thread (its event loop), from /proc."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _writer_busy_s(node: Node) -> float:
    """Seconds the node's writer has been busy, all kinds of work together."""
    return sum(node.metrics.by_label("syncfw_writer_busy_seconds_total", "work").values())


class Phases:
    """Wall time of the writer's steps for each remote batch or group (``--phases``):
    its plan on the event loop (``Store._stage_remote``, which also starts the
    transaction), the transaction as the loop awaits it (``Store._txn``), and the
    statements themselves on the database thread (``sql.run_steps``). With remote
    groups pipelined (``StoreConfig.pipeline_remote``) a plan runs while the group
    before commits, so the writer's time per group is about the larger of plan and
    transaction, not their sum. Bench instrumentation only: it wraps the three in
    place, counting only the transactions of remote batches (those with a guard)."""

    def __init__(self) -> None:
        from syncfw.store import sql, store

        self.on = False
        self.times: dict[str, list[float]] = {"plan": [], "txn": [], "steps": []}
        self.ops = 0
        real_stage, real_txn, real_steps = store.Store._stage_remote, store.Store._txn, sql.run_steps

        def record(key: str, t: float) -> None:
            if self.on:
                self.times[key].append(time.perf_counter() - t)

        async def stage(st: object, incoming: list[object]) -> object:
            self.ops += len(incoming) if self.on else 0
            t = time.perf_counter()
            try:
                return await real_stage(st, incoming)  # type: ignore[arg-type]
            finally:
                record("plan", t)

        async def txn(*args: Any, **kwargs: Any) -> int:
            t = time.perf_counter()
            try:
                return await real_txn(*args, **kwargs)
            finally:
                if kwargs.get("guard") is not None:
                    record("txn", t)

        def steps(*args: Any, **kwargs: Any) -> tuple[int, int | None]:
            t = time.perf_counter()
            try:
                return real_steps(*args, **kwargs)
            finally:
                if len(args) > 4 and args[4] is not None:  # the guard: a remote batch's
                    record("steps", t)

        store.Store._stage_remote = stage  # type: ignore[assignment,method-assign]
        store.Store._txn = txn  # type: ignore[method-assign]
        sql.run_steps = steps

    def take(self) -> dict[str, float]:
        """Microseconds per op of each step since the last take (and the group count)."""
        ops = max(self.ops, 1)
        got = {f"{k}_us_per_op": round(sum(v) * 1e6 / ops, 2) for k, v in self.times.items()}
        got["groups"] = len(self.times["plan"])
        for v in self.times.values():
            v.clear()
        self.ops = 0
        return got


# ------------------------------------------------------------------ the edges' process


class FanInEdge:
    """An edge that syncs only upward: its summary claims every other origin of
    the bench far ahead, so the aggregator sends it nothing back.

    syncfw replicates the whole log to every node: with 64 real edges each would
    also download the other 63's ops, 63 times the ingest, which is not what this
    measures. Everything else is the real node (its own ops, acks, the wire).
    """

    FAR = 1 << 40

    def __init__(self, node: Node, others: list[str]) -> None:
        self._node = node
        self._others = [o for o in others if o != node.node_id]

    def __getattr__(self, name: str) -> object:
        return getattr(self._node, name)

    async def version_vector(self) -> dict[str, int]:
        vv = dict(await self._node.version_vector())
        for origin in self._others:
            vv[origin] = self.FAR
        return vv


async def _edges_main(address: str, folder: str, n_edges: int, backlog: int) -> None:
    nodes = [
        await Node.open(Path(folder) / f"e{i:03}.db", node_id=f"e{i:03}", fleet=FLEET,
                        config=STORE)
        for i in range(n_edges)
    ]
    names = [n.node_id for n in nodes] + [FLEET.authority]
    edges = {n.node_id: FanInEdge(n, names) for n in nodes}
    # one connection per edge, as each edge of a fleet has its own
    pools = {n.node_id: ChannelPool(TransportConfig(exchange_timeout_s=120.0)) for n in nodes}

    port = address.rsplit(":", 1)[1]
    # each edge dials its own loopback address (127.0.0.2, .3, ...): grpc would
    # otherwise share one connection between channels to the same target
    dial = {n.node_id: f"127.0.0.{2 + i % 250}:{port}" for i, n in enumerate(nodes)}

    async def sync(node: Node) -> bool:
        stream = await pools[node.node_id].open(dial[node.node_id])
        out = await run_exchange(edges[node.node_id], stream, timeout_s=120.0)  # type: ignore[arg-type]
        return out.ok

    async def write_backlog(start: int, n: int) -> None:
        for node in nodes:
            for i in range(start, start + n, 500):
                await node.put_many(
                    [(f"telemetry/{node.node_id}/m{j % 64}", {"j": j, "v": f"{j:016x}"})
                     for j in range(i, min(i + 500, start + n))]
                )

    await write_backlog(0, backlog)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        if line[0] == "go":
            c0 = time.process_time()
            oks = await asyncio.gather(*(sync(n) for n in nodes))
            print(f"synced {sum(oks)} cpu {time.process_time() - c0:.3f}", flush=True)
        elif line[0] == "backlog":  # an outage: the same backlog again, not yet synced
            await write_backlog(backlog, backlog)
            print("written", flush=True)
        elif line[0] == "steady":
            rate, seconds = float(line[1]), float(line[2])
            await _steady(nodes, sync, rate, seconds)
            print("done", flush=True)
    for node in nodes:
        await node.close()
        await pools[node.node_id].aclose()


async def _steady(nodes: list[Node], sync: object, rate: float, seconds: float) -> None:
    """Each edge, every SYNC_EVERY_S (staggered), writes its share of ``rate`` and syncs."""
    share = rate / len(nodes)

    async def edge(i: int, node: Node) -> None:
        t0 = time.monotonic() + SYNC_EVERY_S * i / len(nodes)
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        written, tick = 0, 0
        while time.monotonic() - t0 < seconds:
            tick += 1
            k = int(share * (time.monotonic() - t0 + SYNC_EVERY_S)) - written
            if k > 0:
                await node.put_many(
                    [(f"results/{node.node_id}/det/r{written + j}", {"c": written + j})
                     for j in range(k)]
                )
                written += k
            with contextlib.suppress(Exception):  # a cut exchange: the next one resumes
                await sync(node)  # type: ignore[operator]
            await asyncio.sleep(max(0.0, t0 + tick * SYNC_EVERY_S - time.monotonic()))
        with contextlib.suppress(Exception):
            await sync(node)  # type: ignore[operator]

    await asyncio.gather(*(edge(i, n) for i, n in enumerate(nodes)))


# ------------------------------------------------------------------ the aggregator's side


class Latencies:
    """Latency percentiles in fixed memory: log-spaced buckets 1 % wide from 0.01 ms
    to 10 min, so a 10-minute soak's RSS is not the bench's own list of samples."""

    _LO, _STEP = 0.01, math.log(1.01)

    def __init__(self) -> None:
        self._counts = array.array("q", [0]) * (int(math.log(600_000 / self._LO) / self._STEP) + 2)
        self.n = 0

    def add(self, ms: float) -> None:
        i = 0 if ms <= self._LO else int(math.log(ms / self._LO) / self._STEP) + 1
        self._counts[min(i, len(self._counts) - 1)] += 1
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket holding the q-quantile (NaN when empty)."""
        if not self.n:
            return float("nan")
        rank, seen = q * (self.n - 1), 0
        for i, c in enumerate(self._counts):
            seen += c
            if seen > rank:
                return self._LO * math.exp(self._STEP * i)
        return float("nan")  # pragma: no cover


class Commits:
    """When each op became applied at the aggregator: its commit listener's times."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.by_origin: dict[str, tuple[list[int], list[float]]] = {}
        self._last: dict[str, int] = {}
        node.store.add_commit_listener(self.on_commit)

    def on_commit(self, rows: object = None) -> None:
        del rows  # the vector says what moved; the rows are not needed here
        now = time.monotonic()
        for o, s in self._node.store.version_vector.items():
            if s != self._last.get(o):
                self._last[o] = s
                seqs, times = self.by_origin.setdefault(o, ([], []))
                seqs.append(s)
                times.append(now)

    def applied_at(self, origin: str, seq: int) -> float | None:
        """When ``seq`` of ``origin`` was applied; each origin is asked in seq order,
        so what lies before is dropped (bounded memory over a soak)."""
        got = self.by_origin.get(origin)
        if got is None:
            return None
        seqs, times = got
        i = bisect.bisect_left(seqs, seq)
        at = times[i] if i < len(seqs) else None
        if i > 256:
            del seqs[:i], times[:i]
        return at


async def _floor(agg: Node, folder: Path, batch: int = 2000,
                 phases: Phases | None = None) -> float:
    ops = []
    vv: dict[str, int] = {}
    while True:
        page = await agg.ops_since(vv, limit=10_000)
        if not page:
            break
        ops += page
        for op in page:
            vv[op.origin] = max(vv.get(op.origin, 0), op.seq)
    rates = []
    for run in range(FLOOR_RUNS):  # each into a fresh node; the median (this box is noisy)
        node = await Node.open(folder / f"floor-{run}.db", node_id="floor", fleet=FLEET,
                               config=STORE)
        try:
            t = time.perf_counter()
            if phases is not None:
                phases.on = run == 0  # one run's steps
            for i in range(0, len(ops), batch):
                await node.apply_remote(ops[i : i + batch])
            rates.append(len(ops) / (time.perf_counter() - t))
            if phases is not None:
                phases.on = False
        finally:
            await node.close()
    return statistics.median(rates)


async def _feed_only(args: argparse.Namespace) -> dict[str, object]:
    """The feed's latency with ops applied in this process (see the module)."""
    from syncfw.testing.ops import OpWriter

    tick = 0.02
    with tempfile.TemporaryDirectory() as d:
        agg = await Aggregator.open(
            Path(d) / "cloud.db", fleet=FLEET,
            config=AggregatorConfig(mesh=MeshConfig.lan(), store=STORE),
        )
        try:
            mesh = await agg.serve("127.0.0.1:0")
            commits = Commits(agg.node)
            writers = [OpWriter(f"e{i:03}", zone=f"results/e{i:03}/") for i in range(args.edges)]
            consumer = Consumer(mesh.address, since={}, prefixes=["results/"])
            lat = Latencies()
            delivered = 0

            async def consume() -> None:
                nonlocal delivered
                async for item in consumer:
                    now = time.monotonic()
                    delivered += 1
                    at = commits.applied_at(item.origin, item.seq)
                    if at is not None:
                        lat.add((now - at) * 1000)

            reader = asyncio.create_task(consume())
            per_tick = max(1, int(args.rate * tick))
            t0 = time.monotonic()
            k = total = 0
            while time.monotonic() - t0 < args.seconds:
                k += 1
                batches: dict[str, list[object]] = {}
                base = agg.node.wall_ms() << 16
                for j in range(per_tick):  # 32-op batches of a few origins a tick
                    w = writers[(k * 7 + j // 32) % len(writers)]
                    op = w.write(f"det/r{w.seq}", {"c": w.seq}, hlc=base + j)
                    batches.setdefault(op.origin, []).append(op)
                for batch in batches.values():
                    await agg.node.apply_remote(batch)  # type: ignore[arg-type]
                total += per_tick
                await asyncio.sleep(max(0.0, t0 + k * tick - time.monotonic()))
            elapsed = time.monotonic() - t0
            deadline = time.monotonic() + 10
            while delivered < total and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await consumer.aclose()
        finally:
            await agg.aclose()
    p50, p99 = lat.quantile(0.5), lat.quantile(0.99)
    rate = total / elapsed
    print(f"feed only: {args.edges} origins applied in-process at {rate:,.0f} ops/s "
          f"(asked {args.rate:,.0f}) for {elapsed:.1f} s; delivered {delivered}/{total}; "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return {
        "edges": args.edges,
        "feed_only_asked_ops_per_s": args.rate,
        "feed_only_rate_ops_per_s": round(rate),
        "feed_only_delivered": delivered,
        "feed_only_applied": total,
        "feed_only_p50_ms": round(p50, 2),
        "feed_only_p99_ms": round(p99, 2),
    }


async def _breakdown(args: argparse.Namespace) -> dict[str, object]:
    """Where the ingest's cost per op goes, each part measured alone (see the module)."""
    from syncfw.testing.ops import OpWriter

    batch = 250  # about what each warm link's batch carries in the default ingest
    writers = [OpWriter(f"e{i:03}", zone=f"telemetry/e{i:03}/") for i in range(args.edges)]
    per = [
        [w.write(f"m{j % 64}", {"j": j, "v": f"{j:016x}"}, hlc=(1_700_000_000_000 + j) << 16)
         for j in range(args.backlog)]
        for w in writers
    ]
    total = args.edges * args.backlog

    async def drive(node: Node) -> tuple[float, float]:
        """Every origin's batches submitted at once, as the ingest's exchanges do: (s, CPU-s)."""
        async def one(ops: list[object]) -> None:
            for i in range(0, len(ops), batch):
                await node.apply_remote(ops[i : i + batch])  # type: ignore[arg-type]

        t, c = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(ops) for ops in per))  # type: ignore[arg-type]
        return time.perf_counter() - t, time.process_time() - c

    phases = Phases() if args.phases else None
    inproc_phases: dict[str, float] = {}
    runs: dict[str, list[tuple[float, float]]] = {"node": [], "aggregator": []}
    exchange: dict[int, list[float]] = {1: [], args.backlog: []}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for run in range(FLOOR_RUNS):
            node = await Node.open(folder / f"n{run}.db", node_id="floor", fleet=FLEET,
                                   config=STORE)
            try:
                runs["node"].append(await drive(node))
            finally:
                await node.close()
            agg = await Aggregator.open(
                folder / f"a{run}.db", fleet=FLEET,
                config=AggregatorConfig(mesh=MeshConfig.lan(), store=STORE),
            )
            try:
                if phases is not None:
                    phases.on = run == 0  # one run's steps (--phases)
                runs["aggregator"].append(await drive(agg.node))
                if phases is not None and run == 0:
                    phases.on = False
                    inproc_phases = phases.take()
            finally:
                await agg.aclose()
        # One edge's exchanges with an aggregator over real gRPC (front door on), one
        # after the other in this process: CPU per exchange, both sides together.
        agg = await Aggregator.open(folder / "x.db", fleet=FLEET,
                                    config=AggregatorConfig(mesh=MeshConfig.lan(), store=STORE))
        edge = await Node.open(folder / "x-edge.db", node_id="e000", fleet=FLEET, config=STORE)
        pool = ChannelPool(TransportConfig(exchange_timeout_s=60.0))
        try:
            mesh = await agg.serve("127.0.0.1:0")
            for n, cpus in exchange.items():
                for i in range(25):
                    await edge.put_many([(f"telemetry/e000/m{j % 64}", {"j": j}) for j in range(n)])
                    c = time.process_time()
                    out = await run_exchange(edge, await pool.open(mesh.address), timeout_s=60.0)
                    if not out.ok:
                        raise RuntimeError(f"exchange failed: {out}")
                    if i >= 5:  # warm links
                        cpus.append(time.process_time() - c)
        finally:
            await pool.aclose()
            await edge.close()
            await agg.aclose()

    def rate(k: str) -> float:
        return total / statistics.median(s for s, _ in runs[k])

    def us(k: str) -> float:
        return statistics.median(c for _, c in runs[k]) * 1e6 / total

    one_ms = statistics.median(exchange[1]) * 1e3
    many_ms = statistics.median(exchange[args.backlog]) * 1e3
    wire_us = (many_ms - one_ms) * 1e3 / (args.backlog - 1)
    print(f"in-process, {args.edges} origins x {args.backlog} ops in {batch}-op batches "
          f"submitted at once: a node {rate('node'):,.0f} ops/s ({us('node'):.1f} CPU-us/op), "
          f"an aggregator {rate('aggregator'):,.0f} ops/s ({us('aggregator'):.1f} CPU-us/op)")
    print(f"one edge's exchange with the aggregator over gRPC, both sides' CPU: "
          f"{one_ms:.2f} ms for 1 op, {many_ms:.2f} ms for {args.backlog} ops: "
          f"{wire_us:.1f} CPU-us per op more")
    return {
        "edges": args.edges,
        "breakdown_batch_ops": batch,
        "inproc_node_ops_per_s": round(rate("node")),
        "inproc_node_cpu_us_per_op": round(us("node"), 2),
        "inproc_aggregator_ops_per_s": round(rate("aggregator")),
        "inproc_aggregator_cpu_us_per_op": round(us("aggregator"), 2),
        "exchange_cpu_ms_1_op": round(one_ms, 3),
        "exchange_backlog_ops": args.backlog,
        "exchange_cpu_ms_backlog": round(many_ms, 3),
        "exchange_cpu_us_per_op": round(wire_us, 2),
        **{f"phase_inproc_{k}": v for k, v in inproc_phases.items()},
    }


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--edges", type=int, default=64)
    p.add_argument("--backlog", type=int, default=500, help="ops per edge before the ingest")
    p.add_argument("--rate", type=float, default=10_000, help="steady ops/s, all edges together")
    p.add_argument("--seconds", type=float, default=15.0, help="steady phase length")
    p.add_argument("--soak", type=float, default=0.0, metavar="MINUTES")
    p.add_argument("--floor-batch", type=int, default=2000,
                   help="ops per apply_remote in the floor (after the outage the ingest's "
                        "own batches are each edge's whole backlog, 500 ops by default; at "
                        "first contact they start at 8 KiB)")
    p.add_argument("--quick", action="store_true", help="8 edges, small figures (smoke test)")
    p.add_argument("--feed-only", action="store_true",
                   help="the feed's latency with ops applied in this process (no edges)")
    p.add_argument("--breakdown", action="store_true",
                   help="measure the ingest's parts alone (in-process apply, a node and an "
                        "aggregator; CPU per exchange over gRPC)")
    p.add_argument("--profile", metavar="FILE",
                   help="write a cProfile of this process during the ingest after an outage")
    p.add_argument("--spy", metavar="FILE",
                   help="write py-spy sampling profiles (raw, every thread) of this process to "
                        "FILE and of the edges' to FILE.edges during the ingest after an "
                        "outage (pip install '.[profile]')")
    p.add_argument("--phases", action="store_true",
                   help="time the writer's steps per op (apply, its transaction awaited, "
                        "the statements on the database thread) in the ingest after an "
                        "outage and in one floor run (keys phase_ingest_*, phase_floor_*); "
                        "with --breakdown, in the in-process aggregator (phase_inproc_*)")
    p.add_argument("--edges-proc", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.edges_proc:
        addr, folder, n, backlog = args.edges_proc
        await _edges_main(addr, folder, int(n), int(backlog))
        return
    if args.quick:
        args.edges, args.backlog, args.rate, args.seconds = 8, 100, 500, 3.0
    if args.feed_only:
        print(json.dumps(await _feed_only(args)))
        return
    if args.breakdown:
        print(json.dumps(await _breakdown(args)))
        return
    steady_s = args.soak * 60 if args.soak else args.seconds
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        agg = await Aggregator.open(
            folder / "cloud.db", fleet=FLEET,
            config=AggregatorConfig(mesh=MeshConfig.lan(), store=STORE),
        )
        # on every loopback address: each edge dials its own (see _edges_main)
        mesh = await agg.serve("0.0.0.0:0")
        local = f"127.0.0.1:{mesh.address.rsplit(':', 1)[1]}"
        commits = Commits(agg.node)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--edges-proc", mesh.address, str(folder),
            str(args.edges), str(args.backlog),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None

        async def said(word: str) -> str:
            assert proc.stdout is not None
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("the edges' process ended")
                if line.startswith(word):
                    return line

        async def ingest(label: str, goal: int) -> tuple[float, float, float, float]:
            """Every edge syncs its backlog at once: (ops/s, seconds, CPU-s here, CPU-s
            of the edges' process) until the aggregator holds ``goal`` ops in all."""
            assert proc.stdin is not None
            profile = None
            spies = []
            if args.spy and label == "after an outage":  # sampling profiles of both processes
                for pid, out in ((os.getpid(), args.spy), (proc.pid, args.spy + ".edges")):
                    spies.append(await asyncio.create_subprocess_exec(
                        "py-spy", "record", "-p", str(pid), "-r", "1000", "--threads",
                        "--nonblocking", "-f", "raw", "-o", out,
                    ))
                await asyncio.sleep(1.0)  # py-spy attaches
            if phases is not None:
                phases.take()
                phases.on = label == "after an outage"
            if args.profile and label == "after an outage":
                import cProfile

                profile = cProfile.Profile()
                profile.enable()
            t, c0, edges_cpu = time.perf_counter(), time.process_time(), 0.0
            main0, edges_main0 = _main_thread_cpu_s(os.getpid()), _main_thread_cpu_s(proc.pid)
            busy0 = _writer_busy_s(agg.node)
            for _ in range(5):  # an exchange cut on a busy machine is retried, as a mesh would
                proc.stdin.write(b"go\n")
                synced = (await said("synced")).strip()
                edges_cpu += float(synced.rsplit(" ", 1)[1])
                print(f"edges: {synced}", flush=True)
                if sum(agg.node.store.version_vector.values()) >= goal:
                    break
            else:
                raise RuntimeError("the edges could not sync their backlog")
            took = time.perf_counter() - t
            rate, cpu = total / took, time.process_time() - c0
            busy = _writer_busy_s(agg.node) - busy0
            if phases is not None and phases.on:
                phases.on = False
                phase["ingest"] = phases.take()
            mains[label] = (_main_thread_cpu_s(os.getpid()) - main0,
                            _main_thread_cpu_s(proc.pid) - edges_main0, busy)
            for spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file and ends
                await spy.wait()
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
            print(f"ingest ({label}): {total} ops from {args.edges} edges in {took:.2f} s = "
                  f"{rate:,.0f} ops/s; CPU-s: aggregator {cpu:.2f}, edges {edges_cpu:.2f} "
                  f"(of {2 * took:.2f} on 2 cores); main threads: aggregator "
                  f"{mains[label][0]:.2f}, edges {mains[label][1]:.2f}; the aggregator's "
                  f"writer busy {busy:.2f} s ({busy / took:.0%} of the ingest)", flush=True)
            return rate, took, cpu, edges_cpu

        mains: dict[str, tuple[float, float, float]] = {}
        phases = Phases() if args.phases else None
        phase: dict[str, dict[str, float]] = {}
        try:
            await said("ready")
            total = args.edges * args.backlog
            cold, cold_s, cold_cpu, cold_edges_cpu = await ingest("first contact", total)
            floor = await _floor(agg.node, folder, args.floor_batch, phases)
            if phases is not None:
                phase["floor"] = phases.take()
            print(f"floor (apply_remote of the same ops, {args.floor_batch}-op batches): "
                  f"{floor:,.0f} ops/s; first-contact ingest ratio {cold / floor:.2f}")

            consumer = Consumer(local, since=agg.node.store.version_vector,
                                prefixes=["results/"])
            lat = Latencies()
            rss: list[tuple[float, float]] = []
            delivered = 0
            before = sum(agg.node.store.version_vector.values())

            async def consume() -> None:
                nonlocal delivered
                async for item in consumer:
                    now = time.monotonic()
                    delivered += 1
                    at = commits.applied_at(item.origin, item.seq)
                    if at is not None:
                        lat.add((now - at) * 1000)

            reader = asyncio.create_task(consume())
            t0 = time.monotonic()
            proc.stdin.write(f"steady {args.rate} {steady_s}\n".encode())
            done = asyncio.create_task(said("done"))
            while not done.done():
                rss.append((time.monotonic() - t0, _rss_mb()))
                await asyncio.wait({done}, timeout=5.0 if args.soak else 0.5)
            await done
            elapsed = time.monotonic() - t0
            applied = sum(agg.node.store.version_vector.values()) - before
            deadline = time.monotonic() + 10
            while delivered < applied and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # the consumer's last items, bounded
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await consumer.aclose()
            # An outage: every edge holds the same backlog again, over the links the
            # steady phase used (each link's batch size as it learned it).
            proc.stdin.write(b"backlog\n")
            await said("written")
            goal = sum(agg.node.store.version_vector.values()) + total
            ingest, ingest_s, agg_cpu, edges_cpu = await ingest("after an outage", goal)
            print(f"ingest ratio {ingest / floor:.2f} after an outage, {cold / floor:.2f} "
                  "at first contact")
            proc.stdin.write(b"quit\n")
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await agg.aclose()
    rate = applied / elapsed
    p50, p99 = lat.quantile(0.5), lat.quantile(0.99)
    if args.soak and elapsed > 120:
        first = [m for s, m in rss if s <= 60]
        last = [m for s, m in rss if s >= rss[-1][0] - 60]
        window = "first vs last minute of the soak"
    else:
        cut = max(1, len(rss) // 5)
        first, last = [m for _, m in rss[:cut]], [m for _, m in rss[-cut:]]
        window = f"first vs last fifth of a {elapsed:.0f} s steady phase (no --soak)"
    growth = statistics.mean(last) - statistics.mean(first)
    print(f"steady: asked {args.rate:,.0f} ops/s, the aggregator applied {rate:,.0f} ops/s "
          f"for {elapsed:.1f} s; the feed delivered {delivered}/{applied}")
    print(f"feed latency (applied at the aggregator -> yielded by a gRPC consumer): "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms at {rate:,.0f} ops/s")
    print(f"RSS growth {growth:+.1f} MB ({window})")
    for where, got in phase.items():
        print(f"writer steps, {where}: {got['groups']} groups; per op: plan "
              f"{got['plan_us_per_op']:.1f} us, the transaction awaited {got['txn_us_per_op']:.1f}"
              f" us, the statements on the database thread {got['steps_us_per_op']:.1f} us")
    print(json.dumps({
        "edges": args.edges,
        "ingest_ops": total,
        "ingest_ops_per_s": round(ingest),
        "ingest_cpu_s_aggregator": round(agg_cpu, 3),
        "ingest_cpu_s_edges": round(edges_cpu, 3),
        "ingest_s": round(ingest_s, 3),
        "ingest_cpu_s_aggregator_main": round(mains["after an outage"][0], 3),
        "ingest_cpu_s_edges_main": round(mains["after an outage"][1], 3),
        "ingest_writer_busy_s": round(mains["after an outage"][2], 3),
        "floor_ops_per_s": round(floor),
        "ingest_ratio": round(ingest / floor, 3),
        "ingest_cold_ops_per_s": round(cold),
        "ingest_cold_cpu_s_aggregator": round(cold_cpu, 3),
        "ingest_cold_cpu_s_edges": round(cold_edges_cpu, 3),
        "ingest_cold_s": round(cold_s, 3),
        "ingest_cold_ratio": round(cold / floor, 3),
        "feed_asked_ops_per_s": args.rate,
        "feed_rate_ops_per_s": round(rate),
        "feed_delivered": delivered,
        "feed_applied": applied,
        "feed_p50_ms": round(p50, 2),
        "feed_p99_ms": round(p99, 2),
        "rss_growth_mb": round(growth, 1),
        "rss_window": window,
        "steady_s": round(elapsed, 1),
        **{f"phase_{where}_{k}": v for where, got in phase.items() for k, v in got.items()},
    }))


if __name__ == "__main__":
    asyncio.run(main())
