"""Export throughput to a 3-server JetStream cluster (R3 stream) on loopback.

A node holds the ops of ``--origins`` edges (``--ops`` each, applied
in-process); an :class:`~syncfw.cloud.export.Exporter` publishes them all to a
fresh R3 stream on a 3-server ``nats-server`` cluster, in JetStream atomic
batches (the default; ``--atomic-batch 0``: op by op). Two floors, measured in
the same run against the same cluster, publish the same messages (same
subjects, bodies and headers, ``Nats-Msg-Id`` included) to other R3 streams
with no other constraint (no follow(), no per-origin order, no cursor):
nats-py's ``publish_async``, as many in flight as the client allows
(``floor_ops_per_s``), and atomic batches of 1000, ``--in-flight`` at once,
through the exporter's own batch function (``batch_floor_ops_per_s``).
The export figure is timed from the exporter holding its stream (connected,
stream and progress bucket made: ``setup_s``) to the last ack.

With ``--processes N`` (N > 1) the export duty is split by the origin hash
(:func:`~syncfw.cloud.export.owner_of`) across N exporter processes, each
with its own replica of the same log (as N aggregators side by side hold
one), all started at once; ``export_ops_per_s`` is then every op over the
time until the last process has exported its share.

Keys: ``export_ops_per_s`` (the issue's figure; target ≥ 20k),
``floor_ops_per_s``, ``batch_floor_ops_per_s`` and the ratios, ``setup_s``,
``origins``, ``ops``, and the stream check (every op once, in per-origin order). Runs in well under a minute by default;
the last line is one JSON object.

    .venv/bin/python bench/export.py [--origins 64] [--ops 300] [--batch 8000]
        [--atomic-batch 1000] [--in-flight 4] [--processes N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js import api

from syncfw import Fleet, Node
from syncfw.cloud.export import ExportConfig, Exporter
from syncfw.cloud.export_batch import publish_batch
from syncfw.cloud.export_check import check_stream, read_stream
from syncfw.cloud.export_servers import NatsCluster
from syncfw.cloud.export_subjects import op_message, subject_token
from syncfw.log import Op
from syncfw.store.follow import FeedItem

FLEET = Fleet(fleet_id="bench-export")


async def _fill(root: Path, origins: int, per: int, chunk: int = 10) -> Node:
    """The edges write in turns of ``chunk`` ops, as a live fleet does, so their
    ops interleave in time (the exporter keeps one op in flight per origin)."""
    node = await Node.open(root / "cloud.db", node_id="cloud", fleet=FLEET)
    edges = [await Node.open(root / f"e{i}.db", node_id=f"edge-{i:03d}", fleet=FLEET)
             for i in range(origins)]
    for start in range(0, per, chunk):
        for e in edges:
            await e.put_many([(f"fleet/{e.node_id}/m{j}", {"v": j, "pad": "x" * 64})
                              for j in range(start, min(start + chunk, per))])
    for e in edges:
        await node.apply_remote(await e.ops_since({}, limit=per + 10))
        await e.close()
    return node


async def _worker(db: str, node_id: str, urls: str, exporters: str, batch: int,
                  atomic: int, in_flight: int) -> None:
    """One exporter process: export this replica's share, say how many it stored."""
    logging.basicConfig(level=logging.WARNING)
    node = await Node.open(db, node_id=node_id, fleet=FLEET)
    names = tuple(exporters.split(","))
    cfg = ExportConfig(servers=tuple(urls.split(",")), replicas=3, batch_ops=batch,
                       exporters=names, atomic_batch_ops=atomic, batches_in_flight=in_flight)
    ex = Exporter(node, cfg, alive=lambda: names)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
    t0 = time.perf_counter()
    await ex.start()
    while ex.state != "exporting" or ex.lag()[0] > 0:
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"{node_id}: export stuck: {ex.status()}")
        await asyncio.sleep(0.005)
    dt = time.perf_counter() - t0
    await ex.aclose()
    await node.close()
    print(f"done {ex.stats.stored} {dt:.4f}", flush=True)


async def _replicas(root: Path, ops: list[Op], n: int) -> list[str]:
    """``n`` replicas (x0, x1, ...) of the same log, each its own SQLite file."""
    names = []
    for i in range(n):
        node = await Node.open(root / f"x{i}.db", node_id=f"x{i}", fleet=FLEET)
        for j in range(0, len(ops), 5000):
            await node.apply_remote(ops[j : j + 5000])
        await node.close()
        names.append(f"x{i}")
    return names


async def _export_split(root: Path, urls: list[str], ops: list[Op], n: int,
                        args: argparse.Namespace) -> tuple[float, int, list[float]]:
    """Every op exported by ``n`` processes; (seconds until the last is done, stored, each's s)."""
    names = await _replicas(root, ops, n)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", str(root / f"{name}.db"), name,
            ",".join(urls), ",".join(names), str(args.batch), str(args.atomic_batch),
            str(args.in_flight),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for name in names
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = (await p.stdout.readline()).decode()
            if not line.startswith("ready"):
                raise RuntimeError(f"an exporter process did not start: {line!r}")
        t0 = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        stored, each = 0, []
        for p in procs:
            assert p.stdout is not None
            words = (await p.stdout.readline()).decode().split()
            if not words or words[0] != "done":
                raise RuntimeError(f"an exporter process failed: {words!r}")
            stored += int(words[1])
            each.append(float(words[2]))
        dt = time.perf_counter() - t0
        for p in procs:
            await p.wait()
        return dt, stored, each
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


def _servers_cpu_s(cluster: NatsCluster) -> float:
    """CPU seconds (user + system) the cluster's nats-server processes used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for s in cluster.servers:
        if s.proc is None:
            continue
        fields = Path(f"/proc/{s.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def _ready(urls: list[str]) -> None:
    """Wait until the cluster's JetStream has a meta leader (stream creation works)."""
    nc = await nats.connect(urls)
    js = nc.jetstream(timeout=2)
    try:
        for _ in range(200):
            try:
                await js.add_stream(name="WARMUP", subjects=["warmup.>"], num_replicas=3)
                await js.delete_stream("WARMUP")
                return
            except Exception:
                await asyncio.sleep(0.1)
        raise RuntimeError("the JetStream cluster never elected a leader")
    finally:
        await nc.close()


async def _floor(urls: list[str], ops: list[Op]) -> float:
    nc = await nats.connect(urls)
    js = nc.jetstream(timeout=10)
    fleet = subject_token(FLEET.fleet_id)
    await js.add_stream(api.StreamConfig(name="FLOOR", subjects=[f"floor.{fleet}.>"],
                                         num_replicas=3, duplicate_window=120))
    msgs = [op_message("floor", fleet, op) for op in ops]
    t0 = time.perf_counter()
    futs = [await js.publish_async(s, b, headers=h, wait_stall=30) for s, b, h in msgs]
    await asyncio.gather(*futs)
    dt = time.perf_counter() - t0
    info = await js.stream_info("FLOOR")
    assert info.state.messages == len(ops), info.state
    await nc.close()
    return len(ops) / dt


async def _batch_floor(urls: list[str], ops: list[Op], in_flight: int) -> float:
    """Atomic batches of 1000 of the same messages, ``in_flight`` at once, in log order."""
    nc = await nats.connect(urls)
    js = nc.jetstream(timeout=10)
    fleet = subject_token(FLEET.fleet_id)
    await js.add_stream(api.StreamConfig(name="BFLOOR", subjects=[f"bfloor.{fleet}.>"],
                                         num_replicas=3, duplicate_window=120, allow_atomic=True))
    items = [FeedItem(op, None, False, False, False) for op in ops]
    chunks = [items[i : i + 1000] for i in range(0, len(items), 1000)]
    sem = asyncio.Semaphore(in_flight)

    async def one(chunk: list[FeedItem]) -> None:
        async with sem:
            await publish_batch(nc, "BFLOOR", "bfloor", fleet, chunk, 30)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in chunks))
    dt = time.perf_counter() - t0
    info = await js.stream_info("BFLOOR")
    assert info.state.messages == len(ops), info.state
    await nc.close()
    return len(ops) / dt


async def main(args: argparse.Namespace) -> dict[str, object]:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = await _fill(root, args.origins, args.ops)
        total = sum(node.store.version_vector.values())
        try:
            async with NatsCluster(root / "nats", 3) as cluster:
                await _ready(cluster.urls)
                all_ops = await node.ops_since({}, limit=total + 10)
                each: list[float] = []
                if args.processes > 1:
                    export_s, stored, each = await _export_split(
                        root, cluster.urls, all_ops, args.processes, args)
                    if stored != total:
                        raise RuntimeError(f"the exporters stored {stored} of {total} ops")
                else:
                    cfg = ExportConfig(servers=tuple(cluster.urls), replicas=3,
                                       batch_ops=args.batch, atomic_batch_ops=args.atomic_batch,
                                       batches_in_flight=args.in_flight)
                    ex = Exporter(node, cfg)
                    t_setup = time.perf_counter()
                    await ex.start()
                    while ex.state != "exporting":  # connected, stream and bucket made
                        if time.perf_counter() - t_setup > 60:
                            raise RuntimeError(f"export never started: {ex.status()}")
                        await asyncio.sleep(0.001)
                    t0 = time.perf_counter()
                    cpu0, srv0 = time.process_time(), _servers_cpu_s(cluster)
                    setup_s = t0 - t_setup
                    mode = ex.publish_mode
                    while ex.stats.stored < total:
                        if time.perf_counter() - t0 > 120:
                            raise RuntimeError(f"export stuck at {ex.stats.stored}/{total}: "
                                               f"{ex.status()}")
                        await asyncio.sleep(0.01)
                    export_s = time.perf_counter() - t0
                    cpu_us = (time.process_time() - cpu0) / total * 1e6
                    srv_us = (_servers_cpu_s(cluster) - srv0) / total * 1e6
                    await ex.aclose()
                rep = check_stream(await read_stream(cluster.urls, "SYNCFW"),
                                   node.store.version_vector)
                floor = await _floor(cluster.urls, all_ops)
                bfloor = await _batch_floor(cluster.urls, all_ops, args.in_flight)
        finally:
            await node.close()
    export_rate = total / export_s
    out: dict[str, object] = {
        "origins": args.origins,
        "ops": total,
        "batch_ops": args.batch,
        "atomic_batch_ops": args.atomic_batch,
        "batches_in_flight": args.in_flight,
        "processes": args.processes,
        "export_ops_per_s": round(export_rate),
        "floor_ops_per_s": round(floor),
        "export_vs_floor": round(export_rate / floor, 2),
        "batch_floor_ops_per_s": round(bfloor),
        "export_vs_batch_floor": round(export_rate / bfloor, 2),
        "stream_ok": rep.ok,
    }
    if args.processes == 1:
        out["setup_s"] = round(setup_s, 3)
        out["publish_mode"] = mode
        # What the export costs in CPU, per op: this process (the exporter, its
        # follower's SQLite thread) and the three servers (an R3 stream stores
        # each op three times). On a machine of ``cores`` cores running nothing
        # else, no export can beat cores / (the two summed).
        out["exporter_cpu_us_per_op"] = round(cpu_us, 1)
        out["servers_cpu_us_per_op"] = round(srv_us, 1)
        out["cores"] = os.cpu_count()
        out["cpu_bound_ops_per_s"] = round((os.cpu_count() or 1) / ((cpu_us + srv_us) / 1e6))
    print(f"{'export_ops_per_s':<22} {out['export_ops_per_s']:>10,}  "
          f"({total} ops of {args.origins} origins, R3, 3 servers)")
    print(f"{'floor_ops_per_s':<22} {out['floor_ops_per_s']:>10,}  (nats-py publish_async, "
          "same messages, no order kept)")
    print(f"{'export / floor':<22} {out['export_vs_floor']:>10}")
    print(f"{'batch_floor_ops_per_s':<22} {out['batch_floor_ops_per_s']:>10,}  (atomic batches of "
          f"1000, {args.in_flight} in flight, same messages)")
    print(f"{'export / batch floor':<22} {out['export_vs_batch_floor']:>10}")
    if "cpu_bound_ops_per_s" in out:
        print(f"{'CPU per op':<22} exporter {out['exporter_cpu_us_per_op']} us, servers "
              f"{out['servers_cpu_us_per_op']} us: {out['cores']} cores bound the export at "
              f"{out['cpu_bound_ops_per_s']:,} ops/s")
    if "setup_s" in out:
        print(f"{'setup_s':<22} {out['setup_s']:>10}  (connect, stream, bucket; not in the rate)"
              f"  mode: {out['publish_mode']}")
    if each:
        print(f"{'per process (s)':<22} {' '.join(f'{t:.2f}' for t in each)}  "
              f"({args.processes} exporter processes, split by origin hash)")
    print(f"stream: {rep}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--origins", type=int, default=64)
    p.add_argument("--ops", type=int, default=300, help="ops per origin")
    p.add_argument("--batch", type=int, default=8000, help="the exporter's batch_ops")
    p.add_argument("--atomic-batch", type=int, default=1000,
                   help="the exporter's atomic_batch_ops (0: op by op)")
    p.add_argument("--in-flight", type=int, default=4, help="the exporter's batches_in_flight")
    p.add_argument("--processes", type=int, default=1,
                   help="exporter processes splitting the origins (each its own replica)")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    parsed = p.parse_args()
    if parsed.worker:
        db, nid, urls, names, batch, atomic, in_flight = parsed.worker
        asyncio.run(_worker(db, nid, urls, names, int(batch), int(atomic), int(in_flight)))
        sys.exit(0)
    result = asyncio.run(main(parsed))
    print(json.dumps(result, sort_keys=True))
    sys.exit(0 if result["stream_ok"] else 1)
