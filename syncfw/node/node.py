"""The edge composition root: :class:`Node` wires the store, zones, mesh and metrics together.

A node keeps working alone: every write lands in its own SQLite file, stamped
by its hybrid logical clock, checked against its zones, and becomes an op any
other replica can merge (:meth:`Node.ops_since` / :meth:`Node.apply_remote`,
which the sync protocol uses and which work without any network too).

A node owns one :class:`~syncfw.metrics.NodeMetrics` (``node.metrics``): the
store, the mesh, every exchange and an attached inference engine record into
it; ``/metrics`` (:meth:`Node.serve_metrics`) and :meth:`Node.status` read it.

May import: everything below it (mesh, exchange, transport, store, sync,
codec, zones, keys, log, crdt, clock, metrics, errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pycrdt

from syncfw.clock import ClockState, ClockWatch, NtpResult, check_ntp, wall_ms
from syncfw.crdt.lww import TOMBSTONE
from syncfw.errors import ClockError, NotAuthorityError, ZoneOwnershipError
from syncfw.keyfiles import NodeKeys
from syncfw.log import ApplyResult, Op, VersionVector, decode_value, encode_value
from syncfw.mesh import MemberFile, Mesh, MeshConfig
from syncfw.metrics import HLC_AHEAD_SOURCE, NTP_SOURCE, MetricsServer, NodeMetrics, serve_metrics
from syncfw.node.docs import DocUpdates, LiveDocs
from syncfw.node.handles import Counter, ORSet, Register
from syncfw.node.opening import Opening
from syncfw.store import ChangeFeed, Store, StoreConfig
from syncfw.store.follow import Follow
from syncfw.sync.snapshot import DEFAULT_MAX_SNAPSHOT_BYTES, Snapshot
from syncfw.transport.network import GrpcNetwork, Network
from syncfw.transport.rpc import TlsConfig, TransportConfig
from syncfw.trust import STATEMENT_KIND_OF
from syncfw.zones import GRANT_KIND, SYS_PREFIX, Fleet, ZoneTable

__all__ = ["Node"]

log = logging.getLogger("syncfw.node")


class Node:
    """One edge node: a replica of the fleet's log with its own SQLite file.

    Open with ``await Node.open(...)`` or ``async with Node.open(...) as node``.
    It implements :class:`syncfw.log.Replica`.
    """

    def __init__(self, store: Store, metrics: NodeMetrics | None = None) -> None:
        self._store = store
        self.metrics: NodeMetrics = metrics if metrics is not None else NodeMetrics(store.node_id)
        """This node's registry (what ``/metrics`` serves and :meth:`status` reads)."""
        self._metrics_servers: list[MetricsServer] = []
        self._docs = LiveDocs(store)
        self._status_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        self._zone_cache: dict[str, tuple[str, int]] = {}
        self._zone_cache_for: ZoneTable | None = None
        self._meshes: list[Mesh] = []
        self._clock_watch = ClockWatch(store.clock.max_offset_ms)
        self._clock_task: asyncio.Task[None] | None = None
        store.add_listener(self._docs.on_applied)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        node_id: str,
        fleet: Fleet | None = None,
        config: StoreConfig | None = None,
        clock: Callable[[], int] = wall_ms,
        keys: NodeKeys | None = None,
    ) -> Opening:
        """Open the node stored at ``path`` (created if absent).

        Args:
            path: the node's SQLite file.
            node_id: this node's id; a file remembers the node it belongs to.
            fleet: the fleet bootstrap (authority and initial grants); every
                node of a fleet must be given the same one.
            config: storage tuning (durability, size cap, batching).
            clock: wall clock in milliseconds (injected by tests and the simulator).
            keys: this node's keys in a signed fleet (``syncfw keys add-node``,
                :func:`syncfw.keyfiles.load_node`): its chain heads are signed
                and its registration is published in its own zone at open. The
                fleet takes the authority key from them when it has none.

        Raises:
            ValueError: ``keys`` are for another node, fleet or authority key, or
                the fleet is signed and no ``keys`` were given.
            CorruptDatabaseError, ForeignDatabaseError, SchemaVersionError,
            StorageError: see :meth:`syncfw.store.Store.open`.
        """
        return Opening(cls, path, node_id, fleet or Fleet(), config, clock, keys)

    # ----------------------------------------------------------------- identity

    @property
    def node_id(self) -> str:
        return self._store.node_id

    @property
    def fleet(self) -> Fleet:
        return self._store.fleet

    @property
    def fleet_id(self) -> str:
        return self._store.fleet.fleet_id

    @property
    def fleet_digest(self) -> bytes:
        return self._store.fleet.bootstrap_digest()

    @property
    def store(self) -> Store:
        """The underlying store (for tools and tests)."""
        return self._store

    @property
    def zones(self) -> ZoneTable:
        """The zone table as of the last commit."""
        return self._store.zones

    def hlc_now(self) -> int:
        """A fresh hybrid timestamp."""
        return self._store.clock.now()

    def wall_ms(self) -> int:
        """This node's wall clock in ms (the injected one in tests and the simulator)."""
        return self._store.clock.wall()

    def writable(self, key: str) -> bool:
        """True if this node may write ``key`` now."""
        try:
            self._store.zones.zone_for_write(self.node_id, key)
        except ZoneOwnershipError:
            return False
        return True

    # ----------------------------------------------------------------- lww keys

    def _zone(self, key: str) -> tuple[str, int]:
        zones = self._store.zones
        if zones is not self._zone_cache_for or len(self._zone_cache) > 65_536:
            # The zone table is replaced whenever a grant lands: start afresh.
            self._zone_cache = {}
            self._zone_cache_for = zones
        hit = self._zone_cache.get(key)
        if hit is not None:
            return hit
        if not isinstance(key, str) or not key:
            raise ValueError("a key must be a non-empty string")
        hit = zones.zone_for_write(self.node_id, key)
        self._zone_cache[key] = hit
        return hit

    async def put(self, key: str, value: Any) -> Op:
        """Set ``key`` to ``value`` (last writer wins). Returns the op once durable.

        Raises:
            ValueEncodingError: ``value`` is not representable in msgpack.
            ValueTooLargeError: the encoded value is over
                ``StoreConfig.max_value_bytes`` (one op must fit in one sync
                batch), or the key over ``max_key_bytes``; nothing was written.
            ZoneOwnershipError: this node does not own ``key``'s zone.
            StorageFullError: the size cap or disk is full.
        """
        zone, epoch = self._zone(key)
        return await self._store.write("lww", key, zone, epoch, encode_value(value))

    async def put_many(self, items: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> list[Op]:
        """Set several keys in one group commit, in order; one await for all.

        All items are checked (zones, encoding) before any is written: either
        every write is queued or none is.

        Raises:
            ValueEncodingError, ValueTooLargeError, ZoneOwnershipError: an
                item is refused; nothing was written.
            StorageFullError: the size cap or disk is full.
        """
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        writes = [("lww", key, *self._zone(key), encode_value(value)) for key, value in pairs]
        for _, key, _, _, payload in writes:
            self._store.check_size(key, payload)
        results = await self._store.write_many(writes)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def delete(self, key: str) -> Op:
        """Delete ``key`` (a tombstone that wins like any later write)."""
        zone, epoch = self._zone(key)
        return await self._store.write("lww", key, zone, epoch, TOMBSTONE)

    async def get(self, key: str, default: Any = None) -> Any:
        """The current value of ``key``, or ``default`` when absent or deleted."""
        payload = await self._store.read_lww(key)
        return default if payload is None else decode_value(payload)

    async def scan(self, prefix: str) -> dict[str, Any]:
        """Every present key under ``prefix`` with its value."""
        return await self._store.scan_lww(prefix)

    # ----------------------------------------------------------------- other CRDTs

    def counter(self, key: str) -> Counter:
        """A PN-counter handle for ``key``."""
        return Counter(self, key)

    def set(self, key: str) -> ORSet:
        """An add-wins set handle for ``key``."""
        return ORSet(self, key)

    def register(self, key: str) -> Register:
        """A multi-value register handle for ``key``."""
        return Register(self, key)

    async def doc(self, key: str, *, readonly: bool = False) -> pycrdt.Doc[Any]:
        """The live Yjs document at ``key``; local edits become ops, remote ones arrive.

        Each node session edits with a fresh Yjs client id, as Yjs requires.
        Call :meth:`flush` to wait until local edits are durable.

        Raises:
            ZoneOwnershipError: this node cannot write ``key`` (pass
                ``readonly=True`` to follow a document someone else writes;
                local edits to it are then not recorded).
        """
        return await self._docs.open(key, None if readonly else self._zone(key))

    async def flush(self) -> None:
        """Wait until every local document edit made so far is durable.

        Raises:
            SyncfwError: the first error met storing an edit.
        """
        await self._docs.flush()

    async def apply_update(self, key: str, update: bytes) -> Op:
        """Store a Yjs update from a client (a browser) as one op, exactly as it came.

        The open live doc at ``key`` (if any) gets it when it commits, so the
        doc and the log never disagree, and the update is stored whole even
        when it waits on another client's edit not yet here. Returns the op
        once durable. Call it on the event loop; from another thread use
        ``asyncio.run_coroutine_threadsafe(node.apply_update(key, update), loop)``.

        Raises:
            DecodeError: not one well-formed Yjs **v1** update (truncated,
                garbage, an impossible count, bytes left over, or v2, which
                is refused: pycrdt cannot convert it).
            ValueTooLargeError: over ``StoreConfig.max_value_bytes`` (the
                largest op one sync batch carries).
            OpError: ``key`` holds another kind than a Yjs document.
            ZoneOwnershipError: this node cannot write ``key``.
        In every case nothing was written.
        """
        return await self._docs.apply_update(key, self._zone(key), update)

    async def doc_state(self, key: str, state_vector: bytes | None = None) -> bytes:
        """The Yjs document at ``key`` as one v1 update, read from the log.

        With a client's ``state_vector`` (``Y.encodeStateVector``), only what
        that client lacks; without, the whole document. Both include updates
        still waiting on their dependencies, which a live doc leaves out.

        Raises:
            DecodeError: ``state_vector`` is not a Yjs state vector.
        """
        return await self._docs.state(key, state_vector)

    def doc_updates(self, key: str) -> DocUpdates:
        """The updates committed to the document at ``key`` from now on (local and
        remote, in commit order), to push to browsers: ``async for update in ...``.

        A consumer that falls far behind gets one update holding the whole
        document instead of its backlog (see :class:`~syncfw.node.docs.DocUpdates`).
        """
        return self._docs.follow(key)

    # ----------------------------------------------------------------- zones

    async def grant(self, prefix: str, *owners: str) -> Op:
        """Grant ``prefix`` to ``owners`` at the next epoch (the fleet authority only).

        A transfer (a dead truck's zone handed to its replacement) is a grant
        with the new owner: the epoch rises and later writes by the old owner
        under the old epoch are still judged by the old grant.

        Raises:
            NotAuthorityError: this node is not the fleet authority.
        """
        if self.node_id != self.fleet.authority:
            raise NotAuthorityError(
                f"node {self.node_id!r} is not the fleet authority {self.fleet.authority!r}"
            )
        if not owners:
            raise ValueError("a grant needs at least one owner ('*' for a shared zone)")
        if not prefix or prefix.startswith(SYS_PREFIX):
            raise ValueError(f"cannot grant {prefix!r}")

        def payload(zones: ZoneTable) -> bytes:
            latest = zones.latest(prefix)
            epoch = 1 if latest is None else latest.epoch + 1
            return encode_value({"prefix": prefix, "owners": sorted(owners), "epoch": epoch})

        return await self._store.write(GRANT_KIND, ZoneTable.grant_key(prefix), SYS_PREFIX, 0, payload)

    # ----------------------------------------------------------------- Replica

    async def version_vector(self) -> VersionVector:
        return self._store.version_vector

    async def ops_since(
        self, vv: Mapping[str, int], *, limit: int = 10_000, max_bytes: int | None = None
    ) -> list[Op]:
        return await self._store.ops_since(vv, limit=limit, max_bytes=max_bytes)

    async def apply_remote(self, ops: Sequence[Op]) -> ApplyResult:
        return await self._store.apply_remote(ops)

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        await self._store.acknowledge(peer, vv)

    def compacted(self) -> dict[str, int]:
        """Each compacted origin's compaction point (a peer below it gets a snapshot)."""
        return self._store.compacted()

    async def snapshot(self, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES) -> Snapshot:
        """This node's state and the vector it stands for (:mod:`syncfw.sync.snapshot`).

        Raises:
            SnapshotTooLargeError: the state exceeds ``max_bytes`` (nothing read).
        """
        return await self._store.snapshot(max_bytes=max_bytes)

    async def install_snapshot(self, snap: Snapshot, *, source: str) -> None:
        """Join a peer's snapshot (the performer calls it; see ``Store.install_snapshot``)."""
        await self._store.install_snapshot(snap, source=source)
        self._docs.on_snapshot([(k, d) for kind, k, _, _, d in snap.states if kind == "ydoc"])

    async def peer_ack(self, peer: str) -> VersionVector:
        return self._store.peer_ack(peer)

    # ----------------------------------------------------------------- mesh

    async def serve(
        self,
        listen: str | None = "127.0.0.1:0",
        peers: Sequence[str] = (),
        *,
        config: MeshConfig | None = None,
        advertise: str | None = None,
        tls: TlsConfig | None = None,
        transport: TransportConfig | None = None,
        network: Network | None = None,
        metrics: str | None = None,
    ) -> Mesh:
        """Join the fleet mesh: serve gRPC on ``listen`` and gossip with ``peers``.

        Anti-entropy runs every interval (jittered) with ``fanout`` live peers,
        fresh local writes are pushed eagerly to connected peers, and peers are
        learned from each other. The mesh is closed with the node.

        Args:
            listen: ``host:port`` to serve on (port 0: any free port), or None
                to only dial out.
            peers: seed addresses (``host:port``).
            config: mesh tunables; ``MeshConfig.lan()`` by default
                (``.metered_link()``, ``.test()`` are the other presets).
            advertise: the address other nodes should dial, if not ``listen``.
            tls: mutual TLS (the peer's node id comes from its certificate).
            transport: the gRPC server's and channels' settings (connection and
                exchange limits, the front door's rates, refusal holds):
                ``TransportConfig()`` by default; ``tls``, when given, replaces
                its ``tls``. The mesh config's dial timings apply over it.
            network: another transport (the in-memory one, in tests); then
                ``transport`` and ``tls`` are not used.
            metrics: ``host:port`` to serve ``/metrics`` on as well (see
                :meth:`serve_metrics`); None serves none.

        Returns:
            The running mesh (``mesh.address``, ``mesh.status()``). A node's
            meshes share its registry: exchange counters add up over them,
            and the peer gauges are those of the mesh whose table changed last.

        Raises:
            LinkError: ``listen`` cannot be bound.
            OSError: the metrics port cannot be bound (no mesh is left running).
        """
        config = config or MeshConfig.lan()
        base = transport or TransportConfig()
        if tls is not None:
            base = dataclasses.replace(base, tls=tls)
        server = self.serve_metrics(metrics) if metrics is not None else None
        try:
            mesh = await Mesh.start(
                self,
                listen=listen,
                advertise=advertise,
                seeds=list(peers),
                config=config,
                network=network
                or GrpcNetwork(config.transport(base), metrics=self.metrics),
                changes=self.changes,
                metrics=self.metrics,
                member_file=MemberFile(self._store.path),
            )
        except BaseException:
            if server is not None:
                self._metrics_servers.remove(server)
                await asyncio.to_thread(server.close)
            raise
        self._meshes.append(mesh)
        self.add_status_source("mesh" if len(self._meshes) == 1 else f"mesh{len(self._meshes)}", mesh.status)
        return mesh

    @property
    def metrics_servers(self) -> tuple[MetricsServer, ...]:
        """The running ``/metrics`` endpoints (``server.address``)."""
        return tuple(self._metrics_servers)

    def serve_metrics(self, address: str = "127.0.0.1:9109") -> MetricsServer:
        """Serve this node's registry at ``http://address/metrics`` until :meth:`close`.

        The server runs on its own thread; a mesh is not needed.

        Args:
            address: ``host:port`` (port 0: any free port; see ``.address``).

        Returns:
            The running server (``server.address`` is where it listens).

        Raises:
            ValueError: ``address`` is not ``host:port``.
            OSError: the port cannot be bound.
        """
        server = serve_metrics(self.metrics, address)
        self._metrics_servers.append(server)
        log.info("%s serves /metrics on %s", self.node_id, server.address)
        return server

    async def check_clock(
        self, servers: Sequence[str] = ("pool.ntp.org",), *, port: int = 123, timeout_s: float = 2.0
    ) -> NtpResult:
        """Measure this node's clock against NTP and record it as ``clock_offset_ms{source=ntp}``.

        Runs :func:`syncfw.clock.check_ntp` in a thread. The verdict (how far
        the hybrid clock's high-water mark is ahead of NTP-checked time) is
        ``clock_offset_ms{source=hlc_ahead}`` and ``status()["clock"]``, with a
        WARNING while it is past ``max_offset_ms`` (:meth:`watch_clock` checks
        periodically).

        Args:
            servers: NTP servers, tried in order until one answers.
            port: their UDP port.
            timeout_s: per-server timeout.

        Returns:
            The measurement (``offset_s`` positive: the server is ahead of us).

        Raises:
            ClockError: no server answered (the last recorded offset is kept).
        """
        self.add_status_source("clock", self._clock_watch.status)
        try:
            result = await asyncio.to_thread(check_ntp, servers, port=port, timeout_s=timeout_s)
        except ClockError as exc:
            self._clock_watch.failed(str(exc))
            log.warning("%s: clock not checked: %s", self.node_id, exc)
            raise
        self.metrics.set_clock_offset(NTP_SOURCE, result.offset_s * 1000.0)
        self._check_high_water(result, wall_ms())  # true time = the local clock + the offset
        return result

    def _check_high_water(self, result: NtpResult, local_ms: int) -> None:
        """Say loudly when the hybrid clock runs ahead of NTP-checked time.

        The clock never issues a timestamp below its persisted high-water mark
        (timestamps never move backwards), so after the wall clock ran ahead
        and was fixed, this node keeps stamping from the mark, and peers hold
        its writes as clock skew until true time catches up. The way out never
        moves timestamps back (:data:`syncfw.clock.WAY_OUT`; README, Operations).
        """
        before = self._clock_watch.report.state
        report = self._clock_watch.measured(result, self._store.clock.last, local_ms)
        self.metrics.set_clock_offset(HLC_AHEAD_SOURCE, report.ahead_ms)
        if report.state is ClockState.AHEAD:
            log.warning("%s: %s", self.node_id, report.reason)
        elif before is ClockState.AHEAD:
            log.warning("%s: the hybrid clock is no longer ahead: %s", self.node_id, report.reason)

    def watch_clock(
        self,
        servers: Sequence[str] = ("pool.ntp.org",),
        *,
        interval_s: float = 600.0,
        port: int = 123,
        timeout_s: float = 2.0,
    ) -> None:
        """Check the clock against NTP now and every ``interval_s`` until :meth:`close`.

        Each check is :meth:`check_clock`: a high-water mark far ahead is a
        WARNING on every check while it lasts, ``status()["clock"]`` (state
        ``ahead``, how far, the way out) and ``clock_offset_ms{source=hlc_ahead}``;
        a check that reaches no server is a WARNING and state ``unreachable``
        (the last measurement kept). Calling it again replaces the schedule.

        Args:
            servers: NTP servers, tried in order until one answers.
            interval_s: seconds between checks.
            port: their UDP port.
            timeout_s: per-server timeout.

        Raises:
            ValueError: ``interval_s`` is not positive.
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        if self._clock_task is not None:
            self._clock_task.cancel()
        self.add_status_source("clock", self._clock_watch.status)
        self._clock_task = asyncio.get_running_loop().create_task(
            self._watch_clock(tuple(servers), interval_s, port, timeout_s),
            name=f"syncfw-clock-{self.node_id}",
        )

    async def _watch_clock(
        self, servers: Sequence[str], interval_s: float, port: int, timeout_s: float
    ) -> None:
        while True:
            try:
                await self.check_clock(servers, port=port, timeout_s=timeout_s)
            except ClockError:
                pass  # check_clock warned and recorded it; the next check may reach one
            except Exception:  # a check must never end the schedule silently
                log.exception("%s: clock check failed", self.node_id)
            await asyncio.sleep(interval_s)

    # ----------------------------------------------------------------- feed, status, upkeep

    def changes(
        self, keys: Callable[[str], bool] | None = None, *, prefixes: Sequence[str] = ()
    ) -> ChangeFeed:
        """Every change applied from now on, local and remote, in commit order.

        The lossy live view: a change carries no value, and a subscriber that
        falls behind is dropped (:class:`ChangeFeedLagged`). To consume the
        log as a stream, use :meth:`follow`.

        Args:
            keys: only changes to keys it accepts (e.g. ``lambda k:
                k.startswith("models/")``), filtered as each commit lands, so a
                subscriber that wants a few keys pays nothing for the rest and
                never lags behind them.
            prefixes: only keys under one of these, checked first and in C: give
                them (with ``keys`` for any finer test) where the keys wanted
                share prefixes, as on an aggregator every op of the fleet passes.
        """
        return self._store.changes(keys, prefixes=prefixes)

    def follow(
        self,
        since: Mapping[str, int] | None = None,
        prefixes: Sequence[str] = (),
        *,
        include_rejected: bool = False,
        page_ops: int = 1000,
    ) -> Follow:
        """The log as a resumable stream: every op after ``since``, with its value.

        Reads the backlog from SQLite in pages, then tails new commits; a slow
        consumer is paged, never dropped. Persist ``feed.position`` (with
        the effect of what you processed) and pass it back as ``since`` to
        resume with no gap and no duplicate, across restarts of the consumer
        and of the node. Order: each origin's ops in seq order; across origins,
        by ``(hlc, origin, seq)`` within what is read at once (see
        :mod:`syncfw.store.follow`).

        Args:
            since: the version vector already processed (``{}``: from the start).
            prefixes: deliver only keys under one of these (all when empty);
                the others still advance the position.
            include_rejected: also deliver ops stored as rejected
                (``item.rejected`` is then true).
            page_ops: ops read from SQLite at once; what the feed holds at most.

        Returns:
            A :class:`~syncfw.store.follow.Follow`: ``async with`` it (or call
            ``aclose()``) and ``async for item in feed``. It ends when the node closes.

        Raises:
            FeedPositionError: ``since`` is ahead of this node (raised here), or
                below a compaction point (raised by the first read), naming
                ``missing={origin: (first, last)}``.
        """
        store = self._store
        return Follow(
            store,
            since,
            prefixes,
            include_rejected=include_rejected,
            page_ops=page_ops,
            closed=lambda: store.closed,
        )

    def add_status_source(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Include ``fn()`` under ``name`` in :meth:`status` (inference, mesh, ...)."""
        self._status_sources[name] = fn

    async def status(self) -> dict[str, Any]:
        """A snapshot of this node's health: clock, log, zones, and attached sources.

        Its figures come from :attr:`metrics`, as ``/metrics`` does: the
        ``"metrics"`` section holds every family (counters since this process
        opened the node, gauges as they are now); ``pending`` (ops held back)
        and ``file_bytes`` are the same gauges summed, ``pending_by_reason``
        the pending ops by reason (``gap``, ``epoch``, ``clock_skew``) and
        ``discarded`` the held-back ops dropped since open, by why. ``ops``, ``keys`` and
        ``rejected`` are what the file holds, across restarts.
        """
        st = await self._store.stats()
        figures = self.metrics.snapshot()
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "fleet_id": self.fleet_id,
            "hlc": self._store.clock.last,
            "version_vector": self._store.version_vector,
            "pending": sum(figures["ops_pending"].values()),
            "pending_by_reason": self._store.pending_counts(),
            "discarded": self._store.discarded(),
            "rejected": st.rejected,
            "ops": st.ops,
            "keys": st.keys,
            "file_bytes": figures["storage_bytes"],
            "clock_offset_ms": figures["clock_offset_ms"],
            "trust": self._trust_status(figures),
            "metrics": figures,
        }
        for name, fn in self._status_sources.items():
            try:
                out[name] = fn()
            except Exception as exc:  # a broken source must not hide the rest
                out[name] = {"error": str(exc)}
        return out

    async def publish(self, statement: bytes) -> Op:
        """Write an authority-signed statement (a registration or a revocation, as
        ``syncfw keys`` makes them) into the log, so every node learns it.

        The authority writes under ``sys/trust/``; any other node in its own zone
        (``fleet/<id>/keys/``): a statement proves itself wherever it travels.

        Raises:
            TrustError: the statement does not verify against the authority key.
            ValueError: the fleet is unsigned.
        """
        ring = self._store.keys
        if ring is None:
            raise ValueError(f"fleet {self.fleet_id!r} is unsigned: it has no authority key")
        kind = STATEMENT_KIND_OF[type(ring.open(statement))]
        digest = hashlib.sha256(statement).hexdigest()[:32]
        if self.node_id == self.fleet.authority:
            key = f"{SYS_PREFIX}trust/{digest}"
        else:
            key = f"fleet/{self.node_id}/keys/{digest}"
        zone, epoch = self._store.zones.zone_for_write(self.node_id, key)
        return await self._store.write(kind, key, zone, epoch, statement)

    def _trust_status(self, figures: Mapping[str, Any]) -> dict[str, Any]:
        store = self._store
        if store.keys is None:
            return {
                "mode": "unsigned",
                "warning": "UNSIGNED fleet: any peer that can sync can forge any node's ops",
            }
        return {
            "mode": "signed",
            "forks": dict(store.forks),
            "acks_ignored": figures.get("acks_ignored", 0),
        }

    async def state_digest(self) -> str:
        """Digest of the materialized state: equal on replicas holding the same ops."""
        return await self._store.state_digest()

    async def expire_telemetry(self, retention_ms: int) -> int:
        """Drop telemetry keys (``Fleet.telemetry`` zones) not written for ``retention_ms``."""
        return await self._store.expire(retention_ms)

    async def compact(self) -> int:
        """Drop ops every known peer acknowledged (their effect stays in state)."""
        return await self._store.compact()

    async def close(self) -> None:
        """Leave the mesh, stop serving metrics, wait for pending edits, close the store.

        Idempotent.
        """
        if self._clock_task is not None:
            self._clock_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock_task
            self._clock_task = None
        while self._meshes:
            await self._meshes.pop().aclose()
        while self._metrics_servers:  # shutdown() waits on the server's thread
            await asyncio.to_thread(self._metrics_servers.pop().close)
        await self._docs.settle()
        await self._store.aclose()

    aclose = close

    async def __aenter__(self) -> Node:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
