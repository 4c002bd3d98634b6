"""Rollout benchmark: a yard of trucks and a depot whose uplink is the scarce resource.

One run, four figures (the last line is one JSON object):

* ``p2p_depot_bytes`` / ``p2p_full_s``: a multi-MB model (the project's MLP, exported
  wide) published on the depot; every truck fetches it with peer-to-peer chunk sharing
  (adverts, rarest first, the depot asked only for what no peer holds yet). Bytes the
  depot uploaded, and seconds until every truck holds the verified artifact.
* ``depot_only_bytes`` / ``depot_only_full_s``: the same for a second release of the
  same size, with every truck's sources cut down to the depot alone (the same nodes,
  the same code path, only the sources differ).
* ``halt_rounds``: gossip rounds (the depot's) from the canary truck's ``rolled_back``
  record to the halt op held by every truck; the authority runs its own loop
  (:func:`~syncfw.models.rollout_ops.authority_loop`, as ``ModelService`` does): it
  decides as soon as the record arrives.
* ``swap_dropped_requests``: inference calls that failed while a lifecycle activated a
  new model under a load of back-to-back calls (the hot swap).

The depot's link is rate-limited by the bandwidth budget (``peer_bytes_per_s``: its
serving bucket, which sync frames and chunk pieces share); trucks are on the yard's LAN
(no budget). Nodes are real (SQLite files, chunk stores) on the in-memory network.

Targets: ``p2p_depot_bytes`` <= 0.25 x ``depot_only_bytes``; ``p2p_full_s`` <= 0.5 x
``depot_only_full_s``; ``halt_rounds`` <= 2; ``swap_dropped_requests`` == 0.

    python bench/rollout.py              # 32 trucks, about 4 MB, depot at 8 MB/s
    python bench/rollout.py --trucks 48 --rate-mb 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from syncfw import ChangeFeedLagged, Fleet, Node
from syncfw.mesh import MeshConfig
from syncfw.models import ArtifactConfig, Artifacts, FetchConfig, ReleaseManifest, Source
from syncfw.models.adverts import parse_adverts
from syncfw.models.lifecycle import Record, lifecycle_key, read_records
from syncfw.models.rollout import Plan, in_stage, parse_gate
from syncfw.models.rollout_ops import authority_loop, rollout_key, start_rollout
from syncfw.testing import SignedFleet, wait_until
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import InMemoryNetwork

SF = SignedFleet(Fleet(fleet_id="yard", authority="depot"))
CHUNK = 128 << 10
FETCH = FetchConfig(piece_timeout_s=20.0, stall_s=60.0, retry_s=0.05, parallel=4)


def wide_model(seed: int, hidden: int) -> bytes:
    """The project's inspection MLP (its export), ``hidden`` wide: MBs of weights. The
    weights are drawn, not trained: the transfer does not care what they score."""
    import numpy as np

    from syncfw.inference import train

    rng = np.random.default_rng(seed)
    w = {
        "w1": rng.normal(0, 0.05, (256, hidden)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": rng.normal(0, 0.05, (hidden, 2)).astype(np.float32),
        "b2": np.zeros(2, np.float32),
    }
    return train.export_mlp(w, seed=seed)


class Yard:
    """The depot and its trucks on one in-memory network.

    ``star`` (the default): state (manifests, adverts, lifecycle records, rollout ops)
    goes through the depot, each truck gossiping with it alone (the depot lists no
    peers); chunks go truck to truck, each truck dialling another by its in-memory
    address (its id). Else a full mesh: every truck gossips with every other (33 of
    them are CPU-bound in one process).
    """

    def __init__(
        self,
        root: Path,
        rate: float,
        interval: float = 0.25,
        advert_every: int = 4,
        star: bool = True,
    ) -> None:
        self.root, self.rate, self.interval = root, rate, interval
        self.advert_every, self.star = advert_every, star
        self.truck_interval = interval
        self.fallbacks = 0
        self.cpu_s = 0.0
        """The process's CPU seconds in the last pass (all nodes: what bounds its time)."""
        """Chunks of the last pass the depot deferred and sent in the end (no peer in time)."""
        self.net = MemoryNetwork()
        self.nodes: dict[str, Node] = {}
        self.arts: dict[str, Artifacts] = {}

    async def add(self, node_id: str, limited: bool) -> None:
        node = await Node.open(
            self.root / f"{node_id}.db", node_id=node_id, fleet=SF.fleet, keys=SF.keys(node_id)
        )
        # test tunables at a slower round: 33 nodes gossip in one process on a small box
        interval = self.interval if node_id == "depot" else self.truck_interval
        cfg = MeshConfig.test().with_(interval_s=interval)
        if limited:
            cfg = cfg.with_(peer_bytes_per_s=self.rate, peer_burst_bytes=256 << 10)
        if self.star and node_id == "depot":  # the hub lists no peers: trucks meet it alone
            cfg = cfg.with_(gossip=replace(cfg.gossip, gossip_members=0))
        seeds = [] if node_id == "depot" else ["depot"]
        mesh = await node.serve(node_id, seeds, config=cfg, network=InMemoryNetwork(self.net))
        self.nodes[node_id] = node
        arts = self.arts[node_id] = Artifacts.attach(
            node,
            mesh,
            config=ArtifactConfig(durable=False, fetch=FETCH, advert_every=self.advert_every),
        )
        if self.star and arts.fetcher is not None:
            arts.fetcher.sources = self._sources(node)
            arts.fetcher.locate = lambda n: n if n in self.nodes else None

    def _sources(self, node: Node) -> Callable[[ReleaseManifest], Awaitable[list[Source]]]:
        """Artifacts._sources with each node's in-memory address its id (a star's trucks
        never gossip with one another, so their member tables hold the depot alone)."""

        async def sources(m: ReleaseManifest) -> list[Source]:
            adverts = parse_adverts(await node.scan("fleet/"), m.sha256)
            return [
                Source(a.node_id, a.node_id, a)
                for a in adverts
                if a.node_id in self.nodes and a.n == len(m.chunks)
            ]

        return sources

    async def meet(self) -> None:
        """Wait until every node knows every other (a star: the depot knows every truck
        and every truck the depot)."""
        ids = set(self.nodes)

        def met() -> bool:
            for a in self.arts.values():
                assert a.mesh is not None
                seen = {m.node_id for m in a.mesh.membership.members.values()}
                want = ids if not self.star or a.node.node_id == "depot" else {"depot"}
                if not want - {a.node.node_id} <= seen:
                    return False
            return True

        await wait_until(met, what="every node knows every other", timeout_s=120, interval_s=0.2)

    @property
    def trucks(self) -> list[str]:
        return [n for n in self.nodes if n != "depot"]

    def depot_out(self) -> int:
        return sum(self.arts["depot"].status()["bytes_out"].values())

    async def learn(self, version: int) -> ReleaseManifest:
        async def known() -> bool:
            for n in self.trucks:
                if await self.arts[n].release("inspection", version) is None:
                    return False
            return True

        await wait_until(
            known, what=f"every truck learns release {version}", timeout_s=120, interval_s=0.5
        )
        m = await self.arts["depot"].release("inspection", version)
        assert m is not None
        return m

    async def close(self) -> None:
        for n in list(self.nodes):
            await self.arts.pop(n).aclose()
            await self.nodes.pop(n).close()
        await self.net.aclose()


def depot_only(orig: Callable[[ReleaseManifest], Awaitable[list[Source]]]) -> Any:
    async def sources(m: ReleaseManifest) -> list[Source]:
        return [s for s in await orig(m) if s.node_id == "depot"]

    return sources


async def distribute(yard: Yard, data: bytes, version: int, *, p2p: bool) -> tuple[int, float]:
    """Publish ``data`` as ``version``; every truck fetches it. (depot bytes, seconds)."""
    originals = {}
    depot = yard.arts["depot"]
    fanout = depot.config
    if not p2p:  # the floor: the depot serves every truck every chunk (no fan-out limit)
        depot.config = replace(fanout, serve_fanout=0)
        for n in yard.trucks:
            f = yard.arts[n].fetcher
            assert f is not None
            originals[n] = f.sources
            f.sources = depot_only(f.sources)
    try:
        await yard.arts["depot"].publish(
            data,
            name="inspection",
            version=version,
            key=SF.authority_key,
            chunk_size=CHUNK,
            inputs=[("x", "float32", (None, 1, 16, 16))],
            outputs=[("y", "float32", (None, 2))],
        )
        m = await yard.learn(version)
        before = yard.depot_out()
        t0, c0 = time.perf_counter(), time.process_time()
        got = await asyncio.gather(*(yard.arts[n].fetch(m) for n in yard.trucks))
        took = time.perf_counter() - t0
        for n in yard.trucks:
            assert yard.arts[n].held(m)
        yard.fallbacks = sum(p.fallbacks for p in got)
        yard.cpu_s = time.process_time() - c0  # every node's, all threads: one process
        return yard.depot_out() - before, took
    finally:
        depot.config = fanout
        for n, src in originals.items():
            f = yard.arts[n].fetcher
            assert f is not None
            f.sources = src


async def halt_rounds(yard: Yard) -> tuple[int, float]:
    """Rounds (and seconds) from a canary's rolled_back record to the halt held by every
    truck."""
    depot = yard.nodes["depot"]
    # every truck reports v2 committed (as after the last rollout): the fleet the
    # authority counts; a stage is held until its nodes report
    for n in yard.trucks:
        await yard.nodes[n].put(
            lifecycle_key(n, "inspection"),
            Record("inspection", "committed", 2, "00" * 32, serving_version=2).value(),
        )

    async def reported() -> bool:
        return len(await read_records(depot, "inspection")) == len(yard.trucks)

    await wait_until(reported, what="the depot holds every truck's record", timeout_s=60)
    stages = (10, 100)
    plan = Plan("inspection", 3, stages, parse_gate("accuracy>=-0.02"))
    canary = next((n for n in yard.trucks if in_stage(plan, 0, n)), yard.trucks[0])
    await start_rollout(depot, "inspection", 3, stages=stages, gate="accuracy>=-0.02")
    halt = f"{rollout_key('inspection', 3)}/halt"
    mesh = yard.arts["depot"].mesh
    assert mesh is not None
    # the authority's own loop (ModelService runs it): decides as soon as a record arrives
    loop = asyncio.create_task(authority_loop(depot, every_s=mesh.config.interval_s))
    try:
        # the rollout runs everywhere before its canary rolls back (a truck runs a
        # release only once it holds the plan), and the yard's gossip has settled
        plan_key = rollout_key("inspection", 3)

        async def planned() -> bool:
            for n in yard.trucks:
                if await yard.nodes[n].get(plan_key) is None:
                    return False
            return True

        await wait_until(
            planned, what="every truck holds the rollout plan", timeout_s=60, interval_s=0.1
        )
        await asyncio.sleep(4 * mesh.config.interval_s)
        # each truck notes the depot's round and the time as the halt op is applied
        # there (its change feed), not when a poll of 32 stores gets round to it
        arrived: dict[str, tuple[int, float]] = {}
        polled: list[str] = []

        async def note(n: str, feed: Any) -> None:
            try:
                async for ch in feed:
                    if ch.key == halt:
                        arrived[n] = (mesh.rounds, time.perf_counter())
                        return
            except ChangeFeedLagged:  # dropped in a burst: poll instead (later, never sooner)
                polled.append(n)
            finally:
                await feed.aclose()

            async def held() -> bool:
                return await yard.nodes[n].get(halt) is not None

            await wait_until(held, what=f"{n} holds the halt", timeout_s=60)
            arrived[n] = (mesh.rounds, time.perf_counter())

        notes = [asyncio.create_task(note(n, yard.nodes[n].changes())) for n in yard.trucks]
        await asyncio.sleep(0)
        r0, t0 = mesh.rounds, time.perf_counter()
        await yard.nodes[canary].put(
            lifecycle_key(canary, "inspection"),
            Record(
                "inspection",
                "rolled_back",
                3,
                "00" * 32,
                serving_version=2,
                reason="validation failed the gate: accuracy -0.2 < -0.02",
            ).value(),
        )

        # no poll of the trucks' stores meanwhile: it would load the box it measures
        await asyncio.wait_for(asyncio.gather(*notes), 60)
        if polled:
            print(f"halt: {len(polled)} trucks' change feeds lagged; their arrival polled")
        last_round, last_t = max(arrived.values())
        return last_round - r0, last_t - t0
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def swap_dropped(root: Path) -> tuple[int, int]:
    """Calls dropped while a lifecycle activates v2 under load; (dropped, served)."""
    import numpy as np
    import onnx

    from syncfw.inference.engine import Engine
    from syncfw.inference.train import CANARY_PATH, MODEL_PATH
    from syncfw.models.lifecycle import Lifecycle, LifecycleConfig
    from syncfw.models.rollout import parse_gate

    node = await Node.open(root / "swap.db", node_id="depot", fleet=SF.fleet, keys=SF.keys("depot"))
    arts = Artifacts.attach(node, None, config=ArtifactConfig(durable=False))
    engine = Engine(node)
    try:
        good = MODEL_PATH.read_bytes()
        proto = onnx.load_model_from_string(good)
        e = proto.metadata_props.add()
        e.key, e.value = "release_note", "v2"
        for v, data in ((1, good), (2, proto.SerializeToString())):
            await arts.publish(
                data, name="inspection", version=v, key=SF.authority_key, chunk_size=16 << 10
            )
        lc = Lifecycle(
            node,
            arts,
            engine,
            "inspection",
            LifecycleConfig(gate=parse_gate("accuracy>=-0.02"), window_s=0.2, check_every_s=0.05),
        )
        m1 = await arts.release("inspection", 1)
        m2 = await arts.release("inspection", 2)
        assert m1 is not None
        assert m2 is not None
        await lc.update(m1)
        x = np.load(CANARY_PATH)["x"][:16].astype(np.float32) / 255.0
        stop = asyncio.Event()
        counts = {"ok": 0, "dropped": 0}

        async def load() -> None:
            i = 0
            while not stop.is_set():
                try:
                    await engine.infer(x[i % 16 : i % 16 + 1])
                    counts["ok"] += 1
                except Exception:
                    counts["dropped"] += 1
                i += 1

        tasks = [asyncio.create_task(load()) for _ in range(4)]
        rec = await lc.update(m2)
        stop.set()
        await asyncio.gather(*tasks)
        assert rec.step == "committed", rec
        return counts["dropped"], counts["ok"]
    finally:
        await engine.aclose()
        await arts.aclose()
        await node.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="syncfw-rollout-"))
    yard = Yard(root, args.rate_mb * 1e6, advert_every=args.advert_every, star=not args.full_mesh)
    yard.truck_interval = args.truck_round_s
    t_start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        v1, v2 = wide_model(1, args.hidden), wide_model(2, args.hidden)
        print(
            f"artifact {len(v1) / 1e6:.2f} MB ({math.ceil(len(v1) / CHUNK)} chunks of "
            f"{CHUNK >> 10} KiB), made in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        await yard.add("depot", limited=True)
        for i in range(args.trucks):
            await yard.add(f"t{i:02d}", limited=False)
        await yard.meet()
        print(f"{len(yard.nodes)} nodes met in {time.perf_counter() - t_start:.1f}s", flush=True)
        p2p_bytes, p2p_s = await distribute(yard, v1, 1, p2p=True)
        fallbacks, p2p_cpu = yard.fallbacks, yard.cpu_s
        deferred = sum(yard.arts["depot"].status()["deferred"].values())
        print(
            f"p2p:        depot sent {p2p_bytes / 1e6:7.2f} MB, every truck held it in "
            f"{p2p_s:6.2f}s ({deferred} chunk requests deferred as busy, {fallbacks} "
            f"fallbacks to the depot; {p2p_cpu:.1f} CPU-s)",
            flush=True,
        )
        only_bytes, only_s = await distribute(yard, v2, 2, p2p=False)
        only_cpu = yard.cpu_s
        print(
            f"depot only: depot sent {only_bytes / 1e6:7.2f} MB, every truck held it in "
            f"{only_s:6.2f}s (floor at the budget: "
            f"{args.trucks * len(v2) / (args.rate_mb * 1e6):.2f}s; {only_cpu:.1f} CPU-s)",
            flush=True,
        )
        rounds, halt_s = await halt_rounds(yard)
        print(
            f"halt: {rounds} gossip rounds ({halt_s:.2f}s) from the canary's rollback to "
            "every truck",
            flush=True,
        )
    finally:
        await yard.close()
    dropped, served = await swap_dropped(root)
    print(f"swap: {dropped} calls dropped of {served + dropped} during activation", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    out = {
        "wall_s": round(time.perf_counter() - t_start, 1),
        "trucks": args.trucks,
        "topology": "full mesh" if args.full_mesh else "star",
        "artifact_bytes": len(v1),
        "depot_rate_bytes_per_s": args.rate_mb * 1e6,
        "p2p_depot_bytes": p2p_bytes,
        "depot_only_bytes": only_bytes,
        "bytes_ratio": round(p2p_bytes / only_bytes, 4),
        "p2p_full_s": round(p2p_s, 3),
        "p2p_depot_deferred": deferred,
        "p2p_seed_fallbacks": fallbacks,
        "p2p_cpu_s": round(p2p_cpu, 2),
        "depot_only_cpu_s": round(only_cpu, 2),
        "depot_floor_s": round(args.trucks * len(v2) / (args.rate_mb * 1e6), 3),
        "depot_only_full_s": round(only_s, 3),
        "time_ratio": round(p2p_s / only_s, 4),
        "halt_rounds": rounds,
        "halt_s": round(halt_s, 3),
        "round_s": yard.interval,
        "swap_dropped_requests": dropped,
        "swap_served_requests": served,
    }
    out["targets_met"] = (
        out["bytes_ratio"] <= 0.25 and out["time_ratio"] <= 0.5 and rounds <= 2 and dropped == 0
    )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trucks", type=int, default=32)
    p.add_argument("--rate-mb", type=float, default=8.0, help="the depot's uplink, MB/s")
    p.add_argument("--hidden", type=int, default=4096, help="MLP width (4096: about 4 MB)")
    p.add_argument(
        "--advert-every", type=int, default=4, help="chunks between adverts (the default's)"
    )
    p.add_argument(
        "--truck-round-s",
        type=float,
        default=0.25,
        help="the trucks' gossip interval (the depot's is 0.25 s, the unit of halt_rounds)",
    )
    p.add_argument(
        "--full-mesh",
        action="store_true",
        help="every truck gossips with every other (not a star through the depot)",
    )
    a = p.parse_args()
    result = asyncio.run(main(a))
    print(json.dumps(result, sort_keys=True))
    sys.exit(0)
