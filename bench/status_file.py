"""The cost of a node's status report at 100k keys: the status file and the admin snapshot.

``syncfw node serve --status-file`` writes every ``--status-every`` seconds (1 s).
The floor is the old way, measured in the same run: the state digest recomputed on
every write (it reads the whole state). The status writer now recomputes it only when
the log moved and at most every ``--digest-every`` seconds; between those writes it
costs what the counts and the registry cost.

    .venv/bin/python bench/status_file.py [--keys 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from syncfw import Fleet, Grant, Node
from syncfw.cli.node_cmd import StatusWriter, write_status
from syncfw.mesh import Mesh, MeshConfig
from syncfw.node.admin import live_status


async def _median_ms(fn: Callable[[], Awaitable[object]], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


async def main(keys: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="syncfw-status-"))
    fleet = Fleet(fleet_id="bench", grants=(Grant.of("site/", "*"),))
    async with Node.open(folder / "a.db", node_id="a", fleet=fleet) as node:
        for i in range(0, keys, 5000):
            await node.put_many({f"site/k{j:06d}": {"v": j} for j in range(i, min(i + 5000, keys))})
        mesh = await Mesh.start(node, listen=None, config=MeshConfig.test(), run_loop=False)
        try:
            path = folder / "status.json"
            floor = await _median_ms(lambda: write_status(path, node, mesh), 5)
            writer = StatusWriter(path, node, mesh, digest_every=30.0)
            await writer.write()  # the first write computes the digest
            await node.put("site/moved", 1)  # the log moved, the digest is not due yet
            between = await _median_ms(writer.write, 10)
            digest = await _median_ms(node.state_digest, 3)
            snapshot = await _median_ms(lambda: live_status(node, mesh), 10)
        finally:
            await mesh.aclose()
    figures = {
        "keys": float(keys),
        "floor_status_write_ms": round(floor, 1),
        "status_write_ms": round(between, 1),
        "status_write_vs_floor": round(between / floor, 3),
        "state_digest_ms": round(digest, 1),
        "admin_status_ms": round(snapshot, 1),
    }
    print(f"{'figure':<44} {'ms':>8} {'vs floor':>9}")
    print(f"{'floor: status write, digest every time':<44} {floor:8.1f} {1.0:9.2f}")
    print(f"{'status write, digest not due':<44} {between:8.1f} {between / floor:9.3f}")
    print(f"{'state digest alone':<44} {digest:8.1f} {digest / floor:9.2f}")
    print(f"{'admin /v1/status snapshot (live_status)':<44} {snapshot:8.1f} {snapshot / floor:9.3f}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().keys))
