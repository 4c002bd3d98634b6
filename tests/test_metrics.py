"""Metrics on every node: one registry each, recorded where things happen, scraped over HTTP."""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncfw import Fleet, Grant, Node
from syncfw.log import VersionVector
from syncfw.mesh import Mesh, MeshConfig
from syncfw.mesh.mesh import lag_ops
from syncfw.metrics import NodeMetrics
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.waiting import wait_until
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import InMemoryNetwork

FLEET = Fleet(
    fleet_id="metrics-fleet",
    authority="cloud",
    grants=(Grant.of("trucks/t7/", "t7"), Grant.of("trucks/t9/", "t9")),
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(address: str) -> Samples:
    """GET ``/metrics`` and parse it with prometheus_client's own parser."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_a_scrape_of_two_meshed_sqlite_nodes_shows_what_happened(tmp_path: Path) -> None:
    cfg = MeshConfig.test()
    a = await Node.open(tmp_path / "t7.db", node_id="t7", fleet=FLEET)
    b = await Node.open(tmp_path / "t9.db", node_id="t9", fleet=FLEET)
    try:
        mesh_a = await a.serve("127.0.0.1:0", config=cfg, metrics="127.0.0.1:0")
        mesh_b = await b.serve("127.0.0.1:0", [mesh_a.address], config=cfg, metrics="127.0.0.1:0")
        for i in range(3):
            await a.put(f"trucks/t7/k{i}", i)
        await b.put_many({"trucks/t9/x": 1, "trucks/t9/y": 2})

        async def synced() -> bool:
            return (
                await a.version_vector() == await b.version_vector() == {"t7": 3, "t9": 2}
                and all(m.status()["peers"]["alive"] == 1 for m in (mesh_a, mesh_b))
                and all(m.lag_ops.get(p) == 0 for m, p in ((mesh_a, "t9"), (mesh_b, "t7")))
            )

        await wait_until(synced, what="both nodes in sync over gRPC")
        # stop exchanging, so the scrape and status() are of one moment
        await mesh_a.aclose()
        await mesh_b.aclose()

        for node, local, remote, peer in ((a, 3, 2, "t9"), (b, 2, 3, "t7")):
            (server,) = node.metrics_servers
            got = await asyncio.to_thread(_scrape, server.address)
            me = node.node_id
            # two nodes in one process: each scrape holds only its own node's samples
            assert {dict(labels).get("node") for _, labels in got} == {me}
            applied_local = _value(got, "syncfw_ops_applied_total", node=me, source="local")
            applied_remote = _value(got, "syncfw_ops_applied_total", node=me, source="remote")
            assert (applied_local, applied_remote) == (local, remote)
            ok = _value(got, "syncfw_exchanges_total", node=me, outcome="OK")
            assert ok > 0
            wire_in = _value(got, "syncfw_wire_bytes_total", node=me, direction="in")
            wire_out = _value(got, "syncfw_wire_bytes_total", node=me, direction="out")
            assert wire_in > 0 and wire_out > 0
            assert _value(got, "syncfw_peers", node=me, state="alive") == 1
            assert _value(got, "syncfw_peers", node=me, state="dead") == 0
            assert _value(got, "syncfw_peer_lag_ops", node=me, peer=peer) == 0
            storage = _value(got, "syncfw_storage_bytes", node=me)
            assert storage > 0

            st = await node.status()
            assert st["metrics"]["ops_applied"] == {"local": local, "remote": remote}
            assert st["metrics"]["exchanges"]["OK"] == ok
            assert st["metrics"]["wire_bytes"] == {"in": wire_in, "out": wire_out}
            assert st["metrics"]["peers"]["alive"] == 1
            assert st["mesh"]["outcomes"]["OK"] == ok
            assert st["mesh"]["peers"] == {"alive": 1, "suspect": 0, "dead": 0}
            assert st["mesh"]["lag_ops"] == {peer: 0}
            assert st["file_bytes"] == storage == st["metrics"]["storage_bytes"]
            assert st["pending"] == 0
            # the writer planned local groups and applied remote ones, and timed each
            busy = st["metrics"]["writer_busy_s"]
            assert busy["local"] > 0 and busy["remote"] > 0
            assert _value(got, "syncfw_writer_busy_seconds_total", node=me, work="remote") == (
                busy["remote"]
            )
    finally:
        await a.close()
        await b.close()


async def test_metrics_are_served_without_a_mesh_and_stop_with_the_node(tmp_path: Path) -> None:
    node = await Node.open(tmp_path / "t7.db", node_id="t7", fleet=FLEET)
    try:
        server = node.serve_metrics("127.0.0.1:0")
        await node.put("trucks/t7/k", 1)
        got = await asyncio.to_thread(_scrape, server.address)
        assert _value(got, "syncfw_ops_applied_total", node="t7", source="local") == 1
        assert ("syncfw_exchanges_total", frozenset({("node", "t7"), ("outcome", "OK")})) not in got
    finally:
        await node.close()
    assert node.metrics_servers == ()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_scrape, server.address)


async def test_a_bad_metrics_address_leaves_no_mesh_running(tmp_path: Path) -> None:
    node = await Node.open(tmp_path / "t7.db", node_id="t7", fleet=FLEET)
    try:
        with pytest.raises(ValueError, match="host:port"):
            await node.serve("127.0.0.1:0", config=MeshConfig.test(), metrics="9109")
        assert "mesh" not in await node.status()
        assert node.metrics_servers == ()
    finally:
        await node.close()


# -- the mesh's own figures, on in-memory replicas -------------------------------------


def test_lag_counts_ops_held_that_the_ack_lacks() -> None:
    ours: VersionVector = {"a": 5, "b": 3}
    assert lag_ops(ours, {}) == 8
    assert lag_ops(ours, {"a": 5, "b": 3}) == 0
    assert lag_ops(ours, {"a": 2, "c": 9}) == 6  # an ack ahead of us never counts negative
    assert lag_ops(ours, {"a": 7, "b": 1}) == 2


async def _pair(
    cfg: MeshConfig, a: MemoryReplica | None = None, b: MemoryReplica | None = None
) -> tuple[MemoryNetwork, Mesh, Mesh, MemoryReplica, MemoryReplica]:
    """b listens; a has b as its seed. Both driven by hand."""
    net = MemoryNetwork()
    a, b = a or MemoryReplica("a"), b or MemoryReplica("b")
    mb = await Mesh.start(b, listen="b", network=InMemoryNetwork(net), config=cfg, run_loop=False)
    ma = await Mesh.start(
        a, listen="a", seeds=["b"], network=InMemoryNetwork(net), config=cfg, run_loop=False
    )
    return net, ma, mb, a, b


def _peers(mesh: Mesh) -> dict[str, int]:
    return {
        s: int(mesh.metrics.value("syncfw_peers", state=s)) for s in ("alive", "suspect", "dead")
    }


@pytest.mark.parametrize(("dead_after_s", "state"), [(60.0, "suspect"), (0.0, "dead")])
async def test_peer_gauges_follow_the_member_table(dead_after_s: float, state: str) -> None:
    cfg = MeshConfig.test().with_(suspect_after=1, dead_after_s=dead_after_s)
    net, ma, mb, _, _ = await _pair(cfg)
    try:
        assert _peers(ma) == {"alive": 1, "suspect": 0, "dead": 0}  # the seed, from the start
        assert (await ma.sync_with("b")).ok
        assert _peers(mb) == {"alive": 1, "suspect": 0, "dead": 0}  # b learned a from its gossip
        net.unlisten("b")
        assert not (await ma.sync_with("b")).ok
        assert _peers(ma) == {"alive": 0, "suspect": 0, "dead": 0} | {state: 1}
        assert ma.status()["peers"] == _peers(ma)
    finally:
        await ma.aclose()
        await mb.aclose()


class _DeafReplica(MemoryReplica):
    """A replica whose peers' acknowledgements never land."""

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        return None


async def test_peer_lag_is_what_the_peer_had_not_acknowledged() -> None:
    cfg = MeshConfig.test()
    deaf = _DeafReplica("b")
    _, ma, mb, a, b = await _pair(cfg, b=deaf)
    try:
        for i in range(4):
            a.put(f"fleet/a/{i}", i)
        for i in range(3):
            b.put(f"fleet/b/{i}", i)
        assert (await ma.sync_with("b")).ok
        await wait_until(lambda: mb.metrics.value("syncfw_exchanges_total", outcome="OK") == 1)
        # a heard b's acknowledgement; b never recorded a's, so it counts all it holds
        assert ma.lag_ops == {"b": 0}
        assert mb.lag_ops == {"a": 7}
        a.put("fleet/a/late", 1)  # lag is as of the last exchange: unchanged until the next
        assert ma.lag_ops == {"b": 0}
        assert (await ma.sync_with("b")).ok
        assert ma.lag_ops == {"b": 0}
        await wait_until(lambda: mb.lag_ops == {"a": 8})
    finally:
        await ma.aclose()
        await mb.aclose()


async def test_per_peer_series_go_when_the_member_goes() -> None:
    base = 1_700_000_000_000
    a = MemoryReplica("a", wall=lambda: base)
    b = MemoryReplica("b", wall=lambda: base + 1_500)  # b's clock runs 1.5 s ahead
    _, ma, mb, _, _ = await _pair(MeshConfig.test(), a, b)
    try:
        assert (await ma.sync_with("b")).ok
        assert ma.lag_ops == {"b": 0}
        assert ma.clock_offsets_ms == {"b": 1_500}
        assert (
            ma.metrics.value("syncfw_clock_offset_ms", source="peer:b") == ma.clock_offsets_ms["b"]
        )
        del ma.membership.members["b"]  # what forgetting a member would do
        await ma.round()
        assert ma.lag_ops == {} and ma.clock_offsets_ms == {}
        assert ma.metrics.samples("syncfw_peer_lag_ops") == {}
    finally:
        await ma.aclose()
        await mb.aclose()


async def test_a_peer_not_in_the_table_gets_no_series_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a never gossips its member list, so b serves it without knowing it as a member
    cfg = MeshConfig.test().with_(gossip_peers_every=1_000)
    _, ma, mb, _, _ = await _pair(cfg)
    try:
        with caplog.at_level(logging.WARNING, logger="syncfw.mesh"):
            assert (await ma.sync_with("b")).ok
            await wait_until(lambda: mb.metrics.value("syncfw_exchanges_total", outcome="OK") == 1)
        assert mb.lag_ops == {} and mb.clock_offsets_ms == {}
        assert any("a is not a member yet" in r.getMessage() for r in caplog.records)
    finally:
        await ma.aclose()
        await mb.aclose()


def test_two_registries_never_mix() -> None:
    one, two = NodeMetrics("n1"), NodeMetrics("n2")
    one.exchanges.labels("n1", "OK").inc(3)
    one.set_peer_lag("p", 4)
    assert two.value("syncfw_exchanges_total", outcome="OK") == 0
    assert two.samples("syncfw_peer_lag_ops") == {}
    assert one.snapshot()["exchanges"] == {"OK": 3}
    assert one.snapshot()["peer_lag_ops"] == {"p": 4}
    assert b"n2" not in one.exposition()


async def test_status_pending_is_the_pending_gauge(tmp_path: Path) -> None:
    a = await Node.open(tmp_path / "t7.db", node_id="t7", fleet=FLEET)
    b = await Node.open(tmp_path / "t9.db", node_id="t9", fleet=FLEET)
    try:
        await a.put("trucks/t7/k", 1)
        await a.put("trucks/t7/k", 2)
        second = (await a.ops_since({}))[1]
        await b.apply_remote([second])  # seq 2 before seq 1: held back as a gap
        st = await b.status()
        assert st["pending"] == 1
        assert st["metrics"]["ops_pending"]["gap"] == 1
        assert b.metrics.value("syncfw_ops_pending", reason="gap") == 1
        await b.apply_remote(await a.ops_since({}))
        st = await b.status()
        assert st["pending"] == 0
        assert st["metrics"]["ops_applied"] == {"local": 0, "remote": 2}
    finally:
        await a.close()
        await b.close()
