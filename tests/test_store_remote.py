"""Merging remote ops: idempotence, gaps, chains, forks, clock skew, zones, batches."""

from __future__ import annotations

import dataclasses
import random
import uuid
from pathlib import Path

import pytest
from conftest import START_MS, FakeClock, NodeFactory, exchange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import syncfw
from syncfw.log import GENESIS, Op, encode_value, op_hash


def chain(
    origin: str,
    n: int,
    *,
    key: str | None = None,
    zone: str | None = None,
    epoch: int = 0,
    start_ms: int = START_MS,
    first_seq: int = 1,
    prev: bytes = GENESIS,
) -> list[Op]:
    """``n`` well-formed lww ops of ``origin`` (in its own fleet zone by default)."""
    zone = zone if zone is not None else f"fleet/{origin}/"
    ops = []
    for i in range(n):
        seq = first_seq + i
        op = Op(origin, seq, (start_ms << 16) + seq, zone, epoch,
                key or f"{zone}k{seq % 7}", "lww", encode_value(seq), prev)
        prev = op_hash(op)
        ops.append(op)
    return ops


async def test_duplicates_are_no_ops(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    ops = chain("t7", 5)
    r1 = await node.apply_remote(ops)
    r2 = await node.apply_remote(ops + ops)
    assert (r1.applied, r1.duplicates) == (5, 0)
    assert (r2.applied, r2.duplicates) == (0, 10)
    assert await node.version_vector() == {"t7": 5}


async def test_gap_is_held_pending_then_applied_in_order(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    ops = chain("t7", 6, key="fleet/t7/pos")
    r = await node.apply_remote(ops[3:])
    assert (r.applied, r.pending) == (0, 3)
    assert await node.version_vector() == {}
    assert await node.get("fleet/t7/pos") is None
    assert set(node.store.pending()["t7"]) == {4, 5, 6}
    r = await node.apply_remote(ops[:2])
    assert (r.applied, r.pending) == (2, 3)
    r = await node.apply_remote([ops[2]])
    assert (r.applied, r.pending) == (4, 0)
    assert await node.version_vector() == {"t7": 6}
    assert await node.get("fleet/t7/pos") == 6


async def test_pending_survives_restart(make_node: NodeFactory, tmp_path: object) -> None:
    node = await make_node("depot")
    ops = chain("t7", 4)
    await node.apply_remote(ops[2:])
    path = node.store.path
    await node.close()
    node = await make_node("depot", path=path)  # type: ignore[arg-type]
    assert set(node.store.pending()["t7"]) == {3, 4}
    r = await node.apply_remote(ops[:2])
    assert r.applied == 4 and await node.version_vector() == {"t7": 4}


async def test_forged_prev_refuses_the_whole_batch(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    good = chain("t9", 3)
    ops = chain("t7", 4)
    forged = dataclasses.replace(ops[2], prev=b"\x01" * 32)
    with pytest.raises(syncfw.ChainError):
        await node.apply_remote(good + ops[:2] + [forged, ops[3]])
    assert await node.version_vector() == {}
    assert node.store.pending() == {}
    # the node keeps working: the genuine ops still apply
    r = await node.apply_remote(good + ops)
    assert r.applied == 7


async def test_altered_value_breaks_the_chain(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    ops = chain("t7", 3)
    await node.apply_remote(ops[:1])
    tampered = dataclasses.replace(ops[1], value=encode_value("evil"))
    ok = await node.apply_remote([tampered])  # seq 2 itself is fine; seq 3 names the real hash
    assert ok.applied == 1
    with pytest.raises(syncfw.ChainError):
        await node.apply_remote([ops[2]])


async def test_two_different_ops_at_one_id_is_a_fork(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    ops = chain("t7", 3)
    await node.apply_remote(ops)
    other = dataclasses.replace(ops[1], value=encode_value("fork"))
    with pytest.raises(syncfw.ForkError):
        await node.apply_remote([other])
    # within one batch too
    node2 = await make_node("t9")
    with pytest.raises(syncfw.ForkError):
        await node2.apply_remote([ops[0], ops[0], dataclasses.replace(ops[0], hlc=ops[0].hlc + 1)])
    # A pending op was never verified: another op at its id takes its place
    # (no ForkError), and the chain walk judges it when the gap fills.
    await node2.apply_remote(ops[2:])
    await node2.apply_remote([dataclasses.replace(ops[2], value=b"\xc0", prev=b"\x01" * 32)])
    assert node2.store.pending() == {"t7": {3: "gap: waiting for earlier ops of this origin"}}
    assert await node2.version_vector() == {}
    await node2.apply_remote(ops[:2])  # the replacement does not chain: dropped, loudly
    assert (await node2.version_vector())["t7"] == 2
    assert node2.store.discarded() == {"broken_chain": 1}
    await node2.apply_remote(ops[2:])  # resent, as the next exchange does
    assert (await node2.version_vector())["t7"] == 3


async def test_clock_skew_quarantines_until_local_time_catches_up(
    make_node: NodeFactory, clock: FakeClock
) -> None:
    node = await make_node("depot")
    ahead = chain("t7", 2, start_ms=clock.ms + 10_000)  # 10 s in the future, max_offset 500 ms
    fine = chain("t9", 2)
    r = await node.apply_remote(ahead + fine)
    assert (r.applied, r.pending) == (2, 2)
    assert all("clock skew" in why for why in node.store.pending()["t7"].values())
    assert await node.version_vector() == {"t9": 2}
    before = node.store.clock.last
    assert before >> 16 < clock.ms + 10_000  # the skewed stamp did not drag our clock ahead
    clock.advance(10_000)
    r = await node.store.retry_pending()
    assert r.applied == 2 and await node.version_vector() == {"t9": 2, "t7": 2}


async def test_clock_observes_remote_time(make_node: NodeFactory, clock: FakeClock) -> None:
    node = await make_node("depot")
    remote = chain("t7", 1, start_ms=clock.ms + 300)  # ahead, but within max_offset
    await node.apply_remote(remote)
    op = await node.put("fleet/depot/x", 1)
    assert op.hlc > remote[0].hlc  # causality: our next write orders after what we saw


async def test_foreign_zone_ops_are_rejected_recorded_and_relayed(make_node: NodeFactory) -> None:
    a, b, c = await make_node("t9"), await make_node("depot"), await make_node("t12")
    # t7 writes into t9's zone (epoch 1): every replica rejects it, identically
    bad = chain("t7", 1, key="trucks/t9/position", zone="trucks/t9/", epoch=1)
    good = chain("t7", 2, key="trucks/t7/position", zone="trucks/t7/", epoch=1,
                 first_seq=2, prev=op_hash(bad[0]))
    r = await a.apply_remote(bad + good)
    assert (r.applied, r.rejected) == (2, 1)
    assert await a.get("trucks/t9/position") is None
    assert await a.get("trucks/t7/position") == 3
    await exchange(a, b)
    await exchange(b, c)
    for n in (a, b, c):
        rej = await n.store.rejected()
        assert rej == [("t7", 1, "trucks/t9/position",
                        "origin 't7' did not own zone 'trucks/t9/' at epoch 1")]
        assert await n.version_vector() == {"t7": 3}
    assert await a.state_digest() == await b.state_digest() == await c.state_digest()


async def test_key_outside_named_zone_and_unknown_kind_are_rejected(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    op1 = Op("t7", 1, START_MS << 16, "trucks/t7/", 1, "trucks/t9/x", "lww", encode_value(1))
    op2 = Op("t7", 2, (START_MS << 16) + 1, "trucks/t7/", 1, "trucks/t7/x", "teleport",
             encode_value(1), op_hash(op1))
    op3 = Op("t7", 3, (START_MS << 16) + 2, "trucks/t7/", 1, "trucks/t7/y", "counter",
             b"\xc1garbage", op_hash(op2))
    op4 = Op("t7", 4, (START_MS << 16) + 3, "trucks/t7/", 1, "trucks/t7/z", "lww",
             b"\xc1", op_hash(op3))
    r = await node.apply_remote([op1, op2, op3, op4])
    assert r.rejected == 4
    reasons = [why for *_, why in await node.store.rejected()]
    assert "outside the zone" in reasons[0]
    assert "unknown op kind" in reasons[1]
    assert "malformed counter payload" in reasons[2]
    assert "malformed lww payload" in reasons[3]


async def test_op_at_unknown_epoch_waits_for_its_grant(make_node: NodeFactory) -> None:
    cloud, t12, depot = await make_node("cloud"), await make_node("t12"), await make_node("depot")
    await cloud.grant("trucks/t7/", "t12")           # epoch 2
    await exchange(cloud, t12)
    await t12.put("trucks/t7/position", "t12 here")  # epoch 2
    # depot hears from t12 before it hears the grant: the op waits
    r = await depot.apply_remote(await t12.ops_since({"cloud": 1}))
    assert r.pending == 1 and await depot.get("trucks/t7/position") is None
    assert "epoch 2 not known" in next(iter(depot.store.pending()["t12"].values()))
    r = await depot.apply_remote(await cloud.ops_since({}))
    assert r.applied == 2 and r.pending == 0
    assert await depot.get("trucks/t7/position") == "t12 here"


async def test_forged_grant_is_rejected(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    grant = Op("t7", 1, START_MS << 16, "sys/", 0, "sys/zones/trucks/t9/", "grant",
               encode_value({"prefix": "trucks/t9/", "owners": ["t7"], "epoch": 2}))
    r = await node.apply_remote([grant])
    assert r.rejected == 1
    # a node may also not disguise a grant as a write in its own zone
    grant2 = Op("t9", 1, START_MS << 16, "fleet/t9/", 0, "fleet/t9/g", "grant",
                encode_value({"prefix": "trucks/t7/", "owners": ["t9"], "epoch": 2}))
    r = await node.apply_remote([grant2])
    assert r.rejected == 1
    assert node.zones.latest("trucks/t7/").epoch == 1  # type: ignore[union-attr]
    assert node.zones.latest("trucks/t9/").epoch == 1  # type: ignore[union-attr]


async def test_ops_since_respects_limit_and_resumes(make_node: NodeFactory) -> None:
    src, dst = await make_node("t7"), await make_node("depot")
    for i in range(25):
        await src.put(f"trucks/t7/k{i}", i)
    got = await src.ops_since({}, limit=10)
    assert [op.seq for op in got] == list(range(1, 11))
    await dst.apply_remote(got)
    got = await src.ops_since(await dst.version_vector(), limit=10)
    assert [op.seq for op in got] == list(range(11, 21))
    assert await src.ops_since({"t7": 25}) == []
    small = await src.ops_since({}, max_bytes=100)
    assert 0 < len(small) < 25


async def test_compaction_keeps_state_and_skips_compacted_exports(make_node: NodeFactory) -> None:
    a, b = await make_node("t7"), await make_node("depot")
    for i in range(10):
        await a.put(f"trucks/t7/k{i}", i)
    assert await a.compact() == 0  # no known replica: nothing is causally stable
    await exchange(a, b)
    await a.acknowledge("depot", await b.version_vector())
    assert await a.compact() == 10
    st = await a.store.stats()
    assert st.ops == 0 and st.keys == 10
    assert await a.get("trucks/t7/k9") == 9
    op = await a.put("trucks/t7/k0", "new")  # the chain continues from the kept head
    await exchange(a, b)
    assert await b.get("trucks/t7/k0") == "new" and op.seq == 11
    # compacted ops cannot be exported: a peer that lacks them gets nothing of
    # that origin (later ops alone would only wait behind the gap)
    assert await a.ops_since({}) == []
    assert await a.ops_since({"t7": 10}) == [op]


async def test_telemetry_expiry_drops_old_state(make_node: NodeFactory, clock: FakeClock) -> None:
    node = await make_node("t7")
    await node.put("telemetry/t7/temp", 81.5)
    await node.put("trucks/t7/position", 1)
    clock.advance(60_000)
    await node.put("telemetry/t7/rpm", 1200)
    assert await node.store.expire(30_000) == 1
    assert await node.get("telemetry/t7/temp") is None
    assert await node.get("telemetry/t7/rpm") == 1200
    assert await node.get("trucks/t7/position") == 1


async def test_malformed_op_tuples_are_decode_errors() -> None:
    good = chain("t7", 1)[0].to_tuple()
    bad = [
        good[:9],
        ("", *good[1:]),
        (good[0], 0, *good[2:]),
        (good[0], good[1], -1, *good[3:]),
        (*good[:7], "not bytes", *good[8:]),
        (*good[:8], b"short", None),
        "not a tuple",
    ]
    for t in bad:
        with pytest.raises(syncfw.DecodeError):
            Op.from_tuple(t)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), dup=st.booleans())
async def test_any_delivery_order_gives_identical_state(
    make_node: NodeFactory, tmp_path: Path, seed: int, dup: bool
) -> None:
    """Ops of three writers, delivered in random batches, any order, with duplicates."""
    rng = random.Random(seed)
    # A fresh folder per example: hypothesis may replay a seed while the nodes
    # of its first run are still open (and each file admits one store).
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    writers = [
        await make_node(f"w{seed}-{i}", path=folder / f"w{i}.db") for i in range(3)
    ]
    for _ in range(30):
        w = rng.choice(writers)
        choice = rng.random()
        if choice < 0.4:
            await w.put(f"site/k{rng.randint(0, 4)}", rng.randint(0, 100))
        elif choice < 0.6:
            await w.counter("site/c").add(rng.randint(-5, 5))
        elif choice < 0.8:
            s = w.set("site/s")
            await (s.add if rng.random() < 0.6 else s.remove)(rng.randint(0, 3))
        else:
            await w.register("site/r").set(rng.randint(0, 9))
        if rng.random() < 0.2:
            a, b = rng.sample(writers, 2)
            await exchange(a, b)
    all_ops = [op for w in writers for op in await w.ops_since({})]
    digests = set()
    for trial in range(2):
        target = await make_node(f"r{seed}-{trial}", path=folder / f"r{trial}.db")
        ops = list(all_ops) + (rng.sample(all_ops, 10) if dup else [])
        rng.shuffle(ops)
        while ops:
            n = rng.randint(1, 12)
            await target.apply_remote(ops[:n])
            ops = ops[n:]
        assert target.store.pending() == {}
        digests.add(await target.state_digest())
    for a in writers:
        for b in writers:
            if a is not b:
                await exchange(a, b)
    digests |= {await w.state_digest() for w in writers}
    assert len(digests) == 1


async def test_new_zones_may_not_nest_but_transfers_may_happen(make_node: NodeFactory) -> None:
    cloud = await make_node("cloud")
    for prefix in ("site/gate/", "trucks/", "fleet/", "fleet/t7/x/", "sys", "s"):
        with pytest.raises(ValueError, match=r"nest|sys/"):
            await cloud.grant(prefix, "t7")
    assert (await cloud.grant("yard/", "t7")).seq == 1
    assert (await cloud.grant("site/", "t7")).seq == 2  # a transfer of a bootstrap zone
    assert cloud.zones.latest("site/").epoch == 2  # type: ignore[union-attr]


async def test_naming_a_less_specific_zone_is_rejected(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    # t9 names the shared zone site/ for a key in t7's own per-node zone
    sneaky = Op("t9", 1, START_MS << 16, "fleet/", 1, "fleet/t7/model", "lww", encode_value(1))
    r = await node.apply_remote([sneaky])
    assert r.rejected == 1
    sneaky2 = Op("t9", 2, (START_MS << 16) + 1, "site/", 1, "site/x", "lww", encode_value(1),
                 op_hash(sneaky))
    assert (await node.apply_remote([sneaky2])).applied == 1


async def test_ops_since_sends_higher_priority_zones_first(make_node: NodeFactory) -> None:
    fleet = syncfw.Fleet(
        fleet_id="test-fleet",
        authority="cloud",
        grants=(syncfw.Grant.of("site/", "*"),),
        priorities=(("site/alerts", 50), ("telemetry/", -10)),
    )
    noisy, alarmed, quiet = [await make_node(n, fleet=fleet) for n in ("a1", "b2", "c3")]
    relay = await make_node("relay", fleet=fleet)
    for i in range(30):
        await noisy.put(f"telemetry/a1/t{i}", i)
    await alarmed.put("site/mode", "run")
    await alarmed.set("site/alerts").add("fire")
    await quiet.put("site/x", 1)
    for src in (noisy, alarmed, quiet):
        await exchange(src, relay)
    first = await relay.ops_since({}, limit=3)
    assert [op.origin for op in first] == ["b2", "b2", "c3"]  # the alert's origin, then priority 0
    rest = await relay.ops_since({"b2": 2, "c3": 1}, limit=100)
    assert {op.origin for op in rest} == {"a1"}  # telemetry last
