"""The change feed's latency with its gRPC consumer in a process of its own.

Usage: ``python bench/feed_remote.py [--edges 64] [--rate 10000] [--seconds 15]``
(about 40 s).

``bench/aggregator.py`` follows the feed with a :class:`~syncfw.cloud.Consumer` in
the aggregator's own process, so the consumer's CPU is the aggregator's. Here the
consumer runs in a third process, as a cloud team's service would: the same
aggregator, the same 64 edges (``bench/aggregator.py``'s edges' process, syncing
upward only) at the same steady rate, after the same backlog ingest. The
consumer records when it yielded each op (``time.monotonic``, one clock for every
process on the machine); this process records when each op became applied (the
store's commit listener) and joins the two at the end. Figures:

- ``feed_remote_p50_ms`` / ``feed_remote_p99_ms``: applied at the aggregator to
  yielded by the consumer in its own process;
- ``feed_remote_rate_ops_per_s``: ops delivered over the steady phase;
- ``aggregator_cpu_per_s``: this process's CPU seconds per second meanwhile.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aggregator as agg_bench  # beside this script (its folder is on sys.path)

from syncfw.cloud import Aggregator, AggregatorConfig, Consumer
from syncfw.mesh import MeshConfig


async def _consumer_main(address: str, since: str, out: str) -> None:
    """The consumer's process: follow ``results/`` until a line on stdin, then dump
    (origin, seq, time yielded) of every item to ``out``."""
    feed = Consumer(address, since=json.loads(since), prefixes=["results/"])
    origins: list[str] = []
    seqs, times = array.array("q"), array.array("d")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)

    async def run() -> None:
        async for item in feed:
            times.append(time.monotonic())
            origins.append(item.origin)
            seqs.append(item.seq)

    task = asyncio.create_task(run())
    print("started", flush=True)
    await stop.wait()
    await asyncio.sleep(3.0)  # the last items in flight
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    await feed.aclose()
    dump = json.dumps({"o": origins, "s": list(seqs), "t": list(times)})
    await asyncio.to_thread(Path(out).write_text, dump)
    print("dumped", flush=True)


async def _said(proc: asyncio.subprocess.Process, word: str) -> str:
    assert proc.stdout is not None
    while True:
        line = (await proc.stdout.readline()).decode()
        if not line:
            raise RuntimeError(f"a bench process ended before saying {word!r}")
        if line.startswith(word):
            return line


async def main(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        agg = await Aggregator.open(
            folder / "cloud.db", fleet=agg_bench.FLEET,
            config=AggregatorConfig(mesh=MeshConfig.lan(), store=agg_bench.STORE),
        )
        mesh = await agg.serve("0.0.0.0:0")
        local = f"127.0.0.1:{mesh.address.rsplit(':', 1)[1]}"
        commits = agg_bench.Commits(agg.node)
        edges = await asyncio.create_subprocess_exec(
            sys.executable, agg_bench.__file__, "--edges-proc", mesh.address, str(folder),
            str(args.edges), "500", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        consumer = None
        try:
            assert edges.stdin is not None
            await _said(edges, "ready")
            edges.stdin.write(b"go\n")
            await _said(edges, "synced")
            out = folder / "yielded.json"
            consumer = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--consumer", local,
                json.dumps(dict(agg.node.store.version_vector)), str(out),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            assert consumer.stdin is not None
            await _said(consumer, "started")
            await asyncio.sleep(1.0)
            t0, c0 = time.monotonic(), time.process_time()
            edges.stdin.write(f"steady {args.rate} {args.seconds}\n".encode())
            await _said(edges, "done")
            elapsed, cpu = time.monotonic() - t0, time.process_time() - c0
            consumer.stdin.write(b"stop\n")
            await _said(consumer, "dumped")
            got = json.loads(await asyncio.to_thread(out.read_text))
            edges.stdin.write(b"quit\n")
            await edges.wait()
        finally:
            for p in (edges, consumer):
                if p is not None and p.returncode is None:
                    p.kill()
                    await p.wait()
            await agg.aclose()
    lat = []
    for origin, seq, at in zip(got["o"], got["s"], got["t"], strict=True):
        seqs, times = commits.by_origin.get(origin, ([], []))
        i = bisect.bisect_left(seqs, seq)
        if i < len(seqs):
            lat.append((at - times[i]) * 1000)
    lat.sort()
    if not lat:
        raise RuntimeError("the consumer yielded nothing")
    return {
        "edges": args.edges,
        "feed_asked_ops_per_s": args.rate,
        "feed_remote_delivered": len(got["t"]),
        "feed_remote_rate_ops_per_s": round(len(got["t"]) / elapsed),
        "feed_remote_p50_ms": round(_quantile(lat, 0.5), 2),
        "feed_remote_p99_ms": round(_quantile(lat, 0.99), 2),
        "aggregator_cpu_per_s": round(cpu / elapsed, 3),
    }


def _quantile(sorted_ms: list[float], q: float) -> float:
    """The ``q``-quantile of a sorted list (nearest rank)."""
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--consumer":
        asyncio.run(_consumer_main(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        p = argparse.ArgumentParser()
        p.add_argument("--edges", type=int, default=64)
        p.add_argument("--rate", type=float, default=10_000)
        p.add_argument("--seconds", type=float, default=15.0)
        figures = asyncio.run(main(p.parse_args()))
        print(f"feed with its consumer in its own process: p50 {figures['feed_remote_p50_ms']} ms, "
              f"p99 {figures['feed_remote_p99_ms']} ms at {figures['feed_remote_rate_ops_per_s']:,} "
              f"ops/s delivered; the aggregator's process at {figures['aggregator_cpu_per_s']} of a core")
        print(json.dumps(figures))
