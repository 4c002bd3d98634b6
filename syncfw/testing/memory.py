"""An in-memory :class:`~syncfw.log.Replica`: a dict of op chains and an LWW map.

Invariants (the same the SQLite store keeps, so the simulator's verdicts carry):

1. Each origin's held ops are a contiguous chain from seq 1; ``prev`` of each is
   the :func:`~syncfw.log.op_hash` of the one before (``GENESIS`` for seq 1).
2. :meth:`apply_remote` is atomic: every op is checked (fork, chain) before
   anything changes; on :class:`ChainError`/:class:`ForkError` nothing is applied.
3. "The same op" is :func:`~syncfw.log.same_op`: every field but ``sig``. A
   copy differing only in ``sig`` is a duplicate (the first copy is kept); one
   differing in anything else from a held op, or from one earlier in its
   batch, is a fork.
4. An op beyond a gap, or naming a zone epoch not known yet, is held pending and
   applied when its predecessor arrives; a zone violation is recorded as
   rejected (it still counts in the version vector) and never merged. Every op
   is judged by :meth:`~syncfw.zones.ZoneTable.judge` on its own.
5. State is a deterministic fold under :func:`~syncfw.crdt.lww.lww_wins`, the
   one LWW rule, so the same set of ops gives the same state in any order.
6. Acknowledged vectors only move forward (pointwise maximum per origin).
7. No method ever suspends, so sessions can be driven without an event loop.
8. Forks without lock-out: a pending op was never chain-verified, so a fresh
   op differing from it is no fork: it takes the pending one's place, and a
   forged op held pending can never make the genuine chain fail.
10. Compaction and snapshots as the store does them: :meth:`compact` drops
   the ops every acknowledging peer holds (``base`` is then where an origin's
   held chain begins), a peer below that gets :meth:`snapshot`, and
   :meth:`install_snapshot` joins one (lww states by the one rule), taking
   each origin the snapshot holds more of to the snapshot's head.
9. A signed fleet (``Fleet.authority_key``) applies an origin's ops only up to
   the highest head a registered key signed (:func:`syncfw.trust.cover`); the
   rest wait. A conflicting op is fork evidence if a verified head covers it,
   and is discarded otherwise: never a ``ForkError`` or ``ChainError``, never a
   lock-out. Only verified heads keep their ``sig``.

:func:`syncfw.testing.check_replica` holds this replica and the SQLite node
to the same contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from syncfw.clock import HLC
from syncfw.crdt.lww import TOMBSTONE, lww_wins
from syncfw.errors import ChainError, ForkError, TrustError
from syncfw.log import (
    GENESIS,
    ApplyResult,
    Op,
    OpChain,
    Signer,
    VersionVector,
    decode_value,
    encode_value,
    op_hash,
    op_size,
    same_op,
)
from syncfw.sync.snapshot import DEFAULT_MAX_SNAPSHOT_BYTES, Snapshot, check_size
from syncfw.trust import (
    EVIDENCE_KIND,
    KEEP_KIND,
    KEYREG_KIND,
    REVOKE_KIND,
    STATEMENT_KIND_OF,
    ForkEvidence,
    KeyRing,
    branch_from,
    cover,
    verify_fork,
)
from syncfw.zones import Fleet, Grant, Verdict, ZoneTable

__all__ = ["MemoryReplica"]

log = logging.getLogger(__name__)


class MemoryReplica:
    """A whole replica in a few dicts.

    Args:
        node_id: this replica's id.
        fleet: the fleet it belongs to (zones, fleet id).
        wall: wall clock in ms for the HLC (the simulator injects virtual, drifting time).
    """

    def __init__(
        self, node_id: str, fleet: Fleet | None = None, *, wall: Callable[[], int] | None = None
    ) -> None:
        self._node_id = node_id
        self.fleet = fleet or Fleet()
        self.zones = ZoneTable(self.fleet)
        self.clock = HLC(wall) if wall is not None else HLC(lambda: 0)
        self.chains: dict[str, list[Op]] = {}  # the held ops after ``base``
        self.hashes: dict[str, list[bytes]] = {}
        self.base: dict[str, tuple[int, bytes]] = {}  # compacted: (seq, hash) held chains follow
        self.statements: list[bytes] = []  # verified authority statements, as op values
        self.snapshots_installed = 0
        self._walked: dict[tuple[str, int], bytes] = {}  # hashes _check_chains computed
        self.pending: dict[str, dict[int, Op]] = {}
        self.rejected: dict[tuple[str, int], str] = {}
        self.state: dict[str, tuple[int, str, bytes]] = {}
        self.acks: dict[str, VersionVector] = {}
        self.applied_ids: set[tuple[str, int]] = set()
        self.apply_count: dict[tuple[str, int], int] = {}
        self.listeners: list[Callable[[list[Op]], None]] = []
        self.keys: KeyRing | None = self.fleet.keyring()
        self.forks: dict[str, int] = {}
        self.evidence: dict[str, ForkEvidence] = {}
        self.discarded: dict[str, int] = {}
        self.signer: Signer | None = None

    # -- Replica ------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This replica's node id."""
        return self._node_id

    @property
    def fleet_id(self) -> str:
        """The fleet's id."""
        return self.fleet.fleet_id

    @property
    def fleet_digest(self) -> bytes:
        """The fleet bootstrap's digest (:meth:`Fleet.bootstrap_digest`)."""
        return self.fleet.bootstrap_digest()

    def hlc_now(self) -> int:
        """A fresh hybrid timestamp."""
        return self.clock.now()

    def wall_ms(self) -> int:
        """The injected wall clock (0 when none was injected: unknown)."""
        return self.clock.wall()

    async def version_vector(self) -> VersionVector:
        """Highest contiguous seq held per origin."""
        return self.vv()

    def vv(self) -> VersionVector:
        """:meth:`version_vector`, without awaiting."""
        return {o: n for o in {*self.chains, *self.base} if (n := self._head(o)[0])}

    async def ops_since(
        self, vv: Mapping[str, int], *, limit: int = 10_000, max_bytes: int | None = None
    ) -> list[Op]:
        """Ops beyond ``vv``, each origin's in seq order, within ``limit``/``max_bytes``."""
        out: list[Op] = []
        size = 0
        for origin in sorted(self.chains):
            chain = self.chains[origin]
            base = self.base.get(origin, (0, GENESIS))[0]
            if vv.get(origin, 0) < base:
                log.warning(
                    "peer lacks ops (%s, %d..%d) already compacted here",
                    origin,
                    vv.get(origin, 0) + 1,
                    base,
                )
                continue
            for op in chain[vv.get(origin, 0) - base :]:
                if len(out) >= limit:
                    return out
                size += op_size(op)
                if max_bytes is not None and out and size > max_bytes:
                    return out
                out.append(op)
        return out

    async def apply_remote(self, ops: list[Op]) -> ApplyResult:
        """Merge a batch atomically (see the module invariants).

        Raises:
            ForkError: an op is not :func:`~syncfw.log.same_op` as the one held
                (or pending, or earlier in the batch) at its ``(origin, seq)``.
            ChainError: an op of the batch does not extend its origin's chain.
            In both cases nothing of the batch is applied.
        """
        if self.keys is not None:
            return self._apply_signed(ops)
        fresh, duplicates = self._check_forks(ops)
        self._check_chains(fresh)
        for op in fresh.values():
            self.pending.setdefault(op.origin, {})[op.seq] = op
        applied: list[Op] = []
        rejected = 0
        for origin in sorted({op.origin for op in fresh.values()} | set(self.pending)):
            rejected += self._release(origin, applied)
        self._walked.clear()
        for listener in self.listeners:
            listener(applied)
        return ApplyResult(
            applied=len(applied),
            duplicates=duplicates,
            pending=sum(len(q) for q in self.pending.values()),
            rejected=rejected,
        )

    def _check_forks(self, ops: list[Op]) -> tuple[dict[tuple[str, int], Op], int]:
        """The batch's new ops by id, and how many were already held (duplicates)."""
        fresh: dict[tuple[str, int], Op] = {}
        duplicates = 0
        for op in ops:
            if self._compacted_away(op):
                duplicates += 1
                continue
            held = self._held(op.origin, op.seq) or fresh.get(op.id)
            if held is None:
                waiting = self._pending_op(op)
                if waiting is not None and same_op(waiting, op):
                    duplicates += 1
                    continue
                if waiting is not None:
                    # Never chain-verified: not a fork, the chain walk decides
                    # (invariant 8); the fresh op takes its place.
                    log.warning(
                        "fork evidence: op (%s, %d) differs from the one held pending; "
                        "the pending one is discarded",
                        op.origin,
                        op.seq,
                    )
                fresh[op.id] = op
                continue
            if not same_op(held, op):
                raise ForkError(f"two different ops at ({op.origin!r}, {op.seq})")
            duplicates += 1  # the first copy is kept, whatever its sig
        return fresh, duplicates

    def _check_chains(self, fresh: Mapping[tuple[str, int], Op]) -> None:
        """Walk each origin from its head through pending and new ops.

        A new op that does not chain is an error; a pending one is dropped
        (the genuine op may still arrive), but only once the whole batch has
        passed, so an error leaves everything as it was.
        """
        broken: list[Op] = []
        for origin in sorted({o for o, _ in fresh}):
            n, head = self._head(origin)
            queue = self.pending.get(origin, {})
            while True:
                op = fresh.get((origin, n + 1)) or queue.get(n + 1)
                if op is None:
                    break
                if op.prev != head:
                    if op.id in fresh:
                        raise ChainError(
                            f"op ({origin!r}, {op.seq}) does not extend its origin's chain"
                        )
                    broken.append(op)
                    break
                n, head = op.seq, op_hash(op)
                self._walked[op.id] = head  # for _append: each op is hashed once
        for op in broken:
            log.warning("dropping pending op (%s, %d): broken chain", op.origin, op.seq)
            del self.pending[op.origin][op.seq]

    def _release(self, origin: str, applied: list[Op]) -> int:
        """Apply ``origin``'s pending ops that now follow its head; returns the rejected count."""
        queue = self.pending.get(origin, {})
        rejected = 0
        while True:
            n, head = self._head(origin)
            nxt = queue.get(n + 1)
            if nxt is None or nxt.prev != head:
                break
            verdict, reason = self.zones.judge(nxt)
            if verdict is Verdict.WAIT:
                log.warning("holding op (%s, %d) back: %s", origin, nxt.seq, reason)
                break
            del queue[n + 1]
            self._append(nxt, self._walked.pop(nxt.id, None))
            if verdict is Verdict.REJECT:
                log.warning("rejected op (%s, %d) on %r: %s", origin, nxt.seq, nxt.key, reason)
                self.rejected[nxt.id] = reason
                rejected += 1
            else:
                self._merge(nxt)
                applied.append(nxt)
        if not queue:
            self.pending.pop(origin, None)
        return rejected

    # -- signed fleets (invariant 9) ------------------------------------------------

    def _apply_signed(self, ops: list[Op]) -> ApplyResult:
        keys = self.keys
        assert keys is not None
        duplicates = 0
        fresh: dict[tuple[str, int], Op] = {}
        conflicts: dict[str, Op] = {}
        for op in ops:
            if self._compacted_away(op):
                duplicates += 1
                continue
            held = self._held(op.origin, op.seq)
            if held is not None:
                if same_op(held, op):
                    duplicates += 1
                elif op.origin not in conflicts or op.seq < conflicts[op.origin].seq:
                    conflicts[op.origin] = op
                continue
            seen = fresh.get(op.id)
            if seen is not None:
                if not same_op(seen, op):
                    conflicts.setdefault(op.origin, op)
                else:
                    duplicates += 1
                continue
            waiting = self._pending_op(op)
            # A held copy's sig was never verified: one with another sig replaces it.
            if waiting is not None and same_op(waiting, op) and op.sig in (None, waiting.sig):
                duplicates += 1
                continue
            fresh[op.id] = op
        for op in ops:  # statements prove themselves: learn them ahead of their turn
            if op.kind in (KEYREG_KIND, REVOKE_KIND, KEEP_KIND):
                with contextlib.suppress(TrustError):  # judged (rejected) in its turn
                    keys.learn_value(op.value)
        by_origin: dict[str, dict[int, Op]] = {}
        for op in ops:
            by_origin.setdefault(op.origin, {})[op.seq] = op
        for origin, op in sorted(conflicts.items()):
            self._conflict(op, by_origin[origin])
        for op in fresh.values():
            n, head = self._head(op.origin)
            if op.seq == n + 1 and op.prev != head and op.origin not in conflicts:
                conflicts[op.origin] = op
                self._conflict(op, by_origin[op.origin])
                continue
            if op.origin in conflicts and op.seq >= conflicts[op.origin].seq:
                continue
            self.pending.setdefault(op.origin, {})[op.seq] = op
        applied: list[Op] = []
        rejected = 0
        moved = True
        while moved:
            moved = False
            for origin in sorted(set(self.pending)):
                got, rej = self._release_signed(origin, applied)
                rejected += rej
                moved = moved or got
        for listener in self.listeners:
            listener(applied)
        return ApplyResult(
            applied=len(applied),
            duplicates=duplicates,
            pending=sum(len(q) for q in self.pending.values()),
            rejected=rejected,
        )

    def _kept(self, origin: str) -> bool:
        """True if the authority kept the branch of ``origin``'s fork this replica holds."""
        keys = self.keys
        ruling = keys.kept.get(origin) if keys is not None else None
        if ruling is None:
            return False
        held = self._held(origin, ruling[0])
        return held is not None and op_hash(held) == ruling[1]

    def _conflict(self, op: Op, batch: Mapping[int, Op]) -> None:
        keys = self.keys
        assert keys is not None
        if op.origin in self.forks and self._kept(op.origin):
            self.discarded["dropped_branch"] = self.discarded.get("dropped_branch", 0) + 1
            log.warning(
                "discarded op (%s, %d): of the branch the authority dropped", op.origin, op.seq
            )
            return
        branch = branch_from(op, batch)
        c = cover(keys, branch)
        base = self.base.get(op.origin, (0, GENESIS))[0]
        mine = self.chains.get(op.origin, [])[max(0, op.seq - 2 - base) :]
        if c.upto >= op.seq:
            for i, held in enumerate(mine):
                if held.sig is None:
                    continue
                try:
                    ev = verify_fork(keys, mine[: i + 1], branch[: c.upto - op.seq + 1])
                except TrustError:
                    continue
                self.forks[op.origin] = min(self.forks.get(op.origin, ev.seq), ev.seq)
                self.evidence.setdefault(op.origin, ev)
                log.warning("FORK EVIDENCE: %s signed two histories at seq %d", op.origin, ev.seq)
                return
        self.discarded["unsigned_fork"] = self.discarded.get("unsigned_fork", 0) + 1
        log.warning("discarded op (%s, %d): contradicts the verified chain", op.origin, op.seq)

    def _release_signed(self, origin: str, applied: list[Op]) -> tuple[bool, int]:
        keys = self.keys
        assert keys is not None
        queue = self.pending.get(origin, {})
        n, head = self._head(origin)
        if origin in self.forks and not self._kept(origin):
            entries = keys.entries_at(origin, n + 1)
            if not entries or not all(
                e.revoked_after is not None and e.revoked_after <= n for e in entries
            ):
                return False, 0
        run: list[Op] = []
        run_hashes: list[bytes] = []
        h = head
        while (op := queue.get(n + 1 + len(run))) is not None and op.prev == h:
            run.append(op)
            h = op_hash(op)
            run_hashes.append(h)
        c = cover(keys, run)
        rejected = 0
        moved = False
        for i, op in enumerate(run[: max(0, c.upto - n)]):
            verdict, reason = self.zones.judge(op)
            if verdict is Verdict.WAIT:
                break
            del queue[op.seq]
            kept = op if op.seq in c.verified else dataclasses.replace(op, sig=None)
            self._append(kept, run_hashes[i])  # op_hash takes no part of sig
            moved = True
            reason = reason or keys.op_reason(op)
            if not reason and op.kind in (KEYREG_KIND, REVOKE_KIND, KEEP_KIND):
                try:
                    keys.learn_value(op.value)
                    self.statements.append(op.value)
                except TrustError as exc:
                    reason = f"{op.kind}: {exc}"
            elif not reason and op.kind == EVIDENCE_KIND:
                try:
                    ev = ForkEvidence.decode(op.value, keys)
                    self.forks[ev.origin] = min(self.forks.get(ev.origin, ev.seq), ev.seq)
                    self.evidence.setdefault(ev.origin, ev)
                except TrustError as exc:
                    reason = f"evidence: {exc}"
            if reason:
                self.rejected[op.id] = reason
                rejected += 1
            elif op.kind == "lww":
                self._merge(kept)
                applied.append(kept)
            else:
                applied.append(kept)
        if not queue:
            self.pending.pop(origin, None)
        return moved, rejected

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        """Record what ``peer`` acknowledged holding (never moving backwards)."""
        cur = self.acks.setdefault(peer, {})
        for origin, seq in vv.items():
            if seq > cur.get(origin, 0):
                cur[origin] = seq

    async def peer_ack(self, peer: str) -> VersionVector:
        """The last version vector ``peer`` acknowledged."""
        return dict(self.acks.get(peer, {}))

    # -- compaction and snapshots (invariant 10) ---------------------------------------

    async def compact(self) -> int:
        """Drop the ops every acknowledging peer holds; returns how many."""
        if not self.acks:
            return 0
        removed = 0
        for origin in list(self.chains):
            top = self._head(origin)[0]
            bound = min(min(vv.get(origin, 0) for vv in self.acks.values()), top)
            base = self.base.get(origin, (0, GENESIS))[0]
            if bound <= base:
                continue
            cut = bound - base
            self.base[origin] = (bound, self.hashes[origin][cut - 1])
            self.chains[origin] = self.chains[origin][cut:]
            self.hashes[origin] = self.hashes[origin][cut:]
            removed += cut
        return removed

    def compacted(self) -> dict[str, int]:
        """Each compacted origin's compaction point."""
        return {o: b for o, (b, _) in self.base.items() if b}

    async def snapshot(self, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES) -> Snapshot:
        """The lww state, the vector it stands for and each origin's chain head.

        Raises:
            SnapshotTooLargeError: the state exceeds ``max_bytes``.
        """
        stored = sum(len(k) + len(v) for k, (_, _, v) in self.state.items())
        check_size(len(self.state), stored, max_bytes)
        vv = self.vv()
        return Snapshot(
            vv,
            {o: self._head(o)[1] for o in vv},
            sorted(("lww", k, h, o, v) for k, (h, o, v) in self.state.items()),
            (),
            tuple(sorted(set(self.statements))),
        )

    async def install_snapshot(self, snap: Snapshot, *, source: str) -> None:
        """Join ``snap``: the lww rule per key, and each origin it holds more of moves to
        its head (held ops and pending ones at or below it are dropped).

        Raises:
            ForkError: an origin held as far as the snapshot has another head there.
        """
        for origin, seq in snap.vv.items():
            n, head = self._head(origin)
            if n == seq and head != snap.heads[origin]:
                raise ForkError(f"the snapshot's head of {origin!r} at seq {seq} differs")
        take = {o: s for o, s in snap.vv.items() if s > self._head(o)[0]}
        if not take:
            return
        for kind, key, hlc, origin, value in snap.states:
            cand = (hlc, origin, value)
            if kind == "lww" and lww_wins(cand, self.state.get(key)):
                self.state[key] = cand
            self.clock.advance_to(hlc)
        for prefix, epoch, owners in snap.grants:
            self.zones.add_grant(Grant(prefix, frozenset(owners), epoch))
        if self.keys is not None:
            for value in snap.statements:
                with contextlib.suppress(TrustError):
                    self.keys.learn_value(value)
                    self.statements.append(value)
        for origin, seq in take.items():
            self.base[origin] = (seq, snap.heads[origin])
            self.chains[origin], self.hashes[origin] = [], []
            queue = self.pending.get(origin, {})
            for s in [s for s in queue if s <= seq]:
                del queue[s]
        self.snapshots_installed += 1
        await self.apply_remote([])  # what waited behind the snapshot's heads

    # -- local writes and reads -----------------------------------------------------

    def put(self, key: str, value: Any) -> Op:
        """Write ``key`` locally (zone-checked) and return the op."""
        zone, epoch = self.zones.zone_for_write(self._node_id, key)
        # Minted from the held chain's tip, which the simulator's foreign writes also extend.
        chain = OpChain(self._node_id, *self._head(self._node_id), signer=self.signer)
        op = chain.seal(chain.mint(self.clock.now(), zone, epoch, key, "lww", encode_value(value)))
        self._append(op)
        self._merge(op)
        for listener in self.listeners:
            listener([op])
        return op

    def publish(self, statement: bytes) -> Op:
        """Write an authority statement (a registration, a revocation) into this
        replica's own zone, sealed: as :meth:`syncfw.Node.publish` does.

        Raises:
            TrustError: it does not verify against the fleet's authority key.
            ValueError: the fleet is unsigned.
        """
        keys = self.keys
        if keys is None:
            raise ValueError(f"fleet {self.fleet.fleet_id!r} is unsigned")
        kind = STATEMENT_KIND_OF[type(keys.open(statement))]
        key = f"fleet/{self._node_id}/keys/{self._head(self._node_id)[0]}"
        zone, epoch = self.zones.zone_for_write(self._node_id, key)
        chain = OpChain(self._node_id, *self._head(self._node_id), signer=self.signer)
        op = chain.seal(chain.mint(self.clock.now(), zone, epoch, key, kind, statement))
        keys.learn_value(statement)
        self._append(op)
        for listener in self.listeners:
            listener([op])
        return op

    def get(self, key: str) -> Any:
        """The current value of ``key`` (None if unset)."""
        entry = self.state.get(key)
        return None if entry is None or entry[2] == TOMBSTONE else decode_value(entry[2])

    def scan(self, prefix: str = "") -> dict[str, Any]:
        """Every key under ``prefix`` with its value."""
        return {
            k: decode_value(v[2])
            for k, v in sorted(self.state.items())
            if k.startswith(prefix) and v[2] != TOMBSTONE
        }

    def all_ops(self) -> list[Op]:
        """Every held op, by origin then seq."""
        return [op for origin in sorted(self.chains) for op in self.chains[origin]]

    # -- internals ------------------------------------------------------------------

    def _head(self, origin: str) -> tuple[int, bytes]:
        base, base_hash = self.base.get(origin, (0, GENESIS))
        hashes = self.hashes.get(origin)
        return (base + len(hashes), hashes[-1]) if hashes else (base, base_hash)

    def _held(self, origin: str, seq: int) -> Op | None:
        chain = self.chains.get(origin)
        i = seq - 1 - self.base.get(origin, (0, GENESIS))[0]
        return chain[i] if chain and 0 <= i < len(chain) else None

    def _compacted_away(self, op: Op) -> bool:
        """At or below its origin's compaction point: no longer comparable (as the store)."""
        return op.seq <= self.base.get(op.origin, (0, GENESIS))[0]

    def _pending_op(self, op: Op) -> Op | None:
        return self.pending.get(op.origin, {}).get(op.seq)

    def _append(self, op: Op, h: bytes | None = None) -> None:
        self.chains.setdefault(op.origin, []).append(op)
        self.hashes.setdefault(op.origin, []).append(op_hash(op) if h is None else h)

    def _merge(self, op: Op) -> None:
        self.apply_count[op.id] = self.apply_count.get(op.id, 0) + 1
        self.applied_ids.add(op.id)
        cand = (op.hlc, op.origin, op.value)
        if lww_wins(cand, self.state.get(op.key)):
            self.state[op.key] = cand
        self.clock.advance_to(op.hlc)
