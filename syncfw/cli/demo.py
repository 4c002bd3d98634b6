"""``syncfw demo``: a small fleet in one process that splits, keeps working, and converges.

Three nodes (two trucks and a depot) write concurrently into their own zones
and into shared ones, a partition cuts truck t7 off, both sides keep writing
(and t9 tries to write into t7's zone, which is refused), then the partition
heals, the nodes exchange the ops they lack, and the demo prints each node's
state digest: identical digests mean identical state.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from pathlib import Path
from typing import Any

from syncfw.errors import ZoneOwnershipError
from syncfw.node import Node
from syncfw.zones import Fleet, Grant


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run a local demo fleet: concurrent writes, a partition, a heal, converged state",
        description="Run a small demo fleet in this process and show that it converges.",
    )
    p.add_argument("--dir", help="keep the nodes' SQLite files here (default: a temp dir)")
    p.add_argument("--writes", type=int, default=200, help="writes per node per phase")
    p.add_argument("--seed", type=int, default=7, help="seed of the writes' random choices")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        return asyncio.run(demo(Path(args.dir), args.writes, args.seed))
    with tempfile.TemporaryDirectory(prefix="syncfw-demo-") as tmp:
        return asyncio.run(demo(Path(tmp), args.writes, args.seed))


DEMO_FLEET = Fleet(
    fleet_id="demo-mine",
    authority="depot",
    grants=(
        Grant.of("trucks/t7/", "t7"),
        Grant.of("trucks/t9/", "t9"),
        Grant.of("site/", "*"),
    ),
)


async def exchange(a: Node, b: Node) -> int:
    """Push-pull anti-entropy between two nodes in one process; returns ops moved."""
    moved = 0
    for src, dst in ((a, b), (b, a)):
        while ops := await src.ops_since(await dst.version_vector(), limit=5000):
            await dst.apply_remote(ops)
            moved += len(ops)
    return moved


async def _writes(node: Node, rng: random.Random, n: int, phase: str) -> None:
    me = node.node_id
    tonnes = node.counter("site/ore-tonnes")
    alerts = node.set("site/alerts")
    for i in range(n):
        if me.startswith("t"):
            await node.put(f"trucks/{me}/position", {"lat": -22.3 + rng.random(), "lon": 118.6, "i": i})
            await tonnes.add(rng.randint(20, 60))
        if rng.random() < 0.05:
            await alerts.add(f"{phase}:{me}:{i}")
        if rng.random() < 0.1:
            await node.put("site/shift-lead", me)
    await node.put(f"fleet/{me}/status", {"phase": phase, "writes": n})


async def demo(folder: Path, writes: int, seed: int) -> int:
    rng = random.Random(seed)
    names = ("t7", "t9", "depot")
    nodes = [await Node.open(folder / f"{n}.db", node_id=n, fleet=DEMO_FLEET) for n in names]
    t7, t9, depot = nodes
    try:
        print(f"fleet {DEMO_FLEET.fleet_id!r}: nodes {', '.join(names)} in {folder}")
        await asyncio.gather(*(_writes(n, random.Random(rng.random()), writes, "connected") for n in nodes))
        moved = await exchange(t7, t9) + await exchange(t9, depot) + await exchange(t7, depot)
        print(f"connected: {writes} writes per node, {moved} ops exchanged")

        print("partition: t7 | t9 + depot (both sides keep writing)")
        await asyncio.gather(*(_writes(n, random.Random(rng.random()), writes, "partitioned") for n in nodes))
        try:
            await t9.put("trucks/t7/position", {"lat": 0, "lon": 0})
        except ZoneOwnershipError as exc:
            print(f"  refused: {exc}")
        await exchange(t9, depot)
        await _show(nodes, "during partition")

        moved = await exchange(t7, t9) + await exchange(t9, depot) + await exchange(t7, depot)
        print(f"heal: {moved} ops exchanged")
        digests = await _show(nodes, "after heal")
        if len(set(digests)) != 1:
            print("NOT CONVERGED")
            return 1
        tonnes = await depot.counter("site/ore-tonnes").value()
        print(f"converged: identical state on {len(nodes)} nodes; ore tonnes {tonnes}, "
              f"shift lead {await depot.get('site/shift-lead')!r}, "
              f"{len(await depot.set('site/alerts').items())} alerts")
        return 0
    finally:
        for n in nodes:
            await n.close()


async def _show(nodes: list[Node], label: str) -> list[str]:
    digests = []
    print(f"  {label}:")
    for n in nodes:
        d = await n.state_digest()
        digests.append(d)
        vv = await n.version_vector()
        print(f"    {n.node_id:<6} state {d[:16]}  vv {dict(sorted(vv.items()))}")
    return digests
