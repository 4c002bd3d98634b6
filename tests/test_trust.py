"""The trust core: authority statements, signed heads, coverage, fork evidence."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from syncfw.errors import DecodeError, TrustError
from syncfw.log import Op, OpChain
from syncfw.trust import (
    MAX_TRIES,
    UNSIGNED,
    ForkEvidence,
    KeyRing,
    NodeSigner,
    Registration,
    Revocation,
    cover,
    public_key_bytes,
    seal_statement,
    verify_fork,
)

FLEET = "f1"
AUTH = Ed25519PrivateKey.generate()
T7 = Ed25519PrivateKey.generate()


def ring() -> KeyRing:
    return KeyRing(FLEET, "cloud", public_key_bytes(AUTH))


def reg(node: str, key: Ed25519PrivateKey, from_seq: int = 1, **kw: int) -> bytes:
    return seal_statement(AUTH, Registration(FLEET, node, public_key_bytes(key), from_seq, **kw))


def chain_ops(origin: str, key: Ed25519PrivateKey | None, n: int, seal_at: set[int]) -> list[Op]:
    chain = OpChain(origin, signer=NodeSigner(FLEET, key) if key else None)
    out = []
    for i in range(1, n + 1):
        op = chain.mint(i << 16, f"fleet/{origin}/", 0, f"fleet/{origin}/k{i}", "lww", b"\x01")
        out.append(chain.seal(op) if i in seal_at else op)
    return out


def test_statement_round_trip_and_refusals() -> None:
    r = ring()
    value = reg("t7", T7)
    st = r.open(value)
    assert isinstance(st, Registration) and st.node == "t7" and st.from_seq == 1
    assert r.learn_value(value) and not r.learn_value(value)
    forged = seal_statement(Ed25519PrivateKey.generate(), Registration(FLEET, "t7", b"k" * 32))
    with pytest.raises(TrustError, match="not signed by the fleet authority"):
        r.open(forged)
    other_fleet = seal_statement(AUTH, Registration("f2", "t7", public_key_bytes(T7)))
    with pytest.raises(TrustError, match="for fleet"):
        r.open(other_fleet)
    for junk in (b"", b"\xc1", b"\x92\x01\x02", b"x" * 5000):
        with pytest.raises(TrustError):
            r.open(junk)


def test_heads_cover_only_up_to_the_highest_verified_one() -> None:
    r = ring()
    r.learn_value(reg("t7", T7))
    ops = chain_ops("t7", T7, 10, {4, 8})
    c = cover(r, ops)
    assert c.upto == 8 and c.verified == {8} and c.waiting == UNSIGNED
    assert cover(r, ops[:8]).upto == 8 and cover(r, ops[:8]).waiting == ""
    assert cover(r, ops[:3]).upto == 0  # nothing sealed yet: all wait


def test_unknown_key_and_forged_heads_cover_nothing() -> None:
    ops = chain_ops("t7", T7, 4, {4})
    c = cover(ring(), ops)
    assert c.upto == 0 and "no key registered" in c.waiting
    r = ring()
    r.learn_value(reg("t7", T7))
    evil = chain_ops("t7", Ed25519PrivateKey.generate(), 4, {4})
    c = cover(r, evil)
    assert c.upto == 0 and c.bad == {4}


def test_junk_signatures_cost_a_bounded_number_of_verifies() -> None:
    r = ring()
    r.learn_value(reg("t7", T7))
    ops = [dataclasses.replace(op, sig=b"j" * 64) for op in chain_ops("t7", None, 50, set())]
    c = cover(r, ops)
    assert c.upto == 0 and len(c.bad) == MAX_TRIES


def test_authority_signs_with_the_bootstrap_key() -> None:
    ops = chain_ops("cloud", AUTH, 3, {3})
    assert cover(ring(), ops).upto == 3


def test_rotation_key_covers_only_from_its_seq() -> None:
    new = Ed25519PrivateKey.generate()
    r = ring()
    r.learn_value(reg("t7", T7))
    r.learn_value(reg("t7", new, from_seq=5))
    chain = OpChain("t7")
    ops = []
    for i in range(1, 9):
        op = chain.mint(i << 16, "fleet/t7/", 0, f"fleet/t7/k{i}", "lww", b"\x01")
        if i == 4:
            op = dataclasses.replace(op, sig=NodeSigner(FLEET, T7)(op))
        if i == 8:
            op = dataclasses.replace(op, sig=NodeSigner(FLEET, new)(op))
        ops.append(op)
    assert cover(r, ops).upto == 8
    # Without the old key's head at 4, the new key cannot vouch for ops 1..4.
    ops[3] = dataclasses.replace(ops[3], sig=None)
    assert cover(r, ops).upto == 0


def test_revocation_rejects_ops_past_its_point() -> None:
    r = ring()
    r.learn_value(reg("t7", T7))
    r.learn_value(seal_statement(AUTH, Revocation(FLEET, "t7", public_key_bytes(T7), 2)))
    ops = chain_ops("t7", T7, 4, {2, 4})
    assert cover(r, ops).upto == 4
    assert [r.op_reason(op) for op in ops][:2] == ["", ""]
    assert "revoked after seq 2" in r.op_reason(ops[3])
    # A late head of the revoked key never vouches for ops at or below the point.
    late_only = chain_ops("t7", T7, 4, {4})
    assert cover(r, late_only).upto == 0


def test_expired_key() -> None:
    r = ring()
    r.learn_value(reg("t7", T7, not_after_ms=2))
    ops = chain_ops("t7", T7, 3, {3})
    assert [bool(r.op_reason(op)) for op in ops] == [False, False, True]


def test_fork_evidence_verifies_and_round_trips() -> None:
    r = ring()
    r.learn_value(reg("t7", T7))
    a = chain_ops("t7", T7, 3, {3})
    chain = OpChain("t7", *OpChain("t7").tip, signer=NodeSigner(FLEET, T7))
    b = []
    for i in range(1, 4):
        op = chain.mint(i << 16, "fleet/t7/", 0, f"fleet/t7/other{i}", "lww", b"\x02")
        b.append(chain.seal(op) if i == 3 else op)
    ev = verify_fork(r, a, b)
    assert ev.origin == "t7" and ev.seq == 1
    again = ForkEvidence.decode(ev.encode(), r)
    assert again.seq == 1 and again.a == tuple(a)
    # An unsigned branch is no evidence; nor are two copies of one history.
    with pytest.raises(TrustError, match="signed"):
        verify_fork(r, a, [dataclasses.replace(op, sig=None) for op in b])
    with pytest.raises(TrustError, match="do not disagree"):
        verify_fork(r, a, a)
    with pytest.raises(TrustError):
        ForkEvidence.decode(b"\x93\x01\x90", r)


def test_a_sig_longer_than_ed25519_is_refused_at_decode() -> None:
    op = chain_ops("t7", None, 1, set())[0]
    with pytest.raises(DecodeError, match="sig"):
        Op.from_tuple((*op.to_tuple()[:9], b"x" * 256 * 1024))
