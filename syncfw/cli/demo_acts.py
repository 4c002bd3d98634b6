"""The demo's first acts: connected, a backbone outage, reconnection and catch-up.

Every write and every decision the demo makes is also entered in a
:class:`Ledger`, so the verified summary (:mod:`syncfw.cli.demo_summary`) can
prove that no write was lost: the ledger is what the nodes were told to do, the
replicas are what they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from syncfw.cli.demo_fleet import CLOUD, DEPOT, EDGES, STATION, TRUCKS, DemoFleet
from syncfw.errors import SyncfwError, ZoneOwnershipError
from syncfw.keys import status_key
from syncfw.node import Node

if TYPE_CHECKING:
    import numpy as np

    from syncfw.inference import Engine

__all__ = ["Ledger", "Load", "connected", "outage", "reconnect", "same", "until"]

BACKBONE = (CLOUD, DEPOT)
SITE = EDGES


@dataclass
class Ledger:
    """What the demo asked the nodes to write (the summary checks the replicas against it).

    Attributes:
        tonnes: the sum of every ``site/ore-tonnes`` increment.
        parts: the sum of every ``site/parts-inspected`` increment.
        alerts: every member added to ``site/alerts``.
        results: per edge, the result keys its engine wrote, with the label and the
            sha256 of the model that decided.
        correct: per edge, decisions that matched the ground truth.
        failed_calls: inference calls that raised (a dropped request).
    """

    tonnes: int = 0
    parts: int = 0
    alerts: set[str] = field(default_factory=set)
    results: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    failed_calls: list[str] = field(default_factory=list)


async def until(
    cond: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.05
) -> float:
    """Poll ``cond`` until true; returns the seconds it took (raises TimeoutError)."""
    start = time.perf_counter()
    async with asyncio.timeout(timeout_s):
        # Convergence is a property of several nodes at once: poll their digests.
        while not await cond():  # noqa: ASYNC110
            await asyncio.sleep(every_s)
    return time.perf_counter() - start


async def same(nodes: list[Node]) -> bool:
    """True if every node's state digest is the same."""
    return len({await n.state_digest() for n in nodes}) == 1


async def _writes(node: Node, ledger: Ledger, rng: random.Random, n: int, phase: str) -> None:
    me = node.node_id
    tonnes = node.counter("site/ore-tonnes")
    for i in range(n):
        if me in TRUCKS:
            await node.put(
                f"trucks/{me}/position", {"lat": -22.3 + rng.random(), "lon": 118.6, "i": i}
            )
            t = rng.randint(20, 60)
            await tonnes.add(t)
            ledger.tonnes += t
        if rng.random() < 0.05:
            alert = f"{phase}:{me}:{i}"
            await node.set("site/alerts").add(alert)
            ledger.alerts.add(alert)
        if rng.random() < 0.1:
            await node.put("site/shift-lead", me)
    await node.put(status_key(me), {"phase": phase, "writes": n})


async def inspect_one(
    fleet: DemoFleet, ledger: Ledger, n: str, rng: np.random.Generator, key: str
) -> bool:
    """One part through ``n``'s engine; the decision is a result op. Returns True if right."""
    from syncfw.inference.train import IMAGE_SIZE, render_part  # the extra, checked by run()

    engine: Engine = fleet.engines[n]
    defect = bool(rng.random() < 0.5)
    frame = render_part(rng, defect).reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    try:
        result = await engine.infer(frame, key=key)
    except SyncfwError as exc:
        ledger.failed_calls.append(f"{n} {key}: {exc}")
        return False
    label = result.prediction.label
    ledger.results.setdefault(n, {})[result.key] = (label, result.model.sha256)
    right = label == ("defect" if defect else "ok")
    ledger.correct[n] = ledger.correct.get(n, 0) + right
    if n == STATION:
        await fleet.nodes[n].counter("site/parts-inspected").add(1)
        ledger.parts += 1
    return right


async def _inspect(
    fleet: DemoFleet, ledger: Ledger, n: str, rng: np.random.Generator, frames: int, phase: str
) -> int:
    return sum(
        [await inspect_one(fleet, ledger, n, rng, f"{phase}-{i:04d}") for i in range(frames)]
    )


class Load:
    """Background inspections on every edge while a rollout runs (the swap must drop none)."""

    def __init__(self, fleet: DemoFleet, ledger: Ledger, seed: int, every_s: float = 0.2) -> None:
        import numpy as np

        self.fleet, self.ledger, self.every_s = fleet, ledger, every_s
        self.calls = 0
        self._rngs = {n: np.random.default_rng(seed + i) for i, n in enumerate(EDGES)}
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    def start(self, phase: str) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._loop(n, phase)) for n in EDGES]

    async def _loop(self, n: str, phase: str) -> None:
        i = 0
        while not self._stop.is_set():
            await inspect_one(self.fleet, self.ledger, n, self._rngs[n], f"{phase}-{i:05d}")
            self.calls += 1
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every_s)

    async def stop(self) -> None:
        """Let every call under way finish (each is in the ledger), then stop."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self._tasks = []


async def _phase(
    fleet: DemoFleet,
    ledger: Ledger,
    rng: random.Random,
    writers: list[str],
    phase: str,
    frame_rng: np.random.Generator,
) -> int:
    o = fleet.options
    got = await asyncio.gather(
        asyncio.gather(
            *(
                _writes(fleet.nodes[n], ledger, random.Random(rng.random()), o.writes, phase)
                for n in writers
            )
        ),
        asyncio.gather(*(_inspect(fleet, ledger, n, frame_rng, o.frames, phase) for n in EDGES)),
    )
    return sum(got[1])


async def connected(
    fleet: DemoFleet, ledger: Ledger, rng: random.Random, frame_rng: np.random.Generator
) -> None:
    """Act 1: everyone writes and the edges inspect parts; the mesh converges."""
    print("\nact 1, connected: every node writes, trucks and the station inspect parts")
    right = await _phase(fleet, ledger, rng, fleet.names, "connected", frame_rng)
    took = await until(lambda: same(fleet.all_nodes()), 60)
    print(
        f"  {fleet.options.writes} writes per node, {right}/{fleet.options.frames * len(EDGES)} "
        f"parts judged right; converged over gRPC in {took:.2f} s"
    )


async def outage(
    fleet: DemoFleet, ledger: Ledger, rng: random.Random, frame_rng: np.random.Generator
) -> tuple[str, str]:
    """Act 2: the backbone is cut; the site keeps deciding and gossiping truck to truck.

    Returns the cloud's and the site's digests during the outage.
    """
    print(
        "\nact 2, backbone outage: the cloud and the depot lose the site; "
        "trucks and the station still reach each other"
    )
    fleet.partition.split(BACKBONE, SITE)
    right = await _phase(fleet, ledger, rng, fleet.names, "outage", frame_rng)
    try:
        await fleet.nodes["t9"].put("trucks/t7/position", {"lat": 0, "lon": 0})
    except ZoneOwnershipError as exc:
        print(f"  refused: {exc}")
    site = [fleet.nodes[n] for n in SITE]
    took = await until(lambda: same(site), 60)
    print(
        f"  the site's {len(site)} nodes agree with each other after {took:.2f} s "
        f"({right}/{fleet.options.frames * len(EDGES)} parts judged right, offline)"
    )
    cloud_d = await fleet.cloud.state_digest()
    site_d = await site[0].state_digest()
    lag = await _lag_seen_by_cloud(fleet)
    print(
        f"  the cloud {'differs' if cloud_d != site_d else 'matches'} (it cannot hear the "
        f"site): cloud {cloud_d[:16]}, site {site_d[:16]}; the site's ops it lacks: {lag}"
    )
    return cloud_d, site_d


async def _lag_seen_by_cloud(fleet: DemoFleet) -> int:
    cloud_vv = await fleet.cloud.version_vector()
    site_vv = await fleet.nodes[TRUCKS[0]].version_vector()
    return sum(max(0, s - cloud_vv.get(o, 0)) for o, s in site_vv.items())


async def reconnect(fleet: DemoFleet, ledger: Ledger) -> None:
    """Act 3: the backbone is back; the cloud and the depot catch up."""
    lag = await _lag_seen_by_cloud(fleet)
    fleet.partition.heal()
    took = await until(lambda: same(fleet.all_nodes()), 60)
    print(
        f"\nact 3, reconnection: {lag} ops caught up, {len(fleet.names)} nodes identical "
        f"after {took:.2f} s"
    )
    cloud = fleet.cloud
    counts = {n: len(await fleet.results(cloud, n)) for n in EDGES}
    print(
        "  the cloud holds the site's inference results: "
        + ", ".join(f"{n} {k}" for n, k in counts.items())
    )
    sample: Any = next(iter((await fleet.results(cloud, TRUCKS[0])).values()))
    print(
        f"  e.g. {sample['model']['name']} {sample['model']['version']} said "
        f"{sample['label']!r} (confidence {sample['confidence']:.2f}, "
        f"provider {sample['provider']})"
    )
