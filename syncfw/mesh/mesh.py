"""The gossip scheduler: rounds with jitter and fanout, eager push, serving peers.

Invariants:

1. At most one exchange at a time per peer pair: a round skips a peer already
   being synced (dialed, or serving an exchange from it once the caller is
   named: its mTLS identity or the first entry of its Peers frame), and a push
   to such a peer marks it "again" instead of starting another exchange; the
   one push follows when the running exchange ends, however many were asked.
2. A failing peer never stops the mesh, and the slowest peer never holds up
   the others: the loop starts each round's exchanges and probes as tasks,
   each under its own deadlines (``connect_timeout_s`` to dial,
   ``probe_timeout_s`` for the peer's Hello, ``exchange_timeout_s`` in all),
   and moves on; eager pushes likewise. Every outcome is recorded in
   :class:`Membership` and logged.
2a. Failure detection is SWIM's: a failed contact with no Hello heard is
   checked through up to ``indirect_probes`` other members (``Probe`` with a
   target, memberlist's ping-req) before it counts, so a cut between this node
   and one peer alone never makes that peer suspect. Each round also probes
   one member round-robin and every suspect one. A member this node probes on
   another's behalf and fails to reach is probed by this node itself next round.
   A peer this node is exchanging with is left unprobed only while that
   exchange hears from it (a frame within ``probe_timeout_s + interval_s +
   dead_after_s``), and every frame from a suspect refutes the suspicion: a
   loaded peer mid-catch-up is not declared dead (which would cut the
   exchange), and a link gone black mid-exchange is found by the probes in
   seconds, the peer's channel dropped when it is dead ending the exchange,
   instead of the exchange's own deadline hiding the peer for
   ``exchange_timeout_s``.
2b. Every state transition the table records is handled once (the loop takes
   them from :meth:`Membership.drain` after every change): to dead, the pooled
   connection is dropped, "is dead" logged and
   ``syncfw_peer_transitions{state=dead}`` counted, whichever path made it so.
3. Randomness comes from one seeded :class:`random.Random`; the loop's timing
   from the event loop, so tests drive rounds with :meth:`Mesh.round` and never
   wait on wall time.
4. The mesh's figures live in its node's :class:`~syncfw.metrics.NodeMetrics`
   and nowhere else: the exchanges record outcomes, bytes and ops; the mesh
   sets the peer gauges after every change of its member table, and each
   peer's lag and clock offset after every exchange with it. Per-peer series
   exist only for node ids in the member table, and go when they leave it.
   :meth:`Mesh.status` reads them back, so it and ``/metrics`` agree.
5. Dialing a peer takes at most ``config.connect_timeout_s``; its Hello must
   come within ``config.probe_timeout_s`` of the stream opening; the exchange
   in all, at most ``config.exchange_timeout_s``. A probe takes at most
   ``probe_timeout_s``, an indirect one twice that.
7. With a :class:`~syncfw.mesh.persist.MemberFile`, the members ever reached
   are saved every ``config.save_members_every_s`` (from the rounds) and once
   more at :meth:`Mesh.aclose`, after the rounds have stopped and before the
   listener and channels go (a node closes its meshes before its store, so
   the file is still open); they are restored at start beside the seeds. A
   killed process keeps what the last save held.
6. Gossip is bounded (``config.gossip``): members are learned only from a
   Peers frame the session accepted, which it does only after the peer's
   Hello; the table, what one frame adds and this node's own list are capped
   by :class:`Membership`; a round makes new dials only as the
   :class:`GossipGuard`'s bucket allows; every refusal and eviction is counted
   and logged, rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from syncfw.errors import SyncfwError
from syncfw.exchange import ExchangeOutcome, SendBudget, run_exchange
from syncfw.log import Replica, VersionVector
from syncfw.mesh.budget import TokenBucket
from syncfw.mesh.config import MeshConfig
from syncfw.mesh.guard import GossipGuard
from syncfw.mesh.membership import Member, Membership, MemberState
from syncfw.mesh.persist import MemberFile
from syncfw.metrics import PEER_SOURCE, NodeMetrics
from syncfw.notices import clip_text
from syncfw.sync.frames import PeerInfo, Status
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.network import GrpcNetwork, Listener, Network
from syncfw.transport.probe import ProbeAnswer

__all__ = ["Mesh", "lag_ops"]

log = logging.getLogger("syncfw.mesh")

_STATES = tuple(s.value for s in MemberState)
_UNLABELLED_WARNINGS = 256  # distinct non-member peer ids warned about, at most
_MAX_SERVED_PROBES = 32  # indirect probes this node runs for others at once
# a failed exchange that heard no Hello and ended with one of these is a failed
# contact (checked through indirect probes); any other status is the peer answering
_NO_CONTACT = frozenset(
    {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.ABORTED, Status.CANCELLED}
)

T = TypeVar("T")


class _HelloDeadline:
    """A dialed stream whose first frame (the peer's Hello) must come within ``limit_s``.

    A peer that takes the TCP handshake (and the HTTP/2 one) but never says
    hello is a failed contact in ``probe_timeout_s``, not in the exchange's
    deadline.
    """

    def __init__(
        self, stream: FrameStream, limit_s: float, heard: Callable[[], None] | None = None
    ) -> None:
        self._stream = stream
        self._limit = limit_s
        self._first = True
        self._heard = heard  # called on every frame received (the exchange is alive)

    @property
    def peer_address(self) -> str:
        return self._stream.peer_address

    @property
    def peer_identity(self) -> str | None:
        return self._stream.peer_identity

    async def send(self, data: bytes) -> None:
        await self._stream.send(data)

    async def recv(self) -> bytes | None:
        if not self._first:
            got = await self._stream.recv()
        else:
            self._first = False
            try:
                async with asyncio.timeout(self._limit):
                    got = await self._stream.recv()
            except TimeoutError:
                raise LinkError(
                    Status.DEADLINE_EXCEEDED, f"no Hello within {self._limit}s of dialing"
                ) from None
        if self._heard is not None:
            self._heard()
        return got

    async def close(self, status: Status, reason: str) -> None:
        await self._stream.close(status, reason)


def lag_ops(ours: VersionVector, acked: VersionVector) -> int:
    """Ops held in ``ours`` that ``acked`` (a peer's last acknowledgement) lacks."""
    return sum(max(0, seq - acked.get(origin, 0)) for origin, seq in ours.items())


class Mesh:
    """A replica's place in the fleet mesh. Create with :meth:`start`, end with :meth:`aclose`."""

    def __init__(
        self,
        replica: Replica,
        network: Network,
        listener: Listener | None,
        membership: Membership,
        config: MeshConfig,
        rng: random.Random,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.replica = replica
        self.metrics = metrics if metrics is not None else NodeMetrics(replica.node_id)
        self.network = network
        self.listener = listener
        self.membership = membership
        self.config = config
        self._rng = rng
        self.guard = GossipGuard(replica.node_id, config.gossip, self.metrics)
        self._busy: set[str] = set()  # addresses dialed and not done
        self._heard_at: dict[str, float] = {}  # of those: when their exchange last heard a frame
        self._serving: dict[str, int] = {}  # node ids of named callers being served
        self._probing: set[str] = set()  # addresses being probed (directly or not)
        self._probes_served = 0
        self._budgets: dict[str, TokenBucket] = {}
        self._serve_budget: TokenBucket | None = None
        self._again: set[str] = set()  # peers owed one more exchange when theirs ends
        self._spawned: set[asyncio.Task[Any]] = set()
        self.member_file: MemberFile | None = None
        self._saved_at = 0.0
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._exchanges = 0
        self._labelled: set[str] = set()  # peer ids with per-peer series
        self._published: dict[str, int] | None = None  # the member counts the gauges show
        self._warned: set[str] = set()
        self.rounds = 0

    @classmethod
    async def start(
        cls,
        replica: Replica,
        *,
        listen: str | None = "127.0.0.1:0",
        advertise: str | None = None,
        seeds: list[str] | tuple[str, ...] = (),
        config: MeshConfig | None = None,
        network: Network | None = None,
        changes: Callable[[], AsyncIterator[Any]] | None = None,
        seed: int | None = None,
        run_loop: bool = True,
        metrics: NodeMetrics | None = None,
        member_file: MemberFile | None = None,
    ) -> Mesh:
        """Join the mesh: listen, learn peers from ``seeds``, gossip every interval.

        Args:
            replica: the node (anything implementing :class:`~syncfw.log.Replica`).
            listen: ``host:port`` to serve on (port 0: any free port), or None
                for a node that only dials out.
            advertise: the address gossiped to peers, when it differs from the
                bound one (NAT, a proxy).
            seeds: peer addresses to start from.
            config: tunables; :meth:`MeshConfig.lan` by default.
            network: the transport; gRPC by default.
            changes: a factory of the node's change feed (``node.changes``);
                local writes then trigger an eager push.
            seed: seeds the mesh's randomness (peer choice, jitter).
            run_loop: False to drive rounds by hand with :meth:`round`.
            metrics: the node's registry (``node.metrics``); a fresh one if None.
            member_file: where the member table is kept across restarts
                (``MemberFile(node.path)``); its members join the seeds.

        Returns:
            The running mesh.

        Raises:
            LinkError: ``listen`` cannot be bound.
        """
        cfg = config or MeshConfig.lan()
        net = network or GrpcNetwork(cfg.transport(), metrics=metrics)
        mesh = cls(
            replica, net, None, Membership(replica.node_id, ""), cfg, random.Random(seed), metrics
        )
        listener = (
            await net.serve(listen, mesh._serve, probe=mesh._serve_probe)
            if listen is not None
            else None
        )
        address = advertise or (listener.address if listener is not None else "")
        mesh.listener = listener
        mesh.membership = Membership(
            replica.node_id,
            address,
            seeds,
            suspect_after=cfg.suspect_after,
            dead_after_s=cfg.dead_after_s,
            dead_retry_s=cfg.dead_retry_s,
            bounds=cfg.gossip,
        )
        if member_file is not None:
            mesh.member_file = member_file
            restored = mesh.membership.restore(await member_file.load(), time.monotonic())
            if restored:
                log.info(
                    "%s: %d members restored beside %d seeds",
                    replica.node_id,
                    len(restored),
                    len(set(seeds)),
                )
            mesh._saved_at = time.monotonic()
        mesh._publish_members()
        if run_loop:
            mesh._tasks.append(asyncio.create_task(mesh._loop(), name="syncfw-mesh-gossip"))
            if cfg.eager_push:
                mesh._tasks.append(asyncio.create_task(mesh._pusher(), name="syncfw-mesh-push"))
                if changes is not None:
                    mesh._tasks.append(
                        asyncio.create_task(mesh._watch(changes), name="syncfw-mesh-changes")
                    )
        return mesh

    @property
    def address(self) -> str:
        """Where this node listens ("" if it does not)."""
        return self.membership.address

    # -- driving ------------------------------------------------------------------

    async def round(self) -> list[ExchangeOutcome]:
        """One gossip round now: exchange with ``fanout`` random live peers, probe, and wait.

        The loop does not wait (:meth:`start_round`); this waits for the
        round's exchanges and probes, each under its own deadlines.
        """
        exchanges, probes = self.start_round()
        outcomes = list(await asyncio.gather(*exchanges))
        await asyncio.gather(*probes)
        return outcomes

    def start_round(
        self,
    ) -> tuple[list[asyncio.Task[ExchangeOutcome]], list[asyncio.Task[None]]]:
        """Start one round's exchanges and probes as tasks, and return them without waiting."""
        now = time.monotonic()
        self.membership.beat()
        self.membership.tick(now)
        self._changed()
        self.rounds += 1
        # peers mid-exchange are left out before choosing (invariant 1), so the fanout
        # goes to others and no new dial is paid or counted for a peer not dialed
        skip = {m.address for m in self.membership.members.values() if self._in_exchange(m)}
        choice = self.guard.choose(self.membership, self.config.fanout, self._rng, now, skip)
        chosen = choice.chosen
        exchanges = [self._spawn(self.sync_with(m.address), "syncfw-mesh-exchange") for m in chosen]
        # a chosen peer may be probed too: a dial that hangs (a peer taking the TCP
        # handshake, never the Hello) waits connect_timeout_s, a probe only probe_timeout_s
        # a peer mid-exchange is not probed while its exchange hears from it; one whose
        # exchange has gone quiet is (a black-holed link would otherwise hide it from
        # failure detection for the exchange's whole deadline)
        targets = self.membership.probe_targets(
            self._busy_heard(now) | self._probing, self._rng, avoid={m.address for m in chosen}
        )
        probes = [self._spawn(self.probe(m.address), "syncfw-mesh-probe") for m in targets]
        if (
            self.member_file is not None
            and now - self._saved_at >= self.config.save_members_every_s
        ):
            self._saved_at = now
            self._spawn(self.save_members(), "syncfw-mesh-save")
        return exchanges, probes

    async def push(self) -> list[ExchangeOutcome]:
        """Eager push: exchange now with the live peers synced with before, and wait.

        At most ``push_fanout`` of them, the most recently synced first. A peer
        already mid-exchange (either way) is marked "again": one exchange
        follows as soon as that one ends (its summary may predate the write).
        """
        return list(await asyncio.gather(*self.start_push()))

    def start_push(self) -> list[asyncio.Task[ExchangeOutcome]]:
        """Start an eager push's exchanges as tasks and return them without waiting."""
        connected = sorted(
            (
                m
                for m in self.membership.live()
                if m.last_ok is not None and m.state is MemberState.ALIVE
            ),
            key=lambda m: (-(m.last_ok or 0.0), m.address),
        )
        if self.config.push_fanout is not None:
            connected = connected[: self.config.push_fanout]
        tasks = []
        for m in connected:
            if self._in_exchange(m):
                self._again.add(m.address)
            else:
                tasks.append(self._spawn(self.sync_with(m.address), "syncfw-mesh-push"))
        return tasks

    def poke(self) -> None:
        """Ask for an eager push soon (a local write landed)."""
        self._poke.set()

    async def sync_with(self, address: str) -> ExchangeOutcome:
        """Run one exchange with the peer at ``address`` and record how it went.

        A failed contact (no Hello heard) is checked through indirect probes
        before it counts against the peer; this returns once it is recorded.
        """
        m = self.membership.members.get(address)
        if address in self._busy or (m is not None and self._in_exchange(m)):
            return ExchangeOutcome(Status.ABORTED, "already syncing with that peer")
        self._busy.add(address)
        self._heard_at[address] = time.monotonic()
        out = ExchangeOutcome(Status.CANCELLED, "exchange not run")

        def heard() -> None:
            now = self._heard_at[address] = time.monotonic()
            m = self.membership.members.get(address)
            if m is not None and m.state is not MemberState.ALIVE:
                self.membership.heard(address, None, now)  # a frame from it refutes suspicion
                self._changed()

        try:
            try:
                stream = await self._dial(address)
            except LinkError as exc:
                out = ExchangeOutcome(exc.status, exc.reason)
            else:
                out = await run_exchange(
                    self.replica,
                    _HelloDeadline(stream, self.config.probe_timeout_s, heard),
                    config=self.config.session,
                    peers=self._gossip_list(),
                    budget=self._budget(address),
                    on_peers=functools.partial(self._learn, source=address),
                    timeout_s=self.config.exchange_timeout_s,
                    metrics=self.metrics,
                    initiator=True,
                )
            await self._record(address, out)
            return out
        finally:
            self._busy.discard(address)
            self._heard_at.pop(address, None)
            self._follow_up(address, out)

    async def probe(self, address: str) -> None:
        """Probe the member at ``address`` (directly, then through others) and record it."""
        if address in self._probing or address not in self.membership.members:
            return
        self._probing.add(address)
        try:
            answer = await self.network.probe(
                address, source=self.address, timeout_s=self.config.probe_timeout_s
            )
            if answer.reachable:
                self.membership.heard(address, answer.node_id or None, time.monotonic())
                self._changed()
            else:
                await self._confirm(address, answer.reason)
        finally:
            self._probing.discard(address)

    async def save_members(self) -> bool:
        """Save the member table to the :class:`MemberFile` now (False: none, or it failed)."""
        if self.member_file is None:
            return False
        saved = self.membership.saved(_wall_ms(), time.monotonic())
        return await self.member_file.save(saved)

    # -- internals ----------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(work, name=name)
        self._spawned.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._spawned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s: %s failed", self.replica.node_id, task.get_name(), exc_info=exc)

    def _busy_heard(self, now: float) -> set[str]:
        """Peers dialed whose exchange heard a frame within ``probe_timeout_s +
        interval_s + dead_after_s`` (or began that recently): their exchange is the
        evidence, no probe is needed (a loaded peer answers a probe late, and its
        death would cut the very exchange that shows it alive)."""
        c = self.config
        quiet = c.probe_timeout_s + c.interval_s + c.dead_after_s
        return {a for a in self._busy if now - self._heard_at.get(a, now) <= quiet}

    def _in_exchange(self, m: Member) -> bool:
        """Whether an exchange with ``m`` runs now, dialed or served."""
        return m.address in self._busy or (bool(m.node_id) and m.node_id in self._serving)

    def _follow_up(self, address: str, out: ExchangeOutcome) -> None:
        """After an exchange with ``address``: the one push owed to it, if any."""
        if address not in self._again:
            return
        self._again.discard(address)
        m = self.membership.members.get(address)
        if self._closed or m is None or m.state is not MemberState.ALIVE:
            return
        if out.status in _NO_CONTACT and out.peer_id is None:
            return  # unreachable now: the rounds retry it, a push would only wait again
        self._spawn(self.sync_with(address), "syncfw-mesh-repush")

    async def _confirm(self, address: str, reason: str) -> None:
        """This node failed to reach ``address``: ask others before it counts (ping-req)."""
        m = self.membership.members.get(address)
        if m is None:
            return
        helpers: list[Member] = []
        if m.state is not MemberState.DEAD and self.config.indirect_probes:
            helpers = self.membership.helpers(address, self.config.indirect_probes, self._rng)
        answers: list[ProbeAnswer] = []
        if helpers:
            answers = list(
                await asyncio.gather(
                    *(
                        self.network.probe(
                            h.address,
                            source=self.address,
                            target=address,
                            timeout_s=2 * self.config.probe_timeout_s,
                        )
                        for h in helpers
                    )
                )
            )
        now = time.monotonic()
        vouching = [a.node_id or "?" for a in answers if a.reachable]
        if vouching:
            log.debug(
                "%s: %s unreachable from here (%s), but %s reached it",
                self.replica.node_id,
                address,
                reason,
                ", ".join(vouching),
            )
            self.membership.vouched(address, now)
        else:
            self.membership.failed(address, now)
        self._changed()

    def _changed(self) -> None:
        """After any change of the member table: handle its transitions, set the gauges."""
        for t in self.membership.drain():
            m = t.member
            self.metrics.peer_transitions.labels(self.metrics.node_id, t.new.value).inc()
            who = m.node_id or "?"
            if t.new is MemberState.DEAD:
                log.info("%s: peer %s at %s is dead", self.replica.node_id, who, m.address)
                # drop its pooled channel (and grpc's reconnect backoff) until it is back
                self._spawn(self.network.forget(m.address), "syncfw-mesh-forget")
            elif t.new is MemberState.SUSPECT:
                log.info("%s: peer %s at %s is suspect", self.replica.node_id, who, m.address)
            elif t.old is MemberState.DEAD:
                log.info("%s: peer %s at %s is back", self.replica.node_id, who, m.address)
        self._publish_members()

    async def _serve_probe(self, target: str, timeout_s: float) -> ProbeAnswer:
        """Answer a probe: at once for a direct one; for an indirect one, probe ``target``."""
        me = self.replica.node_id
        if not target:
            return ProbeAnswer(True, me)
        m = self.membership.members.get(target)
        if m is None:
            return ProbeAnswer(False, me, "not a member here")
        if self._probes_served >= _MAX_SERVED_PROBES:
            return ProbeAnswer(False, me, "too many probes at once")
        limit = self.config.probe_timeout_s
        limit = min(limit, timeout_s) if timeout_s > 0 else limit
        self._probes_served += 1
        try:
            got = await self.network.probe(target, source=self.address, timeout_s=limit)
        finally:
            self._probes_served -= 1
        if got.reachable:
            self.membership.heard(target, got.node_id or None, time.monotonic())
            self._changed()
        else:
            m.recheck = True  # this node failed to reach it too: its own probe next round
        return ProbeAnswer(got.reachable, me, clip_text(got.reason))

    async def _dial(self, address: str) -> FrameStream:
        """Open a stream to ``address`` within ``connect_timeout_s``.

        Raises:
            LinkError: ``UNAVAILABLE`` if it cannot be reached in time.
        """
        limit = self.config.connect_timeout_s
        try:
            async with asyncio.timeout(limit):
                # timeout_s is the stream's own deadline: the whole exchange's cap
                # (the runner cuts one that stops progressing, after exchange_timeout_s)
                m = self.membership.members.get(address)
                return await self.network.connect(
                    address,
                    source=self.address,
                    timeout_s=self.config.max_exchange_s,
                    # a member heard from is dialed as the node it said it was (mTLS SAN)
                    expect_id=(m.node_id or None) if m is not None else None,
                )
        except TimeoutError:
            raise LinkError(Status.UNAVAILABLE, f"{address}: no connection in {limit}s") from None

    def _gossip_list(self) -> tuple[PeerInfo, ...]:
        self._exchanges += 1
        if self._exchanges % self.config.gossip_peers_every:
            return ()
        return self.membership.gossip()

    def _budget(self, address: str) -> SendBudget | None:
        rate = self.config.peer_bytes_per_s
        if rate is None:
            return None
        b = self._budgets.get(address)
        if b is None:
            b = self._budgets[address] = TokenBucket(rate, self.config.peer_burst_bytes)
        return b

    def _learn(self, peers: tuple[PeerInfo, ...], source: str = "") -> None:
        # the session hands over a Peers frame only once the peer's Hello was accepted
        got = self.membership.learn(peers, time.monotonic())
        self.guard.learned(got, source, len(self.membership.members))
        self._changed()

    async def _record(self, address: str, out: ExchangeOutcome) -> None:
        now = time.monotonic()
        if out.ok:
            got = self.membership.succeeded(address, out.peer_id, now)
            if got is not None:
                self.guard.learned(got, address, len(self.membership.members))
        elif out.peer_id is not None or out.status not in _NO_CONTACT:
            self.membership.heard(address, out.peer_id, now)  # it answered: alive
        elif address in self.membership.members:
            self._probing.add(address)
            try:
                await self._confirm(address, out.reason)
            finally:
                self._probing.discard(address)
        self._changed()
        await self._note_peer(out)

    @property
    def serve_budget(self) -> TokenBucket | None:
        """The bucket what this node sends while serving is charged to (None: no budget).

        The caller is not known before its Hello, so everything served (sync
        frames, and artifact chunks at bulk priority) shares one bucket of the
        per-peer rate.
        """
        if self.config.peer_bytes_per_s is not None and self._serve_budget is None:
            self._serve_budget = TokenBucket(
                self.config.peer_bytes_per_s, self.config.peer_burst_bytes
            )
        return self._serve_budget

    async def _serve(self, stream: FrameStream) -> None:
        budget = self.serve_budget
        named: list[str] = []

        def name(peer_id: str) -> None:
            if not named and peer_id:
                named.append(peer_id)
                self._serving[peer_id] = self._serving.get(peer_id, 0) + 1

        if stream.peer_identity:
            name(stream.peer_identity)

        def on_peers(peers: tuple[PeerInfo, ...]) -> None:
            if peers:  # a member list starts with its sender
                name(peers[0].node_id)
            self._learn(peers, source=stream.peer_address)

        try:
            out = await run_exchange(
                self.replica,
                stream,
                config=self.config.session,
                peers=self._gossip_list(),
                budget=budget,
                on_peers=on_peers,
                timeout_s=self.config.exchange_timeout_s,
                metrics=self.metrics,
            )
        finally:
            for peer_id in named:
                left = self._serving.pop(peer_id, 1) - 1
                if left > 0:
                    self._serving[peer_id] = left
        if out.peer_id:
            for m in list(self.membership.members.values()):
                if m.node_id == out.peer_id:
                    if out.ok:  # a peer that dialed us is connected: push to it too
                        self.membership.succeeded(m.address, out.peer_id, time.monotonic())
                    else:
                        self.membership.heard(m.address, out.peer_id, time.monotonic())
                    if not self._busy & {m.address}:
                        self._follow_up(m.address, out)
            self._changed()
        await self._note_peer(out)

    def _publish_members(self) -> None:
        """Set the peer gauges from the member table; drop series of ids no longer in it."""
        counts: dict[str, int] = {}
        ids: set[str] = set()
        for m in self.membership.members.values():
            counts[m.state.value] = counts.get(m.state.value, 0) + 1
            if m.node_id:
                ids.add(m.node_id)
        if counts == self._published and ids >= self._labelled:
            return  # every exchange's end lands here; the gauges already say this
        self._published = counts
        self.metrics.set_peers(counts, _STATES)
        self.metrics.set_members(len(self.membership.members))
        for gone in self._labelled - ids:
            self.metrics.forget_peer(gone)
        self._labelled &= ids

    async def _note_peer(self, out: ExchangeOutcome) -> None:
        """After an exchange: the peer's clock offset and lag (health signals)."""
        peer = out.peer_id
        if peer is None:
            return
        offset = out.peer_clock_offset_ms
        clock = out.peer_clock  # warn only beyond the limit plus the uncertainty
        if offset is not None and clock is not None and clock.exceeds(self.config.clock_warn_ms):
            log.warning(
                "%s: clock of peer %s is %+d ms off ours (uncertainty %.0f ms)",
                self.replica.node_id,
                peer,
                offset,
                clock.uncertainty_ms,
            )
        if not any(m.node_id == peer for m in self.membership.members.values()):
            # per-peer series stay bounded by the member table; it learns the
            # peer from the peer's own gossip, and the next exchange records it
            if peer not in self._warned and len(self._warned) < _UNLABELLED_WARNINGS:
                self._warned.add(peer)
                log.warning(
                    "%s: peer %s is not a member yet: its lag and clock offset are not recorded",
                    self.replica.node_id,
                    peer,
                )
            return
        self._labelled.add(peer)
        if offset is not None:
            self.metrics.set_clock_offset(PEER_SOURCE + peer, offset)
        try:
            lag = lag_ops(await self.replica.version_vector(), await self.replica.peer_ack(peer))
        except SyncfwError as exc:  # a closing store: the lag is unknown, not zero
            log.warning("%s: lag of peer %s not measured: %s", self.replica.node_id, peer, exc)
            return
        self.metrics.set_peer_lag(peer, lag)

    def _interval(self) -> float:
        j = self.config.jitter
        return self.config.interval_s * self._rng.uniform(1 - j, 1 + j)

    async def _loop(self) -> None:
        """Gossip rounds every jittered interval, never waiting on them; suspects to dead on time."""
        next_round = time.monotonic() + self._interval()
        while not self._closed:
            due = self.membership.next_due()
            wake = next_round if due is None else min(next_round, due)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            try:
                if now >= next_round:
                    next_round = now + self._interval()
                    self.start_round()
                else:  # a suspect is due: declare it dead now, not at the next round
                    self.membership.tick(now)
                    self._changed()
            except SyncfwError:
                log.exception("gossip round failed on %s", self.replica.node_id)

    async def _pusher(self) -> None:
        """Eager pushes, as soon as local writes land (beside the rounds, not behind them)."""
        while not self._closed:
            await self._poke.wait()
            await asyncio.sleep(self.config.push_debounce_s)  # let a burst of writes batch up
            self._poke.clear()
            try:
                self.start_push()
            except SyncfwError:
                log.exception("eager push failed on %s", self.replica.node_id)

    async def _watch(self, changes: Callable[[], AsyncIterator[Any]]) -> None:
        while not self._closed:
            try:
                async for change in changes():
                    if getattr(change, "local", True):
                        self.poke()
            except SyncfwError as exc:  # e.g. the feed lagged: resubscribe
                log.info("change feed of %s restarted: %s", self.replica.node_id, exc)
                continue
            return

    # -- figures (read back from the registry: what /metrics shows) ---------------

    @property
    def outcomes(self) -> dict[str, int]:
        """Exchanges by how they ended (``{"OK": 3, "UNAVAILABLE": 1}``)."""
        got = self.metrics.by_label("syncfw_exchanges_total", "outcome")
        return {k: int(v) for k, v in sorted(got.items()) if v}

    @property
    def ops_sent(self) -> int:
        """Ops sent to peers in exchanges."""
        return int(self.metrics.value("syncfw_exchange_ops_total", direction="sent"))

    @property
    def ops_received(self) -> int:
        """Ops received from peers in exchanges."""
        return int(self.metrics.value("syncfw_exchange_ops_total", direction="received"))

    @property
    def clock_offsets_ms(self) -> dict[str, int]:
        """Each member's clock offset against ours at its last hello, by node id."""
        got = self.metrics.by_label("syncfw_clock_offset_ms", "source")
        n = len(PEER_SOURCE)
        return {k[n:]: int(v) for k, v in sorted(got.items()) if k.startswith(PEER_SOURCE)}

    @property
    def lag_ops(self) -> dict[str, int]:
        """Each member's lag in ops as of the last exchange with it, by node id."""
        got = self.metrics.by_label("syncfw_peer_lag_ops", "peer")
        return {k: int(v) for k, v in sorted(got.items())}

    def status(self) -> dict[str, Any]:
        """Mesh state for ``Node.status()``; its figures come from the node's registry."""
        peers = self.metrics.by_label("syncfw_peers", "state")
        return {
            "address": self.address,
            "heartbeat": self.membership.heartbeat,
            "rounds": self.rounds,
            "members": self.membership.snapshot(),
            "peers": {state: int(peers.get(state, 0)) for state in _STATES},
            "outcomes": self.outcomes,
            "ops_sent": self.ops_sent,
            "ops_received": self.ops_received,
            "clock_offsets_ms": self.clock_offsets_ms,
            "lag_ops": self.lag_ops,
            "gossip": self.guard.status(),
        }

    def members(self) -> list[Member]:
        """Known members."""
        return list(self.membership.members.values())

    async def aclose(self) -> None:
        """Stop gossiping, stop serving, release connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *self._spawned]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # the table as the rounds left it (a save they had started was cancelled with
        # them; MemberFile.save warns rather than raises, so close goes on regardless)
        await self.save_members()
        if self.listener is not None:
            await self.listener.aclose()
        await self.network.aclose()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _wall_ms() -> int:
    return int(time.time() * 1000)
