"""Two real aggregators side by side on a signed mTLS fleet over gRPC: the authority's and a
second one under an ordinary node id. Both build the fleet view from the same log and serve the
feed; only the authority writes what the authority may; they split export duty to a real
JetStream by the hash of the origin, and when the authority's aggregator dies the other one
exports its origins too: every op in the stream once, in per-origin order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from syncfw.cloud import Aggregator, AggregatorConfig, Consumer
from syncfw.cloud.export import ExportConfig, Exporter
from syncfw.cloud.export_check import check_stream, read_stream
from syncfw.cloud.export_servers import NatsCluster, NatsServerMissing
from syncfw.errors import ZoneOwnershipError
from syncfw.keyfiles import add_node, add_subscriber, init_fleet, load_fleet, load_node
from syncfw.keys import result_key
from syncfw.mesh import MeshConfig
from syncfw.node import Node
from syncfw.testing import wait_until
from syncfw.transport.rpc import TlsConfig
from syncfw.zones import Fleet

pytestmark = pytest.mark.asyncio

EDGES = ("t1", "t2", "t3", "t4")
BOTH = ("cloud", "cloud-2")


def _tls(root: Path, node: str) -> TlsConfig:
    k = load_node(root, node)
    return TlsConfig(k.ca_pem, k.cert_pem, k.key_pem)


async def _results(node: Node, start: int, n: int) -> None:
    await node.put_many([
        (result_key(node.node_id, "det", f"r{i}"),
         {"model": {"name": "det", "version": "1"}, "label": "ok", "confidence": 0.9,
          "latency_ms": {"total": 1.0}})
        for i in range(start, start + n)
    ])


def _inferences(agg: Aggregator) -> dict[str, int]:
    nodes = agg.view()["nodes"]
    return {e: nodes.get(e, {}).get("inferences", 0) for e in EDGES}


async def test_a_second_aggregator_builds_the_view_serves_the_feed_and_shares_export(
    tmp_path: Path,
) -> None:
    try:
        nats = NatsCluster(tmp_path / "nats", 1)
        await nats.__aenter__()
    except NatsServerMissing as exc:  # pragma: no cover - the dev extra brings it
        pytest.skip(str(exc))
    root = tmp_path / "keys"
    init_fleet(root, "two-aggs", authority="cloud")
    for n in (*BOTH, *EDGES):
        add_node(root, n)
    sub = add_subscriber(root, "reader")
    fleet = load_fleet(root).bind(Fleet(fleet_id="two-aggs", authority="cloud"))
    mcfg = MeshConfig.test()
    cfg = AggregatorConfig.test()
    a = await Aggregator.open(tmp_path / "a.db", load_node(root, "cloud"), config=cfg)
    b = await Aggregator.open(tmp_path / "b.db", load_node(root, "cloud-2"), config=cfg)
    edges: list[Node] = []
    exporters: list[Exporter] = []
    a_open = True
    try:
        assert a.is_authority and not b.is_authority
        ma = await a.serve("127.0.0.1:0")
        mb = await b.serve("127.0.0.1:0", [ma.address])
        for name in EDGES:
            e = await Node.open(tmp_path / f"{name}.db", node_id=name, fleet=fleet,
                                keys=load_node(root, name))
            await e.serve("127.0.0.1:0", [ma.address, mb.address], config=mcfg,
                          tls=_tls(root, name))
            edges.append(e)
            await _results(e, 0, 20)

        # only the authority writes what the authority may; the second one is a node
        with pytest.raises(ZoneOwnershipError):
            await b.node.put("sys/rollouts/x", 1)

        # both fold the same log into the same figures
        want = {e: 20 for e in EDGES}
        await wait_until(lambda: _inferences(a) == want and _inferences(b) == want,
                         what="both views hold every edge's results", timeout_s=30)
        assert b.view()["nodes"]["cloud-2"]["state"] == "self"
        assert (await b.node.status())["cloud"]["authority"] is False

        # the second aggregator's feed serves the edges' ops to a subscriber certificate
        reader = TlsConfig.from_files(root / "ca.crt", sub / "node.crt", sub / "node.key")
        c = Consumer(mb.address, tls=reader, prefixes=["results/"])
        got = []
        async with asyncio.timeout(30):
            async for item in c:
                got.append((item.origin, item.seq))
                if len(got) == 20 * len(EDGES):
                    break
        await c.aclose()
        assert len(set(got)) == len(got) and {o for o, _ in got} == set(EDGES)

        # export duty split by the hash of the origin, liveness from each one's mesh
        for agg in (a, b):
            ex = Exporter.for_aggregator(agg, ExportConfig.test(nats.urls, exporters=BOTH))
            exporters.append(await ex.start())
        ea, eb = exporters
        await wait_until(lambda: ea.status()["exporters"] == list(BOTH)
                         and eb.status()["exporters"] == list(BOTH), what="both see both",
                         timeout_s=30)
        await wait_until(lambda: ea.lag()[0] == 0 and eb.lag()[0] == 0, what="exported",
                         timeout_s=30)
        await wait_until(lambda: set(ea.status()["owned_origins"]).isdisjoint(
            eb.status()["owned_origins"]), what="duty split", timeout_s=30)
        owned_a = set(ea.status()["owned_origins"])
        assert owned_a and set(eb.status()["owned_origins"]) - owned_a

        # the authority's aggregator dies: the other exports its origins as well
        await ea.aclose()
        exporters.remove(ea)
        await a.aclose()
        a_open = False
        for e in edges:
            await _results(e, 20, 5)
        await wait_until(lambda: eb.status()["exporters"] == ["cloud-2"], timeout_s=30,
                         what="cloud-2 sees the authority's aggregator dead")
        want = {e: 25 for e in EDGES}
        await wait_until(lambda: _inferences(b) == want, what="b holds the new results",
                         timeout_s=30)
        await wait_until(lambda: eb.lag()[0] == 0, what="b exported every origin",
                         timeout_s=30)
        assert owned_a <= set(eb.status()["owned_origins"])
        report = check_stream(await read_stream(nats.urls, "SYNCFW"),
                              b.node.store.version_vector)
        assert report.ok, str(report)  # every op once, in per-origin order
    finally:
        for ex in exporters:
            await ex.aclose()
        for e in edges:
            await e.close()
        await b.aclose()
        if a_open:
            await a.aclose()
        await nats.__aexit__(None, None, None)
