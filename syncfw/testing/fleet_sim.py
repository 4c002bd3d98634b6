"""A fleet-scale simulation: a thousand nodes gossiping in virtual time, in one process.

Where :mod:`syncfw.testing.sim` hunts for faults among a few nodes, this asks a
whole-fleet question: each of N nodes writes once, then every node gossips as
the mesh does; how many rounds, how many bytes, until everyone holds everything?

Invariants:

1. Time is virtual (one event heap) and everything random comes from one
   ``random.Random(seed)``: a seed replays exactly. Sessions, membership and
   the new-dial bucket read only the virtual clock, so however long the
   process takes to simulate a round, no wall-clock deadline is ever tripped.
2. The parts are the real ones: each node's :class:`~syncfw.mesh.Membership`
   and :class:`~syncfw.mesh.guard.GossipGuard` choose its peers and probes
   (as :meth:`Mesh.start_round` does), each exchange is two real
   :class:`~syncfw.sync.Session` s driven by the one
   :class:`~syncfw.exchange.performer.Performer`, and frames cross as the
   transport's wire bytes (:func:`~syncfw.transport.wire.encode_frame`).
   Like the mesh, a node never runs two exchanges with one peer at once.
3. Per-node work grows with what changed, not with N: :class:`FleetReplica`
   keeps its version vector and its digest incrementally
   (:class:`~syncfw.sync.vectors.LiveVector`), hands sessions immutable
   snapshots, and reads only the origins a peer lacks.
4. Probes (SWIM's round-robin ones) are answered after one round trip and
   counted as the bytes of the ``Probe`` RPC's messages; eager pushes are off
   (the question is what gossip rounds alone do).
"""

from __future__ import annotations

import functools
import gc
import heapq
import itertools
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from syncfw.exchange.performer import Performer
from syncfw.log import Op, VersionVector, op_size
from syncfw.mesh.budget import TokenBucket
from syncfw.mesh.config import MeshConfig
from syncfw.mesh.guard import GossipGuard
from syncfw.mesh.membership import Member, Membership
from syncfw.metrics import NodeMetrics
from syncfw.sync import Frame, Session, SessionState, Status
from syncfw.sync.links import PeerBook
from syncfw.sync.session import SessionClocks
from syncfw.sync.vectors import LiveVector
from syncfw.testing.memory import MemoryReplica
from syncfw.transport._pb import sync_pb2 as pb
from syncfw.transport.wire import decode_frame, encode_frame
from syncfw.zones import Fleet

__all__ = ["FleetConfig", "FleetReplica", "FleetReport", "FleetSim", "IdleCost"]

FLEET = Fleet(fleet_id="fleet-sim")
_BASE_MS = 1_700_000_000_000


class FleetReplica(MemoryReplica):
    """A :class:`MemoryReplica` whose vector work costs what changed (invariant 3)."""

    def __init__(self, node_id: str, fleet: Fleet | None = None, **kw: Any) -> None:
        self.live = LiveVector()
        super().__init__(node_id, fleet, **kw)
        self._fleet_digest = self.fleet.bootstrap_digest()  # the fleet never changes

    @property
    def fleet_digest(self) -> bytes:
        """The fleet bootstrap's digest, computed once (each session's Hello carries it)."""
        return self._fleet_digest

    def _append(self, op: Op, h: bytes | None = None) -> None:
        super()._append(op, h)
        self.live.set(op.origin, len(self.chains[op.origin]))

    def vv(self) -> VersionVector:
        """The vector as an immutable snapshot (the same object until it changes)."""
        return self.live.snapshot()

    async def version_vector(self) -> VersionVector:
        return self.live.snapshot()

    async def ops_since(
        self, vv: Mapping[str, int], *, limit: int = 10_000, max_bytes: int | None = None
    ) -> list[Op]:
        """As :meth:`MemoryReplica.ops_since`, reading only the origins ``vv`` lacks."""
        mine = self.live.snapshot()
        if vv == mine:
            return []
        get = vv.get
        lacking = sorted(o for o, s in mine.items() if s > get(o, 0))
        out: list[Op] = []
        size = 0
        for origin in lacking:
            for op in self.chains[origin][get(origin, 0) :]:
                if len(out) >= limit:
                    return out
                size += op_size(op)
                if max_bytes is not None and out and size > max_bytes:
                    return out
                out.append(op)
        return out

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        """As :meth:`MemoryReplica.acknowledge`; a first record or an equal one costs no loop."""
        cur = self.acks.get(peer)
        if cur is None:
            self.acks[peer] = (
                {o: s for o, s in vv.items() if s > 0} if 0 in vv.values() else dict(vv)
            )
            return
        if cur == vv:
            return
        for origin, seq in vv.items():
            if seq > cur.get(origin, 0):
                cur[origin] = seq


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The simulated fleet.

    Attributes:
        nodes: how many.
        mesh: the mesh tunables every node runs (interval, jitter, fanout,
            session, gossip bounds): :meth:`MeshConfig.lan` with member lists
            on every 10th exchange by default. Every member is known from the
            start, and ``lan()``'s list on every exchange (up to 128 members
            each way) is then the largest cost of a round, growing with the
            table: ``Membership.gossip`` orders the whole table per list.
        latency_ms: one-way frame latency range.
        max_rounds: give up (and say so) after this many gossip intervals.
    """

    nodes: int = 1000
    mesh: MeshConfig = field(default_factory=lambda: MeshConfig.lan().with_(gossip_peers_every=10))
    latency_ms: tuple[float, float] = (0.2, 2.0)
    max_rounds: int = 40


@dataclass(slots=True)
class FleetReport:
    """What one fleet run did.

    Attributes:
        seed: the seed.
        nodes: fleet size.
        converged: every node held every node's write.
        rounds: gossip intervals until then (``ceil(virtual time / interval)``).
        virtual_s: virtual seconds until then.
        wall_s: wall seconds the run took (setup included).
        cpu_s: CPU seconds this process spent on it (on a shared machine,
            what the run costs; wall time also counts others' work).
        exchanges: exchanges started.
        statuses: how they ended, by status name.
        frames: frames sent.
        bytes_sent: wire bytes sent by all nodes (frames and probes).
        probes: probes sent.
        rounds_run: node rounds run in all.
        vector_changes: entries set in all the nodes' live vectors.
        kinds: frames and wire bytes delivered, by frame kind.
        problems: what the end check found (empty: all nodes equal).
    """

    seed: int
    nodes: int
    converged: bool = False
    rounds: int = 0
    virtual_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    exchanges: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    bytes_sent: int = 0
    probes: int = 0
    rounds_run: int = 0
    vector_changes: int = 0
    kinds: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def bytes_per_node_round(self) -> float:
        """Mean wire bytes one node sent per gossip round."""
        return self.bytes_sent / max(1, self.rounds_run)


class IdleCost(NamedTuple):
    """What rounds cost once nothing moves (:meth:`FleetSim.idle_rounds`).

    Attributes:
        exchanges: exchanges started in them.
        bytes_per_exchange: wire bytes per exchange, member lists aside
            (Hello and Digest both ways, the probes).
        peers_bytes_per_exchange: member lists' bytes per exchange (they grow
            with the member table up to ``gossip_members``).
        us_per_exchange: CPU microseconds per exchange: its frames, sessions
            and replica work (the rounds' peer choice is the mesh's, not counted).
    """

    exchanges: int
    bytes_per_exchange: float
    peers_bytes_per_exchange: float
    us_per_exchange: float


@dataclass(slots=True)
class _Node:
    replica: FleetReplica
    membership: Membership
    guard: GossipGuard
    book: PeerBook
    busy: set[str] = field(default_factory=set)  # peers in an exchange with this node now
    rounds: int = 0
    exchanges: int = 0
    sent: int = 0


@dataclass(slots=True)
class _Exchange:
    a: int
    b: int
    last_at: dict[int, float]
    performers: dict[int, Performer] = field(default_factory=dict)
    ended: int = 0


class _Link:
    __slots__ = ("side", "sim", "to", "x")

    def __init__(self, sim: FleetSim, x: _Exchange, side: int, to: int) -> None:
        self.sim, self.x, self.side, self.to = sim, x, side, to

    async def send(self, frame: Frame) -> int:
        data = encode_frame(frame)
        self.sim._send(self.x, self.side, self.to, data)
        return len(data)


def _probe_bytes(node_id: str, timeout_s: float) -> int:
    """Wire bytes of one direct probe: the request and the reply messages."""
    req = pb.ProbeRequest(target="", timeout_ms=int(timeout_s * 1000)).ByteSize()
    return req + pb.ProbeReply(reachable=True, node_id=node_id).ByteSize()


class FleetSim:
    """One seeded fleet run: ``await FleetSim(seed, config).run()`` returns a :class:`FleetReport`.

    Args:
        seed: everything random derives from it.
        config: the fleet.
    """

    def __init__(self, seed: int, config: FleetConfig | None = None) -> None:
        self.seed = seed
        self.cfg = config or FleetConfig()
        self.rng = random.Random(seed)
        self.now = 0.0  # virtual seconds
        self.nodes: list[_Node] = []
        self.index: dict[str, int] = {}
        self.report = FleetReport(seed, self.cfg.nodes)
        self._heap: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._complete: set[int] = set()
        self._busy_s = 0.0  # CPU time spent in exchanges (delivering frames, starting them)
        self._timing = False  # count _busy_s (idle_rounds): a clock read per event costs
        self._lists = True  # gossip member lists (idle_rounds may leave them out)

    def _at(self, t: float, kind: str, *args: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, args))

    def _clock(self) -> float:
        return self.now

    def _wall_ms(self) -> int:
        return _BASE_MS + int(self.now * 1000)

    def _build(self) -> None:
        cfg, mesh = self.cfg, self.cfg.mesh
        bounds = mesh.gossip.with_(require_port=False)
        ids = [f"n{i}" for i in range(cfg.nodes)]
        everyone = frozenset(ids)
        for i, node_id in enumerate(ids):
            membership = Membership(
                node_id,
                node_id,
                suspect_after=mesh.suspect_after,
                dead_after_s=mesh.dead_after_s,
                dead_retry_s=mesh.dead_retry_s,
                bounds=bounds,
            )
            # A fleet that has been together a while: every member known and kept
            # across restarts, so never counted as a new dial. This is what
            # Membership.restore makes of the saved table; the ids are generated
            # and valid, so a million address checks are left out.
            membership.members.update({o: Member(o, o) for o in ids if o != node_id})
            membership.seeds = everyone - {node_id}
            metrics = NodeMetrics(node_id)
            dials = TokenBucket(bounds.dials_per_s, bounds.dial_burst, clock=self._clock)
            guard = GossipGuard(node_id, bounds, metrics, dials)
            replica = FleetReplica(node_id, FLEET, wall=self._wall_ms)
            self.nodes.append(_Node(replica, membership, guard, PeerBook()))
            self.index[node_id] = i

    async def run(self) -> FleetReport:
        """Write once everywhere, gossip until every node holds everything, check."""
        t0, c0 = time.perf_counter(), time.process_time()
        cfg, rep = self.cfg, self.report
        self._build()
        for node in self.nodes:
            node.replica.put(f"fleet/{node.replica.node_id}/x", 1)
        interval = cfg.mesh.interval_s
        for i in range(cfg.nodes):
            self._at(self.rng.uniform(0, interval), "round", i)
        await self._drain(cfg.max_rounds * interval, until_complete=True)
        rep.converged = len(self._complete) == cfg.nodes
        rep.virtual_s = self.now
        rep.rounds = math.ceil(self.now / interval)
        rep.rounds_run = sum(n.rounds for n in self.nodes)
        rep.vector_changes = sum(n.replica.live.changes for n in self.nodes)
        digests = {n.replica.live.snapshot().digest() for n in self.nodes}
        if len(digests) != 1:
            rep.problems.append(f"{len(digests)} distinct vectors at the end")
        rep.wall_s = time.perf_counter() - t0
        rep.cpu_s = time.process_time() - c0
        return rep

    async def idle_rounds(self, rounds: int, *, member_lists: bool = True) -> IdleCost:
        """After :meth:`run`: go on for ``rounds`` more intervals, where nothing moves.

        A vector entry set meanwhile is a problem (``report.problems``).

        Args:
            rounds: intervals to run.
            member_lists: gossip member lists as configured; False leaves them
                out, to time the exchanges' own work (a list's cost grows with
                the member table: the mesh's, up to ``gossip_members``).
        """
        self._lists = member_lists
        rep = self.report
        x0, b0 = rep.exchanges, rep.bytes_sent
        p0 = rep.kinds.get("Peers", [0, 0])[1]
        c0 = sum(nd.replica.live.changes for nd in self.nodes)
        self._busy_s = 0.0
        # the exchanges' own work: this thread's CPU only (a test process keeps other
        # threads), with no collector pass whose cost grows with the whole heap
        gc.collect()
        gc.disable()
        self._timing = True
        try:
            await self._drain(self.now + rounds * self.cfg.mesh.interval_s, until_complete=False)
        finally:
            self._timing = False
            gc.enable()
        n = max(1, rep.exchanges - x0)
        changes = sum(nd.replica.live.changes for nd in self.nodes) - c0
        if changes:
            rep.problems.append(f"{changes} vector entries moved in rounds where nothing should")
        peers = rep.kinds.get("Peers", [0, 0])[1] - p0
        return IdleCost(n, (rep.bytes_sent - b0 - peers) / n, peers / n, self._busy_s * 1e6 / n)

    async def _drain(self, limit: float, *, until_complete: bool) -> None:
        n = self.cfg.nodes
        clock = time.thread_time
        timing = self._timing
        heap, pop = self._heap, heapq.heappop
        while heap and not (until_complete and len(self._complete) >= n):
            t, _, kind, args = pop(heap)
            if t > limit:
                heapq.heappush(heap, (t, _, kind, args))
                break
            self.now = max(self.now, t)
            if not timing:
                await getattr(self, "_ev_" + kind)(*args)
                continue
            t0 = clock()
            await getattr(self, "_ev_" + kind)(*args)
            if kind == "deliver":
                self._busy_s += clock() - t0

    # -- events ----------------------------------------------------------------------

    def _interval(self) -> float:
        mesh = self.cfg.mesh
        return mesh.interval_s * self.rng.uniform(1 - mesh.jitter, 1 + mesh.jitter)

    async def _ev_round(self, i: int) -> None:
        """One node's gossip round, as :meth:`Mesh.start_round` makes it."""
        node, now = self.nodes[i], self.now
        self._at(now + self._interval(), "round", i)
        node.rounds += 1
        m = node.membership
        m.beat()
        m.tick(now)
        m.drain()
        choice = node.guard.choose(m, self.cfg.mesh.fanout, self.rng, now)
        chosen = [p for p in choice.chosen if p.address not in node.busy]
        t0 = time.thread_time() if self._timing else 0.0
        for peer in chosen:
            await self._start_exchange(i, self.index[peer.address])
        if self._timing:
            self._busy_s += time.thread_time() - t0
        targets = m.probe_targets(node.busy, self.rng, avoid={p.address for p in chosen})
        for peer in targets:
            self._probe(i, peer)

    def _probe(self, i: int, peer: Member) -> None:
        size = _probe_bytes(peer.node_id, self.cfg.mesh.probe_timeout_s)
        self.report.probes += 1
        self.report.bytes_sent += size
        self.nodes[i].sent += size
        rtt = self.rng.uniform(*self.cfg.latency_ms) + self.rng.uniform(*self.cfg.latency_ms)
        self._at(self.now + rtt / 1000, "probed", i, peer.address)

    async def _ev_probed(self, i: int, address: str) -> None:
        m = self.nodes[i].membership
        m.heard(address, address, self.now)
        m.drain()

    async def _start_exchange(self, a: int, b: int) -> None:
        na, nb = self.nodes[a], self.nodes[b]
        ida, idb = na.replica.node_id, nb.replica.node_id
        if idb in na.busy or ida in nb.busy:
            return
        na.busy.add(idb)
        nb.busy.add(ida)
        x = _Exchange(a, b, {a: self.now, b: self.now})
        session_cfg = self.cfg.mesh.session
        for side, other, node in ((a, b, na), (b, a, nb)):
            session = Session(
                node.replica.node_id,
                FLEET.fleet_id,
                config=session_cfg,
                peers=self._gossip_list(node),
                wall_ms=self._wall_ms(),
                fleet_digest=node.replica.fleet_digest,
                clocks=SessionClocks(self._clock, self._wall_ms),
                book=node.book,
                initiator=side == a,
            )
            x.performers[side] = Performer(
                session,
                node.replica,
                _Link(self, x, side, other),
                on_peers=functools.partial(self._learn, node),
                on_end=functools.partial(self._ended, x, side),
            )
        self.report.exchanges += 1
        await x.performers[a].start()

    def _gossip_list(self, node: _Node) -> tuple[Any, ...]:
        node.exchanges += 1  # as Mesh._gossip_list counts them
        if not self._lists or node.exchanges % self.cfg.mesh.gossip_peers_every:
            return ()
        return node.membership.gossip()

    def _learn(self, node: _Node, peers: tuple[Any, ...]) -> None:
        got = node.membership.learn(peers, self.now)
        node.guard.learned(got, "", len(node.membership.members))
        node.membership.drain()

    def _ended(self, x: _Exchange, side: int, status: Status, reason: str) -> None:
        rep = self.report
        rep.statuses[status.name] = rep.statuses.get(status.name, 0) + 1
        x.ended += 1
        if x.ended == 2:
            na, nb = self.nodes[x.a], self.nodes[x.b]
            na.busy.discard(nb.replica.node_id)
            nb.busy.discard(na.replica.node_id)
        if side == x.a:  # the initiator records the outcome, as Mesh.sync_with does
            peer = self.nodes[x.b].replica.node_id
            m = self.nodes[x.a].membership
            if status is Status.OK:
                m.succeeded(peer, peer, self.now)
            else:
                m.heard(peer, peer, self.now)
            m.drain()

    def _send(self, x: _Exchange, side: int, to: int, data: bytes) -> None:
        rep = self.report
        rep.frames += 1
        rep.bytes_sent += len(data)
        self.nodes[side].sent += len(data)
        t = self.now + self.rng.uniform(*self.cfg.latency_ms) / 1000
        t = max(t, x.last_at[to] + 1e-9)  # FIFO, like one stream
        x.last_at[to] = t
        self._at(t, "deliver", x, to, data)

    async def _ev_deliver(self, x: _Exchange, to: int, data: bytes) -> None:
        performer = x.performers[to]
        if performer.session.state is SessionState.IDLE:
            await performer.start()
        frame = decode_frame(data)
        kind = self.report.kinds.setdefault(type(frame).__name__, [0, 0])
        kind[0] += 1
        kind[1] += len(data)
        await performer.receive(frame)
        if to not in self._complete and len(self.nodes[to].replica.live) == self.cfg.nodes:
            self._complete.add(to)
