"""Rollouts as ops between real nodes on the in-memory network, each running the lifecycle
on ONNX Runtime: a good release goes to its canary stage, is promoted by the authority's
loop and reaches every node; the bad variant is rolled back on its canary node, the
authority halts the rollout, and the other nodes, learning the halt op, never run it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from syncfw import Fleet, Grant, Node
from syncfw.inference.engine import Engine
from syncfw.inference.train import MODEL_PATH
from syncfw.mesh import MeshConfig
from syncfw.models import ArtifactConfig, Artifacts, FetchConfig
from syncfw.models.lifecycle import Lifecycle, LifecycleConfig, read_records
from syncfw.models.rollout import Verdict, bucket
from syncfw.models.rollout_ops import advance, read_rollout, start_rollout, step
from syncfw.testing import SignedFleet, wait_until
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import InMemoryNetwork

SF = SignedFleet(Fleet(fleet_id="ro", authority="depot", grants=(Grant.of("site/", "*"),)))
TRUCKS = ("t3", "t0", "t1")  # buckets 2, 8, 86: only t3 is in a 5 % stage
CHUNK = 16 << 10
GATE = "accuracy>=-0.02,error_rate<=0.01,p99_ms<=500"


class Fleet3:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.net = tmp, MemoryNetwork()
        self.nodes: dict[str, Node] = {}
        self.arts: dict[str, Artifacts] = {}
        self.lcs: dict[str, Lifecycle] = {}
        self.engines: list[Engine] = []

    async def add(self, nid: str) -> None:
        node = await Node.open(self.tmp / f"{nid}.db", node_id=nid, fleet=SF.fleet,
                               keys=SF.keys(nid))
        mesh = await node.serve(nid, [] if nid == "depot" else ["depot"],
                                config=MeshConfig.test(), network=InMemoryNetwork(self.net))
        arts = Artifacts.attach(node, mesh, config=ArtifactConfig(
            durable=False, fetch=FetchConfig(piece_timeout_s=0.5, stall_s=3.0, retry_s=0.02)))
        self.nodes[nid], self.arts[nid] = node, arts
        if nid != "depot":
            eng = Engine(node)
            self.engines.append(eng)
            self.lcs[nid] = Lifecycle(node, arts, eng, "inspection", LifecycleConfig(
                window_s=0.1, check_every_s=0.05))

    async def close(self) -> None:
        for e in self.engines:
            await e.aclose()
        for nid in list(self.nodes):
            await self.arts[nid].aclose()
            await self.nodes[nid].close()
        await self.net.aclose()


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet3]:
    f = Fleet3(tmp_path)
    for nid in ("depot", *TRUCKS):
        await f.add(nid)
    yield f
    await f.close()


async def sees(node: Node, key: str) -> None:
    async def there() -> bool:
        return await node.get(key) is not None

    await wait_until(there, timeout_s=20, what=f"{node.node_id} sees {key}")


async def reported(f: Fleet3, version: int, nodes: tuple[str, ...]) -> None:
    async def all_in() -> bool:
        recs = await read_records(f.nodes["depot"], "inspection")
        return all(n in recs and recs[n].version == version and recs[n].step in (
            "committed", "rolled_back", "failed") for n in nodes)

    await wait_until(all_in, timeout_s=30, what=f"reports of v{version} from {nodes}")


async def test_a_good_release_is_promoted_stage_by_stage_and_a_bad_one_halts(
    fleet: Fleet3,
) -> None:
    assert [bucket(t) < 5 for t in TRUCKS] == [True, False, False]
    depot = fleet.nodes["depot"]
    key = SF.authority_key
    good = MODEL_PATH.read_bytes()
    bad = MODEL_PATH.with_name("inspection_bad.onnx").read_bytes()
    await fleet.arts["depot"].publish(good, name="inspection", version=1, key=key,
                                      chunk_size=CHUNK)
    await start_rollout(depot, "inspection", 1, stages=(5, 100), gate=GATE)
    for t in TRUCKS:
        await sees(fleet.nodes[t], "sys/rollouts/inspection/1")
        await sees(fleet.nodes[t], "sys/models/inspection/1")
    # stage 0: only the canary node runs it
    for t in TRUCKS:
        await step(fleet.lcs[t])
    assert fleet.lcs["t3"].record is not None and fleet.lcs["t3"].record.step == "committed"
    assert fleet.lcs["t0"].record is None and fleet.lcs["t1"].record is None
    await reported(fleet, 1, ("t3",))
    d = await advance(depot)
    assert d[("inspection", 1)].verdict is Verdict.PROMOTE
    for t in TRUCKS:
        await sees(fleet.nodes[t], "sys/rollouts/inspection/1/stage")
        await step(fleet.lcs[t])
    await reported(fleet, 1, TRUCKS)
    assert (await advance(depot))[("inspection", 1)].verdict is Verdict.DONE
    assert all(fleet.lcs[t].record.serving_version == 1 for t in TRUCKS)  # type: ignore[union-attr]

    # the bad variant: caught on its canary node, rolled back, the rollout halted
    await fleet.arts["depot"].publish(bad, name="inspection", version=2, key=key,
                                      chunk_size=CHUNK)
    await start_rollout(depot, "inspection", 2, stages=(5, 100), gate=GATE)
    for t in TRUCKS:
        await sees(fleet.nodes[t], "sys/rollouts/inspection/2")
    for t in TRUCKS:
        await step(fleet.lcs[t])
    r3 = fleet.lcs["t3"].record
    assert r3 is not None and r3.step == "rolled_back" and "accuracy" in r3.reason
    await reported(fleet, 2, ("t3",))
    d = (await advance(depot))[("inspection", 2)]
    assert d.verdict is Verdict.HALT and "t3" in d.reason
    for t in TRUCKS:
        await sees(fleet.nodes[t], "sys/rollouts/inspection/2/halt")
        ro = await read_rollout(fleet.nodes[t], "inspection")
        assert ro is not None and ro.halted and not ro.runs(t)
        await step(fleet.lcs[t])
    # nobody else ran it; every node still serves v1
    for t in ("t0", "t1"):
        rec = fleet.lcs[t].record
        assert rec is not None and (rec.version, rec.serving_version) == (1, 1)
    assert (await advance(depot))[("inspection", 2)].verdict is Verdict.HALT
    assert await depot.get("sys/rollouts/inspection/2/stage") is None
