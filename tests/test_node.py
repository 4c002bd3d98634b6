"""The Node API on real SQLite files: writes, reads, CRDT handles, docs, zones, changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pycrdt
import pytest
from conftest import FLEET, FakeClock, NodeFactory, exchange

import syncfw
from syncfw import Node
from syncfw.testing import wait_until


async def test_put_get_delete_scan(make_node: NodeFactory) -> None:
    node = await make_node("t7")
    op = await node.put("trucks/t7/position", {"lat": -22.3, "lon": 118.6})
    assert op.origin == "t7" and op.seq == 1 and op.zone == "trucks/t7/" and op.epoch == 1
    assert await node.get("trucks/t7/position") == {"lat": -22.3, "lon": 118.6}
    await node.put("trucks/t7/speed", 31.5)
    assert await node.scan("trucks/t7/") == {
        "trucks/t7/position": {"lat": -22.3, "lon": 118.6},
        "trucks/t7/speed": 31.5,
    }
    await node.delete("trucks/t7/speed")
    assert await node.get("trucks/t7/speed", "gone") == "gone"
    assert list(await node.scan("trucks/t7/")) == ["trucks/t7/position"]
    assert await node.version_vector() == {"t7": 3}


async def test_async_with_open_and_reopen_keeps_everything(tmp_path: Path) -> None:
    async with Node.open(tmp_path / "n.db", node_id="t7", fleet=FLEET) as node:
        await node.put("trucks/t7/a", [1, 2, 3])
        await node.counter("site/c").add(5)
    async with Node.open(tmp_path / "n.db", node_id="t7", fleet=FLEET) as node:
        assert await node.get("trucks/t7/a") == [1, 2, 3]
        assert await node.counter("site/c").value() == 5
        op = await node.put("trucks/t7/a", 4)
        assert op.seq == 3  # the sequence continues after a restart


@pytest.mark.parametrize("value", [object(), {1, 2}, 2**70, {"nested": [1, object()]}, lambda: 1])
async def test_unserializable_value_is_refused_and_writes_nothing(
    make_node: NodeFactory, value: object
) -> None:
    node = await make_node("t7")
    with pytest.raises(syncfw.ValueEncodingError):
        await node.put("trucks/t7/x", value)
    assert await node.version_vector() == {}
    assert await node.get("trucks/t7/x") is None


async def test_write_outside_own_zones_is_refused_and_writes_nothing(
    make_node: NodeFactory,
) -> None:
    node = await make_node("t9")
    for key in ("trucks/t7/position", "sys/zones/x", "fleet/t7/model", "nowhere"):
        with pytest.raises(syncfw.ZoneOwnershipError):
            await node.put(key, 1)
    with pytest.raises(syncfw.ZoneOwnershipError):
        await node.counter("trucks/t7/n").add(1)
    with pytest.raises(syncfw.ZoneOwnershipError):
        await node.doc("trucks/t7/notes")
    assert await node.version_vector() == {}
    # its own per-node zones need no grant
    await node.put("fleet/t9/model", {"name": "m"})
    await node.put("results/t9/1", 1)
    assert not node.writable("trucks/t7/position") and node.writable("site/anything")


async def test_concurrent_puts_are_group_committed_and_all_durable(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    node = await make_node("t7")
    ops = await asyncio.gather(*(node.put(f"trucks/t7/k{i}", i) for i in range(500)))
    assert sorted(op.seq for op in ops) == list(range(1, 501))
    # each origin's hash chain links every op to the one before
    by_seq = {op.seq: op for op in ops}
    for seq in range(2, 501):
        assert by_seq[seq].prev == syncfw.log.op_hash(by_seq[seq - 1])
    assert len({op.hlc for op in ops}) == 500
    await node.close()
    reopened = await Node.open(tmp_path / "t7.db", node_id="t7", fleet=FLEET)
    try:
        assert await reopened.scan("trucks/t7/") == {f"trucks/t7/k{i}": i for i in range(500)}
    finally:
        await reopened.close()


async def test_crdt_handles_converge_between_nodes(make_node: NodeFactory) -> None:
    a, b = await make_node("t7"), await make_node("t9")
    await a.counter("site/ore").add(40)
    await b.counter("site/ore").add(12)
    await b.counter("site/ore").add(-2)
    await a.set("site/alerts").add("hot-bearing-3")
    await b.set("site/alerts").add("low-tyre")
    await exchange(a, b)
    # b removes what it saw while a concurrently re-adds: add wins
    await b.set("site/alerts").remove("hot-bearing-3")
    await a.set("site/alerts").add("hot-bearing-3")
    await a.register("site/mode").set("day")
    await b.register("site/mode").set("night")
    await exchange(a, b)
    for n in (a, b):
        assert await n.counter("site/ore").value() == 50
        assert sorted(await n.set("site/alerts").items()) == ["hot-bearing-3", "low-tyre"]
        assert await n.set("site/alerts").contains("low-tyre")
        assert sorted(await n.register("site/mode").values()) == ["day", "night"]
    await a.register("site/mode").set("shift-change")  # observed both: supersedes them
    await exchange(a, b)
    assert await b.register("site/mode").values() == ["shift-change"]
    assert await a.state_digest() == await b.state_digest()


async def test_docs_edits_become_ops_and_remote_edits_arrive(make_node: NodeFactory) -> None:
    a, b = await make_node("t7"), await make_node("t9")
    doc_a = await a.doc("site/notes")
    doc_b = await b.doc("site/notes")
    assert doc_a.client_id != doc_b.client_id
    doc_a.get("text", type=pycrdt.Text).insert(0, "bearing 3 hot")
    doc_b.get("text", type=pycrdt.Text).insert(0, "tyre low; ")
    await a.flush()
    await b.flush()
    assert (await a.version_vector())["t7"] == 1
    await exchange(a, b)
    text_a = str(doc_a.get("text", type=pycrdt.Text))
    assert text_a == str(doc_b.get("text", type=pycrdt.Text))
    assert "bearing 3 hot" in text_a and "tyre low; " in text_a
    # applying the remote edit did not emit a new op (no echo)
    assert await a.version_vector() == {"t7": 1, "t9": 1}
    await exchange(a, b)
    assert await a.version_vector() == await b.version_vector() == {"t7": 1, "t9": 1}
    # a fresh node session reads the merged document from state
    c = await make_node("depot")
    await exchange(a, c)
    doc_c = await c.doc("site/notes")
    assert str(doc_c.get("text", type=pycrdt.Text)) == text_a


async def test_changes_feed_reports_local_and_remote(make_node: NodeFactory) -> None:
    a, b = await make_node("t7"), await make_node("t9")
    feed = b.changes()
    got: list[syncfw.Change] = []

    async def consume() -> None:
        async for ch in feed:
            got.append(ch)
            if len(got) == 2:
                return

    task = asyncio.create_task(consume())  # subscribed at changes(), not at first read
    await b.put("trucks/t9/x", 1)
    await a.put("trucks/t7/y", 2)
    await exchange(a, b)
    await asyncio.wait_for(task, 5)
    assert [(c.key, c.origin, c.local) for c in got] == [
        ("trucks/t9/x", "t9", True),
        ("trucks/t7/y", "t7", False),
    ]


async def test_grants_and_transfer_of_a_zone(make_node: NodeFactory) -> None:
    cloud, t7, t12 = await make_node("cloud"), await make_node("t7"), await make_node("t12")
    with pytest.raises(syncfw.NotAuthorityError):
        await t7.grant("trucks/t12/", "t7")
    with pytest.raises(syncfw.ZoneOwnershipError):
        await t12.put("trucks/t7/position", 1)
    await t7.put("trucks/t7/position", "old-owner")
    # t7 dies; its zone is handed to its replacement t12 (epoch 1 -> 2)
    await cloud.grant("trucks/t7/", "t12")
    await exchange(cloud, t12)
    op = await t12.put("trucks/t7/position", "new-owner")
    assert op.epoch == 2
    await exchange(t7, t12)
    await exchange(cloud, t12)
    for n in (cloud, t7, t12):
        assert await n.get("trucks/t7/position") == "new-owner"
        assert await n.store.rejected() == []
    # t7 learned of the transfer: it can no longer write there
    with pytest.raises(syncfw.ZoneOwnershipError):
        await t7.put("trucks/t7/position", 1)


async def test_status_includes_sources(make_node: NodeFactory, clock: FakeClock) -> None:
    node = await make_node("t7")
    await node.put("trucks/t7/x", 1)
    node.add_status_source("inference", lambda: {"p99_ms": 3.0})
    node.add_status_source("broken", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    st = await node.status()
    assert st["node_id"] == "t7" and st["version_vector"] == {"t7": 1}
    assert st["inference"] == {"p99_ms": 3.0}
    assert "error" in st["broken"]
    assert st["hlc"] >> 16 == clock.ms


async def test_closed_node_refuses_writes(make_node: NodeFactory) -> None:
    node = await make_node("t7")
    await node.close()
    with pytest.raises(syncfw.StoreClosedError):
        await node.put("trucks/t7/x", 1)
    await node.close()  # idempotent


async def test_slow_change_subscriber_is_told_it_lagged(make_node: NodeFactory) -> None:
    node = await make_node("t7", config=syncfw.StoreConfig(changes_buffer=10))
    feed = node.changes()
    for i in range(20):
        await node.put(f"trucks/t7/k{i}", i)
    got: list[syncfw.Change] = []

    async def drain() -> None:
        async for ch in feed:
            got.append(ch)

    with pytest.raises(syncfw.ChangeFeedLagged):
        await drain()
    assert len(got) <= 10
    # writing goes on regardless, and a new subscription works
    fresh = node.changes()
    await node.put("trucks/t7/after", 1)
    assert (await fresh.__anext__()).key == "trucks/t7/after"
    await fresh.aclose()


async def test_a_filtered_change_subscriber_sees_only_its_keys_and_never_lags_on_others(
    make_node: NodeFactory,
) -> None:
    node = await make_node("t7", config=syncfw.StoreConfig(changes_buffer=10))
    feed = node.changes(keys=lambda k: k.startswith("trucks/t7/model"))
    everything = node.changes()
    for i in range(50):  # five times the buffer of other keys
        await node.put(f"trucks/t7/k{i}", i)
    await node.put("trucks/t7/model", "v2")
    got = await asyncio.wait_for(feed.__anext__(), 5)
    assert (got.key, got.local) == ("trucks/t7/model", True)
    with pytest.raises(syncfw.ChangeFeedLagged):  # the unfiltered one fell behind
        async for _ in everything:
            pass
    await feed.aclose()


async def test_a_change_subscriber_by_prefixes_sees_only_keys_under_them_that_it_accepts(
    make_node: NodeFactory,
) -> None:
    node = await make_node("t7", config=syncfw.StoreConfig(changes_buffer=10))
    asked: list[str] = []

    def wanted(key: str) -> bool:
        asked.append(key)
        return key.endswith("/model")

    feed = node.changes(keys=wanted, prefixes=("trucks/t7/m", "trucks/t7/x"))
    only = node.changes(prefixes=["trucks/t7/x"])
    await node.put_many({f"trucks/t7/k{i}": i for i in range(50)})  # under neither prefix
    await node.put_many({"trucks/t7/misc": 1, "trucks/t7/model": "v2", "trucks/t7/x": 0})
    got = await asyncio.wait_for(feed.__anext__(), 5)
    assert got.key == "trucks/t7/model"
    assert sorted(asked) == ["trucks/t7/misc", "trucks/t7/model", "trucks/t7/x"]  # none of k*
    assert (await asyncio.wait_for(only.__anext__(), 5)).key == "trucks/t7/x"
    await feed.aclose()
    await only.aclose()


async def test_expire_telemetry_via_node(make_node: NodeFactory, clock: FakeClock) -> None:
    node = await make_node("t7")
    await node.put("telemetry/t7/temp", 80)
    clock.advance(120_000)
    assert await node.expire_telemetry(60_000) == 1
    assert await node.get("telemetry/t7/temp") is None


async def test_put_many_is_all_or_nothing_before_writing(make_node: NodeFactory) -> None:
    node = await make_node("t7")
    ops = await node.put_many({"trucks/t7/a": 1, "trucks/t7/b": [2], "site/c": "x"})
    assert [op.seq for op in ops] == [1, 2, 3]
    assert await node.get("trucks/t7/b") == [2]
    with pytest.raises(syncfw.ZoneOwnershipError):
        await node.put_many([("trucks/t7/d", 1), ("trucks/t9/e", 2)])
    with pytest.raises(syncfw.ValueEncodingError):
        await node.put_many([("trucks/t7/d", 1), ("trucks/t7/e", object())])
    assert await node.version_vector() == {"t7": 3}
    assert await node.put_many([]) == []


async def test_nodes_serving_over_grpc_converge_and_close_their_mesh(
    make_node: NodeFactory,
) -> None:
    from syncfw.mesh import MeshConfig

    a, b = await make_node("t7"), await make_node("t9")
    mesh_a = await a.serve("127.0.0.1:0", config=MeshConfig.test())
    await b.serve("127.0.0.1:0", [mesh_a.address], config=MeshConfig.test())
    await a.put("trucks/t7/position", {"lat": 1})
    await b.counter("site/ore").add(3)

    async def converged() -> bool:
        return await a.state_digest() == await b.state_digest()

    await wait_until(converged, timeout_s=10, what="convergence over gRPC")
    assert await b.get("trucks/t7/position") == {"lat": 1}
    assert "mesh" in await a.status()
    await a.close()  # leaves the mesh: b keeps working alone
    await b.put("trucks/t9/x", 1)
