"""Signed chain heads and the key ring that verifies them.

The signing unit: an origin signs **chain heads**, not ops. A head is the last op
of a group commit, and at least every :data:`SEAL_EVERY` ops within a long one.
The signature covers ``(fleet, origin, seq, op_hash(op))``; since every op's hash
covers ``prev``, one signature vouches for the whole chain below it.

Invariants:

1. A receiver applies an origin's ops only up to the highest head it has verified
   against the key registered for that origin at that seq (:func:`cover`). The
   ops above wait like a gap (bounded by the store's pending limits).
2. The fleet authority signs with the authority key itself (the bootstrap's
   :attr:`~syncfw.zones.Fleet.authority_key`); every other origin with the key a
   :class:`~syncfw.trust.statements.Registration` names for the seq.
3. A key registered from seq ``r`` covers ops from ``r`` on only: a head signed by
   it never vouches for ops below ``r`` (a rotated key cannot rewrite history).
4. A revoked key's ops past its revocation point are covered (so the chain moves
   on, identically everywhere) but *rejected* (:meth:`KeyRing.op_reason`); a head
   it signed past that point never vouches for ops at or below it.
5. A ``sig`` that does not verify is never stored or relayed: only verified heads
   keep theirs (:attr:`Cover.verified`).
6. Verification work per origin per batch is bounded (:data:`MAX_TRIES`), so junk
   signatures cost a peer, not the node.

Nothing here touches SQLite, asyncio or the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from syncfw.clock import LOGICAL_BITS
from syncfw.errors import TrustError
from syncfw.log import Op, op_hash
from syncfw.trust.statements import (
    ForkResolution,
    Registration,
    Revocation,
    Statement,
    open_statement,
)

__all__ = [
    "MAX_TRIES",
    "SEAL_BYTES",
    "SEAL_EVERY",
    "SIG_BYTES",
    "UNSIGNED",
    "Cover",
    "KeyEntry",
    "KeyRing",
    "NodeSigner",
    "cover",
    "head_message",
]

SIG_BYTES = 64
"""An ed25519 signature's length: the only ``sig`` length an op may carry."""
SEAL_EVERY = 256
"""A long group commit is sealed at least every this many ops, so a receiver never
holds more than this many of an origin's ops waiting for a signature."""
SEAL_BYTES = 256 << 10
"""... and at least every this many bytes of ops (``op_size``), so every sync batch
(up to 3/4 MiB) carries a head."""
MAX_TRIES = 4
"""Signature verifications spent on one origin's ops per batch, at most."""

_HEAD_TAG = "syncfw/head/v1"


def head_message(fleet_id: str, op: Op) -> bytes:
    """The bytes an origin signs to seal ``op`` as its chain head."""
    return msgpack.packb([_HEAD_TAG, fleet_id, op.origin, op.seq, op_hash(op)], use_bin_type=True)


class NodeSigner:
    """A :data:`~syncfw.log.Signer`: seals this node's chain heads with its private key."""

    __slots__ = ("_key", "fleet_id")

    def __init__(self, fleet_id: str, key: Ed25519PrivateKey) -> None:
        self.fleet_id = fleet_id
        self._key = key

    def __call__(self, op: Op) -> bytes:
        return self._key.sign(head_message(self.fleet_id, op))


@dataclass(slots=True)
class KeyEntry:
    """One key of one origin: valid from ``from_seq``, maybe revoked past ``revoked_after``."""

    public_key: bytes
    from_seq: int
    not_after_ms: int = 0
    revoked_after: int | None = None
    _verifier: Ed25519PublicKey | None = field(default=None, repr=False, compare=False)

    def verify(self, sig: bytes, message: bytes) -> bool:
        """True if ``sig`` is this key's signature of ``message``."""
        if self._verifier is None:
            self._verifier = Ed25519PublicKey.from_public_bytes(self.public_key)
        try:
            self._verifier.verify(sig, message)
        except InvalidSignature:
            return False
        return True


class KeyRing:
    """Which key signs which origin's chain, from which seq: the verified statements.

    Args:
        fleet_id: the fleet (bound into every signature).
        authority: the authority's node id.
        authority_key: its raw 32-byte public key; every statement must verify
            against it.
    """

    def __init__(self, fleet_id: str, authority: str, authority_key: bytes) -> None:
        if len(authority_key) != 32:
            raise TrustError("the fleet authority key must be a raw 32-byte ed25519 public key")
        self.fleet_id = fleet_id
        self.authority = authority
        self.authority_key = authority_key
        self._keys: dict[str, list[KeyEntry]] = {authority: [KeyEntry(authority_key, 1)]}
        self._revoked: dict[tuple[str, bytes], int] = {}
        self._seen: set[bytes] = set()  # statement values already learned
        self.kept: dict[str, tuple[int, bytes]] = {}
        """The authority's fork resolutions: origin -> (seq, hash of the kept op)."""

    def copy(self) -> KeyRing:
        """An independent copy (a plan stages statements on one, as zones do)."""
        out = KeyRing.__new__(KeyRing)
        out.fleet_id, out.authority, out.authority_key = (
            self.fleet_id, self.authority, self.authority_key,
        )
        out._keys = {
            o: [KeyEntry(e.public_key, e.from_seq, e.not_after_ms, e.revoked_after, e._verifier)
                for e in es]
            for o, es in self._keys.items()
        }
        out._revoked = dict(self._revoked)
        out._seen = set(self._seen)
        out.kept = dict(self.kept)
        return out

    # -------------------------------------------------------------- statements

    def open(self, value: bytes) -> Statement:
        """Verify a statement op's value against the authority key.

        Raises:
            TrustError: naming what does not verify.
        """
        return open_statement(value, self.authority_key, self.fleet_id)

    def learn(self, statement: Statement) -> bool:
        """Add a verified statement; True if it changed the ring."""
        if isinstance(statement, ForkResolution):
            if self.kept.get(statement.node) == (statement.seq, statement.keep):
                return False
            self.kept[statement.node] = (statement.seq, statement.keep)
            return True
        if statement.node == self.authority:
            return False  # the authority signs with the bootstrap key; no rotation yet
        if isinstance(statement, Registration):
            entries = self._keys.setdefault(statement.node, [])
            for e in entries:
                if e.public_key == statement.public_key and e.from_seq == statement.from_seq:
                    return False
            revoked = self._revoked.get((statement.node, statement.public_key))
            entries.append(
                KeyEntry(statement.public_key, statement.from_seq, statement.not_after_ms, revoked)
            )
            entries.sort(key=lambda e: (e.from_seq, e.public_key))
            return True
        assert isinstance(statement, Revocation)
        slot = (statement.node, statement.public_key)
        old = self._revoked.get(slot)
        if old is not None and old <= statement.after_seq:
            return False
        self._revoked[slot] = statement.after_seq
        for e in self._keys.get(statement.node, []):
            if e.public_key == statement.public_key:
                e.revoked_after = statement.after_seq
        return True

    def learn_value(self, value: bytes) -> bool:
        """:meth:`open` and :meth:`learn` in one; True if the ring changed. A value
        learned before is not verified again.

        Raises:
            TrustError: the statement does not verify.
        """
        if value in self._seen:
            return False
        changed = self.learn(self.open(value))
        self._seen.add(value)
        return changed

    def has(self, value: bytes) -> bool:
        """True if the statement ``value`` was learned (verified) before."""
        return value in self._seen

    def statements(self) -> Iterable[bytes]:
        """Every statement value learned (to persist)."""
        return iter(sorted(self._seen))

    # -------------------------------------------------------------- keys

    def entries_at(self, origin: str, seq: int) -> list[KeyEntry]:
        """The keys that may sign ``origin``'s head at ``seq`` (usually one; none: unknown)."""
        entries = self._keys.get(origin)
        if not entries:
            return []
        best = max((e.from_seq for e in entries if e.from_seq <= seq), default=None)
        if best is None:
            return []
        return [e for e in entries if e.from_seq == best]

    def knows(self, origin: str) -> bool:
        """True if any key is registered for ``origin``."""
        return bool(self._keys.get(origin))

    def op_reason(self, op: Op) -> str:
        """Why a covered op is rejected by its key's validity ("" if it is not).

        Revocation and expiry are judged per op, against the key of its seq.
        """
        entries = self.entries_at(op.origin, op.seq)
        if not entries:
            return f"no key registered for {op.origin!r} at seq {op.seq}"
        reasons: list[str] = []
        for e in entries:
            if e.revoked_after is not None and op.seq > e.revoked_after:
                reasons.append(f"the key of {op.origin!r} was revoked after seq {e.revoked_after}")
            elif e.not_after_ms and (op.hlc >> LOGICAL_BITS) > e.not_after_ms:
                reasons.append(f"the key of {op.origin!r} expired at {e.not_after_ms} ms")
            else:
                return ""
        return reasons[0]


@dataclass(frozen=True, slots=True)
class Cover:
    """How far an origin's linked run of ops is vouched for by verified heads.

    Attributes:
        upto: the highest covered seq (``start - 1``: nothing covered).
        verified: seqs whose ``sig`` verified (only these keep their ``sig``).
        bad: seqs whose ``sig`` did not verify (stripped; counted).
        waiting: why the ops above ``upto`` wait ("" when none do).
    """

    upto: int
    verified: frozenset[int] = frozenset()
    bad: frozenset[int] = frozenset()
    waiting: str = ""


UNSIGNED = "unsigned: waiting for a signed chain head"


def cover(ring: KeyRing, run: Sequence[Op], *, max_tries: int = MAX_TRIES) -> Cover:
    """How far ``run`` (one origin's ops, contiguous and linked, from the next seq
    the replica needs) is covered by heads that verify (invariants 1, 3, 4, 6)."""
    if not run:
        return Cover(0)
    start = run[0].seq
    origin = run[0].origin
    fleet_id = ring.fleet_id
    upto = start - 1
    verified: set[int] = set()
    bad: set[int] = set()
    tries = 0
    signed = [op for op in run if op.sig is not None]
    waiting = ""
    while tries < max_tries:
        moved = False
        for op in reversed(signed):
            if op.seq <= upto or tries >= max_tries:
                break
            if op.seq in bad:
                continue
            entries = ring.entries_at(origin, op.seq)
            usable = [e for e in entries if e.from_seq <= upto + 1]
            if not usable:
                if not entries:
                    waiting = f"unsigned: no key registered for {origin!r} at seq {op.seq}"
                continue
            tries += 1
            message = head_message(fleet_id, op)
            sig = op.sig
            assert sig is not None
            good = [e for e in usable if len(sig) == SIG_BYTES and e.verify(sig, message)]
            if not good:
                bad.add(op.seq)
                continue
            verified.add(op.seq)
            e = good[0]
            if e.revoked_after is not None and op.seq > e.revoked_after and upto < e.revoked_after:
                continue  # a revoked key's late head never vouches for its earlier ops
            upto = op.seq
            moved = True
            break
        if not moved:
            break
    if upto < run[-1].seq:
        waiting = waiting or UNSIGNED
        if not signed:
            waiting = UNSIGNED
    return Cover(upto, frozenset(verified), frozenset(bad), waiting if upto < run[-1].seq else "")

