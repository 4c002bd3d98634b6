"""The node's replicated log and materialized state in one SQLite file (aiosqlite, WAL).

Invariants:

1. One writer. Every mutation runs on the store's single writer task, so the
   version vector, chain heads, pending set and zone table kept in memory are
   always those of the last committed transaction.
2. One transaction per step: appending ops, updating materialized state, the
   version vector, pending ops and the clock's high-water mark commit together
   or not at all. In-memory mirrors change only after COMMIT returns.
3. Group commit: local writes waiting in the queue are stamped and committed in
   one transaction; each caller's ``await`` returns only after that commit. A
   batch may be planned while the one before it commits; its transaction then
   first checks that the log ends where it was planned to start (``TIP_SQL``),
   and is planned again if not.
4. Per-origin contiguity: an op is applied only after its origin's previous op,
   and only if its ``prev`` names that op's hash. Ops past a gap, with a zone
   epoch not yet granted here, or from too far in the future wait in
   ``pending``.
5. Idempotence: an op already held is a no-op; a *different* op at a held
   (origin, seq) is a fork and refuses the whole batch.
6. A remote op whose origin did not own its zone at its epoch is stored as
   rejected (it stays in its origin's chain and is relayed) and never merged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import msgpack

from syncfw.clock import HLC, LOGICAL_BITS, wall_ms
from syncfw.crdt import KINDS, LWW, YDOC
from syncfw.crdt.ydoc import canonical as ydoc_canonical
from syncfw.errors import (
    ChainError,
    ClockSkewError,
    CorruptDatabaseError,
    DecodeError,
    ForkError,
    StorageError,
    StoreClosedError,
)
from syncfw.log import GENESIS, ApplyResult, Op, VersionVector, decode_value, op_hash
from syncfw.store.feed import Change, ChangeFeed
from syncfw.store.sql import (
    INSERT_OP,
    TIP_SQL,
    UPSERT_HEAD,
    StaleTip,
    Step,
    check_and_migrate,
    chunks,
    run_steps,
    translate_error,
)
from syncfw.store.stage import Stage, lww_ok, stage_grant
from syncfw.zones import GRANT_KIND, Fleet, Grant, Verdict, ZoneTable

__all__ = ["Store", "StoreConfig", "StoreStats"]

log = logging.getLogger("syncfw.store")

T = TypeVar("T")
PayloadFn = Callable[[Any], bytes]



@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Tuning of the SQLite store.

    Attributes:
        synchronous: SQLite durability. ``"FULL"`` fsyncs every commit;
            ``"NORMAL"`` (WAL) may lose the last commits on power loss, never
            on a process crash.
        max_bytes: size cap of the database file; a write that would exceed
            it raises :class:`StorageFullError` and writes nothing.
        max_batch: most local writes grouped into one transaction.
        max_offset_ms: how far ahead of local time a remote op may be.
        max_pending: most ops held back at once (the farthest ahead are
            dropped beyond it; they are resent by the next exchange).
        changes_buffer: per-subscriber buffer of the change feed.
    """

    synchronous: Literal["FULL", "NORMAL"] = "NORMAL"
    max_bytes: int | None = None
    max_batch: int = 2048
    max_offset_ms: int = 500
    max_pending: int = 100_000
    changes_buffer: int = 10_000


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Sizes and counts, for ``syncfw inspect`` and node status."""

    file_bytes: int
    ops: int
    pending: int
    rejected: int
    keys: int
    peers: int


@dataclass(slots=True)
class _Write:
    kind: str
    key: str
    zone: str
    epoch: int
    payload: bytes | PayloadFn
    future: asyncio.Future[Op]


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]


_Job = _Write | _Call | None


def _op_row(op: Op, status: int) -> tuple[Any, ...]:
    return (*op.to_tuple(), status)


def _pack_op(op: Op) -> bytes:
    return msgpack.packb(op.to_tuple(), use_bin_type=True)


def _unpack_op(data: bytes) -> Op:
    return Op.from_tuple(msgpack.unpackb(data, raw=False))


class Store:
    """A node's SQLite-backed log and state. Open with :meth:`open`; close with :meth:`aclose`.

    Most applications use :class:`syncfw.Node`, which wraps a store.
    """

    def __init__(
        self,
        conn: aiosqlite.Connection,
        path: str,
        node_id: str,
        fleet: Fleet,
        clock: HLC,
        config: StoreConfig,
    ) -> None:
        self._conn = conn
        self.path = path
        self.node_id = node_id
        self.fleet = fleet
        self.clock = clock
        self.config = config
        self.zones = ZoneTable(fleet)
        self._vv: VersionVector = {}
        self._heads: dict[str, bytes] = {}
        self._compacted: dict[str, int] = {}
        self._pending: dict[str, dict[int, tuple[Op, str]]] = {}
        self._jobs: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Future[None] | None = None
        # Where the next local batch starts: the committed tip, or the tip of
        # the batch still committing (pipelining).
        self._tip: tuple[int, bytes] = (0, GENESIS)
        self._writer_task: asyncio.Task[None] | None = None
        self._subscribers: set[asyncio.Queue[Change | None]] = set()
        self._listeners: list[Callable[[list[Op], bool], None]] = []
        self._closed = False

    # ------------------------------------------------------------------ open/close

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        node_id: str,
        fleet: Fleet,
        wall: Callable[[], int] = wall_ms,
        config: StoreConfig | None = None,
    ) -> Store:
        """Open (creating if needed) the store at ``path``.

        Raises:
            CorruptDatabaseError: the file is not a readable SQLite database.
            ForeignDatabaseError: a SQLite file syncfw did not create, or one
                created for another node id or fleet.
            SchemaVersionError: the file's schema is newer than this syncfw.
            StorageError: the file cannot be opened at all.
        In every case the file is left untouched.
        """
        if not node_id:
            raise ValueError("node_id must not be empty")
        config = config or StoreConfig()
        path = str(path)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {path!r}: {exc}") from None
        try:
            await check_and_migrate(
                conn, path, node_id, fleet, config.synchronous, config.max_bytes
            )
            store = cls(conn, path, node_id, fleet, HLC(wall, max_offset_ms=config.max_offset_ms), config)
            await store._load()
        except BaseException:
            await conn.close()
            raise
        store._writer_task = asyncio.get_running_loop().create_task(
            store._writer(), name=f"syncfw-writer-{node_id}"
        )
        return store

    async def _load(self) -> None:
        try:
            for origin, seq, hsh, compacted in await self._conn.execute_fetchall(
                "SELECT origin, seq, hash, compacted FROM heads"
            ):
                self._vv[origin] = seq
                self._heads[origin] = hsh
                if compacted:
                    self._compacted[origin] = compacted
            for prefix, epoch, owners in await self._conn.execute_fetchall(
                "SELECT prefix, epoch, owners FROM grants ORDER BY prefix, epoch"
            ):
                self.zones.add_grant(Grant(prefix, frozenset(msgpack.unpackb(owners)), epoch))
            for origin, seq, blob, reason in await self._conn.execute_fetchall(
                "SELECT origin, seq, op, reason FROM pending"
            ):
                self._pending.setdefault(origin, {})[seq] = (_unpack_op(blob), reason)
            rows = list(await self._conn.execute_fetchall("SELECT v FROM meta WHERE k = 'hlc'"))
            high = int(rows[0][0]) if rows else 0
            rows = list(
                await self._conn.execute_fetchall(
                    "SELECT max(hlc) FROM ops WHERE origin = ?", (self.node_id,)
                )
            )
            if rows and rows[0][0] is not None:
                high = max(high, int(rows[0][0]))
        except sqlite3.Error as exc:
            raise translate_error(exc) from None
        except DecodeError as exc:
            raise CorruptDatabaseError(f"pending op in {self.path!r} is damaged: {exc}") from None
        # A restart with the wall clock set in the past never issues a smaller timestamp.
        self.clock.advance_to(high)
        self._tip = (self._vv.get(self.node_id, 0), self._heads.get(self.node_id, GENESIS))

    async def aclose(self) -> None:
        """Finish queued writes, stop the writer and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer_task is not None:
            self._enqueue(None)
            await self._writer_task
        for q in self._subscribers:
            q.put_nowait(None)
        await self._conn.close()

    # ------------------------------------------------------------------ properties

    @property
    def version_vector(self) -> VersionVector:
        """A copy of the version vector (applied and rejected ops, contiguous)."""
        return dict(self._vv)

    def head(self, origin: str) -> bytes:
        """Hash of the last contiguous op held from ``origin``."""
        return self._heads.get(origin, GENESIS)

    # ------------------------------------------------------------------ the writer

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    async def write(
        self, kind: str, key: str, zone: str, epoch: int, payload: bytes | PayloadFn
    ) -> Op:
        """Append one local op (group-committed) and return it once durable.

        ``payload`` is the op's bytes, or a function of the key's current
        state returning them (for types whose ops depend on it: counters,
        OR-set removes, registers). Zone checks are the caller's job.
        """
        self._check_open()
        fut: asyncio.Future[Op] = asyncio.get_running_loop().create_future()
        self._enqueue(_Write(kind, key, zone, epoch, payload, fut))
        return await fut

    async def write_many(
        self, writes: Sequence[tuple[str, str, str, int, bytes | PayloadFn]]
    ) -> list[Op | BaseException]:
        """Append several local ops, in order, waiting once for all of them.

        Each write is ``(kind, key, zone, epoch, payload)`` as for :meth:`write`.
        Returns each write's op, or the exception that refused it alone.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Op]] = []
        for kind, key, zone, epoch, payload in writes:
            fut: asyncio.Future[Op] = loop.create_future()
            self._jobs.append(_Write(kind, key, zone, epoch, payload, fut))
            futures.append(fut)
        if not futures:
            return []
        self._wake()
        # Batches commit in queue order, so once the last is settled all are.
        await asyncio.wait([futures[-1]])
        if not all(f.done() for f in futures):  # a batch was re-planned: wait for every one
            await asyncio.wait(futures)
        return [f.exception() or f.result() for f in futures]

    def _wake(self) -> None:
        """Wake the writer if it is waiting for work."""
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` on the writer task, between group commits."""
        self._check_open()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Call(fn, fut))
        return await fut

    def _enqueue(self, job: _Job) -> None:
        self._jobs.append(job)
        self._wake()

    async def _next_job(self) -> _Job:
        while not self._jobs:
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
            self._wakeup = None
        return self._jobs.popleft()

    async def _writer(self) -> None:
        jobs = self._jobs
        inflight: asyncio.Task[bool] | None = None
        try:
            while True:
                if inflight is not None and not jobs:
                    # Wait for the batch in flight to land, or for a new write
                    # to plan while it does, whichever comes first.
                    wakeup = self._wakeup = asyncio.get_running_loop().create_future()
                    await asyncio.wait((inflight, wakeup), return_when=asyncio.FIRST_COMPLETED)
                    self._wakeup = None
                    if inflight.done():
                        inflight = None
                job = await self._next_job()
                if job is None:
                    return
                if isinstance(job, _Call):
                    if inflight is not None:
                        await inflight
                        inflight = None
                    await self._run_call(job)
                    continue
                batch = [job]
                # Group commit: let every writer that is ready to run enqueue its
                # write before this transaction starts (one loop turn, no timer).
                await asyncio.sleep(0)
                limit = self.config.max_batch
                while jobs and len(batch) < limit and isinstance(jobs[0], _Write):
                    batch.append(jobs.popleft())  # type: ignore[arg-type]
                # Pipelining: this batch is planned while the previous one
                # commits on the database thread, then queued behind it.
                nxt, drain = await self._commit_local(batch)
                if inflight is not None:
                    await inflight
                inflight = nxt
                if inflight is not None and drain:
                    # A grant changes the zone table later batches are planned
                    # against: let it land first.
                    await inflight
                    inflight = None
        finally:
            if inflight is not None:
                await inflight
            while jobs:  # writes re-queued behind the close: refuse them clearly
                left = jobs.popleft()
                if left is not None and not left.future.done():
                    left.future.set_exception(StoreClosedError("the store was closed"))

    @staticmethod
    async def _run_call(job: _Call) -> None:
        try:
            result = await job.fn()
        except BaseException as exc:  # delivered to the caller, never kills the writer
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)

    async def _load_states(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """Decoded states of non-lww (kind, key) pairs, empty where absent."""
        wanted = sorted(set(keys))
        states: dict[tuple[str, str], Any] = {}
        by_kind: dict[str, list[str]] = defaultdict(list)
        for kind, key in wanted:
            by_kind[kind].append(key)
            states[(kind, key)] = KINDS[kind].empty()
        for kind, klist in by_kind.items():
            crdt = KINDS[kind]
            for chunk in chunks(klist):
                marks = ",".join("?" * len(chunk))
                for key, data in await self._conn.execute_fetchall(
                    f"SELECT key, data FROM state WHERE kind = ? AND key IN ({marks})",
                    (kind, *chunk),
                ):
                    states[(kind, key)] = crdt.decode(data)
        return states

    async def _commit_local(self, batch: list[_Write]) -> tuple[asyncio.Task[bool] | None, bool]:
        """Stamp a batch of local writes and queue its transaction.

        Returns the task that finishes the batch (resolves the callers once the
        transaction committed) and whether the writer must wait for it before
        planning more. The batch is planned on the tip of the batch before it,
        which may still be committing; its transaction first checks that the
        log really ends there, and if not (that batch failed) its writes are
        planned again.
        """
        me = self.node_id
        start, head = self._tip
        seq = start
        try:
            states = await self._load_states(
                (w.kind, w.key) for w in batch if w.kind in KINDS and w.kind != "lww"
            )
        except (sqlite3.Error, DecodeError) as exc:
            err = translate_error(exc) if isinstance(exc, sqlite3.Error) else exc
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(err)
            return None, False
        ops: list[Op] = []
        done: list[_Write] = []
        stage = Stage()
        zones = self.zones
        for w in batch:
            if w.future.done():  # the caller was cancelled before its turn
                continue
            try:
                if callable(w.payload):
                    # A grant's payload is a function of the zone table (its epoch).
                    state = zones if w.kind == GRANT_KIND else states[(w.kind, w.key)]
                    payload = w.payload(state)
                else:
                    payload = w.payload
                op = Op(me, seq + 1, self.clock.now(), w.zone, w.epoch, w.key, w.kind, payload, head)
                if op.kind == GRANT_KIND:
                    zones = zones.copy() if zones is self.zones else zones
                    reason = stage_grant(zones, op, stage)
                    if reason is not None:
                        raise ValueError(reason)
                else:
                    stage.apply(op, states)
            except Exception as exc:  # one bad write (e.g. its payload function) fails alone
                w.future.set_exception(exc)
                continue
            seq += 1
            head = op_hash(op)
            ops.append(op)
            done.append(w)
        if not ops:
            return None, False
        steps: list[Step] = [(INSERT_OP, [_op_row(op, 0) for op in ops])]
        steps += stage.steps(states)
        steps += [(UPSERT_HEAD, [(me, seq, head)]), self._hlc_step()]
        txn = asyncio.ensure_future(self._transaction(steps, expect=(me, start)))
        self._tip = (seq, head)
        finish = asyncio.ensure_future(self._finish_local(txn, done, ops, zones))
        return finish, zones is not self.zones

    async def _finish_local(
        self, txn: asyncio.Future[int], done: list[_Write], ops: list[Op], zones: ZoneTable
    ) -> bool:
        me = self.node_id
        try:
            await txn
        except StaleTip:
            # The batch before this one failed: plan these writes again, first.
            self._tip = (self._vv.get(me, 0), self._heads.get(me, GENESIS))
            self._jobs.extendleft(reversed(done))
            self._wake()
            return False
        except Exception as exc:  # the writer must outlive any failure of one batch
            if not isinstance(exc, StorageError):
                log.exception("unexpected failure committing local writes")
                exc = StorageError(f"unexpected failure committing local writes: {exc!r}")
            self._tip = (self._vv.get(me, 0), self._heads.get(me, GENESIS))
            for w in done:
                w.future.set_exception(exc)
            return False
        self._vv[me] = ops[-1].seq
        self._heads[me] = op_hash(ops[-1])
        self.zones = zones
        for w, op in zip(done, ops, strict=True):
            w.future.set_result(op)
        self._notify(ops, local=True)
        return True

    def _hlc_step(self) -> Step:
        return ("INSERT OR REPLACE INTO meta (k, v) VALUES ('hlc', ?)", [(self.clock.last,)])

    async def _transaction(
        self, steps: Sequence[Step], *, expect: tuple[str, int] | None = None
    ) -> int:
        """Run ``steps`` in one transaction, in one hop to the database thread.

        aiosqlite costs one thread round trip per awaited call (~50-100 us);
        a commit of a batch would otherwise pay for BEGIN, each statement and
        COMMIT. Returns the total of rows changed. With ``expect=(origin,
        seq)`` the transaction first checks that the log of ``origin`` ends at
        ``seq`` and raises ``StaleTip`` (writing nothing) if it does not.

        Raises:
            StorageError: translated from sqlite3 (StorageFullError on a full
                disk or size cap); the transaction was rolled back whole.
        """
        steps = [s for s in steps if s[1]]
        try:
            run = getattr(self._conn, "_execute", None)
            if run is not None:
                return int(await run(run_steps, self._conn._conn, steps, expect))
            return await self._transaction_stepwise(steps, expect)  # pragma: no cover
        except sqlite3.Error as exc:
            raise translate_error(exc) from None

    async def _transaction_stepwise(
        self, steps: Sequence[Step], expect: tuple[str, int] | None
    ) -> int:  # pragma: no cover
        """The same through public aiosqlite calls, should its internals change."""
        changed = 0
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            if expect is not None:
                rows = list(await self._conn.execute_fetchall(TIP_SQL, (expect[0],)))
                if (rows[0][0] if rows else 0) != expect[1]:
                    raise StaleTip(expect)
            for sql, params in steps:
                cur = await self._conn.executemany(sql, params)
                changed += max(cur.rowcount, 0)
            await self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await self._conn.execute("ROLLBACK")
            raise
        return changed

    # ------------------------------------------------------------------ remote ops

    async def apply_remote(self, ops: Sequence[Op]) -> ApplyResult:
        """Merge a batch of ops from a peer, atomically (see the module invariants).

        Raises:
            ChainError: an op's ``prev`` does not extend its origin's chain.
            ForkError: an op differs from the one held at its (origin, seq).
            StorageFullError: no room; nothing of the batch was applied.
        """
        if not ops:
            return ApplyResult()
        return await self._call(lambda: self._apply_remote(list(ops)))

    async def retry_pending(self) -> ApplyResult:
        """Re-judge held-back ops (after a grant, or once local time caught up)."""
        return await self._call(lambda: self._apply_remote([]))

    async def _apply_remote(self, incoming: list[Op]) -> ApplyResult:
        vv = self._vv
        fresh: dict[str, dict[int, Op]] = defaultdict(dict)
        held: list[Op] = []
        duplicates = 0
        for op in incoming:
            if op.seq <= vv.get(op.origin, 0):
                held.append(op)
                continue
            seen = fresh[op.origin].get(op.seq)
            if seen is None:
                pend = self._pending.get(op.origin, {}).get(op.seq)
                seen = pend[0] if pend is not None else None
            if seen is not None:
                if seen.to_tuple()[:9] != op.to_tuple()[:9]:
                    raise ForkError(f"two different ops at ({op.origin!r}, {op.seq})")
                duplicates += 1
                continue
            fresh[op.origin][op.seq] = op
        if held:
            duplicates += await self._check_forks(held)

        origins = set(fresh) | set(self._pending)
        # Held-back ops, by origin, copied: a broken one is dropped from the copy.
        held_back = {o: {s: op for s, (op, _) in d.items()} for o, d in self._pending.items()}
        if not any(fresh.values()) and not any(
            vv.get(o, 0) + 1 in d for o, d in held_back.items()
        ):
            return ApplyResult(duplicates=duplicates)

        states = await self._load_states(
            (op.kind, op.key)
            for d in (*fresh.values(), *held_back.values())
            for op in d.values()
            if op.kind != "lww" and op.kind in KINDS
        )
        zones = self.zones.copy()
        stage = Stage()
        lww = stage.lww
        nxt = {o: vv.get(o, 0) + 1 for o in origins}
        heads = {o: self._heads.get(o, GENESIS) for o in origins}
        waiting: dict[str, str] = {}
        accepting: set[tuple[str, str, int]] = set()
        # Ops stamped at or past this are further ahead than max_offset allows.
        skew_limit = (self.clock.wall() + self.clock.max_offset_ms + 1) << LOGICAL_BITS
        accepted: list[Op] = []
        rejected: list[tuple[Op, str]] = []
        authority = self.fleet.authority
        order = sorted(origins, key=lambda o: (o != authority, o))
        progress = True
        while progress:
            progress = False
            for origin in order:
                new_ops = fresh.get(origin, {})
                old_ops = held_back.get(origin, {})
                n, head = nxt[origin], heads[origin]
                while True:
                    found = new_ops.get(n)
                    is_fresh = found is not None
                    if found is None:
                        found = old_ops.get(n)
                        if found is None:
                            break
                    op = found
                    if op.prev != head:
                        if is_fresh:
                            raise ChainError(
                                f"op ({op.origin!r}, {op.seq}) does not extend its origin's chain"
                            )
                        # A held-back op that turns out not to chain is dropped;
                        # the genuine one can still arrive.
                        log.warning("dropping pending op (%s, %d): broken chain", op.origin, op.seq)
                        del old_ops[n]
                        break
                    if op.hlc >= skew_limit:
                        try:
                            self.clock.check(op.hlc)
                        except ClockSkewError as exc:
                            waiting[origin] = f"clock skew: {exc}"
                            break
                    # An accepting verdict never changes (the grant history is
                    # append-only), so it is judged once per (origin, zone, epoch).
                    jkey = (origin, op.zone, op.epoch)
                    if jkey in accepting and op.key.startswith(op.zone):
                        reason = ""
                    else:
                        verdict, reason = zones.judge(op)
                        if verdict is Verdict.WAIT:
                            waiting[origin] = reason
                            break
                        if verdict is Verdict.ACCEPT:
                            accepting.add(jkey)
                    if not reason:
                        if op.kind == "lww" and lww_ok(op.value):
                            # The hot path of syncfw.crdt.lww, inlined: greatest (hlc, origin, payload).
                            cand = (op.hlc, origin, op.value)
                            cur = lww.get(op.key)
                            if cur is None or cand > cur:
                                lww[op.key] = cand
                        else:
                            reason = self._stage_remote(op, zones, stage, states) or ""
                    if reason:
                        rejected.append((op, reason))
                    else:
                        accepted.append(op)
                    head = op_hash(op)
                    n += 1
                    waiting.pop(origin, None)
                    progress = True
                nxt[origin], heads[origin] = n, head

        # What stays held back: everything not consumed, with why.
        new_pending: dict[str, dict[int, tuple[Op, str]]] = {}
        for origin in origins:
            why = waiting.get(origin, "gap: waiting for earlier ops of this origin")
            keep = {
                s: (op, why)
                for d in (held_back.get(origin, {}), fresh.get(origin, {}))
                for s, op in d.items()
                if s >= nxt[origin]
            }
            if keep:
                new_pending[origin] = keep
        new_pending = self._bound_pending(new_pending)
        old_keys = {(o, s) for o, d in self._pending.items() for s in d}
        new_keys = {(o, s) for o, d in new_pending.items() for s in d}
        to_delete = sorted(old_keys - new_keys)
        to_insert = [
            (o, s, _pack_op(new_pending[o][s][0]), new_pending[o][s][1])
            for o, s in sorted(new_keys - old_keys)
        ]
        progressed = [o for o in origins if nxt[o] != vv.get(o, 0) + 1]
        if accepted:
            self.clock.observe(max(op.hlc for op in accepted))

        rows = [(*op.to_tuple(), 0) for op in accepted]
        rows += [(*op.to_tuple(), 1) for op, _ in rejected]
        steps: list[Step] = [
            (INSERT_OP, rows),
            (
                "INSERT INTO rejected (origin, seq, key, reason) VALUES (?, ?, ?, ?)",
                [(op.origin, op.seq, op.key, why) for op, why in rejected],
            ),
            *stage.steps(states),
            (UPSERT_HEAD, [(o, nxt[o] - 1, heads[o]) for o in progressed]),
            ("DELETE FROM pending WHERE origin = ? AND seq = ?", to_delete),
            ("INSERT OR REPLACE INTO pending (origin, seq, op, reason) VALUES (?, ?, ?, ?)", to_insert),
            self._hlc_step(),
        ]
        await self._transaction(steps)

        for o in progressed:
            self._vv[o] = nxt[o] - 1
            self._heads[o] = heads[o]
        if self.node_id in progressed:  # our own ops, relayed back (a restore from backup)
            self._tip = (self._vv[self.node_id], self._heads[self.node_id])
        self._pending = new_pending
        self.zones = zones
        if rejected:
            for op, why in rejected:
                log.warning("rejected op (%s, %d) on %r: %s", op.origin, op.seq, op.key, why)
        self._notify(accepted, local=False)
        pending = sum(len(d) for d in new_pending.values())
        return ApplyResult(
            applied=len(accepted), duplicates=duplicates, pending=pending, rejected=len(rejected)
        )

    def _stage_remote(
        self, op: Op, zones: ZoneTable, stage: Stage, states: dict[tuple[str, str], Any]
    ) -> str | None:
        """Stage an accepted op; return a rejection reason if it cannot be merged."""
        if op.kind == GRANT_KIND:
            return stage_grant(zones, op, stage)
        if op.kind not in KINDS:
            return f"unknown op kind {op.kind!r}"
        try:
            if op.kind == "lww" and op.value:
                decode_value(op.value)
            stage.apply(op, states)
        except DecodeError as exc:
            return f"malformed {op.kind} payload: {exc}"
        return None

    def _bound_pending(
        self, pending: dict[str, dict[int, tuple[Op, str]]]
    ) -> dict[str, dict[int, tuple[Op, str]]]:
        total = sum(len(d) for d in pending.values())
        excess = total - self.config.max_pending
        if excess <= 0:
            return pending
        # Drop the ops farthest ahead of their origin: they are the last needed
        # and the next exchange sends them again.
        ranked = sorted(
            ((s - self._vv.get(o, 0), o, s) for o, d in pending.items() for s in d), reverse=True
        )
        for _, o, s in ranked[:excess]:
            del pending[o][s]
        log.warning("pending ops over max_pending: dropped %d, to be resent", excess)
        return {o: d for o, d in pending.items() if d}

    async def _check_forks(self, held: list[Op]) -> int:
        """Compare ops we already hold against the stored ones. Returns the count."""
        stored: dict[tuple[str, int], tuple[Any, ...]] = {}
        by_origin: dict[str, list[int]] = defaultdict(list)
        for op in held:
            by_origin[op.origin].append(op.seq)
        try:
            for origin, seqs in by_origin.items():
                for chunk in chunks(seqs):
                    marks = ",".join("?" * len(chunk))
                    for row in await self._conn.execute_fetchall(
                        "SELECT origin, seq, hlc, zone, epoch, key, kind, value, prev "
                        f"FROM ops WHERE origin = ? AND seq IN ({marks})",
                        (origin, *chunk),
                    ):
                        stored[(row[0], row[1])] = tuple(row)
        except sqlite3.Error as exc:
            raise translate_error(exc) from None
        for op in held:
            kept = stored.get(op.id)
            # Compacted ops are no longer comparable; their chain was verified at apply.
            if kept is not None and kept != op.to_tuple()[:9]:
                raise ForkError(f"two different ops at ({op.origin!r}, {op.seq})")
        return len(held)

    # ------------------------------------------------------------------ export

    async def ops_since(
        self, vv: Mapping[str, int], *, limit: int = 10_000, max_bytes: int | None = None
    ) -> list[Op]:
        """Ops held here beyond ``vv``, each origin's in seq order (see :class:`Replica`).

        Origins whose next ops touch higher-priority zones
        (``Fleet.priorities``) come first, so when ``limit`` or ``max_bytes``
        cuts the answer, an alert goes before telemetry. Within one origin the
        seq order is kept, whatever the zones.

        Ops already compacted away cannot be exported; such an origin is
        skipped with a warning (a state snapshot transfer is future work).
        """
        self._check_open()
        out: list[Op] = []
        size = 0
        try:
            wanted: list[tuple[int, str]] = []
            for origin in sorted(self._vv):
                have = self._vv[origin]
                start = vv.get(origin, 0)
                if have <= start:
                    continue
                if start < self._compacted.get(origin, 0):
                    log.warning(
                        "peer lacks ops (%s, %d..%d) already compacted here", origin, start + 1,
                        self._compacted[origin],
                    )
                    continue
                wanted.append((await self._priority(origin, start, limit), origin))
            wanted.sort(key=lambda po: (-po[0], po[1]))
            for _, origin in wanted:
                start = vv.get(origin, 0)
                rows = await self._conn.execute_fetchall(
                    "SELECT origin, seq, hlc, zone, epoch, key, kind, value, prev, sig FROM ops "
                    "WHERE origin = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (origin, start, limit - len(out)),
                )
                for row in rows:
                    op = Op(*row)
                    out.append(op)
                    size += len(op.value) + len(op.key) + 64
                    if max_bytes is not None and size >= max_bytes:
                        return out
                if len(out) >= limit:
                    return out
        except sqlite3.Error as exc:
            raise translate_error(exc) from None
        return out

    async def _priority(self, origin: str, start: int, window: int) -> int:
        """The highest zone priority among the next ``window`` ops of ``origin`` after ``start``."""
        prios = self.fleet.priorities
        if not prios:
            return 0
        # One CASE over the configured prefixes; prefix ranges use the key index order.
        case = " ".join("WHEN key >= ? AND key < ? THEN ?" for _ in prios)
        params: list[Any] = [v for p, pr in prios for v in (p, p + "\U0010ffff", pr)]
        rows = await self._conn.execute_fetchall(
            f"SELECT max(CASE {case} ELSE 0 END) FROM "
            "(SELECT key FROM ops WHERE origin = ? AND seq > ? ORDER BY seq LIMIT ?)",
            (*params, origin, start, min(window, 1000)),
        )
        best = next(iter(rows))[0]
        return int(best) if best is not None else 0

    # ------------------------------------------------------------------ reads

    async def read_lww(self, key: str) -> bytes | None:
        """The winning payload of an lww key (None when absent or deleted)."""
        rows = await self._fetch(
            "SELECT hlc, origin, data FROM state WHERE kind = 'lww' AND key = ?", (key,)
        )
        if not rows:
            return None
        hlc, origin, data = rows[0]
        return LWW.read((hlc, origin, data))

    async def scan_lww(self, prefix: str) -> dict[str, Any]:
        """Every present lww key under ``prefix`` with its decoded value."""
        rows = await self._fetch(
            "SELECT key, data FROM state WHERE kind = 'lww' AND key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + "\U0010ffff"),
        )
        return {key: decode_value(data) for key, data in rows if data}

    async def read_state(self, kind: str, key: str) -> Any:
        """The decoded CRDT state of a non-lww key (its empty state if absent)."""
        return (await self._load_states([(kind, key)]))[(kind, key)]

    async def rejected(self) -> list[tuple[str, int, str, str]]:
        """Rejected ops as ``(origin, seq, key, reason)``, by origin and seq."""
        rows = await self._fetch("SELECT origin, seq, key, reason FROM rejected ORDER BY origin, seq")
        return [(str(o), int(s), str(k), str(r)) for o, s, k, r in rows]

    def pending(self) -> dict[str, dict[int, str]]:
        """Held-back ops: origin -> seq -> reason."""
        return {o: {s: why for s, (_, why) in d.items()} for o, d in self._pending.items()}

    async def stats(self) -> StoreStats:
        """Counts and the file size."""
        (pc,), (ps,) = (await self._fetch("PRAGMA page_count"))[0], (
            await self._fetch("PRAGMA page_size")
        )[0]
        counts = [
            (await self._fetch(f"SELECT count(*) FROM {t}"))[0][0]
            for t in ("ops", "pending", "rejected", "state", "peers")
        ]
        return StoreStats(pc * ps, *counts)

    async def state_digest(self) -> str:
        """A hex digest of the whole materialized state and rejected set.

        Replicas holding the same ops have the same digest, whatever order the
        ops arrived in: the convergence check of the demo and the simulator.
        """
        h = hashlib.blake2b(digest_size=16)
        for kind, key, hlc, origin, data in await self._fetch(
            "SELECT kind, key, hlc, origin, data FROM state ORDER BY kind, key"
        ):
            if kind == YDOC.name:  # merged Yjs updates: equal content, unequal bytes
                data = ydoc_canonical(data)
            h.update(msgpack.packb([kind, key, hlc, origin, data], use_bin_type=True))
        for row in await self.rejected():
            h.update(msgpack.packb(list(row), use_bin_type=True))
        return h.hexdigest()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self._check_open()
        try:
            return list(await self._conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise translate_error(exc) from None

    # ------------------------------------------------------------------ peers, compaction

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        """Durably record the version vector ``peer`` acknowledged."""
        blob = msgpack.packb(dict(vv))

        async def run() -> None:
            await self._execute_one(
                "INSERT OR REPLACE INTO peers (peer, vv) VALUES (?, ?)", (peer, blob)
            )

        await self._call(run)

    async def forget_peer(self, peer: str) -> None:
        """Stop counting ``peer`` as a replica (it no longer holds back compaction)."""

        async def run() -> None:
            await self._execute_one("DELETE FROM peers WHERE peer = ?", (peer,))

        await self._call(run)

    async def peer_acks(self) -> dict[str, VersionVector]:
        """Every known peer's acknowledged version vector."""
        rows = await self._fetch("SELECT peer, vv FROM peers")
        return {peer: msgpack.unpackb(blob, strict_map_key=False) for peer, blob in rows}

    async def _execute_one(self, sql: str, params: Sequence[Any]) -> None:
        await self._transaction([(sql, [params])])

    async def compact(self) -> int:
        """Drop ops every known peer has acknowledged; their effect stays in state.

        With no known peer nothing is compacted: an op no other replica holds
        is not yet causally stable. Returns the number of ops removed.
        """
        return await self._call(self._compact)

    async def _compact(self) -> int:
        acks = await self.peer_acks()
        if not acks:
            return 0
        bounds = {
            o: min(min(vv.get(o, 0) for vv in acks.values()), have) for o, have in self._vv.items()
        }
        todo = {o: b for o, b in bounds.items() if b > self._compacted.get(o, 0)}
        if not todo:
            return 0
        removed = await self._transaction(
            [
                ("DELETE FROM ops WHERE origin = ? AND seq <= ?", list(todo.items())),
                ("UPDATE heads SET compacted = ? WHERE origin = ?", [(b, o) for o, b in todo.items()]),
            ]
        )
        self._compacted.update(todo)
        return removed - len(todo)

    async def expire(self, retention_ms: int, *, now_ms: int | None = None) -> int:
        """Drop telemetry state older than ``retention_ms`` (see ``Fleet.telemetry``).

        Returns the number of keys expired.
        """

        async def run() -> int:
            cutoff = ((now_ms if now_ms is not None else self.clock.wall()) - retention_ms) << 16
            return await self._transaction(
                [
                    (
                        "DELETE FROM state WHERE key >= ? AND key < ? AND hlc < ?",
                        [(p, p + "\U0010ffff", cutoff) for p in self.fleet.telemetry],
                    )
                ]
            )

        return await self._call(run)

    # ------------------------------------------------------------------ change feed

    def add_listener(self, fn: Callable[[list[Op], bool], None]) -> None:
        """Call ``fn(ops, local)`` synchronously after every commit that applied ops."""
        self._listeners.append(fn)

    def _notify(self, ops: list[Op], *, local: bool) -> None:
        if not ops:
            return
        for fn in self._listeners:
            try:
                fn(ops, local)
            except Exception:  # a listener's bug must not break the writer
                log.exception("store listener failed")
        if not self._subscribers:
            return
        changes = [Change(op.key, op.kind, op.origin, op.seq, op.hlc, local) for op in ops]
        for q in list(self._subscribers):
            if q.maxsize and q.qsize() + len(changes) >= q.maxsize:
                # Too far behind: end this subscription rather than grow without bound.
                self._subscribers.discard(q)
                q.put_nowait(None)
                continue
            for ch in changes:
                q.put_nowait(ch)

    def changes(self) -> ChangeFeed:
        """Every change applied from now on (from this call, not from the first
        ``__anext__``), local and remote, in commit order.

        Iterating raises :class:`ChangeFeedLagged` if the subscriber falls
        ``changes_buffer`` changes behind; it ends when the store closes.
        """
        q: asyncio.Queue[Change | None] = asyncio.Queue(self.config.changes_buffer + 1)
        self._subscribers.add(q)
        return ChangeFeed(
            q,
            unsubscribe=lambda: self._subscribers.discard(q),
            closed=lambda: self._closed,
            buffer=self.config.changes_buffer,
        )


