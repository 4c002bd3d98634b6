"""examples/jetstream_consumer.py against a real nats-server: a durable JetStream consumer
rebuilds the fleet's state from the exported stream, equal to the aggregator's state digest,
resuming where it stopped; a rejected op travels as rejected and is judged the same."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from syncfw import Fleet, Grant, Node
from syncfw.cloud import Aggregator, AggregatorConfig
from syncfw.cloud.export import ExportConfig, Exporter
from syncfw.cloud.export_servers import NatsCluster
from syncfw.log import GENESIS, Op, encode_value
from syncfw.testing import wait_until

FLEET = Fleet(fleet_id="consumer-test", authority="cloud", grants=(Grant.of("site/", "*"),))
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "jetstream_consumer.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("jetstream_consumer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


async def test_a_durable_consumer_rebuilds_the_aggregators_state(tmp_path: Path) -> None:
    consumer = _example()
    agg = await Aggregator.open(tmp_path / "cloud.db", fleet=FLEET, config=AggregatorConfig.test())
    try:
        for e in range(3):
            edge = await Node.open(tmp_path / f"e{e}.db", node_id=f"t{e}", fleet=FLEET)
            await edge.put_many([(f"fleet/t{e}/k{i}", {"i": i}) for i in range(150)])
            await edge.counter("site/tonnes").add(e + 1)
            await edge.set("site/alerts").add(f"a{e}")
            await edge.put(f"results/t{e}/inspection/1", {"label": "ok", "latency_ms": {"total": 3}})
            await agg.node.apply_remote(await edge.ops_since({}))
            await edge.close()
        # a forged op: t0's zone written by "rogue": rejected, and exported as such
        rogue = Op("rogue", 1, agg.node.wall_ms() << 16, "fleet/t0/", 0, "fleet/t0/k1", "lww",
                   encode_value("forged"), GENESIS)
        res = await agg.node.apply_remote([rogue])
        assert res.rejected == 1
        await agg.node.put("sys/note", "from the authority")
        async with NatsCluster(tmp_path / "nats", 1) as nats1:
            async with Exporter.for_aggregator(agg, ExportConfig.test(nats1.urls)) as ex:
                await wait_until(lambda: ex.lag()[0] == 0, what="exported")
                total = sum(agg.node.store.version_vector.values())
                assert ex.stats.stored == total
            want = await agg.node.state_digest()
            # a first run stops part-way; the durable consumer resumes it
            first = await consumer.rebuild(nats1.urls, tmp_path / "replica.db", FLEET,
                                           batch=100, limit=200, idle_s=0.5)
            assert first.messages == 200 and first.digest != want
            second = await consumer.rebuild(nats1.urls, tmp_path / "replica.db", FLEET,
                                            batch=100, idle_s=0.5)
            assert second.messages == total - 200
            assert second.digest == want
            assert second.version_vector == dict(agg.node.store.version_vector)
            replica = await Node.open(tmp_path / "replica.db", node_id="jetstream-replica",
                                      fleet=FLEET)
            try:
                assert [r[:2] for r in await replica.store.rejected()] == [("rogue", 1)]
                assert await replica.get("fleet/t0/k1") == {"i": 1}
            finally:
                await replica.close()
    finally:
        await agg.aclose()


def test_the_example_runs_as_a_script(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True,
                         text=True, check=True, timeout=60)
    assert "--nats" in out.stdout and "--durable" in out.stdout
