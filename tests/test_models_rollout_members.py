"""The authority counts a stage's members, not whoever reported: real nodes on the
in-memory network (SQLite files, gossip). A node enrols when it first looks at its
rollouts; the authority's loop then waits for it in the stage its hash puts it in, stops
waiting once it leaves, and halts a rollout that is already done on a late rollback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from syncfw import Fleet, Grant, Node
from syncfw.inference.engine import Engine
from syncfw.mesh import MeshConfig
from syncfw.models import Artifacts
from syncfw.models.lifecycle import Lifecycle, Record, lifecycle_key, member_key
from syncfw.models.rollout import Verdict, bucket
from syncfw.models.rollout_ops import advance, members_of, read_rollout, start_rollout, step
from syncfw.testing import SignedFleet, wait_until
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import InMemoryNetwork

SF = SignedFleet(Fleet(fleet_id="mb", authority="depot", grants=(Grant.of("site/", "*"),)))
TRUCKS = ("t3", "t0", "t1")  # buckets 2, 8, 86: t3 and t0 are in a 10 % stage
STAGES = (10, 100)


class Yard:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.net = tmp, MemoryNetwork()
        self.nodes: dict[str, Node] = {}
        self.arts: dict[str, Artifacts] = {}
        self.lcs: dict[str, Lifecycle] = {}
        self.engines: list[Engine] = []

    async def add(self, nid: str) -> None:
        node = await Node.open(
            self.tmp / f"{nid}.db", node_id=nid, fleet=SF.fleet, keys=SF.keys(nid)
        )
        mesh = await node.serve(
            nid,
            [] if nid == "depot" else ["depot"],
            config=MeshConfig.test(),
            network=InMemoryNetwork(self.net),
        )
        self.nodes[nid] = node
        self.arts[nid] = Artifacts.attach(node, mesh)
        if nid != "depot":
            eng = Engine(node)
            self.engines.append(eng)
            self.lcs[nid] = Lifecycle(node, self.arts[nid], eng, "inspection")

    async def close(self) -> None:
        for e in self.engines:
            await e.aclose()
        for nid in list(self.nodes):
            await self.arts[nid].aclose()
            await self.nodes[nid].close()
        await self.net.aclose()


@pytest.fixture
async def yard(tmp_path: Path) -> AsyncIterator[Yard]:
    y = Yard(tmp_path)
    for nid in ("depot", *TRUCKS):
        await y.add(nid)
    yield y
    await y.close()


async def depot_sees(y: Yard, key: str, want: object = True) -> None:
    async def there() -> bool:
        got = await y.nodes["depot"].get(key)
        return got is not None and (
            want is True
            or got == want
            or (isinstance(got, dict) and isinstance(want, dict) and want.items() <= got.items())
        )

    await wait_until(there, timeout_s=20, what=f"the depot sees {key}")


async def report(y: Yard, nid: str, step_: str, version: int = 1) -> None:
    key = lifecycle_key(nid, "inspection")
    await y.nodes[nid].put(
        key,
        Record(
            "inspection",
            step_,
            version,
            "00" * 32,
            serving_version=version,
            accuracy_delta=0.0,
            reason="test",
        ).value(),
    )
    await depot_sees(y, key, {"step": step_, "version": version})


async def test_stages_wait_for_members_and_a_done_rollout_still_halts(yard: Yard) -> None:
    assert [bucket(t) < 10 for t in TRUCKS] == [True, True, False]
    depot = yard.nodes["depot"]
    await start_rollout(depot, "inspection", 1, stages=STAGES, gate="accuracy>=-0.02")
    # nobody enrolled yet: the rollout waits (it used to promote an empty stage at once)
    d = (await advance(depot))[("inspection", 1)]
    assert d.verdict is Verdict.WAIT and "no node" in d.reason
    # each truck enrols the first time it looks at its rollouts (no release held: it
    # runs nothing)
    for t in TRUCKS:
        await step(yard.lcs[t])
        await depot_sees(yard, member_key(t, "inspection"), {"runs": True})
    assert await members_of(depot, "inspection") == set(TRUCKS)
    d = (await advance(depot))[("inspection", 1)]
    assert d.verdict is Verdict.WAIT and set(d.blocking) == {"t3", "t0"}
    # one canary reports: the other member of the stage, silent, holds it
    await report(yard, "t3", "committed")
    d = (await advance(depot))[("inspection", 1)]
    assert d.verdict is Verdict.WAIT and d.blocking == ("t0",) and "1 of 2" in d.reason
    ro = await read_rollout(depot, "inspection", 1)
    assert ro is not None and ro.stage == 0
    # t0 is taken out of service: the stage no longer waits for it
    await yard.lcs["t0"].leave()
    await depot_sees(yard, member_key("t0", "inspection"), {"runs": False})
    assert await members_of(depot, "inspection") == {"t3", "t1"}
    d = (await advance(depot))[("inspection", 1)]
    assert d.verdict is Verdict.PROMOTE and d.next_stage == 1
    d = (await advance(depot))[("inspection", 1)]
    assert d.verdict is Verdict.WAIT and d.blocking == ("t1",)
    await report(yard, "t1", "committed")
    assert (await advance(depot))[("inspection", 1)].verdict is Verdict.DONE
    ro = await read_rollout(depot, "inspection", 1)
    assert ro is not None and ro.done and not ro.halted
    assert (await advance(depot))[("inspection", 1)].verdict is Verdict.DONE
    # a late regression (t1's watch window, after the last stage passed) halts it
    await report(yard, "t1", "rolled_back")
    d = (await advance(depot))[("inspection", 1)]
    assert d.verdict is Verdict.HALT and "t1" in d.reason
    ro = await read_rollout(depot, "inspection", 1)
    assert ro is not None and ro.halted and ro.done and "t1" in ro.halt_reason

    async def halted_on_t0() -> bool:
        r = await read_rollout(yard.nodes["t0"], "inspection", 1)
        return r is not None and r.halted and not r.runs("t0")

    await wait_until(halted_on_t0, timeout_s=20, what="t0 learns the halt")
    assert (await advance(depot))[("inspection", 1)].verdict is Verdict.HALT
