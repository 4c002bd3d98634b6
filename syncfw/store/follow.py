"""A resumable, paged feed of the log with decoded values: :meth:`syncfw.Node.follow`.

A :class:`Follow` reads the ops held beyond a version vector from the store's
SQLite file, page by page, then tails new commits. It never drops a slow
consumer: whatever the consumer has not taken yet stays in SQLite.

Invariants:

1. Exactly once from a position. :attr:`Follow.position` is the version vector
   of every op delivered *or passed over* (filtered out by prefix, or rejected
   when ``include_rejected`` is false). A follower started with
   ``since=position`` delivers exactly the ops after it: no gap, no duplicate,
   across a restart of the consumer or of the node.
2. Per-origin seq order, always: each origin's ops come in seq order, and
   ``position[origin]`` only ever moves one op at a time.
3. Across origins, a page is merged by ``(hlc, origin, seq)``, and the merge
   never passes an origin that has more ops in SQLite than it read: when one
   runs dry the follower reads more of it (up to the head it read at the
   page's start) before it goes on (an origin's hlc only grows with its seq). A backlog is therefore
   delivered in global ``(hlc, origin, seq)`` order, whatever the origins'
   rates. An op that reaches this node later (a remote origin's old ops,
   synced in) is delivered when it arrives, after ops already delivered with a
   greater hlc: delivery order across pages is *not* causal order; only
   invariant 2 holds across pages.
4. Bounded memory: a follower holds at most ``page_ops`` ops read but not yet
   delivered (:attr:`Follow.held`); when more origins than ``page_ops`` have
   ops to serve, one op per such origin. To read more of the origin the merge
   waits on, it drops the buffered ops that sort last (they are read again).
5. Reads only, on its own read-only connection (WAL allows readers beside the
   writer). The store's commit listener hands each live follower the ``ops``
   rows the commit inserted, as ``(op, status)`` (``store.feed.CommitRows``:
   the ops the commit holds, never copied), and sets an :class:`asyncio.Event`;
   the follower then takes the next page itself.
5a. From memory when caught up. A follower keeps the rows of every commit
   since its last SQLite read *began* (``_memo``, at most ``page_ops`` rows; one
   more commit, or one whose rows are unknown, e.g. a snapshot installed,
   drops the memo until the next read from SQLite). When its last read reached
   every head it saw and nothing is left buffered, it takes the next page from
   the memo instead of SQLite: rows it already read are skipped, and each
   origin's rows must go on from the seq it has (``fetched + 1``) one by one,
   else the page is read from SQLite after all. The rows are those SQLite would
   return (the planner's ``RemotePlan.inserted``, a local commit's ops) and go
   through the same :meth:`_take_ops` and :meth:`_merge`, so invariants 1-4 hold
   as for a page read; ops compacted after they were committed are still
   delivered (they were never a hole).
6. No silent hole: a position ahead of the node, below a compaction point, or
   ops vanishing under a live follower raise :class:`FeedPositionError`
   naming the missing seqs; the feed then ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import sqlite3
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiosqlite

from syncfw.crdt import COUNTER, LWW, MVREG, ORSET, YDOC
from syncfw.crdt.lww import TOMBSTONE
from syncfw.errors import FeedPositionError
from syncfw.log import Op, VersionVector, built_op, decode_value
from syncfw.store.feed import CommitRows
from syncfw.store.sql import translate_error
from syncfw.zones import GRANT_KIND

__all__ = ["FeedItem", "FeedSource", "Follow", "decode_payload"]

log = logging.getLogger("syncfw.store.follow")

IDLE_RECHECK_S = 30.0
"""While caught up, re-read this often even without a wake-up. The store wakes
followers after every commit and on close (``add_commit_listener``); this is
only a safety net, never the path a change takes."""

_UNION_MAX = 200  # origins per compound SELECT (SQLite allows 500 terms)
_OPS_TERM = (
    "SELECT * FROM (SELECT origin, seq, hlc, zone, epoch, key, kind, value, prev, sig, status "
    "FROM ops WHERE origin = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?)"
)

Missing = dict[str, tuple[int, int]]
_Entry = tuple[int, int, "FeedItem | None"]  # (hlc, seq, item; None when passed over)


_UNDECODED: Any = object()  # FeedItem's value before its first read


class FeedItem:
    """One op of the log as :meth:`Node.follow` delivers it. Immutable.

    Attributes:
        op: the op itself (origin, seq, hlc, zone, epoch, key, kind, payload).
        value: the decoded payload. ``lww``: the value written (``None`` for a
            delete). ``counter``: ``{"p": ..., "n": ...}``, the origin's new
            running totals. ``orset``: ``{"op": "add"|"remove", "element": ...}``
            (a remove also has ``"observed"``, the tags it removes). ``mvreg``:
            ``{"value": ..., "observed": [...]}``. ``grant``: the grant dict.
            ``ydoc``, unknown kinds and payloads that do not decode (only
            possible for rejected ops): the raw bytes.
        deleted: an lww tombstone.
        local: written by this node.
        rejected: stored as rejected (its origin did not own the zone); such
            ops are delivered only with ``include_rejected=True``.

    An item a follower builds (:meth:`of`) decodes ``value`` and ``deleted`` from
    ``op`` when first read (:func:`decode_payload`), so a consumer that never
    reads them, or reads them for a few keys, never pays the decode.
    """

    __slots__ = ("_deleted", "_value", "local", "op", "rejected")

    op: Op
    local: bool
    rejected: bool
    _value: Any
    _deleted: bool

    def __init__(self, op: Op, value: Any, deleted: bool, local: bool, rejected: bool) -> None:
        _SET_OP(self, op)
        _SET_VALUE(self, value)
        _SET_DELETED(self, deleted)
        _SET_LOCAL(self, local)
        _SET_REJECTED(self, rejected)

    @classmethod
    def of(cls, op: Op, local: bool, rejected: bool) -> FeedItem:
        """The item for ``op``, its value decoded when first read."""
        item = _NEW(cls)
        _SET_OP(item, op)
        _SET_VALUE(item, _UNDECODED)
        _SET_LOCAL(item, local)
        _SET_REJECTED(item, rejected)
        return item

    def _decode(self) -> None:
        value, deleted = decode_payload(self.op.kind, self.op.value)
        _SET_VALUE(self, value)
        _SET_DELETED(self, deleted)

    @property
    def value(self) -> Any:
        if self._value is _UNDECODED:
            self._decode()
        return self._value

    @property
    def deleted(self) -> bool:
        if self._value is _UNDECODED:
            self._decode()
        return self._deleted

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"FeedItem is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"FeedItem is immutable: cannot delete {name!r}")

    def _fields(self) -> tuple[Any, ...]:
        return (self.op, self.value, self.deleted, self.local, self.rejected)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not FeedItem:
            return NotImplemented
        assert isinstance(other, FeedItem)
        return self._fields() == other._fields()

    def __hash__(self) -> int:  # the value follows from the op (and may be unhashable)
        return hash((self.op, self.local, self.rejected))

    def __repr__(self) -> str:
        return (
            f"FeedItem(op={self.op!r}, value={self.value!r}, deleted={self.deleted!r}, "
            f"local={self.local!r}, rejected={self.rejected!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (FeedItem, self._fields())

    @property
    def origin(self) -> str:
        return self.op.origin

    @property
    def seq(self) -> int:
        return self.op.seq

    @property
    def hlc(self) -> int:
        return self.op.hlc

    @property
    def key(self) -> str:
        return self.op.key

    @property
    def kind(self) -> str:
        return self.op.kind


_NEW = object.__new__
_SLOT: dict[str, Any] = {name: vars(FeedItem)[name].__set__ for name in FeedItem.__slots__}
_SET_OP, _SET_LOCAL, _SET_REJECTED = _SLOT["op"], _SLOT["local"], _SLOT["rejected"]
_SET_VALUE, _SET_DELETED = _SLOT["_value"], _SLOT["_deleted"]


class FeedSource(Protocol):
    """What a follower needs of a store (``syncfw.store.Store`` provides it)."""

    @property
    def path(self) -> str: ...

    @property
    def node_id(self) -> str: ...

    @property
    def version_vector(self) -> VersionVector: ...

    @property
    def closed(self) -> bool: ...

    def add_commit_listener(self, fn: Callable[[CommitRows | None], None]) -> None: ...


def _tags(raw: Any) -> list[tuple[str, int]]:
    return [(str(o), int(s)) for o, s in raw]


def decode_payload(kind: str, value: bytes) -> tuple[Any, bool]:
    """An op's payload as an application value, and whether it is an lww delete.

    Bytes that do not decode as ``kind`` defines come back raw (see
    :class:`FeedItem`); this never raises.
    """
    try:
        if kind == LWW.name:
            return (None, True) if value == TOMBSTONE else (decode_value(value), False)
        if kind == YDOC.name:
            return value, False
        raw = decode_value(value)
        if kind == COUNTER.name:
            p, n = raw
            return {"p": p, "n": n}, False
        if kind == ORSET.name:
            out: dict[str, Any] = {"op": "add" if raw[0] == "a" else "remove"}
            out["element"] = decode_value(raw[1])
            if raw[0] == "r":
                out["observed"] = _tags(raw[2])
            return out, False
        if kind == MVREG.name:
            return {"value": decode_value(raw[0]), "observed": _tags(raw[1])}, False
        if kind == GRANT_KIND:
            return raw, False
    except Exception:  # malformed payloads of rejected ops: delivered raw, by contract
        log.debug("op payload of kind %r does not decode; delivered raw", kind)
    return value, False


class _Hub:
    """One store listener per store, waking every live follower of it."""

    def __init__(self) -> None:
        self.followers: weakref.WeakSet[Follow] = weakref.WeakSet()

    def on_commit(self, rows: CommitRows | None) -> None:
        for f in list(self.followers):
            f._offer(rows)
            f._wake.set()


_HUBS: weakref.WeakKeyDictionary[Any, _Hub] = weakref.WeakKeyDictionary()


def _hub(source: FeedSource) -> _Hub:
    hub = _HUBS.get(source)
    if hub is None:
        hub = _HUBS[source] = _Hub()
        source.add_commit_listener(hub.on_commit)
    return hub


def _ahead_of(since: Mapping[str, int], have: Mapping[str, int]) -> Missing:
    """Per origin, the seqs ``since`` claims that ``have`` lacks."""
    return {o: (have.get(o, 0) + 1, s) for o, s in since.items() if s > have.get(o, 0)}


def _ahead_error(missing: Missing) -> FeedPositionError:
    named = ", ".join(f"{o} {a}..{b}" for o, (a, b) in sorted(missing.items()))
    return FeedPositionError(
        f"follow() position is ahead of this node: it lacks ops {named} "
        "(the consumer saw ops this node does not hold)",
        missing,
    )


class Follow:
    """An async iterator of :class:`FeedItem`, from a version vector on; see the module.

    Use ``async with node.follow(...) as feed: async for item in feed: ...``
    or call :meth:`aclose`. The feed ends (``StopAsyncIteration``) once the
    node is closed, or after :meth:`aclose`.
    """

    def __init__(
        self,
        source: FeedSource,
        since: Mapping[str, int] | None = None,
        prefixes: Sequence[str] = (),
        *,
        include_rejected: bool = False,
        page_ops: int = 1000,
        closed: Callable[[], bool] = lambda: False,
    ) -> None:
        """See :meth:`syncfw.Node.follow` for the arguments.

        Raises:
            FeedPositionError: ``since`` is ahead of the node's version vector.
            ValueError: ``page_ops`` < 1, or a negative seq in ``since``.
        """
        if page_ops < 1:
            raise ValueError("page_ops must be at least 1")
        pos = {str(o): int(s) for o, s in (since or {}).items()}
        if any(s < 0 for s in pos.values()):
            raise ValueError("a version vector holds seqs >= 0")
        missing = _ahead_of(pos, source.version_vector)
        if missing:
            raise _ahead_error(missing)
        self._source = source
        # Read-only: a follower can never write, whatever it runs.
        self._uri = Path(source.path).resolve().as_uri() + "?mode=ro"
        self._me = source.node_id
        self._pos: VersionVector = {o: s for o, s in pos.items() if s}
        self._prefixes = tuple(prefixes)
        self._include_rejected = include_rejected
        self._page = page_ops
        self._closed = closed
        self._wake = asyncio.Event()
        # Read, not yet delivered: per origin in seq order (``_bufs``), and
        # merged ready to hand out as (origin, seq, item or None).
        self._bufs: dict[str, collections.deque[_Entry]] = {}
        self._ready: collections.deque[tuple[str, int, FeedItem | None]] = collections.deque()
        self._fetched: VersionVector = dict(self._pos)  # highest seq read, per origin
        self._known: VersionVector = {}  # the node's vector at the last read
        self._conn: aiosqlite.Connection | None = None
        # Commits' rows since the last SQLite read began (invariant 5a).
        self._memo: list[CommitRows] = []
        self._memo_rows = 0
        self._memo_whole = False  # it holds every commit since that read began
        self._done = False
        self.max_held = 0
        """The most ops this follower held at once (invariant 4; for tests)."""
        self.pages_read = 0
        """Pages read from SQLite so far (for tests and benchmarks)."""
        self.memo_pages = 0
        """Pages taken from commits' rows in memory instead (invariant 5a)."""
        self.refills = 0
        """Extra reads of one origin the merge ran dry (invariant 3; for tests)."""

    # ------------------------------------------------------------------ surface

    @property
    def position(self) -> VersionVector:
        """The version vector of every op delivered or passed over so far."""
        return dict(self._pos)

    @property
    def held(self) -> int:
        """Ops read from SQLite and not yet delivered (at most ``page_ops``)."""
        return len(self._ready) + sum(len(b) for b in self._bufs.values())

    def take_ready(self, limit: int) -> list[FeedItem]:
        """Up to ``limit`` items already read, without reading or waiting (maybe none).

        The same items, in the same order, as that many ``anext()`` calls
        would return from what is held; :attr:`position` moves past them.
        Call it between ``anext()`` calls, not beside one in flight (its read
        may have part of a page ready while it awaits the rest).
        """
        out: list[FeedItem] = []
        ready, pos = self._ready, self._pos
        while ready and len(out) < limit:
            origin, seq, item = ready.popleft()
            pos[origin] = seq
            if item is not None:
                out.append(item)
        return out

    def __aiter__(self) -> Follow:
        return self

    async def __anext__(self) -> FeedItem:
        ready = self._ready
        pos = self._pos
        while True:
            while ready:
                origin, seq, item = ready.popleft()
                pos[origin] = seq
                if item is not None:
                    return item
            if self._done:
                raise StopAsyncIteration
            if self._closed():
                await self.aclose()
                raise StopAsyncIteration
            try:
                if not await self._read():
                    await self._idle()
            except Exception:  # the feed cannot go on: release the connection
                await self.aclose()
                raise

    async def aclose(self) -> None:
        """Stop following and close the read connection. Idempotent."""
        self._done = True
        self._ready.clear()
        self._bufs.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> Follow:
        await self._connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ reading

    async def _connect(self) -> aiosqlite.Connection:
        if self._conn is not None:
            return self._conn
        try:
            conn = await aiosqlite.connect(self._uri, uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise translate_error(exc) from None
        try:
            await conn.execute("PRAGMA query_only = 1")
        except sqlite3.Error as exc:
            await conn.close()
            raise translate_error(exc) from None
        self._conn = conn
        _hub(self._source).followers.add(self)
        return conn

    async def _idle(self) -> None:
        """Wait for a commit (or the idle re-check) after a read found nothing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_RECHECK_S):
                await self._wake.wait()

    def _offer(self, rows: CommitRows | None) -> None:
        """A commit inserted ``rows`` (None: rows not at hand); see invariant 5a."""
        if not self._memo_whole:
            return
        if rows is None or self._memo_rows + len(rows) > self._page:
            self._memo_whole = False
            self._memo.clear()
            self._memo_rows = 0
        elif rows:
            self._memo.append(rows)
            self._memo_rows += len(rows)

    def _from_memo(self) -> list[tuple[Op, int]] | None:
        """The next page's rows from the memo, or None: read SQLite (invariant 5a)."""
        if not self._memo_whole or self._bufs:
            return None
        fetched = self._fetched
        if any(fetched.get(o, 0) < s for o, s in self._known.items()):
            return None  # the last read stopped short of a head: SQLite has more
        nxt: dict[str, int] = {}
        page: list[tuple[Op, int]] = []
        for part in self._memo:
            for row in part:
                origin, seq = row[0].origin, row[0].seq
                want = nxt.get(origin) or fetched.get(origin, 0) + 1
                if seq < want:
                    continue  # read from SQLite already (it committed during that read)
                if seq > want:
                    return None  # not the next op of its origin: let SQLite say why
                page.append(row)
                nxt[origin] = seq + 1
        self._memo.clear()
        self._memo_rows = 0
        return page

    async def _read(self) -> bool:
        """Read the next page beyond the position. Returns False when caught up."""
        conn = await self._connect()
        # Cleared before the read: a commit landing after our snapshot sets it again.
        self._wake.clear()
        page = self._from_memo()
        if page is not None:
            if page:
                self.memo_pages += 1
                self._take_ops(page, {})
                known, fetched = self._known, self._fetched
                for origin in {op.origin for op, _ in page}:
                    known[origin] = fetched[origin]  # the heads this page reached
                await self._merge(conn)
            return bool(self._ready)
        # Every commit from here on is kept until this read is used (invariant 5a).
        self._memo.clear()
        self._memo_rows = 0
        self._memo_whole = True
        self.pages_read += 1
        # No read transaction around the page: every read is bounded by the
        # heads read first (``seq <= upto``), and the log below a head only
        # ever loses ops to compaction, which _plan and _take report (invariant
        # 6). Each statement is one hop to the connection's thread and back
        # through a busy event loop; BEGIN and COMMIT would be two more.
        try:
            heads = await conn.execute_fetchall("SELECT origin, seq, compacted FROM heads")
            want = self._plan({o: (s, c) for o, s, c in heads})
            for i in range(0, len(want), _UNION_MAX):
                part = want[i : i + _UNION_MAX]
                rows = await conn.execute_fetchall(
                    " UNION ALL ".join([_OPS_TERM] * len(part)),
                    [v for w in part for v in w],
                )
                self._take(rows, {o: min(after + n, upto) for o, after, upto, n in part})
            await self._merge(conn)
        except sqlite3.Error as exc:
            raise translate_error(exc) from None
        return bool(self._ready)

    def _plan(self, heads: dict[str, tuple[int, int]]) -> list[tuple[str, int, int, int]]:
        """Check the position against the heads; the (origin, after, upto, limit) to read."""
        have = {o: s for o, (s, _) in heads.items()}
        missing = _ahead_of(self._pos, have)
        if missing:
            raise _ahead_error(missing)
        self._known = have
        need = [o for o, s in have.items() if s > self._fetched.get(o, 0) and not self._bufs.get(o)]
        gone = {
            o: (self._fetched.get(o, 0) + 1, heads[o][1])
            for o in need
            if heads[o][1] > self._fetched.get(o, 0)
        }
        if gone:
            named = ", ".join(f"{o} {a}..{b}" for o, (a, b) in sorted(gone.items()))
            raise FeedPositionError(
                f"follow() cannot serve ops {named}: compacted away on this node "
                "(resume from a snapshot, or from a peer that still holds them)",
                gone,
            )
        if not need:
            return []
        room = self._page - self.held
        if room < len(need):  # leftovers crowd the page: one op of each origin first
            room += self._evict(len(need) - room, keep=None)
        # Half the room to start with: the rest is for the origins the merge
        # runs dry (invariant 3) without dropping what was just read.
        each = max(room // (2 * len(need)), 1)
        return [(o, self._fetched.get(o, 0), have[o], each) for o in sorted(need)]

    def _take(self, rows: Iterable[Sequence[Any]], expect: dict[str, int]) -> None:
        """:meth:`_take_ops` of rows read from SQLite (origin, seq, ..., sig, status)."""
        self._take_ops(((built_op(r[:10]), r[10]) for r in rows), expect)

    def _take_ops(self, rows: Iterable[tuple[Op, int]], expect: dict[str, int]) -> None:
        """Add a page of ``(op, status)`` rows to the per-origin buffers, checking contiguity.

        ``expect`` is, per origin read, the last seq the read must reach.
        """
        me, prefixes, with_rejected = self._me, self._prefixes, self._include_rejected
        fetched = self._fetched
        bufs = self._bufs
        of = FeedItem.of
        gone: Missing = {}
        for op, status in rows:
            origin, seq = op.origin, op.seq
            nxt = fetched.get(origin, 0) + 1
            if seq != nxt:  # compacted away after the heads were read: not servable
                gone.setdefault(origin, (nxt, seq - 1))
                continue
            fetched[origin] = seq
            item: FeedItem | None = None
            if (with_rejected or not status) and (not prefixes or op.key.startswith(prefixes)):
                item = of(op, origin == me, bool(status))
            buf = bufs.get(origin)
            if buf is None:
                buf = bufs[origin] = collections.deque()
            buf.append((op.hlc, seq, item))
        for origin, last in expect.items():
            if fetched.get(origin, 0) < last and origin not in gone:
                gone[origin] = (fetched.get(origin, 0) + 1, last)
        if gone:
            raise FeedPositionError(f"ops vanished from the log while following: {gone}", gone)
        self.max_held = max(self.max_held, self.held)

    async def _merge(self, conn: aiosqlite.Connection) -> None:
        """Move buffered ops to the ready queue in (hlc, origin, seq) order.

        An origin whose buffer runs dry while it has more ops in SQLite is read
        further (:meth:`_refill`) before the merge goes on: its next op may
        sort before every other head. Without room for it, the merge stops
        there; the rest is merged with the next page.
        """
        bufs, ready, fetched, known = self._bufs, self._ready, self._fetched, self._known
        heap = [(b[0][0], o, b[0][1]) for o, b in bufs.items() if b]
        heapq.heapify(heap)
        while heap:
            origin = heap[0][1]
            buf = bufs[origin]
            if len(heap) == 1:  # one origin: nothing to merge
                ready.extend((origin, seq, item) for _, seq, item in buf)
                buf.clear()
            else:
                _, seq, item = buf.popleft()
                ready.append((origin, seq, item))
            if not buf:
                if known.get(origin, 0) <= fetched.get(origin, 0):
                    heapq.heappop(heap)
                    continue
                if not await self._refill(conn, origin):
                    break
            heapq.heapreplace(heap, (buf[0][0], origin, buf[0][1]))
        for o in [o for o, b in bufs.items() if not b]:
            del bufs[o]

    async def _refill(self, conn: aiosqlite.Connection, origin: str) -> bool:
        """Read more of ``origin`` into its (empty) buffer. False: no room for any."""
        after = self._fetched.get(origin, 0)
        want = min(self._known[origin] - after, max(self._page // 8, 1))
        room = self._page - self.held
        if room < want:
            room += self._evict(want - room, keep=origin)
        n = min(want, room)
        if n < 1:
            return False
        try:
            rows = await conn.execute_fetchall(_OPS_TERM, (origin, after, after + n, n))
        except sqlite3.Error as exc:
            raise translate_error(exc) from None
        self.refills += 1
        self._take(rows, {origin: after + n})
        return True

    def _evict(self, n: int, *, keep: str | None) -> int:
        """Drop up to ``n`` buffered ops that sort last (never an origin's head,
        nor ``keep``'s); they are read again later. Returns how many were dropped.
        """
        bufs, fetched = self._bufs, self._fetched
        freed = 0
        while freed < n:
            tails = [(b[-1][0], o) for o, b in bufs.items() if o != keep and len(b) > 1]
            if not tails:
                break
            origin = max(tails)[1]
            buf = bufs[origin]
            k = min(n - freed, len(buf) - 1, max(len(buf) // 2, 1))
            for _ in range(k):
                buf.pop()
            fetched[origin] = buf[-1][1]
            freed += k
        return freed
