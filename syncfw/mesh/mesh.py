"""The gossip scheduler: rounds with jitter and fanout, eager push, serving peers.

Invariants:

1. At most one exchange at a time is dialed to a given peer; a round skips a
   peer already being synced.
2. A failing peer never stops the mesh: every exchange's outcome is recorded in
   :class:`Membership` and logged, and the loop goes on.
3. Randomness comes from one seeded :class:`random.Random`; the loop's timing
   from the event loop, so tests drive rounds with :meth:`Mesh.round` and never
   wait on wall time.
4. The mesh's figures live in its node's :class:`~syncfw.metrics.NodeMetrics`
   and nowhere else: the exchanges record outcomes, bytes and ops; the mesh
   sets the peer gauges after every change of its member table, and each
   peer's lag and clock offset after every exchange with it. Per-peer series
   exist only for node ids in the member table, and go when they leave it.
   :meth:`Mesh.status` reads them back, so it and ``/metrics`` agree.
5. Dialing a peer takes at most ``config.connect_timeout_s``; the exchange
   that follows, at most ``config.exchange_timeout_s``.
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
from collections.abc import AsyncIterator, Callable
from typing import Any

from syncfw.errors import SyncfwError
from syncfw.exchange import ExchangeOutcome, SendBudget, run_exchange
from syncfw.log import Replica, VersionVector
from syncfw.mesh.budget import TokenBucket
from syncfw.mesh.config import MeshConfig
from syncfw.mesh.guard import GossipGuard
from syncfw.mesh.membership import Member, Membership, MemberState
from syncfw.metrics import PEER_SOURCE, NodeMetrics
from syncfw.sync.frames import PeerInfo, Status
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.network import GrpcNetwork, Listener, Network

__all__ = ["Mesh", "lag_ops"]

log = logging.getLogger("syncfw.mesh")

_STATES = tuple(s.value for s in MemberState)
_UNLABELLED_WARNINGS = 256  # distinct non-member peer ids warned about, at most


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
        self._busy: set[str] = set()
        self._budgets: dict[str, TokenBucket] = {}
        self._serve_budget: TokenBucket | None = None
        self._repush: set[str] = set()
        self._spawned: set[asyncio.Task[ExchangeOutcome]] = set()
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._exchanges = 0
        self._labelled: set[str] = set()  # peer ids with per-peer series
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

        Returns:
            The running mesh.

        Raises:
            LinkError: ``listen`` cannot be bound.
        """
        cfg = config or MeshConfig.lan()
        net = network or GrpcNetwork()
        mesh = cls(
            replica, net, None, Membership(replica.node_id, ""), cfg, random.Random(seed), metrics
        )
        listener = await net.serve(listen, mesh._serve) if listen is not None else None
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
        """One gossip round now: exchange with ``fanout`` random live peers."""
        now = time.monotonic()
        self.membership.beat()
        self.membership.tick(now)
        self._publish_members()
        self.rounds += 1
        choice = self.guard.choose(self.membership, self.config.fanout, self._rng, now)
        chosen = [m for m in choice.chosen if m.address not in self._busy]
        return list(await asyncio.gather(*(self.sync_with(m.address) for m in chosen)))

    async def push(self) -> list[ExchangeOutcome]:
        """Eager push: exchange now with the live peers synced with before.

        At most ``push_fanout`` of them, the most recently synced first. A peer
        already mid-exchange is pushed to again as soon as that exchange ends
        (its summary may predate the write).
        """
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
        targets = []
        for m in connected:
            if m.address in self._busy:
                self._repush.add(m.address)
            else:
                targets.append(m)
        return list(await asyncio.gather(*(self.sync_with(m.address) for m in targets)))

    def poke(self) -> None:
        """Ask for an eager push soon (a local write landed)."""
        self._poke.set()

    async def sync_with(self, address: str) -> ExchangeOutcome:
        """Run one exchange with the peer at ``address`` and record how it went."""
        if address in self._busy:
            return ExchangeOutcome(Status.ABORTED, "already syncing with that peer")
        self._busy.add(address)
        try:
            try:
                stream = await self._dial(address)
            except LinkError as exc:
                out = ExchangeOutcome(exc.status, exc.reason)
            else:
                out = await run_exchange(
                    self.replica,
                    stream,
                    config=self.config.session,
                    peers=self._gossip_list(),
                    budget=self._budget(address),
                    on_peers=functools.partial(self._learn, source=address),
                    timeout_s=self.config.exchange_timeout_s,
                    metrics=self.metrics,
                )
            await self._record(address, out)
            return out
        finally:
            self._busy.discard(address)
            if address in self._repush and not self._closed:
                self._repush.discard(address)
                task = asyncio.create_task(self.sync_with(address), name="syncfw-mesh-repush")
                self._spawned.add(task)
                task.add_done_callback(self._spawned.discard)

    # -- internals ----------------------------------------------------------------

    async def _dial(self, address: str) -> FrameStream:
        """Open a stream to ``address`` within ``connect_timeout_s``.

        Raises:
            LinkError: ``UNAVAILABLE`` if it cannot be reached in time.
        """
        limit = self.config.connect_timeout_s
        try:
            async with asyncio.timeout(limit):
                # timeout_s is the stream's own deadline: the whole exchange's
                return await self.network.connect(
                    address, source=self.address, timeout_s=self.config.exchange_timeout_s
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
        self._publish_members()

    async def _record(self, address: str, out: ExchangeOutcome) -> None:
        now = time.monotonic()
        if out.ok:
            got = self.membership.succeeded(address, out.peer_id, now)
            if got is not None:
                self.guard.learned(got, address, len(self.membership.members))
        else:
            before = self.membership.members.get(address)
            was = before.state if before is not None else None
            state = self.membership.failed(address, now)
            if state is MemberState.DEAD and was is not MemberState.DEAD:
                log.info("%s: peer at %s is dead: %s", self.replica.node_id, address, out.reason)
                await self.network.forget(address)  # drop its pooled channel until it is back
        self._publish_members()
        await self._note_peer(out)

    async def _serve(self, stream: FrameStream) -> None:
        # the caller is not known before its Hello, so what this node sends while
        # serving shares one bucket of the per-peer rate
        if self.config.peer_bytes_per_s is not None and self._serve_budget is None:
            self._serve_budget = TokenBucket(
                self.config.peer_bytes_per_s, self.config.peer_burst_bytes
            )
        out = await run_exchange(
            self.replica,
            stream,
            config=self.config.session,
            peers=self._gossip_list(),
            budget=self._serve_budget,
            on_peers=functools.partial(self._learn, source=stream.peer_address),
            timeout_s=self.config.exchange_timeout_s,
            metrics=self.metrics,
        )
        if out.ok and out.peer_id:  # a peer that dialed us is connected: push to it too
            for m in self.membership.members.values():
                if m.node_id == out.peer_id:
                    self.membership.succeeded(m.address, out.peer_id, time.monotonic())
            self._publish_members()
        await self._note_peer(out)

    def _publish_members(self) -> None:
        """Set the peer gauges from the member table; drop series of ids no longer in it."""
        counts: dict[str, int] = {}
        ids: set[str] = set()
        for m in self.membership.members.values():
            counts[m.state.value] = counts.get(m.state.value, 0) + 1
            if m.node_id:
                ids.add(m.node_id)
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
        if offset is not None and abs(offset) > self.config.clock_warn_ms:
            log.warning(
                "%s: clock of peer %s is %+d ms off ours", self.replica.node_id, peer, offset
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
        """Gossip rounds, every jittered interval."""
        while not self._closed:
            await asyncio.sleep(self._interval())
            try:
                await self.round()
            except SyncfwError:
                log.exception("gossip round failed on %s", self.replica.node_id)

    async def _pusher(self) -> None:
        """Eager pushes, as soon as local writes land (beside the rounds, not behind them)."""
        while not self._closed:
            await self._poke.wait()
            await asyncio.sleep(self.config.push_debounce_s)  # let a burst of writes batch up
            self._poke.clear()
            try:
                await self.push()
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
        if self.listener is not None:
            await self.listener.aclose()
        await self.network.aclose()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
