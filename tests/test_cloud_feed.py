"""The change feed over real gRPC (``syncfw.v1.Feed/Subscribe``): resume with no gap and no
duplicate across reconnects and aggregator restarts, a slow consumer bounded then told, and
positions the server cannot serve."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncfw import Fleet, Node
from syncfw.cloud import Aggregator, AggregatorConfig, Consumer, FeedConfig, FeedServer
from syncfw.errors import FeedPositionError
from syncfw.mesh import MeshConfig
from syncfw.store.follow import FeedItem
from syncfw.sync.frames import Status
from syncfw.testing import wait_until
from syncfw.transport.base import LinkError
from syncfw.transport.network import GrpcNetwork
from syncfw.transport.rpc import TransportConfig

pytestmark = pytest.mark.asyncio

FLEET = Fleet(fleet_id="feed-test")


def _cfg(**feed: object) -> AggregatorConfig:
    base = AggregatorConfig.test()
    return dataclasses.replace(base, feed=dataclasses.replace(base.feed, **feed))  # type: ignore[arg-type]


async def _take(consumer: Consumer, n: int, timeout_s: float = 10.0) -> list[FeedItem]:
    out: list[FeedItem] = []
    async with asyncio.timeout(timeout_s):
        async for item in consumer:
            out.append(item)
            if len(out) == n:
                break
    return out


def _ids(items: list[FeedItem]) -> list[tuple[str, int]]:
    return [(i.origin, i.seq) for i in items]


def _assert_exactly_once(ids: list[tuple[str, int]], expect: dict[str, int]) -> None:
    assert len(ids) == len(set(ids)), "a duplicate was delivered"
    by: dict[str, list[int]] = {}
    for o, s in ids:
        by.setdefault(o, []).append(s)
    for o, seqs in by.items():
        assert seqs == sorted(seqs), f"{o} out of seq order"
    assert {o: sorted(s) for o, s in by.items()} == {
        o: list(range(1, n + 1)) for o, n in expect.items()
    }, "a gap"


@pytest.fixture
async def agg(tmp_path: Path) -> AsyncIterator[Aggregator]:
    a = await Aggregator.open(tmp_path / "cloud.db", fleet=FLEET, config=_cfg())
    await a.serve("127.0.0.1:0")
    yield a
    await a.aclose()


async def _write(node: Node, start: int, n: int) -> None:
    await node.put_many([(f"fleet/{node.node_id}/k{i}", i) for i in range(start, start + n)])


async def test_resume_across_reconnect_and_restart_has_no_gap_and_no_duplicate(
    tmp_path: Path,
) -> None:
    cfg = _cfg()
    agg = await Aggregator.open(tmp_path / "cloud.db", fleet=FLEET, config=cfg)
    mesh = await agg.serve("127.0.0.1:0")
    address = mesh.address
    edge = await Node.open(tmp_path / "edge.db", node_id="edge", fleet=FLEET)
    await edge.serve("127.0.0.1:0", [address], config=MeshConfig.test())
    seen: list[FeedItem] = []
    try:
        await _write(edge, 0, 300)
        await _write(agg.node, 0, 50)
        c1 = Consumer(address, prefixes=["fleet/"])
        seen += await _take(c1, 120)
        pos = c1.position
        await c1.aclose()  # a consumer that stopped; it resumes from its vector

        c2 = Consumer(address, since=pos, prefixes=["fleet/"], reconnect_s=0.05)
        seen += await _take(c2, 100)
        # the aggregator restarts on the same port under a live consumer: it reconnects
        await agg.aclose()
        await _write(edge, 300, 100)
        agg = await Aggregator.open(tmp_path / "cloud.db", fleet=FLEET, config=cfg)
        await agg.serve(address)
        await _write(agg.node, 50, 25)
        await wait_until(
            lambda: agg.node.store.version_vector.get("edge", 0) == 400, what="edge synced",
            timeout_s=15,
        )
        vv = agg.node.store.version_vector
        rest = sum(s for o, s in vv.items() if o in ("edge", "cloud")) - len(seen)
        seen += await _take(c2, rest, timeout_s=20)
        assert c2.connects >= 2, "the consumer never reconnected"
        await c2.aclose()
        _assert_exactly_once(
            [i for i in _ids(seen) if i[0] in ("edge", "cloud")], {"edge": 400, "cloud": 75}
        )
        assert all(i.key.startswith("fleet/") for i in seen)
        byk = {i.key: i.value for i in seen if i.origin == "edge"}
        assert byk["fleet/edge/k399"] == 399  # values included, decoded
    finally:
        await edge.close()
        await agg.aclose()


async def test_a_slow_consumer_is_paged_then_told_it_lags(tmp_path: Path) -> None:
    agg = await Aggregator.open(
        tmp_path / "cloud.db", fleet=FLEET,
        config=_cfg(max_lag_ops=300, page_ops=50, checkpoint_s=0.05),
    )
    mesh = await agg.serve("127.0.0.1:0")
    try:
        await _write(agg.node, 0, 20)
        c = Consumer(mesh.address)
        got = await _take(c, 20)
        # at the head: the server marks the subscription caught up
        await wait_until(lambda: c.lag_ops == 0 and agg.feed.subscribers, what="caught up")
        await asyncio.sleep(0.2)
        for start in range(20, 5020, 500):  # the consumer reads nothing meanwhile
            await _write(agg.node, start, 500)

        async def drain() -> None:
            async with asyncio.timeout(20):
                async for item in c:
                    got.append(item)

        with pytest.raises(LinkError) as exc:
            await drain()
        assert exc.value.status is Status.RESOURCE_EXHAUSTED
        assert "lags" in exc.value.reason and "limit 300" in exc.value.reason
        [info] = agg.feed.max_held_seen
        assert 0 < info <= 50, "the server held more than a page for one subscriber"
        await wait_until(lambda: not agg.feed.subscribers, what="subscription released")
        assert "syncfw_subscriber_lag_ops" in agg.node.metrics.exposition().decode()
        # it resumes from its position and gets the rest: nothing lost, nothing twice
        again = Consumer(mesh.address, since=c.position)
        got += await _take(again, 5020 - len(got))
        await again.aclose()
        await c.aclose()
        _assert_exactly_once(_ids(got), {"cloud": 5020})
    finally:
        await agg.aclose()


async def test_positions_the_server_cannot_serve_get_a_clear_status(agg: Aggregator) -> None:
    assert agg.address is not None
    await _write(agg.node, 0, 5)
    for since, origin in (({"cloud": 99}, "cloud"), ({"ghost": 3}, "ghost")):
        c = Consumer(agg.address, since=since, max_retries=0)
        with pytest.raises(FeedPositionError) as exc:
            await _take(c, 1)
        assert origin in exc.value.missing, exc.value.missing
        assert "ahead" in str(exc.value)
        await c.aclose()
    c = Consumer(agg.address, prefixes=["x" * 2000], max_retries=0)
    with pytest.raises(LinkError) as bad:
        await _take(c, 1)
    assert bad.value.status is Status.INVALID_ARGUMENT and "prefix" in bad.value.reason
    await c.aclose()
    # nothing was lost or broken: a good consumer still reads everything
    c = Consumer(agg.address)
    assert [i.seq for i in await _take(c, 5)] == [1, 2, 3, 4, 5]
    await c.aclose()


async def test_below_a_compaction_point_on_a_node_serving_the_feed(tmp_path: Path) -> None:
    edge = await Node.open(tmp_path / "edge.db", node_id="edge", fleet=FLEET)
    peer = await Node.open(tmp_path / "peer.db", node_id="peer", fleet=FLEET)
    feed = FeedServer(edge, FeedConfig.test())
    net = GrpcNetwork(MeshConfig.test().transport(TransportConfig()), metrics=edge.metrics,
                      services=[feed.service()])
    try:
        mesh = await edge.serve("127.0.0.1:0", config=MeshConfig.test(), network=net)
        await peer.serve("127.0.0.1:0", [mesh.address], config=MeshConfig.test())
        await _write(edge, 0, 10)
        await wait_until(
            lambda: peer.store.version_vector.get("edge", 0) == 10, what="peer synced"
        )
        await wait_until(
            lambda: edge.store.peer_ack("peer").get("edge", 0) == 10, what="peer acked"
        )
        assert await edge.compact() > 0
        c = Consumer(mesh.address, since={"edge": 2}, max_retries=0)
        with pytest.raises(FeedPositionError) as exc:
            await _take(c, 1)
        assert exc.value.missing.get("edge", (0, 0))[0] == 3, exc.value.missing
        assert "compacted" in str(exc.value)
        await c.aclose()
        # from the compaction point on, the feed serves
        c = Consumer(mesh.address, since={"edge": 10, "peer": 0})
        await _write(edge, 10, 2)
        assert [i.seq for i in await _take(c, 2)] == [11, 12]
        await c.aclose()
    finally:
        await peer.close()
        await edge.close()


async def test_an_aggregator_serves_more_edges_from_one_address_than_an_edge_would(
    agg: Aggregator,
) -> None:
    """Edges behind one NAT share an address: the aggregator's front door takes
    more than a node's default of 32 connections from it (40 here, each answered
    with the server's HTTP/2 SETTINGS), and refuses none."""
    assert agg.address is not None
    port = int(agg.address.rsplit(":", 1)[1])
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
    conns = []
    try:
        for _ in range(40):
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            w.write(preface)
            conns.append((r, w))
        for r, _ in conns:
            head = await asyncio.wait_for(r.readexactly(9), 5.0)
            assert head[3] == 4  # a SETTINGS frame: grpc is talking to this one
        assert not agg.node.metrics.snapshot().get("refused_connections")
    finally:
        for _, w in conns:
            w.close()
