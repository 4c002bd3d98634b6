"""The gossip scheduler: rounds with jitter and fanout, eager push, serving peers.

Invariants:

1. At most one exchange at a time is dialed to a given peer; a round skips a
   peer already being synced.
2. A failing peer never stops the mesh: every exchange's outcome is recorded in
   :class:`Membership` and logged, and the loop goes on.
3. Randomness comes from one seeded :class:`random.Random`; the loop's timing
   from the event loop, so tests drive rounds with :meth:`Mesh.round` and never
   wait on wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from syncfw.errors import SyncfwError
from syncfw.log import Replica
from syncfw.mesh.budget import TokenBucket
from syncfw.mesh.config import MeshConfig
from syncfw.mesh.membership import Member, Membership, MemberState
from syncfw.sync.frames import PeerInfo, Status
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.network import GrpcNetwork, Listener, Network
from syncfw.exchange import ExchangeOutcome, SendBudget, run_exchange

__all__ = ["Mesh"]

log = logging.getLogger("syncfw.mesh")


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
    ) -> None:
        self.replica = replica
        self.network = network
        self.listener = listener
        self.membership = membership
        self.config = config
        self._rng = rng
        self._busy: set[str] = set()
        self._budgets: dict[str, TokenBucket] = {}
        self._serve_budget: TokenBucket | None = None
        self._repush: set[str] = set()
        self._spawned: set[asyncio.Task[ExchangeOutcome]] = set()
        self._poke = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._exchanges = 0
        self.rounds = 0
        self.outcomes: dict[str, int] = {}
        self.ops_sent = 0
        self.ops_received = 0
        self.clock_offsets_ms: dict[str, int] = {}

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

        Returns:
            The running mesh.

        Raises:
            LinkError: ``listen`` cannot be bound.
        """
        cfg = config or MeshConfig.lan()
        net = network or GrpcNetwork()
        mesh = cls(replica, net, None, Membership(replica.node_id, ""), cfg, random.Random(seed))
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
        )
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
        self.rounds += 1
        chosen = [
            m
            for m in self.membership.pick(self.config.fanout, self._rng, now)
            if m.address not in self._busy
        ]
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
                stream = await self.network.connect(
                    address, source=self.address, timeout_s=self.config.exchange_timeout_s
                )
            except LinkError as exc:
                out = ExchangeOutcome(exc.status, exc.reason)
            else:
                out = await run_exchange(
                    self.replica,
                    stream,
                    config=self.config.session,
                    peers=self._gossip_list(),
                    budget=self._budget(address),
                    on_peers=self._learn,
                    timeout_s=self.config.exchange_timeout_s,
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

    def _learn(self, peers: tuple[PeerInfo, ...]) -> None:
        for m in self.membership.merge(peers, time.monotonic()):
            log.info("%s learned of %s at %s", self.replica.node_id, m.node_id, m.address)

    async def _record(self, address: str, out: ExchangeOutcome) -> None:
        now = time.monotonic()
        self._note_clock(out)
        self.outcomes[out.status.name] = self.outcomes.get(out.status.name, 0) + 1
        self.ops_sent += out.ops_sent
        self.ops_received += out.ops_received
        if out.ok:
            self.membership.succeeded(address, out.peer_id, now)
            return
        before = self.membership.members.get(address)
        was = before.state if before is not None else None
        state = self.membership.failed(address, now)
        if state is MemberState.DEAD and was is not MemberState.DEAD:
            log.info("%s: peer at %s is dead: %s", self.replica.node_id, address, out.reason)
            await self.network.forget(address)  # drop its pooled channel until it is back

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
            on_peers=self._learn,
            timeout_s=self.config.exchange_timeout_s,
        )
        self.outcomes[out.status.name] = self.outcomes.get(out.status.name, 0) + 1
        self.ops_received += out.ops_received
        self.ops_sent += out.ops_sent
        self._note_clock(out)
        if out.ok and out.peer_id:  # a peer that dialed us is connected: push to it too
            for m in self.membership.members.values():
                if m.node_id == out.peer_id:
                    self.membership.succeeded(m.address, out.peer_id, time.monotonic())

    def _note_clock(self, out: ExchangeOutcome) -> None:
        """Keep each peer's clock offset (a health signal) and warn when it is large."""
        if out.peer_id is None or out.peer_clock_offset_ms is None:
            return
        self.clock_offsets_ms[out.peer_id] = out.peer_clock_offset_ms
        if abs(out.peer_clock_offset_ms) > self.config.clock_warn_ms:
            log.warning(
                "%s: clock of peer %s is %+d ms off ours",
                self.replica.node_id,
                out.peer_id,
                out.peer_clock_offset_ms,
            )

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

    def status(self) -> dict[str, Any]:
        """Mesh state for ``Node.status()``."""
        return {
            "address": self.address,
            "heartbeat": self.membership.heartbeat,
            "rounds": self.rounds,
            "members": self.membership.snapshot(),
            "outcomes": dict(self.outcomes),
            "ops_sent": self.ops_sent,
            "ops_received": self.ops_received,
            "clock_offsets_ms": dict(self.clock_offsets_ms),
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
