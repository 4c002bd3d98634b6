"""A deterministic simulator: N replicas, the real sync sessions, a seeded network.

Invariants:

1. Everything random comes from one ``random.Random(seed)`` and time is
   virtual (an event heap), so a seed replays exactly: a failing seed printed
   by a test is a complete reproduction.
2. Frames cross the simulated network as the transport's wire bytes
   (:func:`~syncfw.transport.wire.encode_frame`), so the simulator runs the very
   handshake and bytes of the real mesh; the sessions are the real
   :class:`~syncfw.sync.Session`, and their effects are carried out by the
   real :class:`~syncfw.exchange.performer.Performer` with the mesh's error
   policy, its link scheduling each frame's bytes as a delivery event.
3. Effects are awaited one at a time, in the order the scheduler pops events,
   so even a replica that really awaits I/O (the SQLite ``Node``) behaves
   deterministically.
4. Faults: partitions that split and heal, frame drops (the link is cut, as a
   dropped TCP connection would be), duplicated and reordered frames, node
   crashes and restarts, per-node clock drift and offset.

The :func:`check` function is the checker: identical state everywhere, every
acknowledged write present everywhere, no op applied twice, the same rejected
ops everywhere.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from syncfw.exchange.performer import Performer
from syncfw.exchange.runner import replica_wall_ms
from syncfw.log import Op, Replica, op_hash
from syncfw.sync import Frame, Session, SessionConfig, SessionState, Status
from syncfw.sync.links import PeerBook
from syncfw.sync.session import SessionClocks
from syncfw.testing.memory import MemoryReplica
from syncfw.transport.wire import decode_frame, encode_frame
from syncfw.zones import Fleet, Grant, Verdict

__all__ = ["MemorySimNode", "SimConfig", "SimNode", "SimReport", "Simulation", "check"]

SHARED = "site/"
FLEET = Fleet(fleet_id="sim", grants=(Grant.of(SHARED, "*"),))


class SimNode:
    """A node as the simulator sees it: a replica it can write to, crash and restart.

    Subclass for other replicas (the SQLite node); :class:`MemorySimNode` is the default.
    """

    node_id: str
    replica: Replica
    up: bool = True

    async def write(self, key: str, value: Any) -> Op:
        """A local write (raises if the zone is not this node's)."""
        raise NotImplementedError

    async def write_foreign(self, key: str, value: Any) -> Op | None:
        """An op in another node's zone, validly chained (a rogue or buggy writer)."""
        return None

    async def crash(self) -> None:
        """Lose everything not durable."""
        self.up = False

    async def restart(self) -> None:
        """Come back from durable state."""
        self.up = True

    async def fingerprint(self) -> Any:
        """Something equal on two nodes exactly when their states are equal."""
        raise NotImplementedError

    def applied_twice(self) -> list[tuple[str, int]]:
        """Op ids merged more than once, if the node can tell."""
        return []

    def rejected(self) -> set[tuple[str, int]] | None:
        """Ids of rejected ops, if the node can tell."""
        return None

    async def aclose(self) -> None:
        """Release resources."""


class MemorySimNode(SimNode):
    """A :class:`MemoryReplica`; its whole state counts as durable across a crash."""

    def __init__(self, node_id: str, wall: Callable[[], int]) -> None:
        self.node_id = node_id
        self.mem = MemoryReplica(node_id, FLEET, wall=wall)
        self.replica = self.mem

    async def write(self, key: str, value: Any) -> Op:
        return self.mem.put(key, value)

    async def write_foreign(self, key: str, value: Any) -> Op | None:
        m = self.mem
        n, head = m._head(m.node_id)
        zone = key.split("/")[0] + "/"
        op = Op(m.node_id, n + 1, m.clock.now(), zone, 0, key, "lww", b"\xa1x", head)
        verdict, reason = m.zones.judge(op)
        if verdict is not Verdict.REJECT:
            return None  # only writes every replica rejects identically are simulated
        m._append(op)
        m.rejected[op.id] = reason
        return op

    async def fingerprint(self) -> Any:
        return (self.mem.vv(), sorted(self.mem.state.items()))

    def applied_twice(self) -> list[tuple[str, int]]:
        return [i for i, n in self.mem.apply_count.items() if n > 1]

    def rejected(self) -> set[tuple[str, int]] | None:
        return set(self.mem.rejected)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What the simulated world does.

    Attributes:
        nodes: number of replicas.
        duration_ms: virtual time during which writes and faults happen.
        writes: local writes spread over the duration.
        foreign_writes: zone-violating writes (each rejected everywhere).
        exchanges: exchanges started over the duration.
        latency_ms: one-way frame latency range.
        p_drop: chance a frame is lost (its link is cut).
        p_duplicate: chance a frame is delivered twice.
        p_reorder: chance a frame skips ahead of those sent before it.
        partitions: partition events (each splits the nodes in two, then heals).
        crashes: crash events (each followed by a restart).
        max_drift: per-node clock rate error (0.01 = 1 %).
        max_offset_ms: per-node clock offset range.
        session: session tunables (small batches exercise batching).
        settle_rounds: rounds of fault-free all-pairs exchanges allowed to converge.
        compactions: compaction events (a node drops what every peer it heard
            from acknowledged; a peer it never heard from then needs a snapshot).
    """

    nodes: int = 5
    duration_ms: int = 5_000
    writes: int = 60
    foreign_writes: int = 3
    exchanges: int = 60
    latency_ms: tuple[int, int] = (1, 30)
    p_drop: float = 0.01
    p_duplicate: float = 0.01
    p_reorder: float = 0.01
    partitions: int = 2
    crashes: int = 2
    max_drift: float = 0.02
    max_offset_ms: int = 300
    session: SessionConfig = field(
        default_factory=lambda: SessionConfig(max_batch_bytes=2048, batch_ops=16, window=2)
    )
    settle_rounds: int = 12
    compactions: int = 0


@dataclass(slots=True)
class SimReport:
    """What happened in one run."""

    seed: int
    exchanges: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    crashes: int = 0
    partitions: int = 0
    writes: int = 0
    settle_rounds: int = 0
    compacted: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if the checker found nothing."""
        return not self.problems


@dataclass(slots=True)
class _Exchange:
    id: int
    a: int
    b: int
    last_at: dict[int, float]
    performers: dict[int, Performer] = field(default_factory=dict)
    ended: bool = False


class _SimLink:
    """One side's link: its frames' bytes become delivery events on the scheduler."""

    __slots__ = ("side", "sim", "to", "x")

    def __init__(self, sim: Simulation, x: _Exchange, side: int, to: int) -> None:
        self.sim, self.x, self.side, self.to = sim, x, side, to

    async def send(self, frame: Frame) -> int:
        if not self.sim.nodes[self.side].up:
            return 0  # a crashed node sends nothing
        data = encode_frame(frame)
        self.sim._send(self.x, self.to, data)
        return len(data)


NodeFactory = Callable[[str, Callable[[], int]], Awaitable[SimNode]]


async def _memory_factory(node_id: str, wall: Callable[[], int]) -> SimNode:
    return MemorySimNode(node_id, wall)


class Simulation:
    """One seeded run. ``await Simulation(seed).run()`` returns a :class:`SimReport`.

    Args:
        seed: the seed everything random derives from.
        config: the world.
        factory: builds a node from its id and its (drifting) wall clock.
    """

    def __init__(
        self, seed: int, config: SimConfig | None = None, factory: NodeFactory | None = None
    ) -> None:
        self.seed = seed
        self.cfg = config or SimConfig()
        self.rng = random.Random(seed)
        self.factory = factory or _memory_factory
        self.now = 0.0
        self.nodes: list[SimNode] = []
        self.report = SimReport(seed)
        self.acked: dict[tuple[str, int], Op] = {}
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._xid = itertools.count(1)
        self._side: list[int] = []  # partition side per node (all 0: connected)
        self._books: dict[int, PeerBook] = {}  # per node: its sessions' peer links
        self._faults = True

    # -- scheduling ----------------------------------------------------------------

    def _at(self, t: float, kind: str, *args: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, args))

    def _wall(self, i: int, drift: float, offset: int) -> Callable[[], int]:
        base = 1_700_000_000_000
        return lambda: base + offset + int(self.now * (1 + drift))

    async def run(self) -> SimReport:
        """Run the world, settle it fault-free, and check it."""
        cfg, rng = self.cfg, self.rng
        for i in range(cfg.nodes):
            drift = rng.uniform(-cfg.max_drift, cfg.max_drift)
            offset = rng.randint(-cfg.max_offset_ms, cfg.max_offset_ms)
            self.nodes.append(await self.factory(f"n{i}", self._wall(i, drift, offset)))
        self._side = [0] * cfg.nodes
        d = cfg.duration_ms
        for _ in range(cfg.writes):
            self._at(rng.uniform(0, d), "write", rng.randrange(cfg.nodes))
        for _ in range(cfg.foreign_writes):
            self._at(rng.uniform(0, d), "foreign", rng.randrange(cfg.nodes))
        for _ in range(cfg.exchanges):
            a = rng.randrange(cfg.nodes)
            b = rng.randrange(cfg.nodes - 1)
            self._at(rng.uniform(0, d), "exchange", a, b if b < a else b + 1)
        for _ in range(cfg.partitions):
            t = rng.uniform(0, d * 0.8)
            self._at(t, "split")
            self._at(t + rng.uniform(100, d * 0.3), "heal")
        for _ in range(cfg.compactions):
            self._at(rng.uniform(0, d), "compact", rng.randrange(cfg.nodes))
        for _ in range(cfg.crashes):
            t = rng.uniform(0, d * 0.8)
            i = rng.randrange(cfg.nodes)
            self._at(t, "crash", i)
            self._at(t + rng.uniform(50, d * 0.2), "restart", i)
        await self._drain()
        await self._settle()
        await self._check()
        for node in self.nodes:
            await node.aclose()
        return self.report

    async def _drain(self) -> None:
        while self._heap:
            t, _, kind, args = heapq.heappop(self._heap)
            self.now = max(self.now, t)
            await getattr(self, "_ev_" + kind)(*args)

    async def _settle(self) -> None:
        """Heal everything, restart everyone, stop faults, exchange until converged."""
        self._faults = False
        self._side = [0] * len(self.nodes)
        for i, node in enumerate(self.nodes):
            if not node.up:
                await self._ev_restart(i)
        n = len(self.nodes)
        for r in range(self.cfg.settle_rounds):
            if await self._converged():
                self.report.settle_rounds = r
                return
            for a in range(n):
                b = (a + 1 + r % (n - 1)) % n
                self._at(self.now + 1, "exchange", a, b)
                await self._drain()
        self.report.settle_rounds = self.cfg.settle_rounds

    async def _converged(self) -> bool:
        prints = [await node.fingerprint() for node in self.nodes]
        return all(p == prints[0] for p in prints)

    # -- events ----------------------------------------------------------------------

    async def _ev_write(self, i: int) -> None:
        node = self.nodes[i]
        if not node.up:
            return
        if self.rng.random() < 0.5:
            key = f"{SHARED}k{self.rng.randrange(8)}"
        else:
            key = f"fleet/{node.node_id}/k{self.rng.randrange(4)}"
        op = await node.write(key, self.rng.randrange(1000))
        self.acked[op.id] = op
        self.report.writes += 1

    async def _ev_foreign(self, i: int) -> None:
        node = self.nodes[i]
        if not node.up:
            return
        op = await node.write_foreign(f"sys/stolen/{node.node_id}", 1)
        if op is not None:
            self.acked[op.id] = op

    async def _ev_compact(self, i: int) -> None:
        node = self.nodes[i]
        compact = getattr(node.replica, "compact", None)
        if node.up and compact is not None:
            self.report.compacted += await compact()

    async def _ev_split(self) -> None:
        if not self._faults:
            return
        n = len(self.nodes)
        cut = self.rng.randrange(1, n)
        order = list(range(n))
        self.rng.shuffle(order)
        self._side = [0] * n
        for i in order[:cut]:
            self._side[i] = 1
        self.report.partitions += 1

    async def _ev_heal(self) -> None:
        self._side = [0] * len(self.nodes)

    async def _ev_crash(self, i: int) -> None:
        if not self._faults or not self.nodes[i].up:
            return
        await self.nodes[i].crash()
        self._books.pop(i, None)  # what its sessions knew of links is lost with it
        self.report.crashes += 1

    async def _ev_restart(self, i: int) -> None:
        if not self.nodes[i].up:
            await self.nodes[i].restart()

    def _linked(self, a: int, b: int) -> bool:
        return self.nodes[a].up and self.nodes[b].up and self._side[a] == self._side[b]

    async def _ev_exchange(self, a: int, b: int) -> None:
        if not self._linked(a, b):
            self._count(Status.UNAVAILABLE)
            return
        x = _Exchange(next(self._xid), a, b, {a: self.now, b: self.now})
        for side, other in ((a, b), (b, a)):
            node = self.nodes[side]
            session = Session(
                node.node_id,
                FLEET.fleet_id,
                config=self.cfg.session,
                wall_ms=replica_wall_ms(node.replica),
                fleet_digest=node.replica.fleet_digest,
                # virtual time: simulated delays never trip a wall-clock deadline
                clocks=SessionClocks(
                    lambda: self.now / 1000, functools.partial(replica_wall_ms, node.replica)
                ),
                book=self._books.setdefault(side, PeerBook()),
                initiator=side == a,
            )
            x.performers[side] = Performer(
                session,
                node.replica,
                _SimLink(self, x, side, other),
                on_end=functools.partial(self._ended, x),
            )
        self.report.exchanges += 1
        await x.performers[a].start()

    async def _ev_deliver(self, x: _Exchange, to: int, data: bytes) -> None:
        if x.ended:
            return
        if not self._linked(x.a, x.b):
            await self._cut(x, "link lost")
            return
        performer = x.performers[to]
        if performer.session.state is SessionState.IDLE:
            await performer.start()
        await performer.receive(decode_frame(data))

    async def _cut(self, x: _Exchange, why: str) -> None:
        for side in (x.a, x.b):
            await x.performers[side].abort(Status.ABORTED, why)

    def _ended(self, x: _Exchange, status: Status, reason: str) -> None:
        self._count(status)
        if all(p.ended for p in x.performers.values()):
            x.ended = True

    def _count(self, status: Status) -> None:
        self.report.statuses[status.name] = self.report.statuses.get(status.name, 0) + 1

    def _send(self, x: _Exchange, to: int, data: bytes) -> None:
        rng, cfg = self.rng, self.cfg
        self.report.frames += 1
        if self._faults and rng.random() < cfg.p_drop:
            self.report.dropped += 1
            self._at(self.now + rng.uniform(*cfg.latency_ms), "cut", x)
            return
        lat = rng.uniform(*cfg.latency_ms)
        t = self.now + lat
        if self._faults and rng.random() < cfg.p_reorder:
            self.report.reordered += 1
            t = self.now + rng.uniform(0, lat)  # may overtake earlier frames
        else:
            t = max(t, x.last_at[to] + 1e-6)  # FIFO, like one TCP stream
            x.last_at[to] = t
        self._at(t, "deliver", x, to, data)
        if self._faults and rng.random() < cfg.p_duplicate:
            self.report.duplicated += 1
            self._at(t + rng.uniform(0, lat), "deliver", x, to, data)

    async def _ev_cut(self, x: _Exchange) -> None:
        if not x.ended:
            await self._cut(x, "frame dropped")

    # -- the checker -------------------------------------------------------------------

    async def _check(self) -> None:
        self.report.problems.extend(await check(self.nodes, self.acked))


async def check(nodes: list[SimNode], acked: dict[tuple[str, int], Op]) -> list[str]:
    """The convergence checker. Returns the problems found (empty: all good).

    Checks identical state, no acknowledged write lost (every replica holds
    every op a write returned, unaltered), no op applied twice, and identical
    rejected-op sets.
    """
    problems: list[str] = []
    prints = [await n.fingerprint() for n in nodes]
    for n, p in zip(nodes[1:], prints[1:], strict=True):
        if p != prints[0]:
            problems.append(f"state of {n.node_id} differs from {nodes[0].node_id}")
    for n in nodes:
        vv = await n.replica.version_vector()
        lost = sorted(i for i in acked if vv.get(i[0], 0) < i[1])
        if lost:
            problems.append(f"{n.node_id} lacks acknowledged writes {lost[:5]}")
        held = await n.replica.ops_since({}, limit=1 << 30)
        by_id = {op.id: op for op in held}
        for i, op in acked.items():
            got = by_id.get(i)
            if got is not None and op_hash(got) != op_hash(op):
                problems.append(f"{n.node_id} holds a different op at {i}")
        twice = n.applied_twice()
        if twice:
            problems.append(f"{n.node_id} applied ops twice: {twice[:5]}")
    # below a compaction point a replica may hold a snapshot instead of the ops, so
    # rejections are compared above the highest one (a snapshot carries no rejections)
    floor: dict[str, int] = {}
    for n in nodes:
        compacted = getattr(n.replica, "compacted", None)
        for origin, seq in (compacted() if compacted is not None else {}).items():
            floor[origin] = max(floor.get(origin, 0), seq)
    rejected = [n.rejected() for n in nodes]
    known = [{i for i in r if i[1] > floor.get(i[0], 0)} for r in rejected if r is not None]
    if any(r != known[0] for r in known):
        problems.append("rejected ops differ between replicas")
    return problems
