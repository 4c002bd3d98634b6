"""Signed chains on real SQLite nodes: every attack of the trust issue, refused and recorded,
with honest ops never lost or blocked."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from conftest import FLEET, START_MS

from syncfw import Fleet, Grant, Node, TrustError
from syncfw.log import Op, OpChain, encode_value
from syncfw.testing import SignedFleet, wait_until
from syncfw.trust import EVIDENCE_KIND, NodeSigner

pytestmark = pytest.mark.asyncio

BASE = Fleet(
    fleet_id="trust",
    authority="cloud",
    grants=(Grant.of("site/", "*"),)
)


@pytest.fixture
def sf() -> SignedFleet:
    return SignedFleet(BASE)


async def sync(a: Node, b: Node, *, rounds: int = 20) -> None:
    """Both directions until neither moves (bounded: forged ops may wait forever)."""
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            ops = await src.ops_since(await dst.version_vector(), limit=1000)
            if ops:
                before = await dst.version_vector()
                await dst.apply_remote(ops)
                moved = moved or (await dst.version_vector()) != before
        if not moved:
            return


async def open_signed(make_node: Any, sf: SignedFleet, node_id: str) -> Node:
    node: Node = await make_node(node_id, fleet=sf.fleet, keys=sf.keys(node_id))
    return node


HLC = START_MS << 16


def forge(origin: str, seq: int, prev: bytes, key: str, value: Any, *, zone: str | None = None,
          epoch: int = 0, kind: str = "lww", sig: bytes | None = None) -> Op:
    z = zone if zone is not None else f"fleet/{origin}/"
    return Op(origin, seq, HLC + seq, z, epoch, key, kind, encode_value(value), prev, sig)


async def test_signed_nodes_converge_and_keep_only_verified_heads(make_node, sf) -> None:
    a = await open_signed(make_node, sf, "t1")
    b = await open_signed(make_node, sf, "t2")
    for i in range(600):  # one long group would seal every 256 ops; these are several
        await a.put(f"fleet/t1/k{i % 50}", i)
    await a.put_many({f"site/x{i}": i for i in range(700)})
    await sync(a, b)
    assert await a.version_vector() == await b.version_vector()
    assert await a.state_digest() == await b.state_digest()
    rows = await b.store._read("SELECT seq, sig FROM ops WHERE origin = 't1' ORDER BY seq")
    assert rows[-1][1] is not None  # the head b holds is signed
    assert sum(1 for _, sig in rows if sig is not None) < len(rows)
    st = await b.status()
    assert st["trust"]["mode"] == "signed" and st["trust"]["forks"] == {}


async def test_a_signed_fleet_refuses_a_node_without_keys(make_node, sf) -> None:
    with pytest.raises(ValueError, match="needs its keys"):
        await make_node("t1", fleet=sf.fleet)
    other = SignedFleet(BASE)
    with pytest.raises(ValueError, match="authority key"):
        await make_node("t1", fleet=sf.fleet, keys=other.keys("t1"))


async def test_unsigned_fleet_is_labelled(make_node, caplog) -> None:
    caplog.set_level(logging.WARNING)
    node = await make_node("u1", fleet=dataclasses.replace(FLEET, fleet_id="unsigned-label"))
    st = await node.status()
    assert st["trust"]["mode"] == "unsigned"
    assert st["metrics"]["trust_mode"]
    assert any("UNSIGNED" in r.getMessage() for r in caplog.records)


async def test_forged_op_for_another_origin_waits_and_never_locks_out(make_node, sf) -> None:
    victim = await open_signed(make_node, sf, "t7")
    other = await open_signed(make_node, sf, "t2")
    await victim.put("fleet/t7/door", "locked")
    await sync(victim, other)
    vv = await other.version_vector()
    head = other.store.head("t7")
    forged = forge("t7", vv["t7"] + 1, head, "fleet/t7/door", "unlocked", sig=b"\x00" * 64)
    res = await other.apply_remote([forged])
    assert res.applied == 0 and res.pending == 1
    assert await other.get("fleet/t7/door") == "locked"
    assert other.store.pending_counts()["unsigned"] == 1
    # The genuine op at that seq takes the forged one's place; nothing is refused.
    await victim.put("fleet/t7/door", "open")
    await sync(victim, other)
    assert await other.get("fleet/t7/door") == "open"
    assert other.store.pending_counts()["unsigned"] == 0
    assert await other.version_vector() == await victim.version_vector()


async def test_forged_copy_of_the_receivers_own_next_op_is_refused(make_node, sf) -> None:
    depot = await open_signed(make_node, sf, "depot")
    await depot.put("fleet/depot/door", "locked")
    vv = await depot.version_vector()
    forged = forge("depot", vv["depot"] + 1, depot.store.head("depot"), "fleet/depot/door",
                   "unlocked", sig=NodeSigner("trust", sf.keys("t2").signing_key)(
                       forge("depot", vv["depot"] + 1, depot.store.head("depot"),
                             "fleet/depot/door", "unlocked")))
    res = await depot.apply_remote([forged])
    assert res.applied == 0
    await depot.put("fleet/depot/door", "checked")  # its own chain goes on, untouched
    assert await depot.get("fleet/depot/door") == "checked"
    assert (await depot.version_vector())["depot"] == vv["depot"] + 1


async def test_forged_authority_grant_is_never_applied(make_node, sf) -> None:
    cloud = await open_signed(make_node, sf, "cloud")
    t7 = await open_signed(make_node, sf, "t7")
    await cloud.grant("trucks/t7/", "t7")
    await sync(cloud, t7)
    await t7.put("trucks/t7/brakes", "ok")
    evil = await open_signed(make_node, sf, "evil")
    await sync(t7, evil)
    # The attacker mints the authority's next op: a grant of trucks/t7/ to itself.
    vv = await evil.version_vector()
    grant = dataclasses.replace(
        (await cloud.store.ops_since({}, limit=100))[-1],
    )
    fake = OpChain("cloud", vv["cloud"], evil.store.head("cloud")).mint(
        grant.hlc + 1, grant.zone, grant.epoch, grant.key, grant.kind, grant.value
    )
    res = await t7.apply_remote([dataclasses.replace(fake, sig=b"\x01" * 64)])
    assert res.applied == 0
    await t7.put("trucks/t7/brakes", "still mine")  # t7 still owns its zone
    assert await t7.get("trucks/t7/brakes") == "still mine"


async def test_write_outside_the_signers_zones_is_rejected_and_recorded(make_node, sf) -> None:
    t1 = await open_signed(make_node, sf, "t1")
    t2 = await open_signed(make_node, sf, "t2")
    await sync(t1, t2)
    signer = sf.signer("t1")
    vv = await t2.version_vector()
    op = forge("t1", vv["t1"] + 1, t2.store.head("t1"), "fleet/t2/brakes", "off",
               zone="fleet/t2/")
    res = await t2.apply_remote([dataclasses.replace(op, sig=signer(op))])
    assert res.rejected == 1 and await t2.get("fleet/t2/brakes") is None
    rejected = await t2.store.rejected()
    assert any(r[0] == "t1" and "fleet/t2/" in r[3] for r in rejected)


async def test_truncated_chain_waits_and_replay_is_a_duplicate(make_node, sf) -> None:
    a = await open_signed(make_node, sf, "t1")
    b = await open_signed(make_node, sf, "t2")
    await a.put_many({f"fleet/t1/k{i}": i for i in range(10)})
    ops = [op for op in await a.ops_since({}) if op.origin == "t1"]
    assert ops[-1].sig is not None
    assert ops[0].kind == "keyreg" and ops[0].sig is not None  # its registration, a commit
    res = await b.apply_remote(ops[:-1])  # the covering head cut off
    assert res.applied == 1 and res.pending == len(ops) - 2
    res = await b.apply_remote(ops)
    assert res.applied == len(ops) - 1
    again = await b.apply_remote(ops)
    assert again.applied == 0 and again.duplicates == len(ops)


async def test_junk_sig_on_a_relayed_op_is_stripped_never_stored(make_node, sf) -> None:
    a = await open_signed(make_node, sf, "t1")
    b = await open_signed(make_node, sf, "t2")
    await a.put_many({f"fleet/t1/k{i}": i for i in range(5)})
    ops = [op for op in await a.ops_since({}) if op.origin == "t1"]
    junk = [dataclasses.replace(op, sig=b"j" * 64) if op.sig is None else op for op in ops]
    res = await b.apply_remote(junk)
    assert res.applied == len(ops)
    rows = await b.store._read("SELECT seq, sig FROM ops WHERE origin = 't1' ORDER BY seq")
    # Only the head verified is kept (it covers the rest); no junk sig is stored.
    assert [seq for seq, sig in rows if sig is not None] == [ops[-1].seq]
    # A relayer that replaces the genuine heads with junk gets nothing applied; the junk
    # is counted, stripped, and the genuine copy (re-sent by anyone) still applies.
    c = await open_signed(make_node, sf, "t3")
    res = await c.apply_remote([dataclasses.replace(op, sig=b"j" * 64) for op in ops])
    assert res.applied == 0
    assert c.store.discarded().get("bad_sig", 0) >= 1
    res = await c.apply_remote(ops)
    assert res.applied == len(ops)


async def test_a_caught_up_follower_delivers_each_op_as_stored_without_its_junk_sig(
    make_node, sf
) -> None:
    """The memo path (follow.py invariant 5a) hands on the op the commit stored: a
    junk sig stripped, as a follower reading the file back sees it."""
    a = await open_signed(make_node, sf, "t1")
    b = await open_signed(make_node, sf, "t2")
    await a.put_many({f"fleet/t1/k{i}": i for i in range(5)})
    ops = [op for op in await a.ops_since({}) if op.origin == "t1"]
    junk = [dataclasses.replace(op, sig=b"j" * 64) if op.sig is None else op for op in ops]
    await b.put("fleet/t2/x", 0)
    async with b.follow(prefixes=["fleet/t1/", "fleet/t2/x"]) as live:
        assert (await anext(live)).key == "fleet/t2/x"  # read back: caught up
        await b.apply_remote(junk)
        got = [await anext(live) for _ in ops]
        assert live.memo_pages >= 1  # from the commit, not read back
    async with b.follow(prefixes=["fleet/t1/"]) as fresh:  # from SQLite
        again = [await anext(fresh) for _ in ops]
        assert fresh.memo_pages == 0
    assert got == again
    assert [it.op.sig is not None for it in got] == [False] * (len(ops) - 1) + [True]
    values = {it.key: it.value for it in got}
    assert [values[f"fleet/t1/k{i}"] for i in range(5)] == list(range(5))


async def test_unsigned_fork_is_discarded_without_lock_out(make_node, sf) -> None:
    a = await open_signed(make_node, sf, "t1")
    b = await open_signed(make_node, sf, "t2")
    await a.put("fleet/t1/x", 1)
    await a.put("fleet/t1/x", 2)
    await sync(a, b)
    held = [op for op in await b.ops_since({}) if op.origin == "t1"]
    other = dataclasses.replace(held[-1], value=encode_value(99), sig=None)
    res = await b.apply_remote([other])  # no ForkError: discarded
    assert res.applied == 0
    assert b.store.discarded().get("unsigned_fork") == 1
    assert b.store.forks == {}
    await a.put("fleet/t1/x", 3)
    await sync(a, b)
    assert await b.get("fleet/t1/x") == 3


async def test_signed_fork_becomes_gossiped_evidence_and_holds_the_origin(make_node, sf) -> None:
    thief = await open_signed(make_node, sf, "t9")
    b = await open_signed(make_node, sf, "t2")
    c = await open_signed(make_node, sf, "t3")
    await thief.put("fleet/t9/a", 1)
    await sync(thief, b)
    # The same key signs a second history from seq 2 (a cloned box).
    vv = await thief.version_vector()
    base = [op for op in await thief.ops_since({}) if op.origin == "t9"]
    signer = sf.signer("t9")
    chain = OpChain("t9", vv["t9"], thief.store.head("t9"), signer=signer)
    await thief.put("fleet/t9/a", 2)
    await sync(thief, b)
    clone = chain.seal(chain.mint(base[-1].hlc + 5, "fleet/t9/", 0, "fleet/t9/a", "lww",
                                  encode_value(666)))
    res = await b.apply_remote([clone])
    assert res.applied == 0
    assert b.store.forks == {"t9": vv["t9"] + 1}
    st = await b.status()
    assert st["trust"]["forks"] == {"t9": vv["t9"] + 1}
    assert st["metrics"]["fork_evidence"]
    # Later ops of t9 are held, not applied.
    await thief.put("fleet/t9/a", 3)
    await sync(thief, b)
    assert await b.get("fleet/t9/a") == 2
    assert b.store.pending_counts()["fork"] >= 1
    # The evidence is gossiped as an op in b's own zone; c verifies it and holds t9 too.
    async def evidence_ops() -> list[Op]:
        return [op for op in await b.ops_since({}) if op.kind == EVIDENCE_KIND]

    async def gossiped() -> bool:
        return bool(await evidence_ops())

    await wait_until(gossiped, timeout_s=5, what="the evidence op")
    ev_ops = await evidence_ops()
    assert ev_ops and ev_ops[0].key == "fleet/t2/evidence/t9"
    await sync(b, c)
    assert c.store.forks == {"t9": vv["t9"] + 1}
    # The authority revokes the cloned key past the fork: the held ops are rejected.
    cloud = await open_signed(make_node, sf, "cloud")
    await cloud.publish(sf.revoke("t9", vv["t9"] + 1))
    await sync(cloud, b)
    await sync(thief, b)
    assert await b.get("fleet/t9/a") == 2
    assert b.store.pending_counts()["fork"] == 0
    assert any(r[0] == "t9" and "revoked" in r[3] for r in await b.store.rejected())


async def test_revoked_key_ops_are_rejected_everywhere(make_node, sf) -> None:
    cloud = await open_signed(make_node, sf, "cloud")
    t5 = await open_signed(make_node, sf, "t5")
    b = await open_signed(make_node, sf, "t2")
    await t5.put("fleet/t5/x", 1)
    vv = await t5.version_vector()
    await cloud.publish(sf.revoke("t5", vv["t5"]))
    await t5.put("fleet/t5/x", 2)  # the stolen truck writes on
    await sync(cloud, b)
    await sync(t5, b)
    assert await b.get("fleet/t5/x") == 1
    assert (await b.version_vector())["t5"] == vv["t5"] + 1  # recorded, not lost
    assert any(r[0] == "t5" and "revoked" in r[3] for r in await b.store.rejected())


async def test_publish_refuses_a_statement_the_authority_did_not_sign(make_node, sf) -> None:
    node = await open_signed(make_node, sf, "t1")
    with pytest.raises(TrustError):
        await node.publish(SignedFleet(BASE).revoke("t1", 0))


async def test_keys_survive_a_restart(make_node, sf, tmp_path) -> None:
    a = await open_signed(make_node, sf, "t1")
    await a.put("fleet/t1/x", 1)
    b = await open_signed(make_node, sf, "t2")
    await sync(a, b)
    await b.close()
    b2 = await make_node("t2", fleet=sf.fleet, keys=sf.keys("t2"), path=tmp_path / "t2.db")
    assert b2.store.keys is not None and b2.store.keys.knows("t1")
    await a.put("fleet/t1/x", 2)
    await sync(a, b2)
    assert await b2.get("fleet/t1/x") == 2


async def test_rotation_registers_a_new_key_from_a_seq(make_node, sf, tmp_path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    a = await open_signed(make_node, sf, "t1")
    b = await open_signed(make_node, sf, "t2")
    await a.put("fleet/t1/x", 1)
    old = sf.keys("t1")
    n = (await a.version_vector())["t1"]
    await a.close()
    new_key = Ed25519PrivateKey.generate()
    rotated = dataclasses.replace(
        old, signing_key=new_key, registration=sf.register("t1", new_key, from_seq=n + 1)
    )
    a2 = await make_node("t1", fleet=sf.fleet, keys=rotated, path=tmp_path / "t1.db")
    await a2.put("fleet/t1/x", 2)
    await sync(a2, b)
    assert await b.get("fleet/t1/x") == 2
    # The old key can no longer vouch for t1's ops from the rotation on.
    vv = await b.version_vector()
    op = forge("t1", vv["t1"] + 1, b.store.head("t1"), "fleet/t1/x", "old key")
    res = await b.apply_remote([dataclasses.replace(op, sig=NodeSigner("trust", old.signing_key)(op))])
    assert res.applied == 0 and await b.get("fleet/t1/x") == 2


async def test_the_authority_keeps_a_branch_and_the_hold_lifts(make_node, sf) -> None:
    from syncfw.log import op_hash
    from syncfw.trust import ForkResolution, seal_statement

    t9 = await open_signed(make_node, sf, "t9")
    b = await open_signed(make_node, sf, "t2")
    await t9.put("fleet/t9/a", 1)
    await t9.put("fleet/t9/a", 2)
    await sync(t9, b)
    vv = await t9.version_vector()
    seq = vv["t9"]
    held = [op for op in await b.ops_since({}) if op.origin == "t9"][-1]
    chain = OpChain("t9", seq - 1, held.prev, signer=sf.signer("t9"))
    twin = chain.seal(chain.mint(held.hlc + 1, "fleet/t9/", 0, "fleet/t9/a", "lww",
                                 encode_value("twin")))
    await b.apply_remote([twin])
    assert b.store.forks == {"t9": seq}
    await t9.put("fleet/t9/a", 3)
    await sync(t9, b)
    assert await b.get("fleet/t9/a") == 2  # held
    cloud = await open_signed(make_node, sf, "cloud")
    ruling = ForkResolution("trust", "t9", op_hash(held), seq)
    await cloud.publish(seal_statement(sf.authority_key, ruling))
    await sync(cloud, b)
    await sync(t9, b)
    assert await b.get("fleet/t9/a") == 3  # the kept branch goes on
    assert b.store.pending_counts()["fork"] == 0
    res = await b.apply_remote([twin])  # the dropped branch: discarded, never re-flagged
    assert res.applied == 0
    assert (await b.version_vector())["t9"] == seq + 1


async def test_many_ops_waiting_for_a_head_make_a_loud_warning(make_node, sf, caplog) -> None:
    caplog.set_level(logging.WARNING)
    from syncfw.store.config import StoreConfig

    a = await open_signed(make_node, sf, "t1")
    b = await make_node("t2", fleet=sf.fleet, keys=sf.keys("t2"),
                        config=StoreConfig(pending_warn_ops=10))
    await a.put_many({f"fleet/t1/k{i}": i for i in range(30)})
    ops = [op for op in await a.ops_since({}) if op.origin == "t1"]
    await b.apply_remote(ops[:-1])  # 29 ops wait for the head
    assert b.store.pending_counts()["unsigned"] >= 10
    assert any("no chain head signed" in r.getMessage() for r in caplog.records)
