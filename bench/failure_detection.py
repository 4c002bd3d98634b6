"""Failure detection on a real gRPC mesh on loopback, ``lan`` preset.

Five nodes, each dialing its peers through its own HTTP CONNECT proxy, so one
node can be cut off as a black hole (what a dropping firewall does): its
tunnels stop carrying bytes and new ones are accepted and not answered. What
was in flight is held, not lost, and goes on at the heal, as TCP resends it:
a proxy that dropped it broke the HTTP/2 state of the connections it resumed
(``Invalid HPACK index``), which a real link never does.

Figures:

- ``neighbour_p99_ms``: write-to-visible between two nodes, quiet mesh (the floor).
- ``reachable_side_p99_ms``: the same among the four reachable nodes while the
  fifth is cut, measured from the moment of the cut. Target: at most 2x the floor.
- ``detect_dead_s``: a node killed; time until every other node reports it dead.
  Target: at most 5 s.

Usage: ``python bench/failure_detection.py [--samples N] [--no-heal]``. The last line is
one JSON object. ``bench/convergence.py`` runs :func:`main` too (fewer samples, no heal
phase) and reports ``detect_dead_s`` and ``reachable_side_p99_ms`` beside its own keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from syncfw.mesh import MemberState, Mesh, MeshConfig
from syncfw.testing import MemoryReplica
from syncfw.transport.config import TransportConfig
from syncfw.transport.network import GrpcNetwork

N = 5


@dataclass
class Holes:
    """Which node ids are cut off (black-holed), and who listens where."""

    owners: dict[str, str] = field(default_factory=dict)  # address -> node id
    cut: set[str] = field(default_factory=set)
    healed: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is cut

    def __post_init__(self) -> None:
        self.healed.set()

    def cut_off(self, node: str) -> None:
        self.cut.add(node)
        self.healed.clear()

    def heal(self) -> None:
        self.cut.clear()
        self.healed.set()

    def blocked(self, a: str, b: str) -> bool:
        return a in self.cut or b in self.cut

    async def passable(self, a: str, b: str) -> None:
        """Wait until ``a`` may reach ``b`` (held, not lost: TCP resends after the heal)."""
        while self.blocked(a, b):
            await self.healed.wait()


@dataclass
class HoleProxy:
    """One node's egress proxy: forwards, except across a cut, where bytes vanish."""

    node: str
    holes: Holes
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> HoleProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            request = await r.readline()
            while (await r.readline()) not in (b"\r\n", b""):
                pass
            target = request.split()[1].decode()
            dst = self.holes.owners.get(target, "?")
            # a black hole answers nothing: the handshake waits (as a SYN is resent)
            # until the heal, or until the dialer gives up and closes
            await self.holes.passable(self.node, dst)
            host, port = target.rsplit(":", 1)
            ur, uw = await asyncio.open_connection(host, int(port))
            w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await w.drain()
        except (OSError, IndexError, ValueError, asyncio.CancelledError):
            w.close()
            return

        async def pipe(src: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    await self.holes.passable(self.node, dst)
                    out.write(data)
                    await out.drain()
            out.close()

        with contextlib.suppress(asyncio.CancelledError):  # the bench ending
            await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()


async def visible_ms(writer: tuple[MemoryReplica, Mesh], reader: MemoryReplica, key: str) -> float:
    replica, mesh = writer
    t0 = time.perf_counter()
    replica.put(key, key)
    mesh.poke()
    while reader.get(key) != key:
        await asyncio.sleep(0.001)
        if time.perf_counter() - t0 > 30:
            raise RuntimeError(f"{key} never became visible")
    return (time.perf_counter() - t0) * 1000


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


async def sample(
    nodes: list[tuple[MemoryReplica, Mesh]], ids: list[int], n: int, tag: str, rng: random.Random
) -> list[float]:
    out = []
    for i in range(n):
        a, b = rng.sample(ids, 2)
        out.append(await visible_ms(nodes[a], nodes[b][0], f"fleet/n{a}/{tag}{i}"))
        await asyncio.sleep(0.02)
    return out


def views(nodes: list[tuple[MemoryReplica, Mesh]], who: list[int], of: str) -> set[MemberState]:
    out = set()
    for i in who:
        m = nodes[i][1].membership.members.get(of)
        out.add(m.state if m is not None else MemberState.ALIVE)
    return out


async def main(samples: int, *, heal: bool = True) -> dict[str, object]:
    """Run the mesh and return the figures (see the module docstring).

    Args:
        samples: writes timed per phase.
        heal: also time the cut node's return (``heal_s``; None when left out).
    """
    rng = random.Random(7)
    cfg = MeshConfig.lan()
    holes = Holes()
    proxies = [await HoleProxy(f"n{i}", holes).start() for i in range(N)]
    nodes: list[tuple[MemoryReplica, Mesh]] = []
    for i in range(N):
        r = MemoryReplica(f"n{i}")
        net = GrpcNetwork(cfg.transport(TransportConfig(http_proxy=proxies[i].url)))
        seeds = [nodes[0][1].address] if nodes else []
        mesh = await Mesh.start(r, config=cfg, network=net, seeds=seeds, seed=i)
        holes.owners[mesh.address] = r.node_id
        nodes.append((r, mesh))
    addr = [m.address for _, m in nodes]
    try:
        t0 = time.monotonic()
        while not all(
            len([x for x in m.members() if x.last_ok is not None]) == N - 1 for _, m in nodes
        ):
            await asyncio.sleep(0.05)
            if time.monotonic() - t0 > 30:
                raise RuntimeError("the mesh never formed")
        print(f"mesh of {N} formed in {time.monotonic() - t0:.1f}s")

        quiet = await sample(nodes, list(range(N)), samples, "quiet", rng)
        floor = p99(quiet)
        print(f"neighbour_p99_ms {floor:.1f} (median {statistics.median(quiet):.1f})")

        holes.cut_off("n4")  # a black hole from now on
        reachable = await sample(nodes, list(range(N - 1)), samples, "cut", rng)
        side = p99(reachable)
        print(
            f"reachable_side_p99_ms {side:.1f} (median {statistics.median(reachable):.1f}) "
            f"while n4 is cut: {side / floor:.2f}x the floor"
        )
        t_cut = time.monotonic()
        while views(nodes, [0, 1, 2, 3], addr[4]) != {MemberState.DEAD}:
            await asyncio.sleep(0.02)
            if time.monotonic() - t_cut > 30:
                raise RuntimeError("the cut node never declared dead")
        holes.heal()
        heal_s: float | None = None
        t_heal = time.monotonic()
        while heal and views(nodes, [0, 1, 2, 3], addr[4]) != {MemberState.ALIVE}:
            await asyncio.sleep(0.02)
            if time.monotonic() - t_heal > 30:
                raise RuntimeError("the healed node never came back")
        if heal:
            heal_s = time.monotonic() - t_heal
            print(f"healed n4 alive again everywhere in {heal_s:.2f}s")

        victim = 3
        t_kill = time.monotonic()
        await nodes[victim][1].aclose()  # the process goes: its server and its dials
        others = [i for i in range(N) if i != victim]
        while views(nodes, others, addr[victim]) != {MemberState.DEAD}:
            await asyncio.sleep(0.01)
            if time.monotonic() - t_kill > 30:
                raise RuntimeError("the killed node never declared dead everywhere")
        detect = time.monotonic() - t_kill
        print(f"detect_dead_s {detect:.2f} (every other node reports n{victim} dead)")
    finally:
        for _, m in nodes:
            await m.aclose()
        for p in proxies:
            await p.aclose()
    return {
        "bench": "failure_detection",
        "preset": "lan",
        "nodes": N,
        "samples": samples,
        "detect_dead_s": round(detect, 2),
        "detect_dead_target_s": 5.0,
        "neighbour_p99_ms": round(floor, 1),
        "reachable_side_p99_ms": round(side, 1),
        "reachable_side_ratio": round(side / floor, 2),
        "reachable_side_target_ratio": 2.0,
        "heal_s": None if heal_s is None else round(heal_s, 2),
        "ok": detect <= 5.0 and side <= 2 * floor,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60, help="writes timed per phase (default 60)")
    ap.add_argument("--no-heal", action="store_true", help="leave out the heal phase")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.samples, heal=not args.no_heal))))
