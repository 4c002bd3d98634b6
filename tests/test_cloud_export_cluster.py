"""The export against a real 3-server JetStream cluster (R3 stream) on loopback: one server
killed mid-export, then the exporter's own server, both restarted; the stream then holds
every op exactly once, in per-origin order, while writes went on throughout."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats
import pytest

from syncfw import Fleet, Node
from syncfw.cloud.export import ExportConfig, Exporter
from syncfw.cloud.export_check import check_stream, read_stream
from syncfw.cloud.export_servers import NatsCluster
from syncfw.testing import wait_until

FLEET = Fleet(fleet_id="cluster-test", authority="cloud")


async def _writer(node: Node, stop: asyncio.Event, every_s: float, per: int) -> None:
    i = 0
    while not stop.is_set():
        await node.put_many([(f"fleet/cloud/live{i + j}", i + j) for j in range(per)])
        i += per
        await asyncio.sleep(every_s)


async def _run_fault_story(tmp_path: Path, edges: int, backlog: int, rounds: int) -> None:
    node = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    for e in range(edges):
        edge = await Node.open(tmp_path / f"e{e}.db", node_id=f"edge-{e}", fleet=FLEET)
        await edge.put_many([(f"fleet/edge-{e}/k{i}", i) for i in range(backlog)])
        await node.apply_remote(await edge.ops_since({}))
        await edge.close()
    stop = asyncio.Event()
    writer: asyncio.Task[None] | None = None
    async with NatsCluster(tmp_path / "nats", 3) as cluster:
        cfg = ExportConfig.test(cluster.urls, replicas=3, batch_ops=200, ack_timeout_s=2.0)
        try:
            async with Exporter(node, cfg) as ex:
                writer = asyncio.create_task(_writer(node, stop, 0.02, 5))
                total = edges * backlog
                for r in range(rounds):
                    await wait_until(lambda r=r: ex.stats.stored >= total * (r + 1) // (rounds * 3),
                                     timeout_s=60, what="export under way")
                    current = cluster.index_of(ex.connected_url or cluster.urls[0])
                    other = (current + 1) % 3
                    cluster.kill(other)  # one server dies mid-export: quorum holds
                    seen = ex.stats.stored
                    await wait_until(lambda seen=seen: ex.stats.stored > seen + 100, timeout_s=60,
                                     what="export goes on with two servers")
                    failures = ex.stats.failures
                    cluster.kill(current)  # then the exporter's own server: no quorum
                    await wait_until(lambda f=failures: ex.stats.failures > f, timeout_s=30,
                                     what="the outage is seen")
                    st = ex.status()
                    assert st["state"] == "unavailable" and st["last_error"]
                    await cluster.restart(other)
                    await cluster.restart(current)
                    await wait_until(lambda: ex.state == "exporting" and ex.stats.last_ack_at
                                     is not None, timeout_s=60, what="export resumes")
                stop.set()
                await writer
                await wait_until(lambda: ex.lag()[0] == 0, timeout_s=120, what="caught up")
                assert ex.cursor == dict(node.store.version_vector)
            nc = await nats.connect(cluster.urls)
            info = await nc.jetstream().stream_info("SYNCFW")
            await nc.close()
            assert info.config.num_replicas == 3
            ops = await read_stream(cluster.urls, "SYNCFW")
            rep = check_stream(ops, node.store.version_vector)
            assert rep.ok, str(rep)
            assert rep.messages == sum(node.store.version_vector.values())
        finally:
            stop.set()
            if writer is not None:
                with contextlib.suppress(Exception):
                    await writer
            await node.close()


async def test_cluster_server_deaths_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    await _run_fault_story(tmp_path, edges=3, backlog=400, rounds=1)


@pytest.mark.slow
async def test_cluster_repeated_server_deaths_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    await _run_fault_story(tmp_path, edges=8, backlog=2000, rounds=3)
