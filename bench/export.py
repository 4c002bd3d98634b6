"""Export throughput to a 3-server JetStream cluster (R3 stream) on loopback.

A node holds the ops of ``--origins`` edges (``--ops`` each, applied
in-process); an :class:`~syncfw.cloud.export.Exporter` publishes them all to a
fresh R3 stream on a 3-server ``nats-server`` cluster. The floor, measured in
the same run against the same cluster, is nats-py itself publishing the same
messages (same subjects, bodies and headers, ``Nats-Msg-Id`` included) to
another R3 stream with ``publish_async`` and no other constraint: as many in
flight as the client allows, no follow(), no per-origin order, no cursor.

Keys: ``export_ops_per_s`` (the issue's figure; target ≥ 20k),
``floor_ops_per_s`` and the ratio, ``origins``, ``ops``, and the stream check
(every op once, in per-origin order). Runs in well under a minute by default;
the last line is one JSON object.

    .venv/bin/python bench/export.py [--origins 64] [--ops 300] [--batch 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js import api

from syncfw import Fleet, Node
from syncfw.cloud.export import ExportConfig, Exporter
from syncfw.cloud.export_check import check_stream, read_stream
from syncfw.cloud.export_servers import NatsCluster
from syncfw.cloud.export_subjects import op_message, subject_token
from syncfw.log import Op

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


async def main(args: argparse.Namespace) -> dict[str, object]:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = await _fill(root, args.origins, args.ops)
        total = sum(node.store.version_vector.values())
        try:
            async with NatsCluster(root / "nats", 3) as cluster:
                await _ready(cluster.urls)
                cfg = ExportConfig(servers=tuple(cluster.urls), replicas=3,
                                   batch_ops=args.batch)
                ex = Exporter(node, cfg)
                t0 = time.perf_counter()
                await ex.start()
                while ex.stats.stored < total:
                    if time.perf_counter() - t0 > 120:
                        raise RuntimeError(f"export stuck at {ex.stats.stored}/{total}: "
                                           f"{ex.status()}")
                    await asyncio.sleep(0.01)
                export_s = time.perf_counter() - t0
                await ex.aclose()
                rep = check_stream(await read_stream(cluster.urls, "SYNCFW"),
                                   node.store.version_vector)
                all_ops = await node.ops_since({}, limit=total + 10)
                floor = await _floor(cluster.urls, all_ops)
        finally:
            await node.close()
    export_rate = total / export_s
    out: dict[str, object] = {
        "origins": args.origins,
        "ops": total,
        "batch_ops": args.batch,
        "export_ops_per_s": round(export_rate),
        "floor_ops_per_s": round(floor),
        "export_vs_floor": round(export_rate / floor, 2),
        "stream_ok": rep.ok,
    }
    print(f"{'export_ops_per_s':<22} {out['export_ops_per_s']:>10,}  "
          f"({total} ops of {args.origins} origins, R3, 3 servers)")
    print(f"{'floor_ops_per_s':<22} {out['floor_ops_per_s']:>10,}  (nats-py publish_async, "
          "same messages, no order kept)")
    print(f"{'export / floor':<22} {out['export_vs_floor']:>10}")
    print(f"stream: {rep}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--origins", type=int, default=64)
    p.add_argument("--ops", type=int, default=300, help="ops per origin")
    p.add_argument("--batch", type=int, default=4096, help="the exporter's batch_ops")
    result = asyncio.run(main(p.parse_args()))
    print(json.dumps(result, sort_keys=True))
    sys.exit(0 if result["stream_ok"] else 1)
