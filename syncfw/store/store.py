"""The node's replicated log and materialized state in one SQLite file (aiosqlite, WAL).

:class:`Store` is a thin facade: the pure planner (:mod:`.planner`) decides
what a batch does, the writer queue (:mod:`.writer`) runs every mutation on
one task with group commit and priorities, :mod:`.export` reads, and
:mod:`.sql` is the only place that talks to SQLite.

Invariants:

1. One writer. Every mutation runs on the store's single writer task, so the
   version vector, chain heads, pending set and zone table kept in memory are
   always those of the last committed transaction.
2. One transaction per step: appending ops, updating materialized state, the
   version vector, pending ops and the clock's high-water mark commit together
   or not at all. In-memory mirrors (and metrics) change only after COMMIT.
3. Local ops are minted by one :class:`~syncfw.log.OpChain` of this origin;
   each group's last op is sealed (``OpChain.seal``). A group may be planned
   while the one before it commits; its transaction then first checks that
   the log ends where it was planned to start (``TIP_SQL``), and is planned
   again (the chain reset to the committed tip) if not.
4. Per-origin contiguity, idempotence, forks, zone verdicts and clock skew
   are decided by :mod:`.planner` (see its invariants), op by op.
5. A peer's acknowledged vector only moves forward: a new ack is merged
   pointwise (max) into the stored one, on the writer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgpack

from syncfw.clock import HLC, wall_ms
from syncfw.crdt import KINDS
from syncfw.errors import (
    ChainFencedError,
    CorruptDatabaseError,
    DecodeError,
    OpError,
    StorageError,
    StorageFullError,
    StoreClosedError,
    TrustError,
    ValueTooLargeError,
)
from syncfw.log import (
    GENESIS,
    NODE_ID_RE,
    ApplyResult,
    Op,
    OpChain,
    Signer,
    VersionVector,
    check_node_id,
    op_size,
    vv_dominates,
    vv_merge,
)
from syncfw.metrics import NodeMetrics
from syncfw.notices import clip
from syncfw.store import export, snapshots, ydocs
from syncfw.store.budget import PeerBound
from syncfw.store.config import StoreConfig
from syncfw.store.export import StoreStats
from syncfw.store.feed import ChangeFeed, CommitListener, CommitRows, Notifier
from syncfw.store.lease import LEASE_EVERY, read_lease, write_lease
from syncfw.store.local import LocalPlan, check_size, plan_local
from syncfw.store.lock import FileLock
from syncfw.store.meter import PendingAlarm, StoreMeter
from syncfw.store.plan_log import PlanLog
from syncfw.store.planner import (
    HLC_LIMIT,
    STATEMENT_KINDS,
    Mirrors,
    PayloadFn,
    Pending,
    RemoteLimits,
    RemotePlan,
    has_work,
    pending_counts,
    plan_remote,
    triage,
)
from syncfw.store.sql import (
    StaleTip,
    Step,
    TxnGuard,
    check_and_migrate,
    quick_check,
    transaction,
    translate_error,
)
from syncfw.store.trust import StoreTrust
from syncfw.store.writer import Priority, RemoteJob, WriteJob, WriterQueue
from syncfw.sync.snapshot import DEFAULT_MAX_SNAPSHOT_BYTES, Snapshot
from syncfw.trust import EVIDENCE_KIND, ForkEvidence, KeyRing
from syncfw.zones import Fleet, ZoneTable

__all__ = ["NODE_ID_RE", "Priority", "Store", "StoreConfig", "StoreStats", "check_node_id"]

log = logging.getLogger("syncfw.store")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Ahead:
    """The mirrors as a remote batch staged but not yet committed will leave them.

    The next remote group is planned against these (writer invariant 4b); everyone
    else (version vectors, heads and pending held in status, summaries, acks) reads
    the committed mirrors, so nothing is told of an op before its COMMIT.
    """

    vv: dict[str, int]
    heads: dict[str, bytes]
    pending: Pending
    zones: ZoneTable
    keys: KeyRing | None
    forks: dict[str, int]
    rejected_bytes: int


@dataclass(slots=True)
class _Staged:
    """A remote batch planned and its transaction started (:meth:`Store._stage_remote`)."""

    m: Mirrors
    plan: RemotePlan
    before: asyncio.Future[None] | None
    """The landing of the batch staged before this one (landings keep that order)."""
    on: TxnGuard | None
    """The guard of the batch in flight this one was planned on top of, if any."""
    txn: asyncio.Future[int] | None = None
    ahead: _Ahead | None = None
    rejected_bytes: int = 0
    """What the plan's rejected ops add to the stored rejected ops (op_size)."""
    drain: bool = False
    """Plan the next group only once this one landed (see Store._start_group)."""
    landed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


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
        metrics: NodeMetrics,
        signer: Signer | None = None,
    ) -> None:
        self._conn = conn
        self.path = path
        self.node_id = node_id
        self.fleet = fleet
        self.clock = clock
        self.config = config
        self.metrics = metrics
        self.zones = ZoneTable(fleet)
        self._vv: VersionVector = {}
        self._heads: dict[str, bytes] = {}
        self._compacted: dict[str, int] = {}
        # Each peer's acknowledged vector, as committed (only moves forward).
        self._acks: dict[str, VersionVector] = {}
        self._rejected_bytes = 0  # what the stored rejected ops take (op_size)
        self._pending: Pending = {}
        # Remote groups are planned while the one before commits (writer invariant 4b):
        # the mirrors as the group in flight leaves them, for planning only; its
        # guard; and the landing the next staged batch waits for.
        self._ahead: _Ahead | None = None
        self._guard = TxnGuard()
        self._landed: asyncio.Future[None] | None = None
        # The CRDT kinds some key holds (None: ask the file); a superset is harmless.
        self._kinds_present: set[str] | None = None
        # Mints this node's ops; may run ahead of what is committed (pipelining).
        self._chain = OpChain(node_id, signer=signer)
        # A signed fleet's key ring (verified statements) and fork flags (mirrors).
        self.keys: KeyRing | None = fleet.keyring()
        self._tasks: set[asyncio.Future[None]] = set()
        # The head lease (.lease): how far this node's own chain is known to have
        # reached, and the seq local writes wait for when the file lost ops.
        self.fenced_until = 0
        self._lease_seq = 0
        self._meter = StoreMeter(metrics)
        self.trust = StoreTrust(node_id, metrics, self._meter)
        self._plan_log = PlanLog(log, node_id)  # a plan's warnings, rate-limited per reason
        self._peer_bound = PeerBound()  # the peers table's bound (store/budget.py)
        self._alarm = PendingAlarm(
            config.pending_warn_ops,
            int(config.pending_warn_age_s * 1000),
            int(config.pending_warn_every_s * 1000),
        )
        busy = {w: metrics.writer_busy.labels(node_id, w) for w in ("local", "remote", "call")}
        self._writer = WriterQueue(
            self._commit_local,
            max_batch=config.max_batch,
            start_group=self._start_group,
            max_remote_ops=config.max_remote_group_ops,
            on_busy=lambda work, s: busy[work].inc(s),
        )
        self._closed = False
        self._feed = Notifier(config.changes_buffer, lambda: self._closed)
        self._lock = FileLock(None)

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
        metrics: NodeMetrics | None = None,
        signer: Signer | None = None,
    ) -> Store:
        """Open (creating if needed) the store at ``path``.

        Args:
            metrics: the node's metric registry to record in (a new one by
                default); exposed as :attr:`metrics`.
            signer: seals this node's chain heads (:class:`syncfw.trust.NodeSigner`);
                a signed fleet's peers apply only what a verified head covers.

        Raises:
            DatabaseLockedError: the file is open in another store (this
                process or another); the error names the holder's pid.
            CorruptDatabaseError: the file is not a readable SQLite database.
            ForeignDatabaseError: a SQLite file syncfw did not create, or one
                created for another node id or fleet.
            SchemaVersionError: the file's schema is newer than this syncfw.
            StorageError: the file cannot be opened at all.
            ValueError: ``node_id`` is not a valid node id (see :func:`check_node_id`).
        In every case the file is left untouched.
        """
        check_node_id(node_id)
        config = config or StoreConfig()
        path = str(path)
        lock = FileLock.acquire(path, node_id)  # before reading anything (see .lock)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            lock.release()
            raise StorageError(f"cannot open {path!r}: {exc}") from None
        except BaseException:
            lock.release()
            raise
        try:
            await check_and_migrate(
                conn, path, node_id, fleet, config.synchronous, config.max_bytes
            )
            await _check_at_open(conn, path, config.open_check_s)
            clock = HLC(wall, max_offset_ms=config.max_offset_ms)
            store = cls(
                conn, path, node_id, fleet, clock, config, metrics or NodeMetrics(node_id), signer
            )
            await store._load()
        except BaseException:
            await conn.close()
            lock.release()
            raise
        store._lock = lock
        store._check_lease()
        store._writer.start(f"syncfw-writer-{node_id}")
        return store

    async def _load(self) -> None:
        try:
            loaded = await export.load_mirrors(self._read, self.node_id)
        except DecodeError as exc:
            raise CorruptDatabaseError(f"pending op in {self.path!r} is damaged: {exc}") from None
        self._vv, self._heads, self._compacted = loaded.vv, loaded.heads, loaded.compacted
        for grant in loaded.grants:
            self.zones.add_grant(grant)
        self._pending = loaded.pending
        self._acks = await export.peer_acks(self._read)
        self._rejected_bytes = await export.rejected_bytes(self._read)
        if self.keys is not None:
            await self.trust.load(self.keys, self._read)
        # A restart with the wall clock set in the past never issues a smaller timestamp.
        self.clock.advance_to(loaded.high_water)
        me = self.node_id
        self._chain.reset(self._vv.get(me, 0), self._heads.get(me, GENESIS))
        self._meter.set_size(await export.file_bytes(self._read))
        self._meter.pending(pending_counts(loaded.pending))

    def _check_lease(self) -> None:
        """Fence local writes if the file holds less of our own chain than the lease."""
        me = self.node_id
        have = self._vv.get(me, 0)
        leased = read_lease(self.path, me)
        self._lease_seq = max(leased, have)
        if leased > have:
            self.fenced_until = leased
            log.warning(
                "%s: this file holds %s's own chain up to seq %d, but it once held seq %d "
                "(a lost WAL, or a restore from an older backup); local writes are refused "
                "until a peer relays those ops back, so no seq is issued twice. If no peer "
                "can hold them: syncfw inspect %s --accept-lost-ops",
                self.path, me, have, leased, self.path,
            )
        self.metrics.chain_fenced.labels(me).set(self.fenced_until)

    def accept_lost_ops(self) -> int:
        """Lift the fence: the operator's word that no peer holds the lost ops (their seqs
        are issued again). Returns the seq the fence waited for (0: none)."""
        was, self.fenced_until = self.fenced_until, 0
        if was:
            me = self.node_id
            self._lease_seq = self._vv.get(me, 0)
            write_lease(self.path, me, self._lease_seq)
            log.warning("%s: the operator accepted the loss of %s's ops after seq %d",
                        self.path, me, self._lease_seq)
            self.metrics.chain_fenced.labels(me).set(0)
        return was

    def _note_own(self, force: bool = False) -> None:
        """After a commit: lift a fence our own ops made up for; move the lease on."""
        me = self.node_id
        seq = self._vv.get(me, 0)
        if self.fenced_until and seq >= self.fenced_until:
            log.warning("%s: %s's own chain is back to seq %d; local writes resume",
                        self.path, me, seq)
            self.fenced_until = 0
            self.metrics.chain_fenced.labels(me).set(0)
        if seq > self._lease_seq and (force or seq - self._lease_seq >= LEASE_EVERY):
            self._lease_seq = seq
            write_lease(self.path, me, seq)

    async def aclose(self) -> None:
        """Finish queued writes, stop the writer and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._writer.close()
        if not self.fenced_until:
            self._note_own(force=True)
        self._feed.close()
        try:
            await self._conn.close()
        finally:
            self._lock.release()
        self._feed.committed(None)  # followers see the close at once

    # ------------------------------------------------------------------ properties

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` began."""
        return self._closed

    @property
    def version_vector(self) -> VersionVector:
        """A copy of the version vector (applied and rejected ops, contiguous)."""
        return dict(self._vv)

    def head(self, origin: str) -> bytes:
        """Hash of the last contiguous op held from ``origin``."""
        return self._heads.get(origin, GENESIS)

    def pending(self) -> dict[str, dict[int, str]]:
        """Held-back ops: origin -> seq -> reason."""
        return {o: {s: why for s, (_, why) in d.items()} for o, d in self._pending.items()}

    def pending_counts(self) -> dict[str, int]:
        """Held-back ops by reason bucket: ``gap``, ``epoch``, ``clock_skew``."""
        return pending_counts(self._pending)

    def discarded(self) -> dict[str, int]:
        """Held-back ops dropped since open, by why: ``fork`` (contradicted by the
        verified chain), ``broken_chain``, ``max_pending`` (resent later)."""
        return dict(self._meter.discarded)

    # ------------------------------------------------------------------ local writes

    def _check_fence(self) -> None:
        if self.fenced_until:
            have = self._vv.get(self.node_id, 0)
            raise ChainFencedError(
                f"{self.path!r} lost {self.node_id!r}'s own ops {have + 1}..{self.fenced_until} "
                "(a lost WAL or an older backup): local writes wait until a peer relays them "
                "back (sync with any peer), or, if no peer can hold them, "
                f"syncfw inspect {self.path} --accept-lost-ops"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed")

    def check_size(self, key: str, payload: bytes | PayloadFn) -> None:
        """Refuse a key or payload over the configured limits (see :func:`.local.check_size`).

        Raises:
            ValueTooLargeError: naming the size and the limit.
        """
        check_size(key, payload, self.config.max_value_bytes, self.config.max_key_bytes)

    async def write(
        self, kind: str, key: str, zone: str, epoch: int, payload: bytes | PayloadFn
    ) -> Op:
        """Append one local op (group-committed) and return it once durable.

        ``payload`` is the op's bytes, or a function of the key's current
        state returning them (for types whose ops depend on it: counters,
        OR-set removes, registers). Zone checks are the caller's job.

        Raises:
            ValueTooLargeError: the key or payload (computed ones too) is over
                ``StoreConfig.max_key_bytes`` / ``max_value_bytes``; nothing
                was written.
        """
        self._check_open()
        self._check_fence()
        self.zones.check_kind(key, kind)
        self.check_size(key, payload)
        fut: asyncio.Future[Op] = asyncio.get_running_loop().create_future()
        self._writer.put(WriteJob(kind, key, zone, epoch, payload, fut))
        return await fut

    async def write_many(
        self, writes: Sequence[tuple[str, str, str, int, bytes | PayloadFn]]
    ) -> list[Op | BaseException]:
        """Append several local ops, in order, waiting once for all of them.

        Each write is ``(kind, key, zone, epoch, payload)`` as for :meth:`write`.
        Returns each write's op, or the exception that refused it alone
        (:class:`ValueTooLargeError` as for :meth:`write`).
        """
        self._check_open()
        self._check_fence()
        loop = asyncio.get_running_loop()
        jobs = [WriteJob(k, key, z, e, p, loop.create_future()) for k, key, z, e, p in writes]
        if not jobs:
            return []
        for job in jobs:
            try:
                self.zones.check_kind(job.key, job.kind)
                self.check_size(job.key, job.payload)
            except (ValueTooLargeError, OpError) as exc:
                job.future.set_exception(exc)  # refused alone, never queued
        if queued := [j for j in jobs if not j.future.done()]:
            self._writer.put_writes(queued)
        futures = [j.future for j in jobs]
        # Groups commit in queue order, so once the last is settled all are.
        await asyncio.wait([futures[-1]])
        if not all(f.done() for f in futures):  # a group was re-planned: wait for every one
            await asyncio.wait(futures)
        return [f.exception() or f.result() for f in futures]

    async def _call(self, fn: Callable[[], Awaitable[T]], priority: Priority) -> T:
        """Run ``fn`` on the writer task, between group commits."""
        self._check_open()
        return await self._writer.call(fn, priority)

    async def _commit_local(self, batch: list[WriteJob]) -> tuple[asyncio.Future[bool] | None, bool]:
        """Plan a group of local writes and start its transaction (see :data:`CommitFn`)."""
        try:
            await self._refuse_other_kinds(batch)
            states = await export.load_states(
                self._read, {(w.kind, w.key) for w in batch if w.kind in KINDS and w.kind != "lww"}
            )
        except (StorageError, DecodeError) as exc:
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            return None, False
        live = [None if w.future.done() else w for w in batch]  # done: cancelled before its turn
        plan = plan_local(
            live, self._chain, self.clock.now, self.zones, states, self.config.max_value_bytes
        )
        for i, failure in plan.failed:
            if not batch[i].future.done():  # a caller cancelled while it was planned
                batch[i].future.set_exception(failure)
        if not plan.ops:
            return None, False
        if self._kinds_present is not None:  # before it commits: the next group is planned meanwhile
            self._kinds_present.update(op.kind for op in plan.ops if op.kind in KINDS)
        txn = await self._start_txn(
            [*plan.steps, self._hlc_step()], expect=(self.node_id, plan.start[0])
        )
        done = [batch[i] for i in plan.taken]
        return asyncio.ensure_future(self._finish_local(txn, done, plan)), plan.zones is not None

    async def _refuse_other_kinds(self, batch: list[WriteJob]) -> None:
        """A key holds one kind: fail each write of a CRDT kind at a key that holds
        others (and a group's second kind at a new key), before anything is planned.

        Only kinds some key of the store holds are looked up, so a store of one
        kind pays nothing. Remote ops are judged by the fleet's declared kinds
        alone (:meth:`ZoneTable.judge`): what a key held when an op arrived differs
        between replicas, so it cannot decide identically everywhere.
        """
        writes = [w for w in batch if w.kind in KINDS and not w.future.done()]
        if not writes:
            return
        if self._kinds_present is None:
            self._kinds_present = await export.present_kinds(self._read)
        kinds = {w.kind for w in writes}
        if len(kinds) == 1 and self._kinds_present <= kinds:
            return  # every key here holds this kind or nothing
        held: dict[str, set[str]] = {}
        if self._kinds_present:
            held = dict(await export.held_kinds(
                self._read, {w.key for w in writes}, self._kinds_present
            ))
        for w in writes:
            have = held.setdefault(w.key, {w.kind})  # a new key: the group's first write says
            if w.kind not in have:
                w.future.set_exception(
                    OpError(
                        f"key {clip(w.key)!r} holds {' and '.join(sorted(have))} values, "
                        f"not {w.kind}; nothing was written"
                    )
                )

    def _committed(self, rows: CommitRows | None) -> None:
        """After a commit: note the kinds its ops brought, then tell the followers."""
        if rows is None:
            self._kinds_present = None  # a snapshot's rows: ask the file again
        elif self._kinds_present is not None:
            self._kinds_present.update(op.kind for op, _ in rows if op.kind in KINDS)
        self._feed.committed(rows)

    async def _finish_local(
        self, txn: asyncio.Future[int], done: list[WriteJob], plan: LocalPlan
    ) -> bool:
        me = self.node_id
        try:
            await txn
        except StaleTip:
            # The group before this one failed: plan these writes again, first.
            self._chain.reset(self._vv.get(me, 0), self._heads.get(me, GENESIS))
            self._writer.requeue(done)
            return False
        except Exception as exc:  # the writer must outlive any failure of one group
            err = exc
            if not isinstance(exc, StorageError):
                log.exception("unexpected failure committing local writes")
                err = StorageError(f"unexpected failure committing local writes: {exc!r}")
            self._chain.reset(self._vv.get(me, 0), self._heads.get(me, GENESIS))
            for w in done:
                if not w.future.done():
                    w.future.set_exception(err)
            return False
        self._vv[me], self._heads[me] = plan.tip
        if plan.zones is not None:
            self.zones = plan.zones
        if self.keys is not None and any(op.kind in STATEMENT_KINDS for op in plan.ops):
            keys = self.keys.copy()
            for op in plan.ops:
                if op.kind in STATEMENT_KINDS:
                    try:
                        keys.learn_value(op.value)
                    except TrustError as exc:  # the caller verified it; say so if not
                        log.warning("a local %s op does not verify: %s", op.kind, exc)
            self.keys = keys
        for w, op in zip(done, plan.ops, strict=True):
            # A caller cancelled while its write committed: the op is in the log all the
            # same (durable, relayed); nobody awaits it, and the writer must live on.
            if not w.future.done():
                w.future.set_result(op)
        self._meter.local(len(plan.ops))
        self._note_own()
        self._feed.applied(list(plan.ops), local=True)
        self._committed([(op, 0) for op in plan.ops])
        return True

    def _hlc_step(self) -> Step:
        # A clock past what SQLite stores (a wall clock set in the year 6429)
        # must not make every later transaction fail: cap the recorded mark.
        return (
            "INSERT OR REPLACE INTO meta (k, v) VALUES ('hlc', ?)",
            [(min(self.clock.last, HLC_LIMIT - 1),)],
        )

    async def _txn(
        self,
        steps: Sequence[Step],
        *,
        expect: tuple[str, int] | None = None,
        grow: int = 0,
        guard: TxnGuard | None = None,
    ) -> int:
        """One transaction (:func:`.sql.transaction`), measuring the file now and then.

        ``grow``: about how many bytes it adds; between measurements the known size
        moves on by it, so the local reserve holds however fast peers write."""
        cap = self.config.max_bytes
        near = cap is not None and self._meter.size >= cap - 2 * (
            self.config.local_reserve_bytes or cap // 8
        )  # near the cap: measure every commit
        changed, size = await transaction(
            self._conn, steps, expect=expect, measure=near or self._meter.size_due(), guard=guard
        )
        if size is None:
            self._meter.size += grow  # an estimate until the next measurement
        self._meter.set_size(size)
        return changed

    # ------------------------------------------------------------------ remote ops

    async def apply_remote(self, ops: Sequence[Op]) -> ApplyResult:
        """Merge a batch of ops from a peer, atomically (see :mod:`.planner`).

        Raises:
            ChainError: an op's ``prev`` does not extend its origin's chain.
            ForkError: an op differs from the one held at its (origin, seq)
                (``sig`` aside: see :func:`syncfw.log.same_op`).
            DecodeError: an op's hlc, seq or epoch is at or past 2**63.
            StorageFullError: no room; nothing of the batch was applied.
        """
        if not ops:
            return ApplyResult()
        self._check_open()
        fut: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._writer.put(RemoteJob(list(ops), fut), Priority.REMOTE)
        return await fut

    async def _start_group(
        self, jobs: list[RemoteJob]
    ) -> tuple[asyncio.Future[None] | None, bool]:
        """Plan remote batches that waited together as one group and start its
        transaction (``StoreConfig.max_remote_group_ops``; writer invariant 4b).

        Returns what lands it (it settles each caller's future with its own batch's
        result) and whether the next group must wait for it to land before it is
        planned (it changes the zone table, the key ring, fork flags or this node's
        own chain). Nothing is pipelined with ``StoreConfig.pipeline_remote`` off.

        If the group cannot be planned (one batch breaks a chain, forks or is
        malformed), each batch is applied alone, so a batch is still applied whole
        or not at all and only a faulty one fails. No room is no batch's fault:
        every caller gets that refusal, warned about and counted once, for the group;
        so does a failed commit.
        """
        try:
            staged = await self._stage_remote([op for job in jobs for op in job.ops])
        except Exception as exc:
            if len(jobs) == 1 or isinstance(exc, StorageFullError):
                _fail(jobs, exc)
                return None, False
            await self._apply_alone(jobs)  # one batch is at fault: find it, batch by batch
            return None, False
        landing = asyncio.ensure_future(self._land_group(staged, jobs))
        return landing, staged.drain or not self.config.pipeline_remote

    async def _land_group(self, staged: _Staged, jobs: list[RemoteJob]) -> None:
        try:
            got, plan = await self._land_remote(staged)
        except StaleTip:
            # A group this one was planned on top of failed to commit: plan it again.
            self._writer.requeue_remote(jobs)
            return
        except Exception as exc:  # the writer must outlive any failure of one group
            _fail(jobs, exc)
            return
        parts = _split_result(got, plan, [job.ops for job in jobs])
        for job, res in zip(jobs, parts, strict=True):
            if not job.future.done():
                job.future.set_result(res)

    async def _apply_alone(self, jobs: list[RemoteJob]) -> None:
        for job in jobs:
            try:
                res = await self._apply_remote(job.ops)
            except Exception as exc:
                _fail([job], exc)
            else:
                if not job.future.done():
                    job.future.set_result(res)

    async def retry_pending(self) -> ApplyResult:
        """Re-judge held-back ops (after a grant, or once local time caught up)."""
        return await self._call(lambda: self._apply_remote([]), Priority.REMOTE)

    def _remote_room(self) -> None:
        """Refuse remote ops once the file is within the space kept for local writes."""
        cap = self.config.max_bytes
        if cap is None:
            return
        reserve = self.config.local_reserve_bytes
        reserve = cap // 8 if reserve is None else reserve
        if self._meter.size >= cap - reserve:
            raise StorageFullError(
                f"{self.path!r} is at {self._meter.size} of its {cap} bytes: the last "
                f"{reserve} are kept for {self.node_id!r}'s own writes, so remote ops are "
                "refused (compact, expire telemetry, or raise max_bytes)"
            )

    async def _apply_remote(self, incoming: list[Op]) -> ApplyResult:
        got, _ = await self._apply_planned(incoming)
        return got

    async def _apply_planned(self, incoming: list[Op]) -> tuple[ApplyResult, RemotePlan]:
        """Plan, commit and account for one batch; its result, and the plan it ran."""
        while True:
            staged = await self._stage_remote(incoming)
            try:
                return await self._land_remote(staged)
            except StaleTip:  # planned on top of a group that failed to commit: again
                continue

    async def _stage_remote(self, incoming: list[Op]) -> _Staged:
        """Plan one batch and start its transaction, against the mirrors as the
        remote group in flight leaves them (:class:`_Ahead`)."""
        # Taken together before anything awaits: a group in flight that fails to
        # commit meanwhile replaces the guard, and this plan, made on its ops, is void.
        a, guard = self._ahead, self._guard
        if a is None:
            vv, heads, pending, zones, keys = (
                self._vv, self._heads, self._pending, self.zones, self.keys
            )
            forks, rejected_bytes = self.trust.forks, self._rejected_bytes
        else:
            vv, heads, pending, zones, keys = a.vv, a.heads, a.pending, a.zones, a.keys
            forks, rejected_bytes = a.forks, a.rejected_bytes
        m = Mirrors(
            vv, heads, pending, zones, keys, forks, await self.trust.kept_branches(keys, self._read)
        )
        t = triage(incoming, m)
        stored = await export.stored_ops(self._read, t.held) if t.held else {}
        work = has_work(t, m)
        states = await export.load_states(self._read, t.state_keys(m.pending)) if work else {}
        lim = RemoteLimits(
            self.clock.wall(),
            self.clock.max_offset_ms,
            self.config.max_pending,
            self.fleet.authority,
            self.config.max_pending_bytes,
            self.config.max_rejected_bytes - rejected_bytes,
        )
        plan = plan_remote(t, m, stored, states, lim)
        if plan.steps and (plan.applied or plan.rejected):
            try:
                self._remote_room()
            except StorageFullError as exc:  # loud: a WARNING, status and a metric
                self._meter.discard({"local_reserve": len(incoming)})
                self._plan_log.emit([f"refused a remote batch of {len(incoming)} ops: {exc}"])
                raise
        staged = _Staged(m, plan, self._landed, guard if a is not None else None)
        if plan.steps:
            if plan.observe_hlc is not None:
                self.clock.observe(plan.observe_hlc)
            rejected = staged.rejected_bytes = sum(op_size(op) for op, _ in plan.rejected)
            grow = sum(op_size(op) for op in plan.applied) + rejected
            staged.txn = await self._start_txn(
                [*plan.steps, self._hlc_step()], grow=2 * grow, guard=guard
            )
            staged.ahead = _Ahead(
                {**vv, **plan.vv},
                {**heads, **plan.heads},
                plan.pending,
                plan.zones if plan.zones is not None else zones,
                plan.keys if plan.keys is not None else keys,
                {**forks, **plan.forks},
                rejected_bytes + rejected,
            )
            if self._guard is guard:  # nothing failed meanwhile: the next plan builds on it
                self._ahead = staged.ahead
            staged.drain = bool(
                plan.zones is not None
                or plan.keys is not None
                or plan.forks
                or plan.suspects
                or self.node_id in plan.vv
            )
        self._landed = staged.landed
        return staged

    async def _start_txn(
        self,
        steps: Sequence[Step],
        *,
        expect: tuple[str, int] | None = None,
        grow: int = 0,
        guard: TxnGuard | None = None,
    ) -> asyncio.Future[int]:
        """Start a transaction (:meth:`_txn`); return once it is queued on the
        database thread, for a pipelined group (local or remote).

        aiosqlite runs requests in the order they are queued, so every read the next
        plan makes (states, stored ops) then runs after this commit and sees what it
        wrote. A task only queues its request once the loop runs it; without this
        wait a read issued meanwhile would overtake the commit.
        """
        queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def run() -> int:
            queued.set_result(None)  # nothing suspends from here to aiosqlite's queue
            return await self._txn(steps, expect=expect, grow=grow, guard=guard)

        txn = asyncio.ensure_future(run())
        await queued
        return txn

    async def _land_remote(self, staged: _Staged) -> tuple[ApplyResult, RemotePlan]:
        """Wait for a staged batch's commit (after those staged before it), then
        move the committed mirrors and tell everyone: its result, and its plan.

        Raises:
            StaleTip: a batch it was planned on top of failed to commit; nothing of
                this one was written (plan it again).
        """
        try:
            if staged.before is not None:
                await staged.before  # land in the order they were planned
            if staged.on is not None and staged.on.failed:
                # Planned on ops that never committed (its transaction, if any, finds
                # the same guard failed; one without, all duplicates say, must not stand).
                raise StaleTip("planned on top of a batch that failed to commit")
            if staged.txn is not None:
                try:
                    await staged.txn
                except StaleTip:
                    raise
                except BaseException:
                    # Everything planned on top of this batch is void (their
                    # transactions find the guard failed): plan from what committed.
                    self._guard = TxnGuard()
                    self._ahead = None
                    raise
        finally:
            staged.landed.set_result(None)
        plan, m = staged.plan, staged.m
        if staged.txn is not None:
            if self._ahead is staged.ahead:
                self._ahead = None  # nothing was planned on top of it
            # After COMMIT only: the mirrors.
            self._vv.update(plan.vv)
            self._heads.update(plan.heads)
            self._rejected_bytes += staged.rejected_bytes
            me = self.node_id
            if me in plan.vv:  # our own ops, relayed back (a restore from backup)
                self._chain.reset(self._vv[me], self._heads[me])
                self._note_own()
            self._pending = plan.pending
            if plan.zones is not None:
                self.zones = plan.zones
            if plan.keys is not None:
                self.keys = plan.keys
            self.trust.forks.update(plan.forks)
            self._meter.pending(plan.pending_counts())
        if plan.suspects:
            await self._record_forks(plan.suspects)
        self._plan_log.emit(plan.warnings)
        for warning in self._alarm.observe(self.pending_counts(), self.clock.wall()):
            log.warning("%s", warning)
        self._meter.remote(len(plan.applied), len(plan.rejected), bool(plan.steps))
        self._meter.duplicates(len(plan.duplicates))
        if plan.discarded:  # counted even when nothing else changed (all of a batch dropped)
            self._meter.discard(plan.discarded)
        self._feed.applied(list(plan.applied), local=False)
        if plan.steps:
            # rejected-only commits advance the vector too
            self._committed(plan.inserted)
        got = plan.result()
        if plan.keys is not None and plan.keys.kept and (await self.trust.kept_branches(self.keys, self._read)) - m.kept:
            # The batch carried the authority's ruling on a fork: what it releases moves
            # now, as it would have had the ruling come first (one more plan, no I/O else).
            more = await self._apply_remote([])
            got = ApplyResult(
                applied=got.applied + more.applied,
                duplicates=got.duplicates,
                pending=more.pending,
                rejected=got.rejected + more.rejected,
            )
        return got, plan

    async def _record_forks(self, suspects: Sequence[tuple[str, int, tuple[Op, ...]]]) -> None:
        """Verified fork evidence is stored, flagged and reported, then gossiped from this
        node's own zone (:meth:`.trust.StoreTrust.record`)."""
        assert self.keys is not None
        found = await self.trust.record(self.keys, suspects, self._read, self._txn)
        for ev in found:
            task = asyncio.ensure_future(self._gossip_evidence(ev))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _gossip_evidence(self, ev: ForkEvidence) -> None:
        """Write the evidence into this node's own zone, so every node learns it."""
        key = f"fleet/{self.node_id}/evidence/{ev.origin}"
        try:
            zone, epoch = self.zones.zone_for_write(self.node_id, key)
            await self.write(EVIDENCE_KIND, key, zone, epoch, ev.encode())
        except Exception as exc:  # kept locally either way; say why it was not relayed
            log.warning("fork evidence against %s kept here but not gossiped: %s", ev.origin, exc)

    @property
    def forks(self) -> dict[str, int]:
        """Origins with verified fork evidence, and the seq it is at (signed fleets)."""
        return self.trust.forks

    @property
    def evidence(self) -> dict[str, ForkEvidence]:
        """The verified fork evidence, by origin."""
        return self.trust.evidence

    # ------------------------------------------------------------------ reads

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One read query (also used by the writer while closing)."""
        try:
            return list(await self._conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise translate_error(exc) from None

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self._check_open()
        return await self._read(sql, params)

    async def ops_since(
        self, vv: Mapping[str, int], *, limit: int = 10_000, max_bytes: int | None = None
    ) -> list[Op]:
        """Ops held here beyond ``vv``, each origin's in seq order (see :class:`Replica`).

        Contiguous from ``vv`` per origin; at most ``limit`` ops and, past the
        first, at most ``max_bytes`` (:func:`syncfw.log.op_size`). Origins whose
        next ops touch higher-priority zones (``Fleet.priorities``) come first,
        so when the answer is cut an alert goes before telemetry.

        Ops already compacted away cannot be exported; such an origin is
        skipped with a warning (a session sends the peer a snapshot first, so it
        never asks for them: :mod:`syncfw.sync.snapshot`).

        Raises:
            CorruptDatabaseError: the rows read have a gap or a broken hash
                link (a damaged file); nothing is served as if complete.
        """
        self._check_open()
        return await export.ops_since(
            self._fetch, dict(self._vv), self._compacted, self.fleet, vv,
            limit=limit, max_bytes=max_bytes, heads=dict(self._heads),
        )

    async def read_lww(self, key: str) -> bytes | None:
        """The winning payload of an lww key (None when absent or deleted)."""
        return await export.read_lww(self._fetch, key)

    async def scan_lww(self, prefix: str) -> dict[str, Any]:
        """Every present lww key under ``prefix`` with its decoded value."""
        return await export.scan_lww(self._fetch, prefix)

    async def read_state(self, kind: str, key: str) -> Any:
        """The decoded CRDT state of a non-lww key (its empty state if absent)."""
        if kind == "ydoc":  # kept as updates and checkpoints, merged on read
            return await ydocs.read(self._fetch, key)
        return (await export.load_states(self._fetch, [(kind, key)]))[(kind, key)]

    async def rejected(self) -> list[tuple[str, int, str, str]]:
        """Rejected ops as ``(origin, seq, key, reason)``, by origin and seq."""
        return await export.rejected(self._fetch)

    async def stats(self) -> StoreStats:
        """Counts and the file size (which also refreshes the storage metric)."""
        st = await export.stats(self._fetch)
        self._meter.set_size(st.file_bytes)
        return st

    async def state_digest(self) -> str:
        """A hex digest of the whole materialized state and rejected set.

        Replicas holding the same ops have the same digest, whatever order the
        ops arrived in: the convergence check of the demo and the simulator.
        """
        return await export.state_digest(self._fetch)

    # ------------------------------------------------------------------ peers, compaction

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        """Durably record that ``peer`` holds ``vv``, merged into what it acknowledged
        before (pointwise max: an ack never moves backwards)."""

        known = self._acks.get(peer)
        if known is not None and vv_dominates(known, vv):
            return  # nothing new: no transaction, no hop to the writer

        async def run() -> None:
            before = self._acks.get(peer)
            merged = vv_merge(before or {}, vv)
            if before is not None and merged == before:
                return
            evict = self._peer_evictions(peer)
            steps: list[Step] = [
                ("INSERT OR REPLACE INTO peers (peer, vv) VALUES (?, ?)", [(peer, msgpack.packb(merged))])
            ]
            if evict:
                steps.append(("DELETE FROM peers WHERE peer = ?", [(p,) for p in evict]))
            await self._txn(steps)
            for p in evict:  # after COMMIT only
                self._acks.pop(p, None)
            self._acks.pop(peer, None)
            self._acks[peer] = merged  # the most recently heard last (store/budget.py)
            self._peer_bound.note(self.node_id, evict, len(self._acks))
            if evict:
                self.metrics.peers_evicted.labels(self.node_id).inc(len(evict))

        await self._call(run, Priority.REMOTE)

    def _peer_evictions(self, peer: str) -> list[str]:
        """Who makes room for ``peer`` in the peers table (store/budget.py, invariants 1-2)."""
        if self.keys is not None:  # a signed fleet records authenticated acks only
            return []
        owners = {o for g in self.zones.grants() for o in g.owners}
        return self._peer_bound.evictions(self._acks, peer, owners)

    async def forget_peer(self, peer: str) -> None:
        """Stop counting ``peer`` as a replica (it no longer holds back compaction)."""

        async def run() -> None:
            await self._txn([("DELETE FROM peers WHERE peer = ?", [(peer,)])])
            self._acks.pop(peer, None)

        await self._call(run, Priority.MAINTENANCE)

    def peer_ack(self, peer: str) -> VersionVector:
        """The vector ``peer`` last acknowledged (empty if none), as committed."""
        return dict(self._acks.get(peer, {}))

    async def peer_acks(self) -> dict[str, VersionVector]:
        """Every known peer's acknowledged version vector (as committed; no read)."""
        self._check_open()
        return {peer: dict(vv) for peer, vv in self._acks.items()}

    async def compact(self) -> int:
        """Drop ops every known peer has acknowledged; their effect stays in state.

        With no known peer nothing is compacted: an op no other replica holds
        is not yet causally stable. Returns the number of ops removed.
        """
        return await self._call(self._compact, Priority.MAINTENANCE)

    async def _compact(self) -> int:
        acks = self._acks  # the committed acks, mirrored: no read
        if not acks:
            return 0
        bounds = {
            o: min(min(vv.get(o, 0) for vv in acks.values()), have) for o, have in self._vv.items()
        }
        todo = {o: b for o, b in bounds.items() if b > self._compacted.get(o, 0)}
        if not todo:
            return 0
        removed = await self._txn(
            [
                ("DELETE FROM ops WHERE origin = ? AND seq <= ?", list(todo.items())),
                ("UPDATE heads SET compacted = ? WHERE origin = ?", [(b, o) for o, b in todo.items()]),
            ]
        )
        self._compacted.update(todo)
        self._rejected_bytes = await export.rejected_bytes(self._read)
        return removed - len(todo)

    # ------------------------------------------------------------------ snapshots

    def compacted(self) -> dict[str, int]:
        """Each compacted origin's compaction point (its ops at or below are only in state)."""
        return {o: c for o, c in self._compacted.items() if c > 0}

    async def snapshot(self, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES) -> Snapshot:
        """The state now, the vector it stands for and every origin's chain head
        (:mod:`syncfw.sync.snapshot`), read on the writer so no commit interleaves.

        Raises:
            SnapshotTooLargeError: the stored state exceeds ``max_bytes`` (nothing read).
        """

        async def run() -> Snapshot:
            return await snapshots.build(
                self._read, dict(self._vv), dict(self._heads), max_bytes
            )

        return await self._call(run, Priority.MAINTENANCE)

    async def install_snapshot(self, snap: Snapshot, *, source: str) -> None:
        """Join a peer's snapshot into this store, in one transaction
        (:mod:`.snapshots`), then apply what was held back behind it.

        Raises:
            ForkError: it contradicts a chain head held here (nothing installed).
            ClockSkewError: it holds a timestamp too far ahead of this node's clock.
            StorageFullError: no room (nothing installed).
        """

        async def run() -> None:
            plan = await snapshots.plan_install(self._read, snap, self._vv, self._heads)
            if not plan.take:
                return
            if plan.newest_hlc:
                self.clock.check(plan.newest_hlc)  # a local write after it must win
            self._remote_room()
            await self._txn([*plan.steps, self._hlc_step()])
            # After COMMIT only: the mirrors.
            if plan.newest_hlc:
                self.clock.advance_to(plan.newest_hlc)
            self._vv.update(plan.take)
            self._heads.update(plan.heads)
            self._compacted.update(plan.take)
            for grant in plan.grants:
                self.zones.add_grant(grant)
            if self.keys is not None:
                for value in plan.statements:
                    try:
                        self.keys.learn_value(value)
                    except TrustError as exc:
                        log.warning("snapshot from %s: a statement does not verify: %s",
                                    clip(source), exc)
            self._pending = {
                o: {s: v for s, v in q.items() if s > plan.take.get(o, 0)}
                for o, q in self._pending.items()
            }
            self._pending = {o: q for o, q in self._pending.items() if q}
            me = self.node_id
            if me in plan.take:  # our own chain, from a peer (a restore from backup)
                self._chain.reset(self._vv[me], self._heads[me])
                self._note_own()
            self._meter.pending(self.pending_counts())
            self._committed(None)  # a snapshot's rows: followers read them back
            await self._apply_remote([])  # what waited behind the snapshot's heads

        await self._call(run, Priority.REMOTE)

    async def expire(self, retention_ms: int, *, now_ms: int | None = None) -> int:
        """Drop telemetry state older than ``retention_ms`` (see ``Fleet.telemetry``).

        Returns the number of keys expired.
        """

        async def run() -> int:
            cutoff = ((now_ms if now_ms is not None else self.clock.wall()) - retention_ms) << 16
            cutoff = max(-HLC_LIMIT, min(cutoff, HLC_LIMIT - 1))
            return await self._txn(
                [
                    (
                        "DELETE FROM state WHERE key >= ? AND key < ? AND hlc < ?",
                        [(p, export.prefix_end(p) or p + "\U0010ffff", cutoff) for p in self.fleet.telemetry],
                    )
                ]
            )

        return await self._call(run, Priority.MAINTENANCE)

    # ------------------------------------------------------------------ change feed

    def add_listener(self, fn: Callable[[list[Op], bool], None]) -> None:
        """Call ``fn(ops, local)`` synchronously after every commit that applied ops."""
        self._feed.add_listener(fn)

    def remove_listener(self, fn: Callable[[list[Op], bool], None]) -> None:
        """Stop calling ``fn`` (no error if it was not added)."""
        self._feed.remove_listener(fn)

    def add_commit_listener(self, fn: CommitListener) -> None:
        """Call ``fn(rows)`` synchronously after every commit that wrote ops (applied,
        rejected or held back), with the ``ops`` rows it inserted; ``fn(None)``
        where those are not at hand (a snapshot installed) and once when the store
        closes."""
        self._feed.add_commit_listener(fn)

    def remove_commit_listener(self, fn: CommitListener) -> None:
        """Stop calling ``fn`` (no error if it was not added)."""
        self._feed.remove_commit_listener(fn)

    def changes(
        self, keys: Callable[[str], bool] | None = None, *, prefixes: Sequence[str] = ()
    ) -> ChangeFeed:
        """Every change applied from now on (from this call, not from the first
        ``__anext__``), local and remote, in commit order: the lossy live view.

        ``keys``: only changes to keys it accepts, filtered as each commit lands
        (the others cost the subscriber nothing and never count towards its lag).
        ``prefixes``: only keys under one of them, checked before ``keys`` and
        without a Python call per op (so a fleet's other keys cost next to nothing).
        Iterating raises :class:`ChangeFeedLagged` if the subscriber falls
        ``changes_buffer`` changes behind; it ends when the store closes.
        """
        return self._feed.changes(keys, prefixes)


async def _check_at_open(conn: aiosqlite.Connection, path: str, seconds: float) -> None:
    """``PRAGMA quick_check``, bounded by ``seconds`` (see ``StoreConfig.open_check_s``)."""
    if seconds <= 0:
        return
    found = await quick_check(conn, seconds)
    if found is None:
        log.warning(
            "quick_check of %r stopped after %.1f s (StoreConfig.open_check_s); "
            "run `syncfw inspect --check` for the full check",
            path, seconds,
        )
    elif found:
        raise CorruptDatabaseError(f"{path!r} is damaged (quick_check): " + "; ".join(found))


def _fail(jobs: list[RemoteJob], exc: BaseException) -> None:
    """Settle each job not yet settled (its caller may have gone) with ``exc``."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


def _split_result(got: ApplyResult, plan: RemotePlan, parts: list[list[Op]]) -> list[ApplyResult]:
    """Each batch's share of a group's result (:meth:`Store._start_group`).

    An op is counted applied or rejected in the first batch that carried it, and a
    duplicate in any later one. What no batch carried (held-back ops the group
    released, or what a fork ruling released) is counted in the first batch, as
    a single batch counts what it releases. ``pending`` is the store's, as ever.
    """
    if len(parts) == 1:
        return [got]
    total = sum(map(len, parts))
    if got.applied == len(plan.applied) == total and not plan.rejected and not plan.duplicates:
        # the common case, every op new and applied: no per-op accounting
        return [ApplyResult(applied=len(ops), pending=got.pending) for ops in parts]
    applied = {op.id for op in plan.applied}
    rejected = {op.id for op, _ in plan.rejected}
    dups = {op.id for op in plan.duplicates}
    claimed: set[tuple[str, int]] = set()
    out: list[ApplyResult] = []
    for ops in parts:
        a = r = d = 0
        for op in ops:
            i = op.id
            if i in claimed:
                d += 1
            elif i in applied:
                a += 1
                claimed.add(i)
            elif i in rejected:
                r += 1
                claimed.add(i)
            elif i in dups:
                d += 1
        out.append(ApplyResult(applied=a, duplicates=d, pending=got.pending, rejected=r))
    first = out[0]
    out[0] = ApplyResult(
        applied=first.applied + got.applied - sum(x.applied for x in out),
        duplicates=first.duplicates,
        pending=got.pending,
        rejected=first.rejected + got.rejected - sum(x.rejected for x in out),
    )
    return out
