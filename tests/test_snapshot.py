"""State snapshots below a compaction point: the format, the session, and real nodes.

A replica that compacted an origin can no longer send a peer that lacks those
ops; it sends a snapshot (its state, the vector and chain heads it stands for),
then the ops after it. The replica contract's half is ``check_replica``'s
``snapshot_below_compaction``; this file holds the format's checks, the
exchange on both replicas (in-process and over real gRPC), and the refusals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pycrdt
import pytest
from conftest import NodeFactory, restore_older_backup

import syncfw
from syncfw.crdt import COUNTER
from syncfw.errors import ChainFencedError, DecodeError, SnapshotTooLargeError
from syncfw.exchange import run_exchange
from syncfw.exchange.pair import SessionPair
from syncfw.mesh import MeshConfig
from syncfw.metrics import NodeMetrics
from syncfw.node import Node
from syncfw.sync import SessionConfig, Snapshot, Status, decode_snapshot, encode_snapshot
from syncfw.sync.session import SNAPSHOT, Session
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.ops import OpWriter
from syncfw.testing.trust import SignedFleet
from syncfw.transport.rpc import ChannelPool, TransportConfig
from syncfw.transport.wire import decode_frame, encode_frame
from syncfw.zones import Fleet, Grant

FLEET = Fleet(fleet_id="snap", authority="cloud", grants=(Grant.of("shared/", "*"),))


def _compacted_pair(n: int = 40) -> tuple[MemoryReplica, MemoryReplica]:
    """``src`` holds ``n`` writes of two origins and compacted all of them; ``fresh`` is empty."""
    src, fresh = MemoryReplica("src", FLEET), MemoryReplica("fresh", FLEET)
    w = OpWriter("t1")
    asyncio.run(src.apply_remote([w.write(f"k{i}", i) for i in range(n)]))
    for i in range(n // 2):
        src.put(f"fleet/src/k{i}", i)
    asyncio.run(src.acknowledge("gone", src.vv()))  # a peer that left: everything is stable
    assert asyncio.run(src.compact()) == n + n // 2
    return src, fresh


# -- the format ---------------------------------------------------------------------------


def _snap() -> Snapshot:
    return Snapshot(
        {"a": 3, "b": 1},
        {"a": b"\x01" * 32, "b": b"\x02" * 32},
        [
            ("lww", "fleet/a/x", 7, "a", b"\x01"),
            ("counter", "fleet/b/c", 2, "", COUNTER.encode(COUNTER.empty())),
        ],
        [("shared/", 2, ("a", "b"))],
        (b"stmt",),
    )


def test_a_snapshot_round_trips_and_encodes_the_same_bytes_twice() -> None:
    snap = _snap()
    data = encode_snapshot(snap)
    assert data == encode_snapshot(dataclasses.replace(snap, states=list(reversed(snap.states))))
    back = decode_snapshot(data)
    assert dict(back.vv) == snap.vv and dict(back.heads) == snap.heads
    assert list(back.states) == sorted(snap.states)
    assert list(back.grants) == [("shared/", 2, ("a", "b"))]
    assert back.statements == (b"stmt",)
    assert back.below({"a": 3}) == {"b": 1} and back.below({"a": 9, "b": 1}) == {}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:-3], "digest"),
        (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "digest"),
        (lambda d: b"XXXX" + d[4:], "not a syncfw snapshot"),
        (lambda d: d[:10], "not a syncfw snapshot"),
    ],
)
def test_a_damaged_snapshot_is_refused_with_its_reason(damage: object, message: str) -> None:
    data = encode_snapshot(_snap())
    with pytest.raises(DecodeError, match=message):
        decode_snapshot(damage(data))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("snap", "message"),
    [
        (Snapshot({"a": 1}, {}), "no chain head"),
        (Snapshot({"a": 1}, {"a": b"short"}), "32-byte"),
        (Snapshot({"a": 1}, {"a": b"\x00" * 32, "z": b"\x00" * 32}), "not in its vector"),
        (Snapshot({"a": 0}, {"a": b"\x00" * 32}), "out of range"),
        (Snapshot({"a": 1}, {"a": b"\x00" * 32}, [("lww", "k", 1, "z", b"")]), "not in its vector"),
        (Snapshot({"a": 1}, {"a": b"\x00" * 32}, [("nope", "k", 1, "a", b"")]), "unknown kind"),
        (Snapshot({"a": 1}, {"a": b"\x00" * 32}, [("counter", "k", 1, "", b"\xc1")]), "counter"),
        (Snapshot({"a": 1}, {"a": b"\x00" * 32}, [("lww", "k" * 2000, 1, "a", b"")]), "too long"),
    ],
)
def test_a_snapshot_is_checked_against_its_vector(snap: Snapshot, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_snapshot(encode_snapshot(snap))


def test_a_snapshot_over_the_cap_is_refused_before_it_is_inflated() -> None:
    rows = [("lww", f"fleet/a/k{i}", i, "a", b"\x00" * 1000) for i in range(2000)]
    data = encode_snapshot(Snapshot({"a": 1}, {"a": b"\x00" * 32}, rows))
    assert len(data) < 100_000  # zeros compress: a bomb, if uncapped
    with pytest.raises(DecodeError, match="exceeds the cap of 1000000"):
        decode_snapshot(data, max_bytes=1_000_000)


# -- the exchange, in-process -----------------------------------------------------------


@pytest.mark.parametrize("fresh_first", [True, False])
def test_a_fresh_replica_below_compaction_converges_through_a_snapshot(
    fresh_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    src, fresh = _compacted_pair()
    src.put("fleet/src/after", "after")  # after the compaction point: in the snapshot too
    a, b = (fresh, src) if fresh_first else (src, fresh)
    with caplog.at_level(logging.WARNING, "syncfw.sync"):
        pair = SessionPair(a, b, encode=encode_frame, decode=decode_frame)
        res = pair.run()
    assert res.a is not None and res.a[0] is Status.OK, res.a
    assert res.b is not None and res.b[0] is Status.OK, res.b
    assert fresh.vv() == src.vv() == {"t1": 40, "src": 21}
    assert fresh.scan("") == src.scan("") and fresh.get("fleet/t1/k39") == 39
    assert fresh.get("fleet/src/after") == "after"
    sender = pair.sessions["b" if fresh_first else "a"]
    # the snapshot stands for all the sender holds: no op of those origins follows it
    assert sender.snapshot_bytes_sent > 0 and sender.ops_sent == 0
    assert "sending a state snapshot" in caplog.text and "installed a state snapshot" in caplog.text
    # the fresh replica goes on writing from its own chain, and the next exchange is in sync
    fresh.put("fleet/fresh/x", 1)
    again = SessionPair(fresh, src).run()
    assert again.a is not None and again.a[0] is Status.OK
    assert pair.sessions["a"].snapshot_bytes_received + pair.sessions["b"].snapshot_bytes_received
    assert src.get("fleet/fresh/x") == 1 and fresh.vv() == src.vv()


def test_a_snapshot_larger_than_the_receivers_cap_ends_the_exchange_and_changes_nothing() -> None:
    src, fresh = _compacted_pair(400)
    res = SessionPair(fresh, src, config_a=SessionConfig(max_snapshot_bytes=512)).run()
    assert res.a is not None and res.a[0] is Status.RESOURCE_EXHAUSTED, res.a
    assert "max_snapshot_bytes" in res.a[1]
    assert fresh.vv() == {} and fresh.scan("") == {}


def test_a_sender_builds_no_snapshot_larger_than_its_cap_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    src, fresh = _compacted_pair(400)
    with pytest.raises(SnapshotTooLargeError, match="max_snapshot_bytes"):
        asyncio.run(src.snapshot(max_bytes=512))
    pair = SessionPair(fresh, src, config_b=SessionConfig(max_snapshot_bytes=512))
    metrics = NodeMetrics("src")
    pair.performers["b"]._metrics = metrics  # what a node's runner hands its performer
    with caplog.at_level(logging.WARNING, logger="syncfw"):
        res = pair.run()
    assert res.a is not None and res.a[0] is Status.OUT_OF_RANGE, res.a
    assert metrics.snapshot()["snapshots"] == {"too_large": 1}
    assert "larger than the largest snapshot" in res.a[1], res.a
    assert any("needs a snapshot, but the state" in r.getMessage() for r in caplog.records)
    assert fresh.vv() == {} and fresh.scan("") == {}
    assert SessionPair(fresh, src).run().a[0] is Status.OK  # type: ignore[index]
    assert fresh.vv() == src.vv()


def test_a_malformed_snapshot_is_refused_and_changes_nothing() -> None:
    src, fresh = _compacted_pair()

    class Liar(MemoryReplica):
        async def snapshot(self, *, max_bytes: int = 1 << 30) -> Snapshot:
            snap = await super().snapshot(max_bytes=max_bytes)
            return dataclasses.replace(snap, states=[("lww", "fleet/t1/k0", 1, "nobody", b"")])

    liar = Liar("src", FLEET)
    liar.chains, liar.hashes, liar.base = src.chains, src.hashes, src.base
    res = SessionPair(fresh, liar).run()
    assert res.a is not None and res.a[0] is Status.INVALID_ARGUMENT, res.a
    assert "not in its vector" in res.a[1]
    assert fresh.vv() == {}


def test_a_peer_that_takes_no_snapshot_is_told_out_of_range_never_ok() -> None:
    src, fresh = _compacted_pair()

    class Old(Session):
        def _features(self) -> tuple[str, ...]:
            return tuple(f for f in super()._features() if f != SNAPSHOT)

    pair = SessionPair(fresh, src)
    old = Old("fresh", FLEET.fleet_id, fleet_digest=fresh.fleet_digest, initiator=True)
    pair.sessions["a"] = pair.performers["a"].session = old
    res = pair.run()
    assert res.b is not None and res.b[0] is Status.OUT_OF_RANGE, res.b
    assert "t1 up to 40" in res.b[1]
    assert res.a is not None and res.a[0] is not Status.OK


def test_a_signed_fleet_takes_no_snapshot_from_an_unauthenticated_peer() -> None:
    sf = SignedFleet(FLEET)
    src, fresh = MemoryReplica("src", sf.fleet), MemoryReplica("fresh", sf.fleet)
    for r in (src, fresh):
        r.signer = sf.signer(r.node_id)
        r.publish(sf.keys(r.node_id).registration)
    for i in range(5):
        src.put(f"fleet/src/k{i}", i)
    asyncio.run(src.acknowledge("gone", src.vv()))
    assert asyncio.run(src.compact()) > 0
    res = SessionPair(fresh, src).run()  # a pair authenticates nobody
    assert res.a is not None and res.a[0] is Status.PERMISSION_DENIED, res.a
    assert fresh.get("fleet/src/k4") is None


# -- real nodes, real gRPC ---------------------------------------------------------------


async def test_a_node_joining_after_compaction_converges_over_grpc(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    depot, truck = await make_node("depot"), await make_node("t1")
    for i in range(50):
        await truck.put(f"fleet/t1/k{i}", i)
    await depot.counter("fleet/depot/c").add(5)
    note = pycrdt.Doc(client_id=7)
    text = note.get("t", type=pycrdt.Text)
    text.insert(0, "bearing 3 hot")
    await depot.apply_update("fleet/depot/notes", note.get_update())
    mesh = await depot.serve("127.0.0.1:0", config=MeshConfig.test())
    address = mesh.address
    await _sync(truck, address)
    await depot.acknowledge("t1", await truck.version_vector())
    await truck.acknowledge("depot", await depot.version_vector())
    assert await depot.compact() > 0
    late = await make_node("t9")
    live = await late.doc("fleet/depot/notes", readonly=True)  # open before: refreshed by it
    await _sync(late, address)
    assert await late.version_vector() == await depot.version_vector()
    assert await late.get("fleet/t1/k49") == 49
    assert await late.counter("fleet/depot/c").value() == 5
    assert str(live.get("t", type=pycrdt.Text)) == "bearing 3 hot"
    got = pycrdt.Doc()
    got.apply_update(await late.doc_state("fleet/depot/notes"))
    assert str(got.get("t", type=pycrdt.Text)) == "bearing 3 hot"
    assert await late.state_digest() == await depot.state_digest()
    status = await late.status()
    assert status["metrics"]["snapshots"] == {"installed": 1}
    await late.put("fleet/t9/x", 1)  # its own chain goes on, and reaches the depot
    await _sync(late, address)
    assert await depot.get("fleet/t9/x") == 1


async def _sync(node: Node, address: str) -> None:
    pool = ChannelPool(TransportConfig.test(connect_timeout_s=2.0), metrics=node.metrics)
    try:
        out = await run_exchange(
            node, await pool.open(address), metrics=node.metrics, initiator=True, timeout_s=10.0
        )
    finally:
        await pool.aclose()
    assert out.status is Status.OK, out


async def test_a_restored_node_whose_peer_compacted_its_ops_learns_its_head_from_a_snapshot(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    path = tmp_path / "t7.db"
    depot = await make_node("depot")
    mesh = await depot.serve("127.0.0.1:0", config=MeshConfig.test())

    async def hand_to_depot(t7: Node) -> None:
        await _sync(t7, mesh.address)
        await depot.acknowledge("t7", await t7.version_vector())
        assert await depot.compact() == 60  # t7's own ops are now only in the depot's state

    # the operator's backup is taken at seq 10 and restored after seq 60
    t7 = await restore_older_backup(
        make_node, path, "t7", backed_up=10, written=60, after_writes=hand_to_depot
    )
    with pytest.raises(ChainFencedError):
        await t7.put("fleet/t7/k", "after the restore")
    await _sync(t7, mesh.address)  # the depot cannot relay the ops: it sends a snapshot
    assert (await t7.version_vector())["t7"] == 60
    assert await t7.get("fleet/t7/k") == 59
    op = await t7.put("fleet/t7/k", "after the restore")  # the fence lifted at seq 60
    assert op.seq == 61
    await _sync(t7, mesh.address)
    assert await depot.get("fleet/t7/k") == "after the restore"


async def test_a_caught_up_follower_of_a_node_installing_a_snapshot_is_told_of_the_hole(
    make_node: NodeFactory,
) -> None:
    # A snapshot commits no op rows a follower could take from memory: it must read
    # the heads again and say which ops it can never deliver, not idle on.
    depot, truck = await make_node("depot"), await make_node("t1")
    for i in range(10):
        await truck.put(f"fleet/t1/k{i}", i)
    mesh = await depot.serve("127.0.0.1:0", config=MeshConfig.test())
    await _sync(truck, mesh.address)
    await depot.acknowledge("t1", await truck.version_vector())
    assert await depot.compact() > 0
    late = await make_node("t9")
    await late.put("fleet/t9/own", 1)
    async with late.follow() as feed:
        assert (await asyncio.wait_for(anext(feed), 5)).key == "fleet/t9/own"
        waiting = asyncio.ensure_future(anext(feed))
        await asyncio.sleep(0.05)  # caught up, idle, its memory whole
        await _sync(late, mesh.address)
        assert (await late.status())["metrics"]["snapshots"] == {"installed": 1}
        with pytest.raises(syncfw.FeedPositionError) as err:
            await asyncio.wait_for(waiting, 5)
        assert err.value.missing["t1"] == (1, 10)
