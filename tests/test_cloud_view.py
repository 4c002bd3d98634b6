"""The aggregator on a small signed fleet over real gRPC with mTLS: the fleet view's contents
(models, rollout stages, modes, inference latency, heartbeats, a skewed clock), its rebuild
after a restart and its deltas, the fleet metric series, telemetry compacted on the edge after
the aggregator's authenticated ack, and a subscriber certificate that may read but never write."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from syncfw.clock import wall_ms
from syncfw.cloud import Aggregator, AggregatorConfig, Consumer, TelemetryPublisher
from syncfw.exchange import run_exchange
from syncfw.keyfiles import (
    NodeKeys,
    add_node,
    add_subscriber,
    init_fleet,
    load_fleet,
    load_node,
)
from syncfw.keys import mode_key, result_key
from syncfw.mesh import MeshConfig
from syncfw.mesh.models import ModelStatus, publish_model
from syncfw.node import Node
from syncfw.sync.frames import Status
from syncfw.testing import wait_until
from syncfw.testing.memory import MemoryReplica
from syncfw.transport.base import LinkError
from syncfw.transport.rpc import ChannelPool, TlsConfig, TransportConfig
from syncfw.zones import Fleet

pytestmark = pytest.mark.asyncio

SKEW_MS = 3_600_000


def _tls(keys: NodeKeys) -> TlsConfig:
    return TlsConfig(keys.ca_pem, keys.cert_pem, keys.key_pem)


class Pki:
    def __init__(self, root: Path) -> None:
        self.dir = root / "fleet"
        init_fleet(self.dir, "cloud-view", authority="cloud")
        for n in ("cloud", "t1", "t2", "t3"):
            add_node(self.dir, n)
        self.sub = add_subscriber(self.dir, "dash")
        self.fleet = load_fleet(self.dir).bind(Fleet(fleet_id="cloud-view", authority="cloud"))

    def keys(self, node: str) -> NodeKeys:
        return load_node(self.dir, node)

    def sub_tls(self) -> TlsConfig:
        return TlsConfig.from_files(self.dir / "ca.crt", self.sub / "node.crt",
                                    self.sub / "node.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def _edge(pki: Pki, tmp: Path, name: str, seed: str, *, skew_ms: int = 0) -> Node:
    node = await Node.open(tmp / f"{name}.db", node_id=name, fleet=pki.fleet,
                           keys=pki.keys(name), clock=lambda: wall_ms() + skew_ms)
    await node.serve("127.0.0.1:0", [seed], config=MeshConfig.test(), tls=_tls(pki.keys(name)))
    return node


@pytest.fixture
async def fleet(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[Aggregator, list[Node]]]:
    agg = await Aggregator.open(tmp_path / "cloud.db", pki.keys("cloud"),
                                config=AggregatorConfig.test())
    mesh = await agg.serve("127.0.0.1:0")
    edges = [
        await _edge(pki, tmp_path, "t1", mesh.address),
        await _edge(pki, tmp_path, "t2", mesh.address),
        await _edge(pki, tmp_path, "t3", mesh.address, skew_ms=SKEW_MS),
    ]
    yield agg, edges
    for e in edges:
        await e.close()
    await agg.aclose()


async def _results(node: Node, latencies: list[float]) -> None:
    await node.put_many([
        (result_key(node.node_id, "det", f"r{i}"),
         {"model": {"name": "det", "version": "2"}, "label": "ok", "confidence": 0.9,
          "latency_ms": {"total": ms}})
        for i, ms in enumerate(latencies)
    ])


async def test_fleet_view_after_a_small_real_grpc_fleet(
    fleet: tuple[Aggregator, list[Node]], pki: Pki, tmp_path: Path
) -> None:
    agg, (t1, t2, t3) = fleet
    updates = agg.updates()
    await publish_model(t1, "t1", ModelStatus("det", "2", "ab" * 32, "active"))
    await publish_model(t2, "t2", ModelStatus("det", "3", "cd" * 32, "canary"))
    await t2.put(mode_key("t2"), {"mode": "degraded", "previous": "full", "reason": "hot",
                                  "at_ms": wall_ms()})
    await _results(t1, [float(i) for i in range(1, 101)])
    await TelemetryPublisher(t1, interval_s=60).publish()
    await t3.put("fleet/t3/hello", 1)

    def ready() -> bool:
        n = agg.view()["nodes"]
        return (
            n.get("t1", {}).get("inferences") == 100
            and n.get("t2", {}).get("mode") == "degraded"
            and n.get("t1", {}).get("heartbeat") is not None
            and n.get("t3", {}).get("clock_offset_ms") is not None
            and all(n.get(x, {}).get("state") == "alive" for x in ("t1", "t2", "t3"))
        )

    await wait_until(ready, what="the view shows the fleet", timeout_s=20)
    v = agg.view()
    json.dumps(v)  # plain data
    assert v["version"] == 1 and v["aggregator"] == "cloud" and v["rebuilt"]
    n1, n2, n3 = (v["nodes"][x] for x in ("t1", "t2", "t3"))
    assert n1["model"]["version"] == "2" and n1["rollout_stage"] == "active"
    assert n2["model"]["version"] == "3" and n2["rollout_stage"] == "canary"
    assert n2["mode"] == "degraded" and n2["mode_reason"] == "hot"
    assert v["totals"]["degraded"] == ["t2"]
    assert n1["latency_ms"]["samples"] == 100
    assert n1["latency_ms"]["p50_ms"] == 50.0 and n1["latency_ms"]["p99_ms"] == 99.0
    assert n1["heartbeat"]["beat"] == 1 and n1["metrics"]["ops_rejected"] == 0
    assert n1["sync_lag_ops"] is not None and n1["last_contact_ago_s"] is not None
    # the skewed edge: its offset is shown and flagged, its ops wait at the aggregator
    assert abs(n3["clock_offset_ms"] - SKEW_MS) < 60_000, n3
    assert n3["clock_skewed"] is True
    assert not n1["clock_skewed"] and not n2["clock_skewed"]
    assert v["pending_by_reason"].get("clock_skew", 0) > 0, v["pending_by_reason"]
    assert {"model": "det", "version": "3", "stage": "canary", "nodes": 1} in v["totals"]["rollout"]
    # deltas came for the nodes that changed
    got: dict[str, Any] = {}
    async with asyncio.timeout(5):
        while "t1" not in got or "t2" not in got:
            got.update((await updates.__anext__()).get("nodes", {}))
    updates.close()
    # the fleet series on the aggregator's /metrics
    text = agg.node.metrics.exposition().decode()
    assert 'syncfw_fleet_nodes{node="cloud",state="alive"} 3.0' in text
    assert ('syncfw_fleet_rollout_nodes{model="det",node="cloud",stage="canary",version="3"} 1.0'
            in text)
    assert "syncfw_subscribers" in text

    # a restart rebuilds the same log-derived view from the file
    before = {k: {f: d[f] for f in ("ops", "inferences", "model", "mode", "latency_ms")}
              for k, d in v["nodes"].items()}
    await agg.aclose()
    again = await Aggregator.open(tmp_path / "cloud.db", pki.keys("cloud"),
                                  config=AggregatorConfig.test())
    try:
        await asyncio.wait_for(again.wait_rebuilt(), 10)
        after = again.view()["nodes"]
        for k, d in before.items():
            assert {f: after[k][f] for f in d} == d, k
    finally:
        await again.aclose()


async def test_telemetry_is_compacted_on_the_edge_after_the_aggregators_ack(
    fleet: tuple[Aggregator, list[Node]],
) -> None:
    agg, (t1, _, _) = fleet
    pub = TelemetryPublisher(t1, interval_s=60)
    for _ in range(5):
        await pub.publish()
    top = t1.store.version_vector["t1"]
    await wait_until(lambda: t1.store.peer_ack("cloud").get("t1", 0) >= top,
                     what="the aggregator acknowledged", timeout_s=20)
    # only the authenticated peers count; the other edges ack too (all peers must)
    await wait_until(
        lambda: all(t1.store.peer_ack(p).get("t1", 0) >= top for p in ("t2", "t3")),
        what="the other edges acknowledged", timeout_s=20,
    )
    assert await t1.compact() > 0
    status = await t1.status()
    assert status["ops"] < top  # the old heartbeat ops are gone from the edge
    assert (await t1.get(pub.keys[0]))["beat"] == 5  # their effect stays
    await wait_until(lambda: (agg.view()["nodes"].get("t1", {}).get("heartbeat") or {})
                     .get("beat") == 5, what="the aggregator keeps the heartbeat")
    # the aggregator keeps the whole log: every t1 op is still there
    assert agg.node.store.version_vector["t1"] == top


async def test_a_subscriber_certificate_reads_the_feed_but_never_writes(
    fleet: tuple[Aggregator, list[Node]], pki: Pki
) -> None:
    agg, (t1, _, _) = fleet
    assert agg.address is not None
    await t1.put("fleet/t1/door", "locked")
    await wait_until(lambda: agg.node.store.version_vector.get("t1", 0) > 0, what="synced")
    tls = pki.sub_tls()
    c = Consumer(agg.address, tls=tls, prefixes=["fleet/t1/door"])
    async with asyncio.timeout(10):
        item = await c.__anext__()
    assert item.key == "fleet/t1/door" and item.value == "locked"
    # served under its certificate's identity
    assert [s["identity"] for s in agg.feed.subscribers.values()] == ["sub:dash"]
    await c.aclose()

    # the same certificate trying to sync (write) is refused before any frame
    intruder = MemoryReplica("sub:dash", pki.fleet)
    intruder.put("fleet/sub:dash/x", "forged")  # an op to offer: it must never be stored
    pool = ChannelPool(TransportConfig.test(tls=tls))

    async def sync() -> None:
        out = await run_exchange(intruder, await pool.open(agg.address), timeout_s=5.0)
        if not out.ok:
            raise LinkError(out.status, out.reason)

    try:
        with pytest.raises(LinkError) as exc:
            await sync()
        assert exc.value.status is Status.FAILED_PRECONDITION, exc.value
        assert "subscriber" in exc.value.reason
    finally:
        await pool.aclose()
    refused = agg.node.metrics.by_label("syncfw_refused_streams_total", "reason")
    assert refused.get("subscriber", 0) >= 1
    # (the edges keep syncing meanwhile: only the intruder's origin is checked)
    assert "sub:dash" not in agg.node.store.version_vector
    assert not [r for r in await agg.node.store.rejected() if r[0] == "sub:dash"]
