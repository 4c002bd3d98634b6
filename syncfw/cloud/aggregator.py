"""The cloud composition root: :class:`Aggregator`.

An aggregator is a syncfw node that peers with edges over the same gRPC
mesh, keeps the whole log (it never compacts), serves the change feed
(``syncfw.v1.Feed/Subscribe``) on its mesh port, and materializes the fleet
view (:mod:`syncfw.cloud.view`). One aggregator is the fleet authority and
holds its key; others may run beside it under ordinary node ids (keys from
``syncfw keys add-node``): they sync with it and with each other like any
nodes, build the same view from the same log, serve the same feed and share
export duty (:mod:`syncfw.cloud.export`), but write nothing only the
authority may (``sys/``, grants, registrations).

Invariants:

1. The view is rebuilt from the log at open (``follow({})``, rejected ops
   included) and then follows it live: the log is the only source of the
   log-derived figures; a restart rebuilds the same view.
2. The live figures (liveness, sync lag, clock offsets, forks, subscribers)
   are read every ``refresh_s`` from the mesh and the store, never from the
   network on a :meth:`Aggregator.view` call, so :meth:`view` is cheap and sync.
   A refresh reads only those: the member table, the peers' acknowledgements
   (their lag, on one read-only connection kept open), the clock-offset gauge
   alone and the store's counts; never the whole status or metrics registry
   (tens of milliseconds of the event loop a second with 64 edges).
3. The aggregator never calls ``compact``: it is the replica of record.
4. View updates are published as deltas to bounded per-listener queues
   (:meth:`Aggregator.updates`); a listener that falls a whole queue behind
   gets one ``{"reset": true}`` delta (re-read :meth:`view`), never unbounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from syncfw.clock import wall_ms
from syncfw.cloud.feed import FeedConfig, FeedServer
from syncfw.cloud.metrics import FleetMetrics
from syncfw.cloud.view import VIEW_VERSION, FleetView
from syncfw.keyfiles import NodeKeys, is_subscriber
from syncfw.mesh import Mesh, MeshConfig
from syncfw.metrics import PEER_SOURCE
from syncfw.models.service import ModelService, ServiceConfig
from syncfw.node import Node
from syncfw.node.admin import peer_lags
from syncfw.store import StoreConfig
from syncfw.store.follow import FeedItem, Follow
from syncfw.transport.network import GrpcNetwork, Network
from syncfw.transport.rpc import TlsConfig, TransportConfig
from syncfw.zones import Fleet

__all__ = ["Aggregator", "AggregatorConfig", "ViewUpdates"]

log = logging.getLogger("syncfw.cloud")

_FOLD_BATCH = 512  # feed items folded before a delta is published


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """Tunables of an aggregator (presets: the defaults, :meth:`test`).

    Attributes:
        mesh: the mesh tunables (``MeshConfig.lan()`` by default).
        feed: the served change feed's.
        store: the SQLite store's (None: the defaults).
        refresh_s: how often the live figures are read.
        updates_queue: deltas a view listener may fall behind before a reset.
        transport: the gRPC transport's base (TLS is filled in from the keys);
            an aggregator serves a whole fleet, so its quotas are larger than
            an edge's: 256 exchanges at once, 64 from one address, and up to
            256 connections from one address (edges behind one NAT share it;
            the front door's default of 32 would refuse the 33rd).
        models: the model side, started with the mesh
            (:class:`~syncfw.models.service.ModelService`, no model served
            here): the aggregator holds, serves and advertises release chunks
            like any node, and the authority's promotes and halts its fleet's
            rollouts from the nodes' reports. None: neither (a caller that runs
            its own rollout loop).
    """

    mesh: MeshConfig = field(default_factory=MeshConfig.lan)
    feed: FeedConfig = field(default_factory=FeedConfig)
    store: StoreConfig | None = None
    refresh_s: float = 1.0
    updates_queue: int = 256
    models: ServiceConfig | None = field(default_factory=ServiceConfig)
    transport: TransportConfig = field(
        default_factory=lambda: TransportConfig(
            max_concurrent_exchanges=256, max_exchanges_per_peer=64,
            max_connections_per_host=256,
        )
    )

    @classmethod
    def test(cls) -> AggregatorConfig:
        """Tests on one machine: fast rounds, quick refreshes and checkpoints."""
        return cls(mesh=MeshConfig.test(), feed=FeedConfig.test(), refresh_s=0.2)


class ViewUpdates:
    """A listener's deltas of the fleet view (async iterator; see invariant 4).

    Each delta is ``{"version": VIEW_VERSION, "seq": n, "nodes": {node: entry}}``
    with the entries that changed, or ``{"reset": True, "seq": n}``.
    """

    def __init__(self, owner: Aggregator, maxsize: int) -> None:
        self._owner = owner
        self._q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self.resets = 0

    def _put(self, delta: dict[str, Any]) -> None:
        try:
            self._q.put_nowait(delta)
        except asyncio.QueueFull:
            while not self._q.empty():
                self._q.get_nowait()
            self.resets += 1
            self._q.put_nowait({"reset": True, "seq": delta["seq"]})

    def __aiter__(self) -> ViewUpdates:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._q.get()

    def close(self) -> None:
        """Stop receiving deltas."""
        self._owner._listeners.discard(self)


class Aggregator:
    """The fleet's cloud node (see the module). Open with ``await Aggregator.open(...)``."""

    def __init__(self, node: Node, config: AggregatorConfig, keys: NodeKeys | None) -> None:
        self.node = node
        self.config = config
        self.keys = keys
        self.fleet_metrics = FleetMetrics(node.metrics)
        self.feed = FeedServer(node, config.feed, self.fleet_metrics)
        self.fleet = FleetView(node.node_id)
        self.mesh: Mesh | None = None
        self.models: ModelService | None = None  # started by serve() (AggregatorConfig.models)
        self._listeners: set[ViewUpdates] = set()
        self._seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._rebuilt = asyncio.Event()
        self._closed = False
        self._ro: aiosqlite.Connection | None = None  # the refresh's reads (invariant 2)
        self._models_seen = -1  # FleetView.models_changed when the rollout series were set
        self._ro_uri = Path(node.store.path).resolve().as_uri() + "?mode=ro"
        node.add_status_source("cloud", self._status)

    @classmethod
    async def open(
        cls,
        path: str | Path,
        keys: NodeKeys | None = None,
        *,
        fleet: Fleet | None = None,
        node_id: str | None = None,
        config: AggregatorConfig | None = None,
        clock: Callable[[], int] = wall_ms,
    ) -> Aggregator:
        """Open (or create) the aggregator's SQLite file and rebuild the view from it.

        Args:
            path: its SQLite file (the embedded default store).
            keys: its node's keys (``syncfw keys``; ``load_node(dir, node)``): the
                authority's for the fleet's authority aggregator, another
                node's for one beside it. None: an unsigned, development fleet.
            fleet: the fleet bootstrap (default: the one ``keys`` names).
            node_id: the aggregator's node id (default: the one ``keys`` name,
                else the fleet's authority).
            config: tunables.
            clock: wall clock in ms (tests).

        Raises:
            ValueError: ``node_id`` differs from the one ``keys`` name, or is a
                subscriber's id (``sub:...``), which never writes.
        """
        cfg = config or AggregatorConfig()
        if keys is not None:
            if node_id is not None and node_id != keys.node_id:
                raise ValueError(
                    f"these keys are node {keys.node_id!r}'s, not {node_id!r}'s"
                )
            fleet = fleet or Fleet(fleet_id=keys.fleet_id, authority=keys.authority)
        fleet = fleet or Fleet()
        nid = node_id or (keys.node_id if keys is not None else fleet.authority)
        if is_subscriber(nid):
            raise ValueError(f"{nid!r} names a feed subscriber, which never syncs: not an aggregator")
        node = await Node.open(path, node_id=nid, fleet=fleet, config=cfg.store, clock=clock,
                               keys=keys)
        agg = cls(node, cfg, keys)
        agg._tasks.append(asyncio.create_task(agg._follow(), name="syncfw-cloud-view"))
        agg._tasks.append(asyncio.create_task(agg._refresh_loop(), name="syncfw-cloud-live"))
        return agg

    # ------------------------------------------------------------------ serving

    def tls(self) -> TlsConfig | None:
        """Mutual TLS from its keys (None in an unsigned fleet)."""
        k = self.keys
        return None if k is None else TlsConfig(k.ca_pem, k.cert_pem, k.key_pem)

    async def serve(
        self,
        listen: str | None = "127.0.0.1:0",
        peers: Sequence[str] = (),
        *,
        advertise: str | None = None,
        tls: TlsConfig | None = None,
        network: Network | None = None,
        metrics: str | None = None,
    ) -> Mesh:
        """Join the mesh on ``listen`` and serve the change feed on the same port.

        Args:
            listen: ``host:port`` (port 0: any free one).
            peers: seed addresses.
            advertise: the address edges dial, if not ``listen``.
            tls: mutual TLS (default: from its keys).
            network: another transport (tests); it serves no feed unless it does itself.
            metrics: ``host:port`` for ``/metrics`` (node and fleet series).

        Raises:
            LinkError: ``listen`` cannot be bound.
        """
        mesh_cfg = self.config.mesh
        if network is None:
            base = dataclasses.replace(self.config.transport, tls=tls or self.tls())
            tcfg = mesh_cfg.transport(base)
            network = GrpcNetwork(tcfg, metrics=self.node.metrics, services=[self.feed.service()])
        self.mesh = await self.node.serve(
            listen, peers, config=mesh_cfg, advertise=advertise, network=network, metrics=metrics
        )
        if self.config.models is not None and self.models is None:
            self.models = await ModelService.start(self.node, self.mesh, self.config.models)
        return self.mesh

    @property
    def is_authority(self) -> bool:
        """Whether this aggregator is the fleet's authority (one per fleet)."""
        return self.node.node_id == self.node.fleet.authority

    @property
    def address(self) -> str | None:
        """Where the mesh and the feed listen."""
        return None if self.mesh is None else self.mesh.address

    # ------------------------------------------------------------------ the view

    def view(self) -> dict[str, Any]:
        """The fleet view as plain data (documented in the README, "Cloud aggregator")."""
        out = self.fleet.to_dict(self.node.wall_ms())
        out["rebuilt"] = self._rebuilt.is_set()
        return out

    def updates(self) -> ViewUpdates:
        """A new listener of view deltas (close it with ``.close()``)."""
        sub = ViewUpdates(self, self.config.updates_queue)
        self._listeners.add(sub)
        return sub

    async def wait_rebuilt(self) -> None:
        """Wait until the view folded the log as it was at open."""
        await self._rebuilt.wait()

    def _publish(self, changed: set[str]) -> None:
        if not changed:
            return
        self._seq += 1
        if self._listeners:  # a delta's entries cost a node_dict each: only when heard
            now = self.node.wall_ms()
            delta = {
                "version": VIEW_VERSION,
                "seq": self._seq,
                "nodes": {n: self.fleet.node_dict(n, now) for n in sorted(changed)},
            }
            for sub in list(self._listeners):
                sub._put(delta)
        if self.fleet.models_changed != self._models_seen:
            self._models_seen = self.fleet.models_changed
            self.fleet_metrics.set_rollout(self.fleet.rollout_counts())

    async def _follow(self) -> None:
        """Invariant 1: fold the whole log, then follow it.

        What the follower already read is folded without a wait
        (``take_ready``), at most ``_FOLD_BATCH`` items a delta. A read is
        never cancelled (a follower cut mid-read would leave its snapshot
        open): the next item is one pending future, waited on with a timeout.
        """
        target = dict(self.node.store.version_vector)
        pending: asyncio.Future[FeedItem] | None = None

        def folded(batch: list[FeedItem], feed: Follow) -> None:
            self._publish(self.fleet.fold(batch))
            if not self._rebuilt.is_set():
                pos = feed.position
                if all(pos.get(o, 0) >= s for o, s in target.items()):
                    self._rebuilt.set()

        try:
            page = self.feed.page_ops()  # many origins need a large page (FeedServer.page_ops)
            async with self.node.follow({}, include_rejected=True, page_ops=page) as feed:
                batch: list[FeedItem] = []
                while True:
                    if pending is None:  # (never beside a read in flight)
                        room = _FOLD_BATCH - len(batch)
                        got = feed.take_ready(room)
                        batch += got
                        if len(got) == room:  # a full delta, and maybe more ready
                            folded(batch, feed)
                            batch = []
                            continue
                        if batch:  # nothing more ready without a read
                            folded(batch, feed)
                            batch = []
                        pending = asyncio.ensure_future(feed.__anext__())
                    done, _ = await asyncio.wait({pending}, timeout=0.05)
                    if not done:
                        folded([], feed)
                        continue
                    fut, pending = pending, None
                    try:
                        batch.append(fut.result())
                    except StopAsyncIteration:
                        self._publish(self.fleet.fold(batch))
                        return
        except Exception:
            log.exception("the fleet view stopped following the log")
            raise
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    async def _lags(self) -> dict[str, tuple[int, float]]:
        """Each acknowledging peer's lag, ``(ops, seconds)`` (``peer_lags``, as status has it)."""
        node = self.node
        if self._ro is None:
            self._ro = await aiosqlite.connect(self._ro_uri, uri=True)
        acks = await node.store.peer_acks()
        return await peer_lags(self._ro, dict(node.store.version_vector), acks, node.wall_ms())

    def _peer_clock_offsets(self) -> dict[str, float]:
        """Peers' clock offsets, read from the one gauge (not the whole registry)."""
        out: dict[str, float] = {}
        me = self.node.node_id
        for family in self.node.metrics.clock_offset_ms.collect():
            for sample in family.samples:
                source = sample.labels.get("source", "")
                if sample.labels.get("node") == me and source.startswith(PEER_SOURCE):
                    out[source[len(PEER_SOURCE) :]] = sample.value
        return out

    async def refresh(self) -> None:
        """Read the live figures now (invariant 2) and publish what changed."""
        node = self.node
        lags = await self._lags()
        offsets = self._peer_clock_offsets()
        max_off = node.store.clock.max_offset_ms
        mono = time.monotonic()
        nodes: dict[str, Any] = {}

        def entry(nid: str, state: str, address: str | None, ago: float | None) -> None:
            lag = lags.get(nid)
            off = offsets.get(nid)
            nodes[nid] = {
                "state": state,
                "address": address,
                "last_contact_ago_s": ago,
                "lag_ops": None if lag is None else lag[0],
                "lag_s": None if lag is None else lag[1],
                "clock_offset_ms": off,
                "clock_skewed": off is not None and abs(off) > max_off,
            }

        for m in self.mesh.members() if self.mesh is not None else []:
            if m.node_id:
                ago = None if m.last_ok is None else round(mono - m.last_ok, 3)
                entry(m.node_id, m.state.value, m.address, ago)
        for peer in sorted(lags):
            if peer not in nodes:  # acknowledged once, not in the member table now
                entry(peer, "not a member", None, None)
        nodes[node.node_id] = {"state": "self", "address": self.address}
        live = {
            "nodes": nodes,
            "forks": {o: s for o, s in node.store.forks.items()},
            "pending_by_reason": node.store.pending_counts(),
            "subscribers": {k: dict(v) for k, v in self.feed.subscribers.items()},
        }
        changed = self.fleet.set_live(live)
        by_state: dict[str, int] = {}
        for n in self.fleet.nodes:
            if n == node.node_id:
                continue
            state = nodes.get(n, {}).get("state", "not a member")
            by_state[state] = by_state.get(state, 0) + 1
        self.fleet_metrics.set_nodes(by_state)
        self._publish(changed)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # a failed read must not end the live view
                log.warning("fleet view: live figures not read: %s", exc)
            await asyncio.sleep(self.config.refresh_s)

    def _status(self) -> dict[str, Any]:
        v = self.view()
        return {
            "view_version": v["version"],
            "authority": self.is_authority,
            "nodes": v["totals"]["nodes"],
            "by_state": v["totals"]["by_state"],
            "ops_folded": v["ops_folded"],
            "rebuilt": v["rebuilt"],
            "subscribers": len(self.feed.subscribers),
        }

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Stop the view, leave the mesh, close the node. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.models is not None:
            await self.models.aclose()
        if self._ro is not None:
            with contextlib.suppress(Exception):
                await self._ro.close()
        await self.node.close()

    async def __aenter__(self) -> Aggregator:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

