"""Fork evidence: proof that an origin's key signed two different histories.

Two branches of one origin's ops, each linked by ``prev`` and ending in a head
whose signature verifies against the key registered for that seq, that disagree
somewhere (two different ops at one seq, or one branch's op naming a ``prev``
that is not the hash of the other's op just below it). Anyone with the fleet's
key ring can check it (:func:`verify_fork`), so evidence is gossiped as it is
and every node reaches the same conclusion.

An unsigned or badly signed conflicting op is no evidence: it is discarded.

Nothing here touches SQLite, asyncio or the network.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgpack

from syncfw.errors import DecodeError, TrustError
from syncfw.log import Op, op_hash, same_op
from syncfw.trust.ring import KeyRing, head_message

__all__ = ["EVIDENCE_KIND", "MAX_BRANCH_OPS", "ForkEvidence", "branch_from", "verify_fork"]

EVIDENCE_KIND = "evidence"
"""Op kind whose value is an encoded :class:`ForkEvidence`."""
MAX_BRANCH_OPS = 1024
"""Longest branch evidence carries (an honest signer seals every 256 ops)."""


@dataclass(frozen=True, slots=True)
class ForkEvidence:
    """Two signed branches of ``origin`` that disagree at ``seq``."""

    origin: str
    seq: int
    a: tuple[Op, ...]
    b: tuple[Op, ...]

    def encode(self) -> bytes:
        """The bytes gossiped (an ``evidence`` op's value)."""
        return msgpack.packb(
            [1, [op.to_tuple() for op in self.a], [op.to_tuple() for op in self.b]],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes, ring: KeyRing) -> ForkEvidence:
        """Decode and verify (:func:`verify_fork`).

        Raises:
            TrustError: malformed, or not proof of a fork.
        """
        try:
            version, a, b = msgpack.unpackb(data, raw=False)
            if version != 1 or not isinstance(a, list) or not isinstance(b, list):
                raise TrustError("unknown evidence layout")
            if len(a) > MAX_BRANCH_OPS or len(b) > MAX_BRANCH_OPS:
                raise TrustError(f"an evidence branch holds more than {MAX_BRANCH_OPS} ops")
            ops_a = [Op.from_tuple(t) for t in a]
            ops_b = [Op.from_tuple(t) for t in b]
        except DecodeError as exc:
            raise TrustError(f"malformed evidence: {exc}") from None
        except TrustError:
            raise
        except Exception:  # msgpack raises several unrelated types
            raise TrustError("malformed evidence") from None
        return verify_fork(ring, ops_a, ops_b)


def branch_from(op: Op, by_seq: Mapping[int, Op]) -> list[Op]:
    """``op`` and the ops of ``by_seq`` (one origin's, by seq) that chain on from it, at
    most :data:`MAX_BRANCH_OPS`: the branch a conflicting op starts, as both replicas
    judge it."""
    branch = [op]
    while len(branch) < MAX_BRANCH_OPS:
        nxt = by_seq.get(branch[-1].seq + 1)
        if nxt is None or nxt.prev != op_hash(branch[-1]):
            break
        branch.append(nxt)
    return branch


def _branch(ring: KeyRing, ops: Sequence[Op], name: str) -> None:
    if not ops:
        raise TrustError(f"evidence branch {name} is empty")
    if len(ops) > MAX_BRANCH_OPS:
        raise TrustError(f"evidence branch {name} holds more than {MAX_BRANCH_OPS} ops")
    for lo, hi in itertools.pairwise(ops):
        if hi.origin != lo.origin or hi.seq != lo.seq + 1 or hi.prev != op_hash(lo):
            raise TrustError(f"evidence branch {name} is not one linked chain")
    head = ops[-1]
    sig = head.sig
    entries = [e for e in ring.entries_at(head.origin, head.seq) if e.from_seq <= ops[0].seq]
    if sig is None or not any(e.verify(sig, head_message(ring.fleet_id, head)) for e in entries):
        raise TrustError(f"evidence branch {name} does not end in a head signed by its origin")


def verify_fork(ring: KeyRing, a: Sequence[Op], b: Sequence[Op]) -> ForkEvidence:
    """Check that ``a`` and ``b`` prove a fork of one origin.

    Raises:
        TrustError: naming what does not hold.
    """
    _branch(ring, a, "a")
    _branch(ring, b, "b")
    if a[0].origin != b[0].origin:
        raise TrustError("evidence branches are of two origins")
    by_seq = {op.seq: op for op in a}
    for op in b:
        other = by_seq.get(op.seq)
        if other is not None and not same_op(other, op):
            return ForkEvidence(op.origin, op.seq, tuple(a), tuple(b))
    for x, y in ((a, b), (b, a)):
        below = {op.seq: op for op in x}.get(y[0].seq - 1)
        if below is not None and op_hash(below) != y[0].prev:
            # y's chain holds another op at below.seq than x: the fork is there.
            return ForkEvidence(y[0].origin, below.seq, tuple(a), tuple(b))
    raise TrustError("evidence branches do not disagree")
