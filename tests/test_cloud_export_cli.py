"""``syncfw cloud run --nats URL`` as a process: an edge feeds the aggregator over gRPC and its
ops reach the JetStream stream; bad export settings are a clear error (exit 2)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from syncfw import Fleet, Node
from syncfw.cloud.export_check import read_stream
from syncfw.cloud.export_servers import NatsCluster
from syncfw.mesh import MeshConfig
from syncfw.testing import wait_until

FLEET = Fleet(fleet_id="cli-export")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


async def _syncfw(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncfw", *args, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_cloud_run_exports_to_jetstream(tmp_path: Path) -> None:
    async with NatsCluster(tmp_path / "nats", 1) as nats1:
        agg = await _syncfw("cloud", "run", "--db", str(tmp_path / "cloud.db"), "--fleet",
                            FLEET.fleet_id, "--listen", "127.0.0.1:0", "--preset", "test",
                            "--nats", ",".join(nats1.urls), "--nats-stream", "FLEETLOG")
        edge: Node | None = None
        try:
            assert agg.stdout is not None
            lines = []
            while not any(x.startswith("export nats") for x in lines):
                lines.append((await asyncio.wait_for(agg.stdout.readline(), 30)).decode())
            address = next(x for x in lines if x.startswith("listening ")).split()[1]
            assert "stream FLEETLOG" in lines[-1]
            edge = await Node.open(tmp_path / "t1.db", node_id="t1", fleet=FLEET)
            await edge.serve("127.0.0.1:0", [address], config=MeshConfig.test())
            await edge.put_many([(f"results/t1/det/r{i}", {"label": i}) for i in range(25)])

            async def exported() -> bool:
                try:
                    ops = await read_stream(nats1.urls, "FLEETLOG")
                except Exception:
                    return False
                return sorted(o.op.seq for o in ops if o.op.origin == "t1") == list(range(1, 26))

            await wait_until(exported, what="t1's ops in the stream", timeout_s=30,
                             interval_s=0.2)
        finally:
            if edge is not None:
                await edge.close()
            agg.send_signal(signal.SIGTERM)
            await asyncio.wait_for(agg.wait(), 30)
        assert agg.returncode == 0


async def test_bad_export_settings_are_a_clear_error(tmp_path: Path) -> None:
    agg = await _syncfw("cloud", "run", "--db", str(tmp_path / "cloud.db"), "--listen",
                        "127.0.0.1:0", "--preset", "test", "--nats", "nats://127.0.0.1:1",
                        "--nats-stream", "bad.name")
    out, _ = await asyncio.wait_for(agg.communicate(), 60)
    assert agg.returncode == 2 and b"syncfw cloud: stream name 'bad.name'" in out, out
