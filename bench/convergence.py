"""Gossip convergence: rounds to spread writes, heal time over gRPC, neighbour latency.

Usage: ``python bench/convergence.py [--seeds S] [--fd-samples N] [--quick]
[--fleet-nodes N]`` (about a minute on an idle machine).

- ``rounds_8``, ``rounds_32``, ``rounds_128``: median (over S seeds) of gossip
  rounds until every node holds every node's write, when each of N nodes has
  written once and then every node runs one round per step (fanout 3, the LAN
  preset's), on the in-memory transport. Expected O(log N).
- ``grpc16_heal_s``: 16 in-memory replicas meshed over real gRPC on loopback
  with the LAN preset's gossip loop running (1 s interval, jitter, fanout 3);
  split into two halves of 8 that each keep writing; seconds from the heal
  until all 16 are identical.
- ``neighbour_p99_ms``: over gRPC, p99 of the time from a local write on one
  node to its arrival on a peer it is connected to (eager push), over 200
  writes 20 ms apart.

- ``slow_link_efficiency``: a node behind a 64 kbit/s link (a shaping TCP
  proxy on loopback, ``syncfw.testing.shaping``, in front of a real gRPC
  server) with a backlog of 1 KiB random writes, caught up by repeated
  exchanges: (backlog wire bytes / link rate) / catch-up time, median of 3.
  Scaled down to fit a minute: the backlog is ``--backlog-s`` (default 5) s
  of the link, not 60.
- ``slow_link_stalls``: runs in which no op moved for 30 s (of the 3).

- ``detect_dead_s``, ``reachable_side_p99_ms``: from ``bench/failure_detection.py``
  (run here with ``--fd-samples`` writes per phase, default 30, and no heal
  phase): five nodes over real gRPC on loopback, the ``lan`` preset, each
  dialing through its own black-hole proxy. ``detect_dead_s``: one node
  closed, seconds until every other node reports it dead (target <= 5).
  ``reachable_side_p99_ms``: p99 write-to-visible among the four others while
  the fifth is cut; ``reachable_side_floor_p99_ms`` the same mesh quiet, and
  ``reachable_side_ratio`` the one over the other (target <= 2).

- ``rounds_1000``: gossip rounds (intervals of the LAN preset's 1 s) until
  1,000 simulated nodes, each with one fresh write, all hold everything, in
  the fleet simulator (``syncfw.testing.fleet_sim``: virtual time, the real
  ``Membership``/``GossipGuard`` choosing peers and probes, real sessions and
  performer, frames as wire bytes); median over ``--fleet-seeds`` (default 1).
- ``sim_1000_s``: wall seconds of one such run (setup included; median);
  ``sim_1000_cpu_s`` the CPU seconds of this process in it (on a shared
  machine wall time also counts everyone else's work).
- ``gossip_bytes_per_node_round_1000``: mean wire bytes a node sends per
  round in that run (frames and probes).
- ``fleet_insync_bytes_per_exchange`` / ``fleet_insync_us_per_exchange_ratio``:
  rounds run after convergence (nothing moved; member lists left out, their
  cost is the mesh's) at 1,000 nodes against the same at 100: bytes per
  exchange there, and the ratio of CPU time per exchange (1,000 / 100; about
  1 when the cost does not grow with N).
  ``--fleet-nodes N`` sizes the fleet (keys then end in ``_N``; the default is
  200, so the script stays under a minute: the 1,000-node figures take
  ``--fleet-nodes 1000``); ``--quick`` runs only the fleet.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # failure_detection.py

from syncfw.log import Op
from syncfw.mesh import Mesh, MeshConfig
from syncfw.sync.frames import Status
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.waiting import wait_until
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import GrpcNetwork, InMemoryNetwork
from syncfw.zones import Fleet

FLEET = Fleet(fleet_id="bench")


def _converged(rs: list[MemoryReplica]) -> bool:
    first = rs[0].vv()
    return all(r.vv() == first for r in rs)


async def rounds_for(n: int, seed: int) -> int:
    """Gossip rounds until n nodes, each with one fresh write, all hold everything."""
    net = MemoryNetwork()
    rng = random.Random(seed)
    rs = [MemoryReplica(f"n{i}", FLEET) for i in range(n)]
    # In-memory listeners have bare names (no port), and rounds are driven by
    # hand with no time passing: this measures gossip rounds, not dial pacing,
    # so the gossip bounds allow both.
    cfg = MeshConfig.lan()
    cfg = cfg.with_(
        gossip=cfg.gossip.with_(require_port=False, dials_per_s=1e9, dial_burst=1 << 30)
    )
    meshes = []
    for i, r in enumerate(rs):
        m = await Mesh.start(
            r,
            listen=f"n{i}",
            network=InMemoryNetwork(net),
            config=cfg,
            seed=rng.randrange(1 << 30),
            run_loop=False,
        )
        meshes.append(m)
    # full membership, as after the yard has been together a while
    from syncfw.sync.frames import PeerInfo

    everyone = [PeerInfo(f"n{i}", f"n{i}", 1) for i in range(n)]
    for m in meshes:
        m.membership.merge(everyone, 0.0)
    for r in rs:
        r.put(f"fleet/{r.node_id}/x", 1)
    rounds = 0
    while not _converged(rs):
        rounds += 1
        if rounds > 50 * n:
            raise RuntimeError(f"{n} nodes did not converge in {rounds - 1} rounds")
        await asyncio.gather(*(m.round() for m in meshes))
    for m in meshes:
        await m.aclose()
    return rounds


class _SplitNetwork(GrpcNetwork):
    """gRPC, with a switchable partition between two sets of addresses."""

    def __init__(self, blocked: set[frozenset[str]]) -> None:
        super().__init__()
        self.blocked = blocked

    async def connect(
        self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
    ) -> FrameStream:
        if frozenset((source, address)) in self.blocked:
            raise LinkError(Status.UNAVAILABLE, "partitioned")
        return await super().connect(
            address, source=source, timeout_s=timeout_s, expect_id=expect_id
        )


def _feed(r: MemoryReplica) -> AsyncIterator[object]:
    q: asyncio.Queue[object] = asyncio.Queue()
    # like Node.changes() filtered on Change.local: only this node's own writes push
    r.listeners.append(lambda ops: [q.put_nowait(o) for o in ops if o.origin == r.node_id])

    async def gen() -> AsyncIterator[object]:
        while True:
            yield await q.get()

    return gen()


async def grpc_heal_and_latency() -> tuple[float, float]:
    n = 16
    blocked: set[frozenset[str]] = set()
    rs = [MemoryReplica(f"g{i}", FLEET) for i in range(n)]
    cfg = MeshConfig.lan()
    meshes: list[Mesh] = []
    for i, r in enumerate(rs):
        seeds = [meshes[0].address] if meshes else []
        meshes.append(
            await Mesh.start(
                r,
                seeds=seeds,
                config=cfg,
                network=_SplitNetwork(blocked),
                seed=i,
                changes=lambda r=r: _feed(r),  # type: ignore[misc]
            )
        )

    async def until(cond: Callable[[], bool], limit_s: float = 30.0) -> None:
        # a fine poll: heal time is read off the wake-up that sees convergence
        await wait_until(cond, timeout_s=limit_s, interval_s=0.005)

    try:
        # everyone learns everyone
        # (generous: on a loaded 2-core machine gossip can take a while to reach all 16)
        await until(lambda: all(len(m.membership.members) == n - 1 for m in meshes), 90.0)
        left = {m.address for m in meshes[: n // 2]}
        right = {m.address for m in meshes[n // 2 :]}
        blocked.update(frozenset((a, b)) for a in left for b in right)
        for k in range(20):
            for r in rs:
                r.put(f"fleet/{r.node_id}/p{k}", k)
        half = n // 2
        await until(lambda: all(r.vv() == rs[0].vv() for r in rs[:half]))
        await until(lambda: all(r.vv() == rs[half].vv() for r in rs[half:]))
        assert rs[0].vv() != rs[half].vv()
        t0 = time.perf_counter()
        blocked.clear()
        await until(lambda: _converged(rs) and all(r.state == rs[0].state for r in rs))
        heal_s = time.perf_counter() - t0

        # neighbour latency: g0 writes; g1 (a peer it has synced with) sees it
        arrived: dict[tuple[str, int], float] = {}
        rs[1].listeners.append(
            lambda ops: [arrived.setdefault(o.id, time.perf_counter()) for o in ops]
        )
        await meshes[0].sync_with(meshes[1].address)
        lat: list[float] = []
        for k in range(200):
            t = time.perf_counter()
            op: Op = rs[0].put(f"fleet/g0/lat{k}", k)
            await until(lambda op=op: op.id in arrived, 10)  # type: ignore[misc]
            lat.append((arrived[op.id] - t) * 1000)
            await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - t)))
        lat.sort()
        p99 = lat[int(len(lat) * 0.99) - 1]
        print(
            f"neighbour latency ms: p50 {lat[len(lat) // 2]:.2f} p90 {lat[int(len(lat) * 0.9)]:.2f} max {lat[-1]:.2f}"
        )
    finally:
        for m in meshes:
            await m.aclose()
    return heal_s, p99


async def slow_link_run(backlog_s: float) -> tuple[float, bool]:
    """One catch-up over a shaped 64 kbit/s link: (efficiency, stalled)."""
    import os

    from syncfw.codec import encode_batch
    from syncfw.exchange import run_exchange
    from syncfw.testing.shaping import ShapedLink
    from syncfw.transport.rpc import ChannelPool, GrpcServer

    rate = 64_000 / 8
    a, b = MemoryReplica("a", FLEET), MemoryReplica("b", FLEET)

    async def handler(stream: FrameStream) -> None:
        await run_exchange(b, stream, timeout_s=30.0)

    server = await GrpcServer.start("127.0.0.1:0", handler)
    link = await ShapedLink(server.address, rate_bps=rate).start()
    writes = int(backlog_s * rate / 1024)
    for k in range(writes):
        a.put(f"fleet/a/k{k}", os.urandom(1024))
    backlog = len(encode_batch(a.all_ops(), zstd=True, elide_prev=True))
    pool = ChannelPool()
    last_move, seen, stalled = time.monotonic(), 0, False
    t0 = time.monotonic()
    try:
        while b.vv().get("a", 0) < writes:
            await run_exchange(a, await pool.open(link.address), timeout_s=30.0, initiator=True)
            now, got = time.monotonic(), b.vv().get("a", 0)
            if got > seen:
                seen, last_move = got, now
            elif now - last_move > 30:
                stalled = True
                break
        took = time.monotonic() - t0
    finally:
        await pool.aclose()
        await link.aclose()
        await server.aclose()
    return (backlog / rate) / took, stalled


async def fleet(n: int, seeds: int, small: int = 100) -> dict[str, float]:
    """The fleet simulator's figures at ``n`` nodes (median over ``seeds``), and what
    rounds cost once nothing moves there against at ``small`` nodes."""
    from syncfw.testing.fleet_sim import FleetConfig, FleetSim

    runs = []
    sim = FleetSim(0)
    for seed in range(seeds):
        sim = FleetSim(seed, FleetConfig(nodes=n))
        rep = await sim.run()
        if not rep.converged or rep.problems:
            raise RuntimeError(f"fleet of {n} (seed {seed}) did not converge: {rep}")
        runs.append(copy.deepcopy(rep))  # as it stood at convergence: idle_rounds adds to it
        print(
            f"fleet of {n}: {rep.rounds} rounds, {rep.wall_s:.1f} s wall ({rep.cpu_s:.1f} s CPU), "
            f"{rep.exchanges} exchanges, {rep.bytes_per_node_round / 1024:.1f} KiB per "
            "node-round; by frame "
            + ", ".join(f"{k} {c} / {b / 1e6:.2f} MB" for k, (c, b) in sorted(rep.kinds.items()))
        )
    hi = await sim.idle_rounds(2, member_lists=False)
    little = FleetSim(0, FleetConfig(nodes=small))
    await little.run()
    lo = await little.idle_rounds(2, member_lists=False)
    print(
        f"rounds in sync, at {small} / {n} nodes: {lo.bytes_per_exchange:.0f} / "
        f"{hi.bytes_per_exchange:.0f} bytes and {lo.us_per_exchange:.0f} / "
        f"{hi.us_per_exchange:.0f} us CPU per exchange"
    )
    return {
        f"rounds_{n}": statistics.median(r.rounds for r in runs),
        f"sim_{n}_s": round(statistics.median(r.wall_s for r in runs), 2),
        f"sim_{n}_cpu_s": round(statistics.median(r.cpu_s for r in runs), 2),
        f"gossip_bytes_per_node_round_{n}": round(
            statistics.median(r.bytes_per_node_round for r in runs)
        ),
        "fleet_insync_bytes_per_exchange": round(hi.bytes_per_exchange, 1),
        "fleet_insync_us_per_exchange_ratio": round(hi.us_per_exchange / lo.us_per_exchange, 2),
    }


async def failure_detection(samples: int) -> dict[str, float]:
    """``bench/failure_detection.py``'s figures, without its heal phase."""
    import failure_detection as fd  # beside this script (its folder is on sys.path)

    got = await fd.main(samples, heal=False)
    keys = {
        "detect_dead_s": "detect_dead_s",
        "reachable_side_p99_ms": "reachable_side_p99_ms",
        "reachable_side_floor_p99_ms": "neighbour_p99_ms",
        "reachable_side_ratio": "reachable_side_ratio",
    }
    return {mine: float(str(got[theirs])) for mine, theirs in keys.items()}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backlog-s", type=float, default=5.0)
    parser.add_argument("--fleet-nodes", type=int, default=None)
    parser.add_argument("--fleet-seeds", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fd-samples", type=int, default=30)
    args = parser.parse_args()
    res: dict[str, float] = {}
    # 200 by default keeps the script under a minute; the figures are
    # --fleet-nodes 1000 (several minutes: see bench/README.md).
    n_fleet = args.fleet_nodes or 200
    res.update(await fleet(n_fleet, args.fleet_seeds))
    if args.quick:
        print(json.dumps(res))
        return
    for n in (8, 32, 128):
        seeds = args.seeds if n < 128 else max(1, args.seeds // 2)
        rounds = [await rounds_for(n, s) for s in range(seeds)]
        res[f"rounds_{n}"] = statistics.median(rounds)
        print(f"{n} nodes: rounds {rounds}")
    heal, p99 = await grpc_heal_and_latency()
    res["grpc16_heal_s"] = round(heal, 3)
    res["neighbour_p99_ms"] = round(p99, 2)
    runs = [await slow_link_run(args.backlog_s) for _ in range(3)]
    print(f"slow link: efficiency {[round(e, 3) for e, _ in runs]}")
    res["slow_link_efficiency"] = round(statistics.median(e for e, _ in runs), 3)
    res["slow_link_stalls"] = sum(1 for _, st in runs if st)
    try:
        res.update(await failure_detection(args.fd_samples))
    except RuntimeError as exc:  # said loudly, and the other figures still reported
        print(f"failure detection: NOT MEASURED: {exc}", file=sys.stderr)
        res["failure_detection_error"] = str(exc)
    print(json.dumps(res))


if __name__ == "__main__":
    asyncio.run(main())
