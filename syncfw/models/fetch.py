"""Fetching a manifest's missing chunks from whichever peers advertise them.

Invariants:

1. Only missing chunks are asked for: what the store holds is never fetched
   again, so an interrupted fetch resumes where it stopped.
2. Every chunk is hashed before it is stored (:meth:`ChunkStore.put`). A
   peer that sends bytes that do not match, pieces out of order or over
   length, a chunk not asked for, says "missing" for what it advertised, or
   goes silent past ``piece_timeout_s`` is *skipped* for the rest of the
   fetch, counted in ``syncfw_artifact_bad_chunks{peer,reason}`` and logged
   once (WARNING); its chunks go back to the pool for the others.
3. Load is spread so that a yard shares one download. A *seed* is a source
   whose advert was complete the whole fetch (the depot, the publisher: its
   uplink is the scarce one); a *peer* is one seen fetching (a partial advert),
   complete or not now. Chunks go rarest first across peers, then in an order
   of this node's own (seeded); a chunk any peer holds is asked of a peer, the
   least busy first, at most ``per_source`` requests to one at once. A seed is
   asked one chunk at a time (the others' adverts may not have arrived), and a chunk no
   peer holds yet only by the ``seed_fanout`` fetchers a rendezvous hash of
   (chunk, node id) ranks first among those fetching, so each chunk leaves the
   seed about once and the others take it from that peer once it advertises
   it. After ``seed_hold_s`` with no peer holding a chunk, anyone may ask a seed
   for it (a fetcher gone quiet does not stall the rest).
   A source that answers ``RESOURCE_EXHAUSTED`` ("busy": a depot's metered uplink
   sent that chunk to enough peers lately, see
   :attr:`~syncfw.models.artifacts.ArtifactConfig.serve_fanout`) is not asked for
   those chunks again for a while (doubling from ``busy_s``, at most ``seed_hold_s``)
   and is never skipped for it: the chunks are taken from the peers that advertise
   them, or from the seed once it serves them again. A chunk deferred that way and
   taken from the seed in the end is a *fallback*: counted in
   ``syncfw_artifact_seed_fallbacks{peer}``, in the progress, and logged once per
   fetch (WARNING). A busy answer names the chunk's takers (:func:`busy_reason`):
   they are asked for it at once, as peers, before their adverts arrive; a taker
   asked for a chunk still on its way waits for it to land (``Fetcher.inflight``),
   and one that says "missing" for a chunk it never advertised is deferred, not
   skipped (it was named by the seed, it claimed nothing).
4. A full disk ends the fetch at once (:class:`StorageFullError`): what was
   stored stays stored. No holder for the remaining chunks for ``stall_s`` is
   a :class:`FetchError` naming how many are missing; both leave the fetch
   resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from syncfw.errors import ChunkError, FetchError, StorageFullError
from syncfw.log import NODE_ID_RE
from syncfw.models.adverts import Advert
from syncfw.models.chunks import ChunkStore
from syncfw.models.figures import ArtifactMetrics
from syncfw.models.manifest import ReleaseManifest
from syncfw.notices import clip
from syncfw.sync.frames import Status
from syncfw.transport.artifacts import MAX_HASHES_PER_FETCH, ArtifactNetwork
from syncfw.transport.base import LinkError

__all__ = ["FetchConfig", "FetchProgress", "Fetcher", "Source", "busy_reason", "busy_takers"]

log = logging.getLogger("syncfw.models")

_TAKERS = "takers: "
_MAX_TAKERS = 16


def busy_reason(takers: Iterable[str]) -> str:
    """The tail of a "busy" refusal that names the chunk's recent takers."""
    return _TAKERS + ",".join(sorted(takers)[:_MAX_TAKERS])


def busy_takers(reason: str) -> list[str]:
    """The takers a "busy" refusal names (:func:`busy_reason`); malformed ids are dropped."""
    _, found, tail = reason.rpartition(_TAKERS)
    if not found:
        return []
    return [n for n in tail.strip().split(",")[:_MAX_TAKERS] if NODE_ID_RE.fullmatch(n)]


@dataclass(frozen=True, slots=True)
class Source:
    """A peer that claims chunks of the artifact.

    Attributes:
        node_id: the peer.
        address: where to dial it.
        advert: what it claims.
    """

    node_id: str
    address: str
    advert: Advert


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Tunables of a fetch.

    Attributes:
        parallel: requests in flight at once, all peers together.
        per_source: requests in flight to one peer at once.
        batch: chunks named in one request (at most 64).
        piece_timeout_s: a peer silent this long within a request is skipped.
        stall_s: no holder for the missing chunks this long ends the fetch.
        retry_s: how long to wait for adverts when no peer holds what is missing.
        link_failures: link errors after which a peer is skipped for the fetch.
        seed_fanout: fetchers that may ask a seed for a chunk no peer holds yet
            (invariant 3; the seed's uplink carries each chunk about this often).
        seed_hold_s: how long a chunk no peer holds waits for its fetchers before
            anyone may ask a seed for it (at most half of ``stall_s``).
        busy_s: how long a chunk a source refused as busy is not asked of it again
            (doubling per refusal of that chunk, at most ``seed_hold_s``).
    """

    parallel: int = 4
    per_source: int = 2
    batch: int = 4
    piece_timeout_s: float = 10.0
    stall_s: float = 30.0
    retry_s: float = 0.1
    link_failures: int = 3
    seed_fanout: int = 1
    seed_hold_s: float = 5.0
    busy_s: float = 0.25

    def __post_init__(self) -> None:
        if not 1 <= self.batch <= MAX_HASHES_PER_FETCH:
            raise ValueError(f"batch must be in [1, {MAX_HASHES_PER_FETCH}]")
        if self.parallel < 1 or self.per_source < 1 or self.seed_fanout < 1:
            raise ValueError("parallel, per_source and seed_fanout must be >= 1")
        if self.seed_hold_s < 0 or self.busy_s <= 0:
            raise ValueError("seed_hold_s must be >= 0 and busy_s > 0")


@dataclass(slots=True)
class FetchProgress:
    """How a fetch stands (handed to the progress callback after every chunk).

    Attributes:
        name, version, sha256: the artifact.
        total: its chunk count.
        held: chunks held now.
        resumed: chunks already held when the fetch began.
        bytes_in: bytes fetched in this fetch.
        by_peer: bytes fetched from each peer.
        skipped: peers skipped, with why.
        fallbacks: chunks a source deferred as busy that came from it in the end.
        done: every chunk is held.
    """

    name: str
    version: int
    sha256: str
    total: int
    held: int
    resumed: int = 0
    bytes_in: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    fallbacks: int = 0
    done: bool = False


SourceList = Callable[[ReleaseManifest], Awaitable[list[Source]]]
ChunkHook = Callable[[ReleaseManifest, int], Awaitable[None]]
ProgressHook = Callable[[FetchProgress], None]


class _Lie(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Fetcher:
    """Fetches artifacts' chunks into a store from peers (invariants at the top).

    Args:
        store: where chunks land.
        network: a transport that carries the artifact stream kind.
        node_id: this node (never asked).
        sources: who claims the artifact's chunks now (called again as adverts change).
        config: tunables.
        metrics: the node's artifact figures.
        on_chunk: awaited after each chunk is stored (the node's advert).
        seed: seeds this node's chunk order.
        locate: where to dial a node (the takers a busy seed names), or None.

    Attributes:
        inflight: the chunks being fetched now, each with an event set when its
            request ends (stored or not): the serving side waits on it.
    """

    def __init__(
        self,
        store: ChunkStore,
        network: ArtifactNetwork,
        *,
        node_id: str,
        sources: SourceList,
        config: FetchConfig | None = None,
        metrics: ArtifactMetrics | None = None,
        on_chunk: ChunkHook | None = None,
        seed: int | None = None,
        locate: Callable[[str], str | None] | None = None,
    ) -> None:
        self.store = store
        self.network = network
        self.node_id = node_id
        self.sources = sources
        self.config = config or FetchConfig()
        self.metrics = metrics
        self.on_chunk = on_chunk
        self._rng = random.Random(seed if seed is not None else node_id)
        self.locate = locate
        self.inflight: dict[bytes, asyncio.Event] = {}

    async def fetch(
        self, manifest: ReleaseManifest, progress: ProgressHook | None = None
    ) -> FetchProgress:
        """Fetch every chunk of ``manifest`` not held.

        Returns:
            The final progress (``done``).

        Raises:
            FetchError: no peer held the remaining chunks for ``stall_s``.
            StorageFullError: the store's budget or the disk is full.
        """
        run = _Run(self, manifest, progress)
        return await run.go()


def _rendezvous(sha256: str, index: int, node_id: str) -> bytes:
    """The rank key of ``node_id`` for chunk ``index`` (the same on every node)."""
    return hashlib.sha256(f"{sha256}:{index}:{node_id}".encode()).digest()[:8]


class _Run:
    """One fetch of one manifest."""

    def __init__(self, f: Fetcher, m: ReleaseManifest, hook: ProgressHook | None) -> None:
        self.f, self.m, self.hook, self.cfg = f, m, hook, f.config
        self.missing = set(f.store.missing(m))
        n = len(m.chunks)
        self.p = FetchProgress(m.name, m.version, m.sha256, n, n - len(self.missing))
        self.p.resumed = self.p.held
        self.order = sorted(self.missing)
        f._rng.shuffle(self.order)
        self.asked: set[int] = set()
        self.busy: dict[str, int] = {}
        self.denied: dict[str, set[int]] = {}
        self.failures: dict[str, int] = {}
        self.backoff: dict[str, float] = {}
        self.fetching: set[str] = set()
        """Nodes seen with a partial advert in this fetch: peers, never seeds."""
        self.started = time.monotonic()
        self.unheld_since: dict[int, float] = {}
        self.deferred: dict[tuple[str, int], float] = {}
        """(source, chunk) refused as busy: not asked of that source before this time."""
        self.deferrals: dict[tuple[str, int], int] = {}
        self.refused_busy: set[tuple[str, int]] = set()
        self.hints: dict[int, set[str]] = {}
        """Per chunk, the takers a busy seed named (asked as peers before they advertise)."""
        self.hinted: dict[str, Source] = {}
        self._mine: tuple[tuple[str, ...], dict[int, bool]] = ((), {})

    def _report(self) -> None:
        self.p.done = not self.missing
        mt = self.f.metrics
        if mt is not None:
            label = f"{self.m.name}:{self.m.version}"
            mt.progress.labels(mt.node_id, label, "held").set(self.p.held)
            mt.progress.labels(mt.node_id, label, "total").set(self.p.total)
        if self.hook is not None:
            self.hook(self.p)

    async def go(self) -> FetchProgress:
        self._report()
        tasks: dict[asyncio.Task[bool], tuple[Source, list[int]]] = {}
        last = time.monotonic()
        known: list[Source] | None = None
        known_at = 0.0
        try:
            while self.missing:
                if len(tasks) < self.cfg.parallel:
                    now = time.monotonic()
                    if known is None or now - known_at >= min(self.cfg.retry_s, 0.05):
                        # adverts change at gossip pace: a burst of finished requests
                        # plans on one read of them, not one read each
                        known, known_at = await self.f.sources(self.m), now
                    for src, idx in self._plan(known, self.cfg.parallel - len(tasks)):
                        self.asked.update(idx)
                        self.busy[src.node_id] = self.busy.get(src.node_id, 0) + 1
                        tasks[asyncio.create_task(self._request(src, idx))] = (src, idx)
                if not tasks:
                    if time.monotonic() - last > self.cfg.stall_s:
                        raise FetchError(
                            f"{self.m.name} {self.m.version}: no reachable peer holds the "
                            f"{len(self.missing)} missing chunks of {self.p.total} "
                            f"(skipped: {self.p.skipped or 'none'}); what is held is kept",
                            missing=len(self.missing),
                        )
                    await asyncio.sleep(self.cfg.retry_s)
                    continue
                done, _ = await asyncio.wait(
                    tasks, timeout=self.cfg.retry_s * 5, return_when=asyncio.FIRST_COMPLETED
                )
                for t in done:
                    src, idx = tasks.pop(t)
                    self.busy[src.node_id] -= 1
                    self.asked.difference_update(idx)
                    # StorageFullError ends the fetch; everything else is handled inside
                    if not t.result():  # a "busy" answer alone is no progress
                        last = time.monotonic()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):  # ended with the fetch
                    await t
        self._report()
        return self.p

    def _plan(self, sources: list[Source], slots: int) -> list[tuple[Source, list[int]]]:
        now = time.monotonic()
        me = self.f.node_id
        others = [s for s in sources if s.node_id != me]
        self.fetching.update(s.node_id for s in others if not s.advert.complete)
        usable = [
            s
            for s in others
            if s.node_id not in self.p.skipped and self.backoff.get(s.node_id, 0.0) <= now
        ]
        by_id = {s.node_id: s for s in usable}
        for node in {n for ns in self.hints.values() for n in ns} - by_id.keys():
            hinted = self._hinted(node)
            if hinted is not None and self.backoff.get(node, 0.0) <= now:
                usable.append(hinted)
        seeds = {s.node_id for s in usable if s.advert.complete and s.node_id not in self.fetching}

        # who fetches this artifact, this node too (a peer skipped shares nothing)
        crowd = tuple(sorted((self.fetching - self.p.skipped.keys()) | {me}))
        hold_s = min(self.cfg.seed_hold_s, self.cfg.stall_s / 2)
        if self._mine[0] != crowd:
            self._mine = (crowd, {})
        memo = self._mine[1]

        def mine(i: int) -> bool:
            """This node is among the seed_fanout first fetchers of chunk i (rendezvous)."""
            got = memo.get(i)
            if got is None:
                if len(crowd) <= self.cfg.seed_fanout:
                    got = True
                else:
                    rank = sorted(crowd, key=lambda n: _rendezvous(self.m.sha256, i, n))
                    got = me in rank[: self.cfg.seed_fanout]
                memo[i] = got
            return got

        batches: dict[str, tuple[Source, list[int]]] = {}

        def size(s: Source) -> int:
            # a seed, one chunk at a time: at a fetch's start the others' adverts may
            # not have arrived yet, and a burst of batches would queue copies on its uplink
            return 1 if s.node_id in seeds else self.cfg.batch

        def room(s: Source) -> bool:
            per = 1 if s.node_id in seeds else self.cfg.per_source
            return (
                self.busy.get(s.node_id, 0) < per
                and (s.node_id in batches or len(batches) < slots)
                and len(batches.get(s.node_id, (s, []))[1]) < size(s)
            )

        rank = {i: r for r, i in enumerate(self.order)}
        wanted = [i for i in self.order if i in self.missing and i not in self.asked]
        # who claims each wanted chunk, in the order of ``usable`` (Advert.holds, with
        # each advert's mask read once: this runs on every step of a fetch)
        claimants: dict[int, list[Source]] = {i: [] for i in wanted}
        hints = self.hints
        for s in usable:
            a, node = s.advert, s.node_id
            bits = a.mask()
            for i in wanted:
                if (0 <= i < a.n and bits >> i & 1) or node in hints.get(i, ()):
                    claimants[i].append(s)
        held_by = {i: sum(1 for s in claimants[i] if s.node_id not in seeds) for i in wanted}
        for i in wanted:
            if held_by[i]:
                self.unheld_since.pop(i, None)
            else:
                self.unheld_since.setdefault(i, now)
        # rarest first across peers (a chunk no peer holds yet first), then this node's order
        wanted.sort(key=lambda i: (held_by[i], rank[i]))
        for i in wanted:
            if len(batches) >= slots and all(len(idx) >= size(s) for s, idx in batches.values()):
                break  # every request this plan may start is full
            ok = [
                s
                for s in claimants[i]
                if i not in self.denied.get(s.node_id, ())
                and self.deferred.get((s.node_id, i), 0.0) <= now
            ]
            holders = [s for s in ok if s.node_id not in seeds and room(s)]
            if not holders and all(s.node_id in seeds for s in ok):
                # no peer holds it: a seed, if this node is one of the chunk's fetchers
                # or the chunk has waited seed_hold_s for them
                waited = now - self.unheld_since.get(i, now) >= hold_s
                if mine(i) or waited:
                    holders = [s for s in ok if room(s)]
            if not holders:
                continue
            best = min(
                holders,
                key=lambda s: (
                    s.node_id in seeds,
                    self.busy.get(s.node_id, 0) + (s.node_id in batches),
                    self.f._rng.random(),
                ),
            )
            batches.setdefault(best.node_id, (best, []))[1].append(i)
        return list(batches.values())

    def _hinted(self, node: str) -> Source | None:
        """A source for a taker a busy seed named, claiming nothing (the hints do)."""
        if node == self.f.node_id or node in self.p.skipped:
            return None
        got = self.hinted.get(node)
        if got is None and self.f.locate is not None:
            address = self.f.locate(node)
            if address:
                n = len(self.m.chunks)
                got = self.hinted[node] = Source(
                    node, address, Advert(node, self.m.sha256, n, bytes((n + 7) // 8))
                )
        return got

    async def _request(self, src: Source, idx: list[int]) -> bool:
        """Ask ``src`` for chunks ``idx``; True if it answered "busy" and sent none."""
        m, f = self.m, self.f
        stored = 0
        want = {m.chunks[i]: i for i in idx}
        left = dict(want)
        buf: dict[bytes, bytearray] = {}
        pieces = f.network.fetch(
            src.address,
            list(want),
            source=f.node_id,
            node_id=f.node_id,
            timeout_s=max(self.cfg.piece_timeout_s * len(idx), 30.0),
        )
        mine: dict[bytes, asyncio.Event] = {}  # what this node's server may wait for
        for digest in want:
            if digest not in f.inflight:
                mine[digest] = f.inflight[digest] = asyncio.Event()
        try:
            while left:
                try:
                    piece = await asyncio.wait_for(anext(pieces), self.cfg.piece_timeout_s)
                except StopAsyncIteration:
                    raise _Lie(
                        "silent", f"ended the stream with {len(left)} chunks unsent"
                    ) from None
                except TimeoutError:
                    raise _Lie("silent", f"sent nothing for {self.cfg.piece_timeout_s}s") from None
                i = left.get(piece.digest)
                if i is None:
                    raise _Lie("malformed", "sent a chunk that was not asked for")
                if piece.missing:
                    left.pop(piece.digest)
                    if src.advert.holds(i):
                        self._denied(src, i)
                    else:  # a taker the seed named, the chunk not landed there yet
                        self._defer(src, [i])
                    continue
                b = buf.setdefault(piece.digest, bytearray())
                if piece.offset != len(b):
                    raise _Lie("malformed", "sent pieces out of order")
                b += piece.data
                if len(b) > m.chunk_length(i):
                    raise _Lie("malformed", f"sent chunk {i} longer than {m.chunk_length(i)} bytes")
                if piece.last:
                    left.pop(piece.digest)
                    data = bytes(buf.pop(piece.digest))
                    await self._store(src, i, data)
                    stored += 1
        except _Lie as lie:
            self._skip(src, lie.reason, lie.detail)
        except LinkError as exc:
            if exc.status is Status.RESOURCE_EXHAUSTED:
                self._defer(src, list(left.values()))
                self.refused_busy.update((src.node_id, i) for i in left.values())
                takers = [n for n in busy_takers(exc.reason) if n != f.node_id]
                if takers:
                    self.fetching.update(takers)  # peers, not seeds
                    for i in left.values():
                        self.hints.setdefault(i, set()).update(takers)
                return stored == 0
            self._link_failed(src, exc)
        finally:
            for digest, ev in mine.items():
                if f.inflight.get(digest) is ev:
                    del f.inflight[digest]
                ev.set()
            closer = getattr(pieces, "aclose", None)  # an async generator's
            if closer is not None:
                await closer()
        return False

    def _defer(self, src: Source, idx: list[int]) -> None:
        """``src`` said busy for ``idx``: not asked of it for a while (doubling)."""
        now = time.monotonic()
        cap = max(self.cfg.seed_hold_s, self.cfg.busy_s)
        for i in idx:
            key = (src.node_id, i)
            n = self.deferrals[key] = self.deferrals.get(key, 0) + 1
            self.deferred[key] = now + min(self.cfg.busy_s * 2 ** (n - 1), cap)

    async def _store(self, src: Source, i: int, data: bytes) -> None:
        try:
            await asyncio.to_thread(self.f.store.put, self.m.chunks[i], data)
        except ChunkError:
            raise _Lie(
                "bad_hash", f"sent chunk {i} with bytes that do not match its hash"
            ) from None
        except StorageFullError:
            raise
        self.missing.discard(i)
        self.p.held += 1
        self.p.bytes_in += len(data)
        self.p.by_peer[src.node_id] = self.p.by_peer.get(src.node_id, 0) + len(data)
        if self.f.metrics is not None:
            self.f.metrics.moved(src.node_id, "in", len(data))
        ev = self.f.inflight.pop(self.m.chunks[i], None)
        if ev is not None:  # this node's server, asked for it early, sends it now
            ev.set()
        if (src.node_id, i) in self.refused_busy:
            self._fell_back(src, i)
        if self.f.on_chunk is not None:
            await self.f.on_chunk(self.m, i)
        self._report()

    def _fell_back(self, src: Source, i: int) -> None:
        self.p.fallbacks += 1
        if self.f.metrics is not None:
            self.f.metrics.fallbacks.labels(self.f.metrics.node_id, src.node_id).inc()
        if self.p.fallbacks == 1:
            log.warning(
                "%s: chunk %d of %s %s came from %s after it deferred it as busy: no peer "
                "shared it in time (counted in syncfw_artifact_seed_fallbacks; logged once "
                "per fetch)",
                self.f.node_id,
                i,
                self.m.name,
                self.m.version,
                clip(src.node_id),
            )

    def _denied(self, src: Source, i: int) -> None:
        self.denied.setdefault(src.node_id, set()).add(i)
        if self.f.metrics is not None:
            self.f.metrics.refused_chunk(src.node_id, "denied")
        if len(self.denied[src.node_id]) >= self.cfg.batch:
            self._skip(src, "denied", "says it does not hold chunks it advertises")

    def _skip(self, src: Source, reason: str, detail: str) -> None:
        if self.f.metrics is not None and reason != "denied":
            self.f.metrics.refused_chunk(src.node_id, reason)
        if src.node_id in self.p.skipped:
            return
        self.p.skipped[src.node_id] = f"{reason}: {detail}"
        log.warning(
            "%s: skipping peer %s for %s %s (%s): %s; fetching from the others",
            self.f.node_id,
            clip(src.node_id),
            self.m.name,
            self.m.version,
            reason,
            detail,
        )

    def _link_failed(self, src: Source, exc: LinkError) -> None:
        n = self.failures[src.node_id] = self.failures.get(src.node_id, 0) + 1
        self.backoff[src.node_id] = time.monotonic() + min(0.2 * 2**n, 5.0)
        if n >= self.cfg.link_failures:
            self._skip(src, "link", f"{n} failed requests, the last: {exc.reason}")
