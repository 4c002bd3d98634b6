"""A node's artifact side: publish, verify, hold, serve, advertise and fetch model releases.

:class:`Artifacts` joins the pieces of this package to one node: its chunk
store beside the database, the release manifests in its log (``sys/models/``),
its adverts in its own zone, the chunks it serves on its mesh's transport
(charged to the mesh's serving budget at bulk priority, so state and alerts go
first) and the fetches it runs from whichever peers advertise what it lacks.

It is the API the node's update state machine and the rollout build on:
:meth:`~Artifacts.releases` (every name's verified, judged releases),
:meth:`~Artifacts.latest`, :meth:`~Artifacts.fetch`, :meth:`~Artifacts.read`
(the verified bytes, with :meth:`ReleaseManifest.model_manifest` for
``Engine.load``) and :meth:`~Artifacts.watch` (catch up on every release as
soon as any peer brings its manifest and chunks). Nothing here activates a
model: the node keeps serving what it serves until the state machine swaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from syncfw.errors import (
    ChangeFeedLagged,
    ManifestError,
    NotAuthorityError,
    SyncfwError,
)
from syncfw.mesh import MemberState, Mesh
from syncfw.models.adverts import advert_key, advert_value, parse_adverts
from syncfw.models.chunks import ChunkStore
from syncfw.models.fetch import (
    FetchConfig,
    Fetcher,
    FetchProgress,
    ProgressHook,
    Source,
    busy_reason,
)
from syncfw.models.figures import ArtifactMetrics
from syncfw.models.manifest import (
    DEFAULT_CHUNK_BYTES,
    MANIFEST_PREFIX,
    Judgement,
    ReleaseManifest,
    Tensor,
    build_manifest,
    judge_releases,
    open_manifest,
    parse_manifest_key,
    seal_manifest,
)
from syncfw.node import Node
from syncfw.notices import clip, clip_text
from syncfw.sync.frames import Status
from syncfw.transport.artifacts import MAX_PIECE_BYTES, ArtifactNetwork, ChunkPiece, ChunkRequest
from syncfw.transport.base import LinkError
from syncfw.transport.budget import Priority
from syncfw.trust import public_key_bytes

__all__ = ["ArtifactConfig", "Artifacts"]


def _quiet(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("an advert write failed: %s", fut.exception())


log = logging.getLogger("syncfw.models")

_FLEET_SCAN = "fleet/"


@dataclass(frozen=True, slots=True)
class ArtifactConfig:
    """Tunables of a node's artifact side.

    Attributes:
        max_bytes: disk budget of the chunk store (None: the disk bounds it).
        durable: fsync every chunk write (off only in tests and benchmarks).
        fetch: fetch tunables.
        advert_every: chunks fetched between two advert updates (always at the end).
        authority_key: the key manifests must verify against; default the
            fleet's :attr:`~syncfw.zones.Fleet.authority_key`.
        retry_s: how long :meth:`Artifacts.watch` waits before retrying a failed catch-up.
        serve_fanout: on a metered uplink (the mesh's serving budget is set: a depot),
            each chunk goes to at most this many callers per ``serve_hold_s``; a
            further caller is refused it ``RESOURCE_EXHAUSTED`` ("busy": take it
            from the peers that have it, or ask again later). 0: no limit. An
            unmetered node (a truck on the yard's LAN) serves everyone.
        serve_hold_s: how long after a chunk's last copy left a further caller is
            refused it (the takers' adverts reach the others meanwhile); then it is
            served again, so a lone node is never stalled.
    """

    max_bytes: int | None = None
    durable: bool = True
    fetch: FetchConfig = field(default_factory=FetchConfig)
    advert_every: int = 4
    authority_key: bytes | None = None
    retry_s: float = 2.0
    serve_fanout: int = 2
    serve_hold_s: float = 5.0

    def __post_init__(self) -> None:
        if self.serve_fanout < 0 or self.serve_hold_s < 0:
            raise ValueError("serve_fanout and serve_hold_s must be >= 0")


class Artifacts:
    """One node's model artifacts. Make with :meth:`attach`; close with :meth:`aclose`.

    Args:
        node: the node.
        mesh: its mesh (serve and fetch on its transport), or None to only
            publish and read.
        store: the chunk store.
        config: tunables.
    """

    def __init__(
        self, node: Node, mesh: Mesh | None, store: ChunkStore, config: ArtifactConfig
    ) -> None:
        self.node = node
        self.mesh = mesh
        self.store = store
        self.config = config
        self.metrics = ArtifactMetrics.of(node.metrics)
        self.refused: dict[str, tuple[str, str]] = {}
        """Manifest keys refused, with ``(reason, message)``."""
        self.fetches: dict[str, FetchProgress] = {}
        self._warned: set[tuple[str, bytes]] = set()
        self._since_advert: dict[str, int] = {}
        self._watch: asyncio.Task[None] | None = None
        self._served: dict[bytes, dict[str, float]] = {}
        """Per chunk, the callers it went to lately: when its last piece left (inf: going)."""
        self._wake = asyncio.Event()
        self.watch_error: str = ""
        self.fetcher: Fetcher | None = None
        if mesh is not None:
            net = mesh.network
            if not isinstance(net, ArtifactNetwork):
                raise ValueError(f"the mesh's transport {type(net).__name__} carries no artifacts")
            net.artifacts.serve_with(self._serve)
            self.fetcher = Fetcher(
                store,
                net,
                locate=self._locate,
                node_id=node.node_id,
                sources=self._sources,
                config=config.fetch,
                metrics=self.metrics,
                on_chunk=self._fetched_chunk,
            )

    @classmethod
    def attach(
        cls, node: Node, mesh: Mesh | None = None, *, config: ArtifactConfig | None = None
    ) -> Artifacts:
        """The artifact side of ``node``: its chunk store (``<db>.chunks``) and, with
        ``mesh``, chunks served and fetched on the mesh's transport.

        Raises:
            StorageError: the chunk folder cannot be used.
            ValueError: the mesh's transport does not carry the artifact stream kind.
        """
        cfg = config or ArtifactConfig()
        store = ChunkStore.beside(node.store.path, max_bytes=cfg.max_bytes, durable=cfg.durable)
        self = cls(node, mesh, store, cfg)
        node.add_status_source("artifacts", self.status)
        return self

    @property
    def authority_key(self) -> bytes:
        """The key every manifest must verify against (empty: none, every manifest refused)."""
        return self.config.authority_key or self.node.fleet.authority_key

    # ------------------------------------------------------------------ releases

    async def publish(
        self,
        data: bytes,
        *,
        name: str,
        version: int,
        key: Ed25519PrivateKey,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        inputs: Sequence[Tensor] | None = None,
        outputs: Sequence[Tensor] | None = None,
        labels: Sequence[str] | None = None,
        canary_accuracy: float | None = None,
        canary_p50_ms: float | None = None,
        canary_p99_ms: float | None = None,
        note: str = "",
    ) -> ReleaseManifest:
        """Publish ``data`` as release ``version`` of ``name`` (the authority node only).

        The chunks are stored first, then the signed manifest is written at
        ``sys/models/<name>/<version>`` and this node advertises the whole artifact.

        Args:
            data: the artifact (an ONNX model).
            name, version: the release; ``version`` must be above every
                release of ``name`` this node knows.
            key: the fleet authority's ed25519 signing key.
            chunk_size: bytes per chunk.
            inputs, outputs, labels: the model's signature; None reads them
                from the ONNX bytes (needs the inference extra).
            canary_accuracy, canary_p50_ms, canary_p99_ms: the optimize step's figures.
            note: why this release (a rollback says what it undoes).

        Raises:
            NotAuthorityError: this node is not the fleet authority.
            ManifestError: ``not_authority`` (``key`` is not the authority's),
                ``backwards`` (not above the latest version), ``malformed``.
            ModelLoadError: ``inputs`` is None and the bytes are no ONNX model.
            StorageFullError: the chunk store is full (no manifest written).
        """
        fleet = self.node.fleet
        if self.node.node_id != fleet.authority:
            raise NotAuthorityError(
                f"node {self.node.node_id!r} is not the fleet authority {fleet.authority!r}: "
                "only the authority publishes releases"
            )
        if public_key_bytes(key) != self.authority_key:
            raise ManifestError("the signing key is not the fleet authority's key", "not_authority")
        judged = (await self.releases()).get(name)
        if judged is not None and judged.latest is not None and version <= judged.latest.version:
            raise ManifestError(
                f"{name} version {version} is not above the latest release "
                f"{judged.latest.version}: versions only move forward "
                "(a rollback is a new, higher version)",
                "backwards",
            )
        if inputs is None or outputs is None:
            from syncfw.inference.manifest import ModelManifest

            mm = ModelManifest.of(data, name=name, version=str(version), labels=labels)
            inputs = [(t.name, t.dtype, t.shape) for t in mm.inputs]
            outputs = [(t.name, t.dtype, t.shape) for t in mm.outputs]
            labels = mm.labels if labels is None else labels
        manifest = build_manifest(
            data,
            name=name,
            version=version,
            chunk_size=chunk_size,
            inputs=inputs,
            outputs=outputs,
            labels=labels,
            canary_accuracy=canary_accuracy,
            canary_p50_ms=canary_p50_ms,
            canary_p99_ms=canary_p99_ms,
            issued=self.node.hlc_now(),
            note=note,
        )
        await asyncio.to_thread(self._put_all, manifest, data)
        sealed = seal_manifest(manifest, key, fleet.fleet_id)
        await self.node.put(manifest.key, sealed)
        await self._advertise(manifest)
        log.info(
            "%s published %s %s (%d bytes, %d chunks)",
            self.node.node_id,
            name,
            version,
            manifest.size,
            len(manifest.chunks),
        )
        return open_manifest(sealed, self.authority_key, fleet.fleet_id)

    def _put_all(self, manifest: ReleaseManifest, data: bytes) -> None:
        for i, digest in enumerate(manifest.chunks):
            start = i * manifest.chunk_size
            self.store.put(digest, data[start : start + manifest.chunk_size])

    async def releases(self) -> dict[str, Judgement]:
        """Every name's verified releases, judged (versions only move forward).

        A manifest that does not verify, or that the judgement refuses, is left
        out, recorded in :attr:`refused` and ``syncfw_model_manifests_refused{reason}``
        and logged once (WARNING).
        """
        state = await self.node.scan(MANIFEST_PREFIX)
        by_name: dict[str, list[ReleaseManifest]] = {}
        refused: dict[str, tuple[str, str]] = {}
        fleet_id = self.node.fleet_id
        for key, value in sorted(state.items()):
            where = parse_manifest_key(key)
            if where is None:
                continue
            try:
                m = open_manifest(value, self.authority_key, fleet_id)
                if (m.name, m.version) != where:
                    raise ManifestError(
                        f"{key} holds the manifest of {m.name} {m.version}", "malformed"
                    )
            except ManifestError as exc:
                refused[key] = (exc.reason, str(exc))
                self._refusal(key, value, exc.reason, str(exc))
                continue
            by_name.setdefault(m.name, []).append(m)
        out: dict[str, Judgement] = {}
        for name, ms in by_name.items():
            judged = out[name] = judge_releases(ms)
            for m, reason, message in judged.refused:
                refused[m.key] = (reason, message)
                self._refusal(m.key, m._body, reason, message)
        self.refused = refused
        return out

    def _refusal(self, key: str, value: Any, reason: str, message: str) -> None:
        tag = (
            key,
            hashlib.sha256(value if isinstance(value, bytes) else repr(value).encode()).digest(),
        )
        if tag in self._warned:
            return
        self._warned.add(tag)
        self.metrics.refused.labels(self.metrics.node_id, reason).inc()
        log.warning(
            "%s: refused release manifest %s (%s): %s; the current model keeps serving",
            self.node.node_id,
            clip(key),
            reason,
            message,
        )

    async def latest(self, name: str) -> ReleaseManifest | None:
        """The highest accepted release of ``name``, or None."""
        judged = (await self.releases()).get(name)
        return None if judged is None else judged.latest

    async def release(self, name: str, version: int) -> ReleaseManifest | None:
        """Release ``version`` of ``name`` if it stands, else None."""
        judged = (await self.releases()).get(name)
        if judged is None:
            return None
        return next((m for m in judged.accepted if m.version == version), None)

    # ------------------------------------------------------------------ chunks

    def held(self, manifest: ReleaseManifest) -> bool:
        """True if every chunk of ``manifest`` is held."""
        return not self.store.missing(manifest)

    async def fetch(
        self, manifest: ReleaseManifest, progress: ProgressHook | None = None
    ) -> FetchProgress:
        """Fetch what this node lacks of ``manifest`` from the peers that advertise it.

        Returns:
            The fetch's progress (``done``; ``resumed`` chunks were held before).

        Raises:
            FetchError: the remaining chunks could not be fetched (what was
                fetched stays held; the next fetch resumes).
            StorageFullError: the chunk store or the disk is full.
            ValueError: this node has no mesh to fetch on.
        """
        if self.fetcher is None:
            raise ValueError("this node's artifacts have no mesh to fetch on")
        await self._advertise(manifest, starting=True)  # peers learn it fetches too
        try:
            got = await self.fetcher.fetch(manifest, self._progress(manifest, progress))
        finally:
            self._since_advert.pop(manifest.sha256, None)
        await asyncio.to_thread(self.store.assemble, manifest)  # the whole, verified
        await self._advertise(manifest)
        return got

    def _progress(self, manifest: ReleaseManifest, hook: ProgressHook | None) -> ProgressHook:
        def record(p: FetchProgress) -> None:
            self.fetches[f"{manifest.name}:{manifest.version}"] = p
            if hook is not None:
                hook(p)

        return record

    async def read(self, manifest: ReleaseManifest) -> bytes:
        """The artifact's bytes, every chunk and the whole verified.

        Raises:
            KeyError: a chunk is not held (fetch first).
            ChunkError: held bytes no longer match (removed; fetch again).
        """
        return await asyncio.to_thread(self.store.assemble, manifest)

    async def catch_up(self, name: str) -> ReleaseManifest | None:
        """Fetch the latest release of ``name`` if any chunk is missing; returns it (or None)."""
        m = await self.latest(name)
        if m is not None and not self.held(m):
            await self.fetch(m)
        elif m is not None:
            await self._advertise(m)
        return m

    # ------------------------------------------------------------------ adverts

    async def _advertise(self, manifest: ReleaseManifest, *, starting: bool = False) -> None:
        held = self.store.held(manifest)
        if not held and not starting:
            return
        await self._put(
            advert_key(self.node.node_id, manifest.sha256),
            advert_value(manifest.name, manifest.version, len(manifest.chunks), held),
        )

    async def _put(self, key: str, value: Any) -> None:
        # A fetch is cancelled freely (a peer skipped, the caller gone); the write
        # it started finishes on its own, so a cancellation never reaches the store.
        write = asyncio.ensure_future(self.node.put(key, value))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            write.add_done_callback(_quiet)
            raise

    async def _fetched_chunk(self, manifest: ReleaseManifest, index: int) -> None:
        n = self._since_advert.get(manifest.sha256, 0) + 1
        if n >= self.config.advert_every:
            n = 0
            await self._advertise(manifest)
        self._since_advert[manifest.sha256] = n

    def _locate(self, node_id: str) -> str | None:
        """Where to dial ``node_id`` (a live member), or None."""
        if self.mesh is None:
            return None
        for m in self.mesh.membership.members.values():
            if m.node_id == node_id and m.state is not MemberState.DEAD:
                return m.address
        return None

    async def _sources(self, manifest: ReleaseManifest) -> list[Source]:
        mesh = self.mesh
        if mesh is None:
            return []
        addresses: dict[str, str] = {}
        for m in mesh.membership.members.values():
            if m.node_id and m.state is not MemberState.DEAD:
                addresses.setdefault(m.node_id, m.address)
        adverts = parse_adverts(await self.node.scan(_FLEET_SCAN), manifest.sha256)
        return [
            Source(a.node_id, addresses[a.node_id], a)
            for a in adverts
            if a.node_id in addresses and a.n == len(manifest.chunks)
        ]

    # ------------------------------------------------------------------ serving

    async def _serve(self, request: ChunkRequest) -> AsyncIterator[ChunkPiece]:
        budget = self.mesh.serve_budget if self.mesh is not None else None
        limit = self.config.serve_fanout if budget is not None else 0
        caller = clip_text(request.node_id) or "?"
        for digest in request.hashes:
            try:
                data = (
                    await asyncio.to_thread(self.store.get, digest)
                    if self.store.has(digest)
                    else None
                )
            except (KeyError, SyncfwError) as exc:
                log.warning(
                    "%s: not serving chunk %s: %s", self.node.node_id, digest.hex()[:12], exc
                )
                data = None
            if data is None and await self._landed(digest):
                data = await asyncio.to_thread(self.store.get, digest)
            if data is None:
                yield ChunkPiece(digest, missing=True)
                continue
            if limit and not self._may_serve(digest, caller, limit):
                self.metrics.deferred.labels(self.metrics.node_id, caller).inc()
                raise LinkError(
                    Status.RESOURCE_EXHAUSTED,
                    f"busy: chunk {digest.hex()[:12]} just went to {limit} peers on this "
                    f"metered uplink; take it from them (served again after "
                    f"{self.config.serve_hold_s}s) {busy_reason(self._served[digest])}",
                )
            takers = self._served.setdefault(digest, {}) if limit else {}
            takers[caller] = math.inf
            sent = False
            try:
                for off in range(0, len(data), MAX_PIECE_BYTES):
                    piece = data[off : off + MAX_PIECE_BYTES]
                    last = off + len(piece) >= len(data)
                    if budget is not None:
                        await budget.spend(len(piece), Priority.BULK)
                    if last:  # counted before the caller, done, may close the stream
                        self.metrics.moved(caller, "out", len(data))
                        sent = True
                        takers[caller] = time.monotonic()
                    yield ChunkPiece(digest, off, piece, last=last)
            finally:
                if not sent and takers.get(caller) == math.inf:
                    del takers[caller]  # it never left: it does not count

    async def _landed(self, digest: bytes) -> bool:
        """True if ``digest``, not held, was on its way here (this node's own fetch) and
        has landed within half a piece timeout: a peer the depot named as its taker is
        asked before the chunk arrives."""
        fetcher = self.fetcher
        ev = fetcher.inflight.get(digest) if fetcher is not None else None
        if ev is None:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), self.config.fetch.piece_timeout_s / 2)
        return self.store.has(digest)

    def _may_serve(self, digest: bytes, caller: str, limit: int) -> bool:
        """True if ``caller`` may have ``digest`` now (the per-chunk fan-out, above)."""
        now = time.monotonic()
        hold = self.config.serve_hold_s
        if len(self._served) > 4096:  # forget chunks whose hold is over
            self._served = {
                d: t for d, t in self._served.items() if any(now - x < hold for x in t.values())
            }
        takers = self._served.get(digest)
        if not takers:
            return True
        for who, at in list(takers.items()):
            if now - at >= hold:
                del takers[who]
        return caller in takers or len(takers) < limit

    # ------------------------------------------------------------------ watching

    def watch(self, names: Sequence[str] = ()) -> None:
        """Keep the latest release of ``names`` (all names when empty) held, fetching
        each as soon as its manifest and a peer holding it arrive (an offline node
        catches up from the first peer it meets). Runs until :meth:`aclose`."""
        if self._watch is None:
            self._watch = asyncio.create_task(
                self._watch_loop(tuple(names)), name="artifacts-watch"
            )

    async def _watch_loop(self, names: tuple[str, ...]) -> None:
        feed_task = asyncio.create_task(self._follow_changes())
        try:
            while True:
                self._wake.clear()
                try:
                    wanted = names or tuple(await self.releases())
                    for name in wanted:
                        await self.catch_up(name)
                    self.watch_error = ""
                except SyncfwError as exc:
                    self.watch_error = str(exc)
                    log.warning(
                        "%s: catching up on releases failed: %s (retrying)", self.node.node_id, exc
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.config.retry_s)
                    continue
                await self._wake.wait()
        finally:
            feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed_task

    async def _follow_changes(self) -> None:
        while True:
            feed = self.node.changes(keys=_artifact_key, prefixes=_ARTIFACT_PREFIXES)
            try:
                async for ch in feed:
                    if ch.key.startswith(MANIFEST_PREFIX) or not ch.local:
                        self._wake.set()
            except ChangeFeedLagged:
                self._wake.set()
                continue
            finally:
                await feed.aclose()
            return

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The ``artifacts`` entry of ``node.status()``."""
        return {
            "store": {
                "chunks": len(self.store),
                "bytes": self.store.used_bytes,
                "max_bytes": self.store.max_bytes,
                "folder": str(self.store.root),
            },
            "fetches": {
                k: {
                    "held": p.held,
                    "total": p.total,
                    "resumed": p.resumed,
                    "bytes_in": p.bytes_in,
                    "by_peer": dict(p.by_peer),
                    "skipped": dict(p.skipped),
                    "seed_fallbacks": p.fallbacks,
                    "done": p.done,
                }
                for k, p in self.fetches.items()
            },
            "refused": {k: reason for k, (reason, _) in self.refused.items()},
            "watch_error": self.watch_error,
            **self.metrics.snapshot(),
        }

    async def aclose(self) -> None:
        """Stop watching and serving (the store stays on disk)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self.mesh is not None and isinstance(self.mesh.network, ArtifactNetwork):
            self.mesh.network.artifacts.serve_with(None)


_ARTIFACT_PREFIXES = (MANIFEST_PREFIX, "fleet/")
"""Where :func:`_artifact_key`'s keys lie (``fleet/<node>/artifacts/...``)."""


def _artifact_key(key: str) -> bool:
    """The keys a change of which may start or feed a fetch: manifests and adverts."""
    return key.startswith(MANIFEST_PREFIX) or "/artifacts/" in key
