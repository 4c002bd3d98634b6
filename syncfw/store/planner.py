"""The apply planner: what a batch of ops does to the store, decided in pure code.

The store reads what the planner needs (its in-memory mirrors, the stored
copies of ops it already holds, the CRDT states the batch touches), the
planner returns a :class:`RemotePlan` or :class:`LocalPlan` (verdicts, the SQL
steps, the mirror updates), and the store commits the steps in one
transaction and only then applies the mirror updates.

Invariants:

1. No I/O and no asyncio here: the same inputs give the same plan. (Local
   planning mints through the store's :class:`~syncfw.log.OpChain` and stamps
   with its clock; both are in-memory.)
2. Every remote op is judged by :meth:`ZoneTable.judge` on its own: no verdict
   is memoised, so an op's verdict never depends on which ops shared its batch.
3. "The same op" is :func:`~syncfw.log.same_op` (``sig`` takes no part): an op
   equal to one held, pending or earlier in the batch but for ``sig`` is a
   duplicate, and the first copy is kept; any other difference at one
   ``(origin, seq)`` with a held op or one earlier in the batch is a
   :class:`ForkError` and refuses the whole batch.
7. Forks without lock-out: a pending op was never chain-verified (it waits
   behind a gap), so a fresh op that differs from it is not refused. The
   fresh op takes its place; if it then extends the verified chain, the
   pending one is discarded as fork evidence (a warning and a count,
   :attr:`RemotePlan.discarded`). A forged op held pending can therefore
   never make the genuine chain fail.
4. Ops of one origin apply in seq order, each naming the hash of the one
   before as ``prev``; past a gap, an unknown zone epoch or a timestamp too
   far ahead, the rest of that origin waits in ``pending``.
5. Timestamps are stored as SQLite INTEGER, which is signed 64-bit. The HLC
   issues ``hlc < 2**63`` for any wall clock before the year 6429 (physical
   ms < 2**47), so an op at or past :data:`HLC_LIMIT` cannot come from a sane
   clock: the batch carrying it is refused with :class:`DecodeError` (as a
   malformed op would be), and a local stamp there fails its write with
   :class:`ClockError`. Nothing is written in either case. (A seq or epoch
   at or past 2**63 is refused the same way: none can be reached honestly.)
   We refuse rather than store a biased value because no honest op needs the
   range, and a bias would change the meaning of every ``hlc`` column that
   other readers of the file (the change feed, ``syncfw inspect``) compare.
6. One LWW rule: lww ops are folded with :func:`syncfw.crdt.lww.lww_wins`,
   and the SQL upsert that writes the fold agrees with it (property-tested).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from syncfw.clock import LOGICAL_BITS
from syncfw.crdt import KINDS, lww_wins
from syncfw.errors import ChainError, ClockSkewError, DecodeError, ForkError, TrustError
from syncfw.log import GENESIS, ApplyResult, Op, OpId, decode_value, op_hash, op_size, same_op
from syncfw.store.sql import INSERT_OP, UPSERT_HEAD, Step
from syncfw.store.stage import Stage, lww_ok, stage_grant
from syncfw.trust import (
    EVIDENCE_KIND,
    KEEP_KIND,
    KEYREG_KIND,
    REVOKE_KIND,
    ForkEvidence,
    KeyRing,
    branch_from,
    cover,
)
from syncfw.zones import GRANT_KIND, Verdict, ZoneTable

__all__ = [
    "FORK_STATE",
    "HLC_LIMIT",
    "INSERT_STATE_ROW",
    "LOG_ONLY_KINDS",
    "TRUST_STATE",
    "Mirrors",
    "OpVerdict",
    "PayloadFn",
    "Outcome",
    "RemoteLimits",
    "RemotePlan",
    "Triage",
    "has_work",
    "pending_bucket",
    "plan_remote",
    "triage",
]

HLC_LIMIT = 1 << 63
"""The first timestamp SQLite cannot store as INTEGER (see invariant 5)."""

Pending = Mapping[str, Mapping[int, tuple[Op, str]]]
"""origin -> seq -> (op, why it waits)."""

GAP = "gap: waiting for earlier ops of this origin"
SKEW = "clock skew"
FORK_HOLD = "fork evidence against this origin: held until the authority acts"
REJECT_BUDGET = "rejected-op budget full"
STATEMENT_KINDS = (KEYREG_KIND, REVOKE_KIND, KEEP_KIND)
LOG_ONLY_KINDS = (KEYREG_KIND, REVOKE_KIND, KEEP_KIND, EVIDENCE_KIND)
"""Kinds with no CRDT state: the op (and, for statements, a ``trust`` row) is the record."""
TRUST_STATE = "trust"
"""``state.kind`` of a verified authority statement (key: its digest; data: the op value)."""
FORK_STATE = "fork"
"""``state.kind`` of fork evidence (key: ``origin``; data: the encoded evidence)."""
MAX_STATEMENTS_PER_PLAN = 64
"""Statement ops verified ahead of their turn per plan, at most (each costs a verify)."""
INSERT_STATE_ROW = "INSERT OR IGNORE INTO state (kind, key, data) VALUES (?, ?, ?)"

INSERT_REJECTED = "INSERT INTO rejected (origin, seq, key, reason) VALUES (?, ?, ?, ?)"
DELETE_PENDING = "DELETE FROM pending WHERE origin = ? AND seq = ?"
INSERT_PENDING = "INSERT OR REPLACE INTO pending (origin, seq, op, reason) VALUES (?, ?, ?, ?)"


class Outcome(enum.Enum):
    """What became of one op of a batch."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    PENDING = "pending"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class OpVerdict:
    """One op's outcome, with the reason for ``PENDING`` and ``REJECTED``."""

    op: OpId
    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Mirrors:
    """The store's committed in-memory state the planner reads (never mutates)."""

    vv: Mapping[str, int]
    heads: Mapping[str, bytes]
    pending: Pending
    zones: ZoneTable
    keys: KeyRing | None = None
    """The key ring of a signed fleet (None: unsigned, nothing is verified)."""
    forks: Mapping[str, int] = field(default_factory=dict)
    """Origins with verified fork evidence, and the seq they forked at."""
    kept: frozenset[str] = frozenset()
    """Forked origins whose branch this replica holds is the one the authority kept
    (a ``forkkeep`` statement): their hold is lifted, the other branch discarded."""


def pending_counts(pending: Mapping[str, Mapping[int, tuple[Op, str]]]) -> dict[str, int]:
    """Held-back ops by :func:`pending_bucket`, every bucket present."""
    out = dict.fromkeys(("gap", "epoch", "clock_skew", "unsigned", "fork", "rejected_budget"), 0)
    for d in pending.values():
        for _, why in d.values():
            out[pending_bucket(why)] += 1
    return out


def pending_bucket(reason: str) -> str:
    """The metric label of a pending reason: ``gap``, ``clock_skew``, ``epoch``,
    ``unsigned`` (waiting for a signed head), ``fork`` (held on fork evidence) or
    ``rejected_budget`` (it would be rejected, and rejected ops are at their budget)."""
    if reason.startswith("gap"):
        return "gap"
    if reason.startswith(SKEW):
        return "clock_skew"
    if reason.startswith("unsigned"):
        return "unsigned"
    if reason.startswith("fork"):
        return "fork"
    if reason.startswith(REJECT_BUDGET):
        return "rejected_budget"
    return "epoch"


def pack_op(op: Op) -> bytes:
    """The ``pending.op`` column: the op's tuple form in msgpack."""
    return msgpack.packb(op.to_tuple(), use_bin_type=True)


# ---------------------------------------------------------------------------- remote


@dataclass(frozen=True, slots=True)
class Triage:
    """A batch sorted before anything is read from disk.

    Attributes:
        fresh: ops beyond the version vector, not pending, first copy of each.
        held: ops at or below the version vector; their stored copies must be
            compared (:func:`plan_remote` takes them as ``stored``).
        duplicates: copies of pending ops or of ops earlier in the batch.
    """

    fresh: Mapping[str, Mapping[int, Op]]
    held: tuple[Op, ...]
    duplicates: tuple[Op, ...]
    contested: frozenset[OpId] = frozenset()
    """Fresh ops that differ from the pending op at their id (invariant 7)."""
    resealed: frozenset[OpId] = frozenset()
    """Signed fleets: copies of pending ops with another ``sig``, which replace them
    (a held copy's sig was never verified; a relayer's junk must not shadow the real one)."""

    def state_keys(self, pending: Pending) -> set[tuple[str, str]]:
        """The non-lww ``(kind, key)`` states the plan will fold into."""
        ops = [op for d in self.fresh.values() for op in d.values()]
        ops += [op for d in pending.values() for op, _ in d.values()]
        return {(op.kind, op.key) for op in ops if op.kind != "lww" and op.kind in KINDS}


def _fork(op: Op) -> ForkError:
    return ForkError(f"two different ops at ({op.origin!r}, {op.seq})")


def triage(incoming: Iterable[Op], m: Mirrors) -> Triage:
    """Sort a batch into fresh, held and duplicate ops.

    Raises:
        DecodeError: an op's hlc is at or past :data:`HLC_LIMIT`.
        ForkError: an op differs (not :func:`same_op`) from one earlier in
            the batch at its ``(origin, seq)``. (One that differs from a
            pending op is ``contested``: invariant 7.)
    """
    vv, pending = m.vv, m.pending
    signed = m.keys is not None
    resealed: set[OpId] = set()
    fresh: dict[str, dict[int, Op]] = {}
    held: list[Op] = []
    dups: list[Op] = []
    contested: set[OpId] = set()
    for op in incoming:
        if op.hlc >= HLC_LIMIT or op.seq >= HLC_LIMIT or op.epoch >= HLC_LIMIT:
            raise DecodeError(
                f"op ({op.origin!r}, {op.seq}) has an hlc, seq or epoch >= 2**63, which no "
                "sane replica issues and SQLite cannot store"
            )
        if op.seq <= vv.get(op.origin, 0):
            held.append(op)
            continue
        mine = fresh.get(op.origin)
        if mine is None:
            mine = fresh[op.origin] = {}
        seen = mine.get(op.seq)
        if seen is not None:
            if not same_op(seen, op):
                raise _fork(op)
            dups.append(op)
            continue
        waiting = pending.get(op.origin)
        if waiting is not None and op.seq in waiting:
            if same_op(waiting[op.seq][0], op):
                if not (signed and op.sig is not None and op.sig != waiting[op.seq][0].sig):
                    dups.append(op)
                    continue
                resealed.add(op.id)  # a held copy's sig was never verified: try this one
            else:
                contested.add(op.id)  # never verified: the chain walk decides
        mine[op.seq] = op
    return Triage(
        {o: d for o, d in fresh.items() if d},
        tuple(held),
        tuple(dups),
        frozenset(contested),
        frozenset(resealed),
    )


@dataclass(frozen=True, slots=True)
class RemotePlan:
    """What one remote batch does, to be committed as one transaction.

    Attributes:
        applied: ops merged into state, in apply order.
        rejected: ops recorded as rejected, with why (never merged).
        duplicates: ops already held (no-ops).
        pending: the whole pending set after the batch.
        steps: the SQL of the transaction (the clock's high-water step aside).
        vv, heads: new entries of the version vector and chain heads.
        zones: the zone table after the batch (None: unchanged).
        observe_hlc: the greatest hlc applied, for the clock to observe.
        warnings: what was dropped or rejected, to log after COMMIT.
        discarded: held-back ops dropped, by why (``fork``: contradicted by
            the verified chain; ``broken_chain``; ``max_pending``; in a signed
            fleet also ``bad_sig`` (signatures stripped) and ``unsigned_fork``
            (a conflicting op no verified head covers)).
        keys: the key ring after the batch (None: unchanged).
        forks: origins newly flagged by verified fork evidence ops.
        suspects: conflicting branches a verified head covers, ``(origin, seq,
            ops)``: the store pairs each with its own signed branch as
            :class:`~syncfw.trust.ForkEvidence`.
        inserted: the ``ops`` rows the transaction inserts, in order, as
            ``(op as stored, status)`` (``store.feed.CommitRows``): the accepted
            ops (status 0), then the rejected ones (1).
    """

    applied: tuple[Op, ...] = ()
    rejected: tuple[tuple[Op, str], ...] = ()
    duplicates: tuple[Op, ...] = ()
    pending: Pending = field(default_factory=dict)
    steps: tuple[Step, ...] = ()
    vv: Mapping[str, int] = field(default_factory=dict)
    heads: Mapping[str, bytes] = field(default_factory=dict)
    zones: ZoneTable | None = None
    observe_hlc: int | None = None
    warnings: tuple[str, ...] = ()
    discarded: Mapping[str, int] = field(default_factory=dict)
    keys: KeyRing | None = None
    forks: Mapping[str, int] = field(default_factory=dict)
    suspects: tuple[tuple[str, int, tuple[Op, ...]], ...] = ()
    inserted: tuple[tuple[Op, int], ...] = ()

    def result(self) -> ApplyResult:
        """The caller's summary."""
        return ApplyResult(
            applied=len(self.applied),
            duplicates=len(self.duplicates),
            pending=sum(len(d) for d in self.pending.values()),
            rejected=len(self.rejected),
        )

    def pending_counts(self) -> dict[str, int]:
        """Pending ops by :func:`pending_bucket` (every bucket present)."""
        return pending_counts(self.pending)

    def verdicts(self, ops: Iterable[Op]) -> list[OpVerdict]:
        """The outcome of each of ``ops`` (the batch this plan was made from)."""
        applied = {op.id for op in self.applied}
        rejected = {op.id: why for op, why in self.rejected}
        dups = {id(op) for op in self.duplicates}
        out: list[OpVerdict] = []
        for op in ops:
            if id(op) in dups:
                out.append(OpVerdict(op.id, Outcome.DUPLICATE))
            elif op.id in applied:
                out.append(OpVerdict(op.id, Outcome.APPLIED))
            elif op.id in rejected:
                out.append(OpVerdict(op.id, Outcome.REJECTED, rejected[op.id]))
            elif op.seq in self.pending.get(op.origin, {}):
                out.append(OpVerdict(op.id, Outcome.PENDING, self.pending[op.origin][op.seq][1]))
            else:  # held back, then dropped over max_pending
                out.append(OpVerdict(op.id, Outcome.PENDING, "dropped over max_pending; resent later"))
        return out


@dataclass(frozen=True, slots=True)
class RemoteLimits:
    """The bounds a remote plan is made under."""

    wall_ms: int
    max_offset_ms: int
    max_pending: int
    authority: str
    max_pending_bytes: int = 1 << 62
    rejected_room: int = 1 << 62
    """Bytes of rejected ops this plan may still store (``StoreConfig.max_rejected_bytes``
    less what is stored); an op that would be rejected past it waits instead."""


PayloadFn = Callable[[Any], bytes]
"""A payload computed from the key's current state (counters, OR-set removes, grants)."""


def _stage(op: Op, zones: ZoneTable, stage: Stage, states: dict[tuple[str, str], Any]) -> str:
    """Stage an accepted op; return why it cannot be merged ("" if it can)."""
    if op.kind == GRANT_KIND:
        return stage_grant(zones, op, stage) or ""
    if op.kind in STATEMENT_KINDS or op.kind == EVIDENCE_KIND:
        return f"{op.kind} ops need a signed fleet (this one has no authority key)"
    if op.kind not in KINDS:
        return f"unknown op kind {op.kind!r}"
    try:
        if op.kind == "lww":  # reached only when lww_ok refused the payload
            decode_value(op.value)
        stage.apply(op, states)
    except DecodeError as exc:
        return f"malformed {op.kind} payload: {exc}"
    return ""


class _Run:
    """The mutable working set of one :func:`plan_remote` call."""

    def __init__(self, t: Triage, m: Mirrors, states: Mapping[tuple[str, str], Any]) -> None:
        self.fresh = {o: dict(d) for o, d in t.fresh.items()}
        self.held_of: dict[str, list[Op]] = {}
        for op in t.held:
            self.held_of.setdefault(op.origin, []).append(op)
        # Held-back ops, by origin, copied: a broken one is dropped from the copy.
        self.held_back = {o: {s: op for s, (op, _) in d.items()} for o, d in m.pending.items()}
        self.origins = sorted(set(t.fresh) | set(m.pending))
        self.nxt = {o: m.vv.get(o, 0) + 1 for o in self.origins}
        self.heads = {o: m.heads.get(o, GENESIS) for o in self.origins}
        self.waiting: dict[str, str] = {}
        self.accepted: list[Op] = []
        self.rejected: list[tuple[Op, str]] = []
        self.rejected_bytes = 0
        self.warnings: list[str] = []
        self.discarded: dict[str, int] = {}
        self.contested = t.contested
        self.zones = m.zones
        self.stage = Stage()
        self.states = dict(states)
        self.base_zones = m.zones
        self.keys = m.keys
        self.base_keys = m.keys
        self.forks = dict(m.forks)
        self.kept = m.kept
        self.new_forks: dict[str, int] = {}
        self.verified: set[OpId] = set()
        self.trust_rows: list[tuple[str, str, bytes]] = []
        self.suspects: list[tuple[str, int, tuple[Op, ...]]] = []
        self.covered: dict[str, list[Op]] = {}
        if self.keys is not None:
            self.learn_ahead()

    # ------------------------------------------------------------ signed fleets

    def own_keys(self) -> KeyRing:
        """The run's key ring, copied before its first change (rollback, as zones)."""
        assert self.keys is not None
        if self.keys is self.base_keys:
            self.keys = self.keys.copy()
        return self.keys

    def learn_ahead(self) -> None:
        """Learn the statements the batch and the held-back ops carry before any
        chain is covered: a node's registration travels in its own chain, ahead of
        the heads it verifies (statements prove themselves, wherever found)."""
        budget = MAX_STATEMENTS_PER_PLAN
        for d in (*self.fresh.values(), *self.held_back.values()):
            for op in d.values():
                if op.kind in STATEMENT_KINDS and budget > 0:
                    budget -= 1
                    keys = self.keys
                    assert keys is not None
                    try:
                        if not keys.has(op.value):
                            self.own_keys().learn_value(op.value)
                    except TrustError:
                        pass  # judged (rejected) in its turn

    def signed_run(self, origin: str, n: int, head: bytes) -> list[tuple[Op, bytes]]:
        """The ops of ``origin`` from ``n`` that link to ``head`` and that verified
        heads cover, each with its hash (walked instead of the raw fresh/pending ops;
        the walk reuses the hashes rather than computing them again)."""
        new_ops = self.fresh.get(origin, {})
        old_ops = self.held_back.get(origin, {})
        run: list[Op] = []
        hashes: list[bytes] = []
        s, h = n, head
        while True:
            f, p = new_ops.get(s), old_ops.get(s)
            if f is not None and f.prev == h:
                op = f
            elif p is not None and p.prev == h:
                op = p
            else:
                if f is not None and s == n:
                    self.conflict(origin, f)  # does not extend the verified chain
                break
            run.append(op)
            h = op_hash(op)
            hashes.append(h)
            s += 1
        keys = self.keys
        assert keys is not None
        c = cover(keys, run)
        if c.bad:
            self.discard("bad_sig", len(c.bad))
            self.warnings.append(
                f"stripped {len(c.bad)} signature(s) of {origin} that do not verify"
            )
        self.verified.update((origin, q) for q in c.verified)
        if c.waiting:
            self.waiting[origin] = c.waiting
        k = max(0, c.upto - n + 1)
        return list(zip(run[:k], hashes[:k], strict=True))

    def conflict(self, origin: str, op: Op) -> None:
        """``op`` contradicts the verified chain: fork evidence if a verified head of
        its own branch covers it, else discarded (never a lock-out)."""
        if any(o == origin for o, _, _ in self.suspects):
            return
        if origin in self.kept:  # the authority kept this replica's branch
            self.discard("dropped_branch")
            self.warnings.append(
                f"discarded op ({origin}, {op.seq}): of the branch the authority dropped"
            )
            fresh = self.fresh.get(origin)
            if isinstance(fresh, dict):
                fresh.pop(op.seq, None)
            return
        branch = branch_from(op, {q.seq: q for q in self.batch_of(origin)})
        keys = self.keys
        assert keys is not None
        c = cover(keys, branch)
        if c.upto >= op.seq:
            top = c.upto - op.seq + 1
            self.suspects.append((origin, op.seq, tuple(branch[:top])))
        else:
            self.discard("unsigned_fork")
            self.warnings.append(
                f"discarded op ({origin}, {op.seq}): it contradicts the verified chain and "
                "no head signed by its origin covers it"
            )
        fresh = self.fresh.get(origin)
        if isinstance(fresh, dict):
            for q in branch:
                if fresh.get(q.seq) is q:
                    del fresh[q.seq]

    def batch_of(self, origin: str) -> list[Op]:
        """Every op of ``origin`` this batch carries (held range too)."""
        return [*self.held_of.get(origin, ()), *self.fresh.get(origin, {}).values()]

    def origin(self, origin: str, lim: RemoteLimits) -> bool:
        """Apply what ``origin`` can apply now; True if anything moved."""
        n, head = self.nxt[origin], self.heads[origin]
        signed: Iterator[tuple[Op, bytes]] | None = None
        if self.keys is not None:
            if origin in self.forks and not self.released(origin, n):
                self.waiting[origin] = FORK_HOLD
                return False
            signed = iter(self.signed_run(origin, n, head))
        new_ops = self.fresh.get(origin, {})
        old_ops = self.held_back.get(origin, {})
        stage, lww = self.stage, self.stage.lww
        skew_ms = lim.wall_ms + lim.max_offset_ms
        moved = False
        while True:
            if signed is not None:  # linked and covered by verified heads
                pair = next(signed, None)
                if pair is None:
                    break
                op, known = pair
                is_fresh = new_ops.get(n) is op
            else:
                got = new_ops.get(n)
                is_fresh = got is not None
                if got is None:
                    got = old_ops.get(n)
                    if got is None:
                        break
                op, known = got, b""
            if op.prev != head:
                if is_fresh:
                    raise ChainError(f"op ({op.origin!r}, {op.seq}) does not extend its origin's chain")
                # A held-back op that turns out not to chain is dropped; the
                # genuine one can still arrive.
                self.warnings.append(f"dropping pending op ({op.origin}, {op.seq}): broken chain")
                self.discard("broken_chain")
                del old_ops[n]
                break
            if is_fresh and op.id in self.contested:
                # The verified chain reaches this seq with another op than the
                # one held pending: that one is fork evidence (invariant 7).
                self.warnings.append(
                    f"fork evidence: discarded pending op ({op.origin}, {op.seq}), which "
                    "differs from the op that extends the verified chain"
                )
                self.discard("fork")
                old_ops.pop(n, None)
            if op.hlc >= HLC_LIMIT:  # held back by an older syncfw: it can never be stored
                self.warnings.append(f"dropping pending op ({op.origin}, {op.seq}): hlc >= 2**63")
                del old_ops[n]
                break
            remote_ms = op.hlc >> LOGICAL_BITS
            if remote_ms > skew_ms:
                err = ClockSkewError(remote_ms, lim.wall_ms, lim.max_offset_ms)
                self.waiting[origin] = f"{SKEW}: {err}"
                break
            verdict, reason = self.zones.judge(op)  # every op, no memo (invariant 2)
            if verdict is Verdict.WAIT:
                self.waiting[origin] = reason
                break
            if not reason and self.keys is not None:
                reason = self.keys.op_reason(op)  # revoked or expired key
                if not reason and (op.kind in STATEMENT_KINDS or op.kind == EVIDENCE_KIND):
                    reason = self.stage_trust(op) or "-"
            if reason == "-":
                reason = ""
            elif not reason:
                if op.kind == "lww" and lww_ok(op.value):
                    cand = (op.hlc, origin, op.value)
                    if lww_wins(cand, lww.get(op.key)):
                        lww[op.key] = cand
                else:
                    if op.kind == GRANT_KIND and self.zones is self.base_zones:
                        self.zones = self.zones.copy()  # grants staged on a copy (rollback)
                    reason = _stage(op, self.zones, stage, self.states)
            if reason:
                size = op_size(op)
                if self.rejected_bytes + size > lim.rejected_room:
                    # Stored, a rejected op costs its bytes forever (it is part of its
                    # origin's chain and relayed); past the budget the origin waits,
                    # bounded by the pending caps, and says so.
                    self.waiting[origin] = (
                        f"{REJECT_BUDGET} (StoreConfig.max_rejected_bytes): op {op.seq} "
                        f"would be rejected: {reason}"
                    )
                    self.warnings.append(
                        f"holding ops of {origin} from seq {op.seq}: the rejected-op budget "
                        f"(StoreConfig.max_rejected_bytes, {lim.rejected_room} bytes left) "
                        f"is full, and it would be rejected: {reason}"
                    )
                    break
                self.rejected_bytes += size
                self.rejected.append((op, reason))
            else:
                self.accepted.append(op)
            head = known or op_hash(op)
            n += 1
            self.waiting.pop(origin, None)
            moved = True
        self.nxt[origin], self.heads[origin] = n, head
        return moved

    def released(self, origin: str, n: int) -> bool:
        """True if the authority acted on ``origin``'s fork: it kept the branch this
        replica holds, or revoked the key at ``n`` (the ops past the revocation point are
        then rejected, and the chain moves on)."""
        if origin in self.kept:
            return True
        assert self.keys is not None
        entries = self.keys.entries_at(origin, n)
        return bool(entries) and all(
            e.revoked_after is not None and e.revoked_after < n for e in entries
        )

    def stage_trust(self, op: Op) -> str:
        """Stage a statement or evidence op; why it is rejected ("" if it is not)."""
        keys = self.keys
        assert keys is not None
        if op.kind in STATEMENT_KINDS:
            if not keys.has(op.value):
                try:
                    self.own_keys().learn_value(op.value)
                except TrustError as exc:
                    return f"{op.kind}: {exc}"
            self.trust_rows.append((TRUST_STATE, hashlib.sha256(op.value).hexdigest(), op.value))
            return ""
        try:
            ev = ForkEvidence.decode(op.value, keys)
        except TrustError as exc:
            return f"evidence: {exc}"
        self.flag(ev.origin, ev.seq, op.value)
        return ""

    def flag(self, origin: str, seq: int, evidence: bytes) -> None:
        """Record verified fork evidence against ``origin`` (its later ops are held)."""
        if origin in self.kept:
            return  # resolved by the authority: evidence is history now
        if seq < self.forks.get(origin, seq + 1):
            self.forks[origin] = seq
            self.new_forks[origin] = seq
        self.trust_rows.append((FORK_STATE, origin, evidence))

    def discard(self, why: str, n: int = 1) -> None:
        """Count held-back ops dropped for ``why``."""
        self.discarded[why] = self.discarded.get(why, 0) + n

    def new_pending(self, lim: RemoteLimits, vv: Mapping[str, int]) -> dict[str, dict[int, tuple[Op, str]]]:
        """What stays held back: everything not consumed, with why, bounded."""
        out: dict[str, dict[int, tuple[Op, str]]] = {}
        for origin in self.origins:
            why = self.waiting.get(origin, GAP)
            nxt = self.nxt[origin]
            keep = {
                s: (op, why)
                for d in (self.held_back.get(origin, {}), self.fresh.get(origin, {}))
                for s, op in d.items()
                if s >= nxt
            }
            if keep:
                out[origin] = keep
        total = sum(len(d) for d in out.values())
        size = sum(held_bytes(op) for d in out.values() for op, _ in d.values())
        if total <= lim.max_pending and size <= lim.max_pending_bytes:
            return out
        # Drop the ops farthest ahead of their origin until both bounds hold:
        # they are the last needed and the next exchange sends them again.
        ranked = sorted(((s - vv.get(o, 0), o, s) for o, d in out.items() for s in d), reverse=True)
        dropped = 0
        for _, o, s in ranked:
            if total <= lim.max_pending and size <= lim.max_pending_bytes:
                break
            size -= held_bytes(out[o].pop(s)[0])
            total -= 1
            dropped += 1
        self.warnings.append(
            f"held-back ops over max_pending ({lim.max_pending} ops) or max_pending_bytes "
            f"({lim.max_pending_bytes} bytes): dropped {dropped}, to be resent"
        )
        self.discard("max_pending", dropped)
        return {o: d for o, d in out.items() if d}


def held_bytes(op: Op) -> int:
    """What a held-back op costs in memory and in the pending table, about."""
    return len(op.value) + len(op.key) + len(op.zone) + len(op.origin) + 128


def has_work(t: Triage, m: Mirrors) -> bool:
    """False when a batch only repeats what is held and nothing pending can move."""
    return bool(t.fresh) or any(m.vv.get(o, 0) + 1 in d for o, d in m.pending.items())


def plan_remote(
    t: Triage,
    m: Mirrors,
    stored: Mapping[OpId, Op],
    states: Mapping[tuple[str, str], Any],
    lim: RemoteLimits,
) -> RemotePlan:
    """Plan a remote batch (or, with an empty triage, a retry of what is pending).

    Args:
        t: the batch, from :func:`triage`.
        m: the store's committed mirrors.
        stored: the stored copies of ``t.held`` (compacted ones absent).
        states: the decoded states of ``t.state_keys(m.pending)``.
        lim: the wall clock and bounds to plan under.

    Raises:
        ForkError: a held op differs from its stored copy.
        ChainError: a fresh op does not extend its origin's chain.
    """
    conflicts: dict[str, Op] = {}
    for op in t.held:
        kept = stored.get(op.id)
        # Compacted ops are no longer comparable; their chain was verified at apply.
        if kept is not None and not same_op(kept, op):
            if m.keys is None:
                raise _fork(op)
            # Signed fleet: evidence if signed, else discarded; never a refusal.
            if op.origin not in conflicts or op.seq < conflicts[op.origin].seq:
                conflicts[op.origin] = op
    against = {id(op) for op in conflicts.values()}
    duplicates = t.duplicates + tuple(op for op in t.held if id(op) not in against)
    if not has_work(t, m) and not conflicts:
        return RemotePlan(duplicates=duplicates, pending=m.pending)
    run = _Run(t, m, states)
    for origin, op in sorted(conflicts.items()):
        run.conflict(origin, op)
    order = sorted(run.origins, key=lambda o: (o != lim.authority, o))
    while any([run.origin(o, lim) for o in order]):
        pass
    new_pending = run.new_pending(lim, m.vv)
    old_keys = {(o, s) for o, d in m.pending.items() for s in d}
    new_keys = {(o, s) for o, d in new_pending.items() for s in d}
    # A contested op still waiting replaces the pending one at its id (invariant 7).
    replaced = {(o, s) for o, s in t.contested | t.resealed if (o, s) in new_keys}
    to_insert = [
        (o, s, pack_op(new_pending[o][s][0]), new_pending[o][s][1])
        for o, s in sorted((new_keys - old_keys) | replaced)
    ]
    progressed = [o for o in run.origins if run.nxt[o] != m.vv.get(o, 0) + 1]
    vv = {o: run.nxt[o] - 1 for o in progressed}
    heads = {o: run.heads[o] for o in progressed}
    inserted = [(op, 0) for op in run.accepted] + [(op, 1) for op, _ in run.rejected]
    if m.keys is not None:  # only verified heads keep their sig (a junk one is never stored or relayed)
        ok = run.verified
        inserted = [
            (op if op.sig is None or op.id in ok else dataclasses.replace(op, sig=None), status)
            for op, status in inserted
        ]
    rows = [(*op.to_tuple(), status) for op, status in inserted]
    steps: list[Step] = [
        (INSERT_OP, rows),
        (INSERT_REJECTED, [(op.origin, op.seq, op.key, why) for op, why in run.rejected]),
        *run.stage.steps(run.states),
        (INSERT_STATE_ROW, run.trust_rows),
        (UPSERT_HEAD, [(o, vv[o], heads[o]) for o in progressed]),
        (DELETE_PENDING, sorted(old_keys - new_keys)),
        (INSERT_PENDING, to_insert),
    ]
    warnings = run.warnings + [
        f"rejected op ({op.origin}, {op.seq}) on {op.key!r}: {why}" for op, why in run.rejected
    ]
    return RemotePlan(
        applied=tuple(run.accepted),
        rejected=tuple(run.rejected),
        duplicates=duplicates,
        pending=new_pending,
        steps=tuple(s for s in steps if s[1]),
        vv=vv,
        heads=heads,
        zones=None if run.zones is m.zones else run.zones,
        observe_hlc=max((op.hlc for op in run.accepted), default=None),
        warnings=tuple(warnings),
        discarded=run.discarded,
        keys=None if run.keys is m.keys else run.keys,
        forks=run.new_forks,
        suspects=tuple(run.suspects),
        inserted=tuple(inserted),
    )
