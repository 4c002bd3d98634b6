"""Export every op of the log to a NATS JetStream stream: :class:`Exporter`.

The exporter follows its node's log (``node.follow()``, rejected ops
included) and publishes each op as one message (format:
:mod:`syncfw.cloud.export_subjects`; subject by zone, ``Nats-Msg-Id``
``origin:seq``). It is at-least-once, made exactly-once by JetStream's
duplicate window.

Invariants:

1. **Per-origin order.** An origin's op ``n + 1`` is published only after
   JetStream acknowledged op ``n`` (to this exporter, or to another, as the
   shared progress says), or in the same atomic batch after it. Where the
   stream allows atomic batch publish (:mod:`syncfw.cloud.export_batch`, the
   default on a stream created here), ops go in batches stored whole or not
   at all: up to ``batches_in_flight`` batches at once, each over origins no
   other in flight holds, the next batch of an origin's ops only once the
   previous is acknowledged. Otherwise ops go one by one, one per origin in
   flight. Either way the stream holds each origin's ops in seq order, even
   when a publish fails between two that succeed (a leader election).
2. **Nothing lost.** The durable cursor (:mod:`syncfw.cloud.export_cursor`,
   a version vector in the node's own SQLite file) and the shared progress
   move only after JetStream acknowledged; after any failure the exporter
   backs off and resumes from them, so an op is never passed over unpublished.
3. **No duplicate.** A re-publish (after a restart, a lost ack, an outage)
   carries the same message id and is dropped inside the stream's duplicate
   window (a batch holding any such id is refused whole, and its ops are then
   published one by one, each dropped or stored alone). Beyond it, an exporter never publishes an op the shared progress
   says is in the stream; that progress is a KV bucket in the same JetStream
   (``<stream>_progress``, one key per origin, moved forward only, by
   compare-and-set) written right after each acknowledged batch and read
   again at most ``progress_refresh_s`` before a publish. A duplicate past the
   window needs an exporter to die between JetStream's ack and its progress
   write, and no other exporter to take its origins over within the window.
4. **Split duty.** With several exporters (``ExportConfig.exporters``, node
   ids syncing with each other like any nodes), each origin is exported by
   the live exporter ranked first by a stable hash of ``(exporter,
   origin)`` (rendezvous hashing; liveness from the mesh: alive or suspect).
   When one dies its origins move to the others, each starting from the
   shared progress. Two exporters that both believe they own an origin
   (a split mesh) publish the same ids: invariant 3 still holds.
5. **Never silent.** NATS unavailable at start or dying mid-run: the status
   entry (``node.status()["export"]``) says so, a WARNING (at most one per
   reason per ``warn_every_s``), ``syncfw_export_connected`` 0, the lag in
   ops and seconds grows, and it retries with exponential backoff.

Metrics (the node's registry): ``syncfw_export_lag_ops{exporter}`` (the
fleet series' slot), ``syncfw_export_lag_seconds{exporter}`` (since it was
last caught up), ``syncfw_export_ops_total{exporter, outcome}`` (``stored``,
``duplicate``: dropped by the window, ``skipped``: already exported by
another), ``syncfw_export_failures_total{exporter, reason}``,
``syncfw_export_connected{exporter}``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import nats.js.errors
from nats.js import api
from prometheus_client import Counter, Gauge

from syncfw.cloud.export_batch import (
    DUPLICATE,
    NOT_ENABLED,
    TOO_LARGE,
    BatchRefused,
    can_write_frames,
    publish_batch,
)
from syncfw.cloud.export_cursor import CursorFile
from syncfw.cloud.export_subjects import op_message, subject_token
from syncfw.cloud.metrics import FleetMetrics
from syncfw.mesh import Mesh
from syncfw.node import Node
from syncfw.store.follow import FeedItem

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = ["ExportConfig", "ExportConfigError", "Exporter", "owner_of"]

log = logging.getLogger("syncfw.cloud.export")

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_ROUND_READ_S = 0.05  # the longest a started round waits on a read of more ops
_KV_PLAIN = re.compile(r"[A-Za-z0-9_-]+")


class ExportConfigError(ValueError):
    """The export settings, or the stream found on the servers, cannot work (names why)."""


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """Where and how to export (presets: the defaults, :meth:`test`).

    Attributes:
        servers: NATS URLs (``nats://host:port``); the client also learns the
            cluster's other servers from them.
        stream: the JetStream stream (created if absent, with ``replicas``
            and ``duplicate_window_s``); letters, digits, ``_`` and ``-``.
        subject_prefix: the subjects' first token(s): ``<prefix>.<fleet>.<zone...>``.
        replicas: the stream's and the progress bucket's replicas when
            created here (3 on a 3-server cluster).
        duplicate_window_s: the stream's duplicate window when created here.
        exporters: node ids sharing export duty (empty: this node alone).
        batch_ops: ops read from the log and exported per round.
        read_page_ops: ops the exporter's follower may hold read ahead (at
            least ``batch_ops``): with many origins interleaved in time, a
            page too small for several rounds drops and re-reads ops to merge
            them (each op read 2.7 times at 8,000 with 64 origins, once at 24,000).
        atomic_batch_ops: ops per JetStream atomic batch (at most the
            server's ``max_batch_size``, 1000 by default); 0: publish op by op
            even where the stream allows batches.
        batches_in_flight: atomic batches in flight at once, each over its own
            origins (a stream takes 50 at once from all its publishers).
        ack_timeout_s: how long a publish waits for JetStream's ack.
        progress_refresh_s: the shared progress read at most this long
            before a publish (well under the duplicate window).
        retry_initial_s, retry_max_s: backoff after a failure.
        warn_every_s: at most one WARNING per reason this often.
        include_rejected: also export ops the node holds as rejected
            (``Syncfw-Rejected: 1``), so the stream is the whole log.
        connect_timeout_s: one connection attempt.
    """

    servers: tuple[str, ...]
    stream: str = "SYNCFW"
    subject_prefix: str = "syncfw"
    replicas: int = 1
    duplicate_window_s: float = 120.0
    exporters: tuple[str, ...] = ()
    batch_ops: int = 8000
    read_page_ops: int = 24_000
    atomic_batch_ops: int = 1000
    batches_in_flight: int = 4
    ack_timeout_s: float = 5.0
    progress_refresh_s: float = 0.5
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    warn_every_s: float = 30.0
    include_rejected: bool = True
    connect_timeout_s: float = 2.0
    idle_check_s: float = 0.2

    def __post_init__(self) -> None:
        if not self.servers:
            raise ExportConfigError("export needs at least one NATS server URL")
        if not _NAME.fullmatch(self.stream):
            raise ExportConfigError(
                f"stream name {self.stream!r}: use letters, digits, '_' and '-' only"
            )
        if not self.subject_prefix or any(
            not t or t in ("*", ">") or not _NAME.fullmatch(t)
            for t in self.subject_prefix.split(".")
        ):
            raise ExportConfigError(
                f"subject prefix {self.subject_prefix!r}: dot-separated tokens of letters, "
                "digits, '_' and '-'"
            )
        if self.replicas < 1 or self.batch_ops < 1 or self.batches_in_flight < 1:
            raise ExportConfigError("replicas, batch_ops and batches_in_flight must be at least 1")
        if not 0 <= self.atomic_batch_ops <= 1000:
            raise ExportConfigError(
                "atomic_batch_ops: 0 (op by op) to 1000 (the most nats-server takes by default)"
            )

    @classmethod
    def test(cls, servers: Sequence[str], **changes: Any) -> ExportConfig:
        """Tests on one machine: short timeouts and backoff, frequent warnings."""
        base: dict[str, Any] = {
            "ack_timeout_s": 2.0,
            "retry_initial_s": 0.05,
            "retry_max_s": 0.5,
            "warn_every_s": 1.0,
            "connect_timeout_s": 1.0,
            "idle_check_s": 0.05,
        }
        base.update(changes)
        return cls(servers=tuple(servers), **base)

    @property
    def progress_bucket(self) -> str:
        return f"{self.stream}_progress"


def _rank(exporter: str, origin: str) -> bytes:
    return hashlib.sha256(f"{exporter}\x00{origin}".encode()).digest()


def owner_of(origin: str, exporters: Iterable[str]) -> str:
    """The exporter (of the live ones) that exports ``origin``: rendezvous hashing."""
    return max(exporters, key=lambda e: _rank(e, origin))


def _kv_key(origin: str) -> str:
    """A KV key for ``origin``: itself when plain, else ``=`` and its UTF-8 hex."""
    return origin if _KV_PLAIN.fullmatch(origin) else "=" + origin.encode().hex()


class ExportUnavailable(Exception):
    """A publish, an ack or a stream call failed: back off and resume (internal)."""


@dataclass(slots=True)
class _Progress:
    seq: int = 0
    revision: int | None = None  # the KV entry's revision (None: no key yet)
    read_at: float = -1e9


@dataclass(slots=True)
class _Stats:
    stored: int = 0
    duplicates: int = 0
    skipped: int = 0
    failures: int = 0
    batches: int = 0
    atomic_batches: int = 0
    batch_fallbacks: int = 0  # atomic batches refused for a duplicate, then sent op by op
    last_error: str | None = None
    last_error_at: float | None = None
    last_ack_at: float | None = None
    retry_in_s: float | None = None
    connects: int = 0
    disconnects: int = 0
    warned: dict[str, tuple[float, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Collectors:
    fleet: FleetMetrics
    lag_s: Gauge
    ops: Counter
    failures: Counter
    connected: Gauge


# One set per registry: an exporter restarted on the same node reuses them.
_COLLECTORS: weakref.WeakKeyDictionary[Any, _Collectors] = weakref.WeakKeyDictionary()


def _collectors(node: Node, fleet: FleetMetrics | None) -> _Collectors:
    r = node.metrics.registry
    have = _COLLECTORS.get(r)
    if have is not None:
        return have if fleet is None or fleet is have.fleet else dataclasses.replace(have, fleet=fleet)
    labels = ("node", "exporter")
    made = _Collectors(
        fleet=fleet or FleetMetrics(node.metrics),
        lag_s=Gauge(
            "syncfw_export_lag_seconds",
            "Seconds since the exporter last held no op unexported (0: caught up).",
            labels, registry=r,
        ),
        ops=Counter(
            "syncfw_export_ops", "Ops handed to JetStream, by outcome.",
            (*labels, "outcome"), registry=r,
        ),
        failures=Counter(
            "syncfw_export_failures", "Failed export attempts, by reason.",
            (*labels, "reason"), registry=r,
        ),
        connected=Gauge(
            "syncfw_export_connected", "1 while the exporter holds a NATS connection.",
            labels, registry=r,
        ),
    )
    _COLLECTORS[r] = made
    return made


class _Meters:
    def __init__(self, node: Node, fleet: FleetMetrics | None, name: str) -> None:
        c = _collectors(node, fleet)
        nid = node.node_id
        self.fleet = c.fleet
        self.name = name
        self.lag_s = c.lag_s.labels(nid, name)
        self.stored = c.ops.labels(nid, name, "stored")
        self.duplicate = c.ops.labels(nid, name, "duplicate")
        self.skipped = c.ops.labels(nid, name, "skipped")
        self._failures = c.failures
        self._failure_labels = (nid, name)
        self.connected = c.connected.labels(nid, name)
        self.connected.set(0)
        self.fleet.set_export_lag(name, 0)

    def failure(self, reason: str) -> None:
        self._failures.labels(*self._failure_labels, reason).inc()


class Exporter:
    """Exports a node's log to JetStream (see the module).

    Use ``async with Exporter(node, config, ...)`` (or :meth:`start` and
    :meth:`aclose`). For an aggregator: :meth:`for_aggregator`.

    Args:
        node: the node whose log is exported (an aggregator's node).
        config: where and how.
        fleet_metrics: the aggregator's fleet series (default: declared here
            in the node's registry).
        mesh: returns the node's mesh, for liveness of the other exporters.
        alive: overrides the liveness read from the mesh (the exporter ids
            believed alive; tests of a split mesh).
    """

    def __init__(
        self,
        node: Node,
        config: ExportConfig,
        *,
        fleet_metrics: FleetMetrics | None = None,
        mesh: Callable[[], Mesh | None] = lambda: None,
        alive: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.node = node
        self.config = config
        self.name = f"nats:{config.stream}"
        self.fleet_token = subject_token(node.store.fleet.fleet_id)
        self._mesh = mesh
        self._alive = alive
        self._cursor_file = CursorFile(node.store.path, self.name)
        self.cursor: dict[str, int] = {}
        """Committed: per origin, every op up to this seq is in the stream."""
        self._progress: dict[str, _Progress] = {}
        self._dirty: set[str] = set()  # progress not yet written to the shared bucket
        self.stats = _Stats()
        self.state = "stopped"
        self.owners: tuple[str, ...] = ()
        self._meters = _Meters(node, fleet_metrics, self.name)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._caught_up_at = time.monotonic()
        self._lag = (0, 0.0)
        self._closed = False
        self._atomic = False  # the stream takes atomic batches (read at connect)
        self._atomic_max = config.atomic_batch_ops
        self.publish_mode = "op by op"
        """``atomic batches`` or ``op by op``; :attr:`publish_mode_reason` says why the latter."""
        self.publish_mode_reason: str | None = None
        node.add_status_source("export", self.status)

    @classmethod
    def for_aggregator(cls, aggregator: Any, config: ExportConfig) -> Exporter:
        """An exporter of an :class:`~syncfw.cloud.Aggregator`'s log, on its metrics and mesh."""
        return cls(
            aggregator.node,
            config,
            fleet_metrics=aggregator.fleet_metrics,
            mesh=lambda: aggregator.mesh,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Exporter:
        """Load the cursor and start exporting in the background. Returns self."""
        if self._task is None:
            self.cursor = await self._cursor_file.load()
            self.state = "connecting"
            self._task = asyncio.create_task(self._run(), name=f"syncfw-export-{self.name}")
        return self

    async def aclose(self) -> None:
        """Stop exporting, write the shared progress, close the NATS connection."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._dirty and self._kv is not None:
            # A clean stop leaves the shared progress current, so whoever takes
            # these origins over starts where this exporter stopped.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.ack_timeout_s):
                    await self._flush_progress()
        await self._disconnect()
        await self._cursor_file.aclose()
        self.state = "closed"
        self._meters.connected.set(0)

    async def __aenter__(self) -> Exporter:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ surface

    @property
    def connected_url(self) -> str | None:
        """The server the exporter is connected to now (None when not)."""
        nc = self._nc
        if nc is None or not nc.is_connected or nc.connected_url is None:
            return None
        u = nc.connected_url
        return f"nats://{u.hostname}:{u.port}"

    def lag(self) -> tuple[int, float]:
        """``(ops, seconds)``: ops this exporter owns and has not exported, and
        seconds since it last had none."""
        owners = self.owners or self._owners()
        me = self.node.node_id
        ops = 0
        for o, head in self.node.store.version_vector.items():
            if owner_of(o, owners) != me:
                continue
            done = max(self.cursor.get(o, 0), self._progress.get(o, _Progress()).seq)
            ops += max(head - done, 0)
        now = time.monotonic()
        if ops == 0:
            self._caught_up_at = now
        self._lag = (ops, 0.0 if ops == 0 else round(now - self._caught_up_at, 3))
        self._meters.fleet.set_export_lag(self.name, ops)
        self._meters.lag_s.set(self._lag[1])
        return self._lag

    def status(self) -> dict[str, Any]:
        """The status entry (``node.status()["export"]``)."""
        s = self.stats
        now = time.monotonic()
        ops, secs = self.lag()
        owners = self.owners or self._owners()
        me = self.node.node_id
        return {
            "state": self.state,
            "stream": self.config.stream,
            "servers": list(self.config.servers),
            "connected_url": self.connected_url,
            "exporters": list(owners),
            "owned_origins": sorted(
                o for o in self.node.store.version_vector if owner_of(o, owners) == me
            ),
            "lag_ops": ops,
            "lag_s": secs,
            "stored": s.stored,
            "duplicates": s.duplicates,
            "skipped": s.skipped,
            "failures": s.failures,
            "last_error": s.last_error,
            "last_error_ago_s": None if s.last_error_at is None else round(now - s.last_error_at, 3),
            "last_ack_ago_s": None if s.last_ack_at is None else round(now - s.last_ack_at, 3),
            "retry_in_s": s.retry_in_s,
            "publish_mode": self.publish_mode,
            "publish_mode_reason": self.publish_mode_reason,
            "atomic_batches": s.atomic_batches,
            "batch_fallbacks": s.batch_fallbacks,
        }

    # ------------------------------------------------------------------ ownership

    def _owners(self) -> tuple[str, ...]:
        me = self.node.node_id
        cfg = self.config.exporters
        if not cfg:
            return (me,)
        if self._alive is not None:
            live = set(self._alive())
        else:
            mesh = self._mesh()
            live = set()
            if mesh is not None:
                live = {m.node_id for m in mesh.members() if m.state.value in ("alive", "suspect")}
        return tuple(sorted({e for e in cfg if e in live} | {me}))

    def _owns(self, origin: str, owners: tuple[str, ...]) -> bool:
        return owners == (self.node.node_id,) or owner_of(origin, owners) == self.node.node_id

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        delay = self.config.retry_initial_s
        while not self._closed:
            try:
                await self._connect()
                self.state = "exporting"
                self.stats.retry_in_s = None
                if await self._epoch():
                    return  # the node closed
                delay = self.config.retry_initial_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc, delay)
                self.lag()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)

    def _failed(self, exc: BaseException, delay: float) -> None:
        reason = _reason(exc)
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        s = self.stats
        s.failures += 1
        s.last_error = text
        s.last_error_at = time.monotonic()
        s.retry_in_s = delay
        self.state = "unavailable"
        self._meters.failure(reason)
        self._warn(
            reason,
            "export to NATS JetStream stream %s stalled (%s); %d ops behind, retrying in %.2fs",
            self.config.stream, text, self._lag[0], delay,
        )

    def _warn(self, reason: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, quiet = self.stats.warned.get(reason, (-1e9, 0))
        if now - last < self.config.warn_every_s:
            self.stats.warned[reason] = (last, quiet + 1)
            return
        self.stats.warned[reason] = (now, 0)
        if quiet:
            msg += f" ({quiet} more like it since the last warning)"
        log.warning(msg, *args)

    async def _connect(self) -> None:
        cfg = self.config
        if self._nc is None or self._nc.is_closed:
            # A closed client (its reconnect attempts spent) is replaced: this
            # loop, not the client, owns the backoff and the warnings.
            self._nc, self._js, self._kv = None, None, None

            async def on_error(exc: Exception) -> None:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self.stats.last_error_at = time.monotonic()

            async def on_disconnect() -> None:
                self.stats.disconnects += 1
                self._meters.connected.set(0)

            async def on_reconnect() -> None:
                self.stats.connects += 1
                self._meters.connected.set(1)

            nc = await nats.connect(
                servers=list(cfg.servers),
                name=f"syncfw-export-{self.node.node_id}",
                connect_timeout=cfg.connect_timeout_s,
                allow_reconnect=True,
                max_reconnect_attempts=3,
                reconnect_time_wait=0.25,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
            self._nc = nc
            self._js = nc.jetstream(timeout=cfg.ack_timeout_s)
            self.stats.connects += 1
            self._meters.connected.set(1)
        if self._kv is None:
            await self._ensure_stream()

    async def _disconnect(self) -> None:
        nc, self._nc, self._js, self._kv = self._nc, None, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _ensure_stream(self) -> None:
        cfg, js = self.config, self._js
        assert js is not None
        subject = f"{cfg.subject_prefix}.{self.fleet_token}.>"
        try:
            info = await js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            info = await js.add_stream(
                api.StreamConfig(
                    name=cfg.stream,
                    subjects=[subject],
                    num_replicas=cfg.replicas,
                    duplicate_window=cfg.duplicate_window_s,
                    storage=api.StorageType.FILE,
                    retention=api.RetentionPolicy.LIMITS,
                    allow_atomic=cfg.atomic_batch_ops > 0 or None,
                )
            )
        else:
            have = info.config.subjects or []
            if subject not in have and f"{cfg.subject_prefix}.>" not in have and ">" not in have:
                raise ExportConfigError(
                    f"stream {cfg.stream!r} exists without the subjects {subject!r} "
                    f"(it has {have}): export elsewhere, or add them to it"
                )
        self._choose_mode(bool(info.config.allow_atomic))
        try:
            self._kv = await js.key_value(cfg.progress_bucket)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await js.create_key_value(
                bucket=cfg.progress_bucket, history=1, replicas=cfg.replicas
            )

    async def _epoch(self) -> bool:
        """Export from the committed cursor until ownership changes (False) or
        the node closes (True). Raises on a failure (the caller backs off)."""
        owners = self.owners = self._owners()
        vv = dict(self.node.store.version_vector)
        mine = [o for o in vv if self._owns(o, owners)]
        await self._read_progress(mine, force=True)
        await self._flush_progress()
        since: dict[str, int] = {}
        for o, head in vv.items():
            if o in mine:
                upto = max(self.cursor.get(o, 0), self._progress.get(o, _Progress()).seq)
                since[o] = min(head, upto)
            else:
                since[o] = head
        # What the shared progress says is in the stream is in the cursor too.
        jumped = {o: since[o] for o in mine if since[o] > self.cursor.get(o, 0)}
        if jumped:
            n = sum(s - self.cursor.get(o, 0) for o, s in jumped.items())
            self.stats.skipped += n
            self._meters.skipped.inc(n)
            await self._commit(jumped, {})
        self.lag()
        pending: asyncio.Future[FeedItem] | None = None
        batch: list[FeedItem] = []
        cfg = self.config
        feed = self.node.follow(since, include_rejected=cfg.include_rejected,
                                page_ops=max(cfg.read_page_ops, cfg.batch_ops))
        try:
            async with feed:
                while True:
                    if pending is None:
                        # What the follower already read, without a task and a
                        # wait per op (never beside a read in flight).
                        batch += feed.take_ready(cfg.batch_ops - len(batch))
                        if batch and (len(batch) >= cfg.batch_ops
                                      or not _behind(feed, self.node.store.version_vector)):
                            # Full, or all the log holds now: a round, so a backlog
                            # goes in large batches and a trickle without delay. The
                            # next round is read while this one is published.
                            pending = asyncio.ensure_future(feed.__anext__())
                            await self._export(batch, owners)
                            batch = []
                            if self._owners() != owners:
                                log.info("export duty moves: exporters now %s", self._owners())
                                return False
                            continue
                        pending = asyncio.ensure_future(feed.__anext__())
                    # More is in the log when a round is under way: read it into
                    # the round (a bounded wait: what is left may all be filtered out).
                    wait = _ROUND_READ_S if batch else cfg.idle_check_s
                    done, _ = await asyncio.wait({pending}, timeout=wait)
                    if done:
                        fut, pending = pending, None
                        try:
                            batch.append(fut.result())
                        except StopAsyncIteration:
                            if batch:
                                await self._export(batch, owners)
                            return True
                        continue
                    if batch:
                        await self._export(batch, owners)
                        batch = []
                    if self._dirty:
                        await self._flush_progress()
                    self.lag()
                    if self._owners() != owners:
                        log.info("export duty moves: exporters now %s", self._owners())
                        return False
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    # ------------------------------------------------------------------ publishing

    async def _export(self, batch: list[FeedItem], owners: tuple[str, ...]) -> None:
        """Publish a batch, one op per origin in flight (invariant 1); commit what was acked."""
        mine = [it for it in batch if self._owns(it.origin, owners)]
        if not mine:
            return
        await self._read_progress({it.origin for it in mine})
        lanes: dict[str, collections.deque[FeedItem]] = {}
        moved: dict[str, int] = {}
        skipped = 0
        for it in mine:
            o = it.origin
            done = max(self.cursor.get(o, 0), self._progress.get(o, _Progress()).seq)
            if it.seq <= done:
                skipped += 1
                moved[o] = max(moved.get(o, 0), it.seq)
                continue
            lanes.setdefault(o, collections.deque()).append(it)
        if skipped:
            self.stats.skipped += skipped
            self._meters.skipped.inc(skipped)
        if self._atomic:
            acked, failure = await self._publish_batches(lanes)
        else:
            acked, failure = await self._publish_lanes(lanes)
        for o, s in acked.items():
            moved[o] = max(moved.get(o, 0), s)
        await self._commit(moved, acked)
        self.stats.batches += 1
        if failure is not None:
            raise ExportUnavailable(failure) from None
        await self._flush_progress()

    async def _publish_lanes(
        self, lanes: dict[str, collections.deque[FeedItem]]
    ) -> tuple[dict[str, int], str | None]:
        """One task per origin, each publishing its ops one after the other, the next
        only once the previous is acknowledged (invariant 1); the origins run side by
        side with no barrier between them. A lane stops at its first failure."""
        js = self._js
        assert js is not None
        cfg = self.config
        acked: dict[str, int] = {}
        failures: list[str] = []
        counts = [0, 0]  # stored, duplicate

        async def lane(origin: str, items: collections.deque[FeedItem]) -> None:
            for it in items:
                subject, body, headers = op_message(
                    cfg.subject_prefix, self.fleet_token, it.op, rejected=it.rejected
                )
                fut: asyncio.Future[api.PubAck] | None = None
                try:
                    async with asyncio.timeout(cfg.ack_timeout_s):
                        fut = await js.publish_async(
                            subject, body, wait_stall=cfg.ack_timeout_s, stream=cfg.stream,
                            headers=headers,
                        )
                        ack = await fut
                except TimeoutError:
                    if fut is not None:
                        fut.cancel()
                    failures.append(f"no ack for {it.origin}:{it.seq} in {cfg.ack_timeout_s}s")
                    return
                except Exception as exc:
                    failures.append(f"{it.origin}:{it.seq} not stored: {_text(exc)}")
                    return
                acked[origin] = it.seq
                counts[1 if ack.duplicate else 0] += 1

        await asyncio.gather(*(lane(o, items) for o, items in lanes.items()))
        stored, dup = counts
        if stored or dup:
            self.stats.stored += stored
            self.stats.duplicates += dup
            self._meters.stored.inc(stored)
            self._meters.duplicate.inc(dup)
            self.stats.last_ack_at = time.monotonic()
        return acked, (failures[0] if failures else None)

    def _choose_mode(self, stream_allows: bool) -> None:
        """Atomic batches where the stream allows them and the client can send them."""
        cfg = self.config
        why: str | None = None
        if cfg.atomic_batch_ops == 0:
            why = "atomic_batch_ops is 0"
        elif not stream_allows:
            why = (f"stream {cfg.stream!r} does not allow atomic batch publish (allow_atomic, "
                   "nats-server 2.12 or later): enable it on the stream for a faster export")
        elif self._nc is None or not can_write_frames(self._nc):
            why = "this nats-py client has no write buffer to send batch frames through"
        self._atomic = why is None
        self.publish_mode = "op by op" if why else "atomic batches"
        if why is not None and why != self.publish_mode_reason and cfg.atomic_batch_ops:
            log.warning("export to %s publishes op by op: %s", cfg.stream, why)
        self.publish_mode_reason = why

    async def _publish_batches(
        self, lanes: dict[str, collections.deque[FeedItem]]
    ) -> tuple[dict[str, int], str | None]:
        """Atomic batches (invariant 1): the origins dealt into ``batches_in_flight``
        groups, each group's ops (an origin's in seq order) published as batches
        one after the other, the groups side by side. A group stops at its first
        failure; a batch refused for a duplicate id goes op by op (invariant 3)."""
        nc = self._nc
        assert nc is not None
        cfg = self.config
        total = sum(len(items) for items in lanes.values())
        n_groups = max(1, min(cfg.batches_in_flight, -(-total // self._atomic_max)))
        groups: list[list[FeedItem]] = [[] for _ in range(n_groups)]
        for items in sorted(lanes.values(), key=len, reverse=True):
            min(groups, key=len).extend(items)  # the emptiest group takes the next origin
        acked: dict[str, int] = {}
        failures: list[str] = []

        async def group(items: list[FeedItem]) -> None:
            i = 0
            while i < len(items):
                chunk = items[i : i + self._atomic_max]
                try:
                    if not nc.is_connected:
                        raise ExportUnavailable("not connected")
                    ack = await publish_batch(nc, cfg.stream, cfg.subject_prefix,
                                              self.fleet_token, chunk, cfg.ack_timeout_s)
                except BatchRefused as exc:
                    if not await self._refused(exc, chunk, acked, failures):
                        return
                except (TimeoutError, nats.errors.TimeoutError):
                    failures.append(f"no ack for a batch of {len(chunk)} ops from "
                                    f"{chunk[0].origin}:{chunk[0].seq} in {cfg.ack_timeout_s}s")
                    return
                except Exception as exc:
                    failures.append(f"a batch from {chunk[0].origin}:{chunk[0].seq} "
                                    f"not stored: {_text(exc)}")
                    return
                else:
                    self.stats.atomic_batches += 1
                    self.stats.stored += ack.count
                    self._meters.stored.inc(ack.count)
                    self.stats.last_ack_at = time.monotonic()
                    for it in chunk:
                        acked[it.origin] = it.seq
                i += len(chunk)

        await asyncio.gather(*(group(g) for g in groups if g))
        return acked, (failures[0] if failures else None)

    async def _refused(
        self, exc: BatchRefused, chunk: list[FeedItem], acked: dict[str, int], failures: list[str]
    ) -> bool:
        """A refused batch: op by op if for a duplicate (True once all are in); else a failure."""
        if exc.code == DUPLICATE:
            # Part of it is in the stream already (a re-publish after a lost ack,
            # a restart, a handover): each op alone is dropped or stored.
            self.stats.batch_fallbacks += 1
            lanes: dict[str, collections.deque[FeedItem]] = {}
            for it in chunk:
                lanes.setdefault(it.origin, collections.deque()).append(it)
            got, failure = await self._publish_lanes(lanes)
            acked.update(got)
            if failure is not None:
                failures.append(failure)
                return False
            return True
        if exc.code == TOO_LARGE and len(chunk) > 1:
            self._atomic_max = max(1, len(chunk) // 2)
            self._warn("batch-size", "JetStream refused an atomic batch of %d ops (%s): "
                       "batches of %d from now on", len(chunk), exc.description, self._atomic_max)
        elif exc.code == NOT_ENABLED:
            self._choose_mode(False)
        failures.append(str(exc))
        return False

    async def _commit(self, moved: Mapping[str, int], acked: Mapping[str, int]) -> None:
        """Invariant 2: the cursor, then the shared progress, only for what is in the stream."""
        moved = {o: s for o, s in moved.items() if s > self.cursor.get(o, 0)}
        if moved:
            await self._cursor_file.save(moved)
            self.cursor.update(moved)
        for o, s in acked.items():
            p = self._progress.setdefault(o, _Progress())
            if s > p.seq:
                self._dirty.add(o)

    # ------------------------------------------------------------------ shared progress

    async def _read_progress(self, origins: Iterable[str], *, force: bool = False) -> None:
        kv = self._kv
        assert kv is not None
        now = time.monotonic()
        stale = [
            o for o in origins
            if force or now - self._progress.get(o, _Progress()).read_at > self.config.progress_refresh_s
        ]
        if not stale:
            return

        async def one(o: str) -> None:
            p = self._progress.setdefault(o, _Progress())
            try:
                entry = await kv.get(_kv_key(o))
            except nats.js.errors.KeyNotFoundError:
                p.read_at = now
                return
            seq = int(entry.value or b"0")
            if entry.revision is not None and (p.revision is None or entry.revision >= p.revision):
                p.revision = entry.revision
                if seq > p.seq:
                    p.seq = seq
            p.read_at = now

        await asyncio.gather(*(one(o) for o in stale))

    async def _flush_progress(self) -> None:
        """Write the cursor of dirty origins to the shared bucket (forward only, CAS)."""
        kv = self._kv
        if kv is None or not self._dirty:
            return
        todo = sorted(self._dirty)

        async def one(o: str) -> None:
            p = self._progress.setdefault(o, _Progress())
            want = self.cursor.get(o, 0)
            for _ in range(5):
                if want <= p.seq and p.revision is not None:
                    break
                try:
                    if p.revision is None:
                        p.revision = await kv.create(_kv_key(o), str(want).encode())
                    else:
                        p.revision = await kv.update(_kv_key(o), str(want).encode(), last=p.revision)
                    p.seq = want
                    break
                except nats.js.errors.KeyWrongLastSequenceError:
                    p.read_at = -1e9
                    await self._read_progress([o], force=True)
            self._dirty.discard(o)

        await asyncio.gather(*(one(o) for o in todo))


def _behind(feed: Any, vv: Mapping[str, int]) -> bool:
    """Whether the log holds ops past the follower's position."""
    pos = feed.position
    return any(s > pos.get(o, 0) for o, s in vv.items())


def _text(exc: BaseException | None) -> str:
    if exc is None:
        return "?"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ExportConfigError):
        return "config"
    if isinstance(exc, (nats.errors.NoServersError, OSError, nats.errors.ConnectionClosedError)):
        return "unreachable"
    if isinstance(exc, ExportUnavailable):
        return "publish"
    if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
        return "timeout"
    return "error"
