"""A metered depot's per-chunk fan-out, between real nodes on the in-memory network: each
chunk leaves the depot's uplink at most ``serve_fanout`` times while the trucks share it;
a truck the depot deferred and that no peer can help falls back to the depot after the
hold (never a stall: a WARNING, a metric, the progress say so); the authority halts a
rollout as soon as a canary's rollback arrives, not at its next poll."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncfw import Fleet, Node
from syncfw.mesh import MeshConfig
from syncfw.models import ArtifactConfig, Artifacts, FetchConfig
from syncfw.models.lifecycle import Record, lifecycle_key
from syncfw.models.manifest import ReleaseManifest
from syncfw.models.rollout_ops import authority_loop, rollout_key, start_rollout
from syncfw.testing import SignedFleet, wait_until
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import InMemoryNetwork

SF = SignedFleet(Fleet(fleet_id="fanout", authority="depot"))
SIG = {"inputs": [("x", "float32", (None, 4))], "outputs": [("y", "float32", (None, 2))]}
CHUNK = 16 << 10
FETCH = FetchConfig(piece_timeout_s=5.0, stall_s=30.0, retry_s=0.02, busy_s=0.05, seed_hold_s=1.0)


class Yard:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.net = tmp, MemoryNetwork()
        self.nodes: dict[str, Node] = {}
        self.arts: dict[str, Artifacts] = {}

    async def add(self, nid: str, *, rate: float | None = None, **cfg: float) -> Artifacts:
        node = await Node.open(
            self.tmp / f"{nid}.db", node_id=nid, fleet=SF.fleet, keys=SF.keys(nid)
        )
        mc = MeshConfig.test()
        if rate is not None:
            mc = mc.with_(peer_bytes_per_s=rate, peer_burst_bytes=32 << 10)
        mesh = await node.serve(
            nid, [] if nid == "depot" else ["depot"], config=mc, network=InMemoryNetwork(self.net)
        )
        arts = Artifacts.attach(
            node,
            mesh,
            config=ArtifactConfig(durable=False, fetch=FETCH, advert_every=1, **cfg),  # type: ignore[arg-type]
        )
        self.nodes[nid], self.arts[nid] = node, arts
        return arts

    async def publish(self, data: bytes, version: int = 1) -> ReleaseManifest:
        """The depot publishes ``data`` as release ``version`` of ``inspection``."""
        return await self.arts["depot"].publish(
            data, name="inspection", version=version, key=SF.authority_key, chunk_size=CHUNK,
            **SIG,  # type: ignore[arg-type]
        )

    async def learn(self, nid: str, version: int = 1) -> ReleaseManifest:
        async def known() -> bool:
            return await self.arts[nid].release("inspection", version) is not None

        await wait_until(known, timeout_s=20, what=f"{nid} learns release {version}")
        m = await self.arts[nid].release("inspection", version)
        assert m is not None
        return m

    async def meet(self) -> None:
        ids = set(self.nodes)

        def met() -> bool:
            for a in self.arts.values():
                assert a.mesh is not None
                seen = {m.node_id for m in a.mesh.membership.members.values()}
                if not ids - {a.node.node_id} <= seen:
                    return False
            return True

        await wait_until(met, timeout_s=20, what="every node knows every other")

    def out(self, nid: str) -> int:
        return sum(self.arts[nid].status()["bytes_out"].values())

    async def close(self) -> None:
        for nid in list(self.nodes):
            await self.arts.pop(nid).aclose()
            await self.nodes.pop(nid).close()
        await self.net.aclose()


@pytest.fixture
async def yard(tmp_path: Path) -> AsyncIterator[Yard]:
    y = Yard(tmp_path)
    yield y
    await y.close()


async def test_each_chunk_leaves_a_metered_depot_once_and_the_trucks_share_it(
    yard: Yard,
) -> None:
    n, data = 5, random.Random(1).randbytes(12 * CHUNK)
    # a hold longer than the test: the depot never serves a chunk twice, however slow
    # the adverts are on a loaded box (the trucks wait for each other instead)
    await yard.add("depot", rate=2e6, serve_fanout=1, serve_hold_s=120.0)
    for i in range(n):
        await yard.add(f"t{i}")
    await yard.meet()
    m = await yard.publish(data)
    ms = [await yard.learn(f"t{i}") for i in range(n)]
    got = await asyncio.wait_for(
        asyncio.gather(*(yard.arts[f"t{i}"].fetch(mm) for i, mm in enumerate(ms))), 60
    )
    for i, p in enumerate(got):
        assert p.done and await yard.arts[f"t{i}"].read(m) == data
        assert "depot" not in p.skipped  # "busy" is no lie and no link failure
        assert p.fallbacks == 0
    # alone, every truck would pull every chunk from the depot: n copies; here one
    assert yard.out("depot") <= len(data), yard.out("depot") / len(data)
    assert sum(p.by_peer.get("depot", 0) for p in got) == yard.out("depot")
    assert sum(sum(v for k, v in p.by_peer.items() if k != "depot") for p in got) >= (n - 1) * len(
        data
    )
    deferred = (await yard.nodes["depot"].status())["artifacts"]["deferred"]
    assert sum(deferred.values()) > 0  # the others were told to wait for their peers


async def test_a_truck_no_peer_can_help_falls_back_to_the_depot_after_the_hold(
    yard: Yard, caplog: pytest.LogCaptureFixture
) -> None:
    data = random.Random(2).randbytes(6 * CHUNK)
    await yard.add("depot", rate=4e6, serve_fanout=1, serve_hold_s=1.5)
    await yard.add("t0")
    await yard.add("t1")
    await yard.meet()
    await yard.publish(data)
    m0, m1 = await yard.learn("t0"), await yard.learn("t1")
    yard.net.partition("t0", "t1")  # t1 cannot reach the truck that took every chunk
    assert (await yard.arts["t0"].fetch(m0)).by_peer == {"depot": len(data)}
    with caplog.at_level(logging.WARNING, logger="syncfw.models"):
        p = await asyncio.wait_for(yard.arts["t1"].fetch(m1), 60)
    assert p.done and await yard.arts["t1"].read(m1) == data
    # the depot deferred what it had just sent t0, then served t1 once the hold was over
    assert p.by_peer.get("depot") == len(data)
    assert p.fallbacks > 0 and "depot" not in p.skipped
    assert any("deferred it as busy" in r.getMessage() for r in caplog.records)
    st = (await yard.nodes["t1"].status())["artifacts"]
    assert st["seed_fallbacks"].get("depot", 0) == p.fallbacks
    assert st["fetches"]["inspection:1"]["seed_fallbacks"] == p.fallbacks
    assert sum((await yard.nodes["depot"].status())["artifacts"]["deferred"].values()) > 0


async def test_an_unmetered_node_serves_every_caller(yard: Yard) -> None:
    data = random.Random(3).randbytes(4 * CHUNK)
    await yard.add("depot", serve_fanout=1, serve_hold_s=120.0)  # no budget: a LAN node
    for i in range(3):
        await yard.add(f"t{i}")
    await yard.meet()
    await yard.publish(data)
    for i in range(3):
        yard.net.partition(f"t{i}", f"t{(i + 1) % 3}")  # no truck can reach another
        yard.net.partition(f"t{i}", f"t{(i + 2) % 3}")
    for i in range(3):
        p = await yard.arts[f"t{i}"].fetch(await yard.learn(f"t{i}"))
        assert p.by_peer == {"depot": len(data)} and p.fallbacks == 0
    assert sum((await yard.nodes["depot"].status())["artifacts"]["deferred"].values()) == 0


async def test_the_authority_halts_as_soon_as_a_canary_rollback_arrives(yard: Yard) -> None:
    await yard.add("depot")
    await yard.add("t0")
    await yard.meet()
    depot, t0 = yard.nodes["depot"], yard.nodes["t0"]
    await start_rollout(depot, "inspection", 3, stages=(100,), gate="accuracy>=-0.02")
    # a poll far longer than the test: only the arriving record can wake the authority
    loop = asyncio.create_task(authority_loop(depot, every_s=3600))
    try:
        await asyncio.sleep(0.2)  # its first pass: nothing to halt
        assert await depot.get(f"{rollout_key('inspection', 3)}/halt") is None
        await t0.put(
            lifecycle_key("t0", "inspection"),
            Record(
                "inspection", "rolled_back", 3, "00" * 32, serving_version=2, reason="gate"
            ).value(),
        )

        async def halted() -> bool:
            return await t0.get(f"{rollout_key('inspection', 3)}/halt") is not None

        await wait_until(halted, timeout_s=30, what="the halt reaches the canary")
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_a_taker_asked_for_a_chunk_on_its_way_sends_it_once_it_lands(yard: Yard) -> None:
    data = random.Random(4).randbytes(6 * CHUNK)
    # a slow metered depot: past its 32 KiB burst, each 16 KiB chunk takes half a second
    await yard.add("depot", rate=32e3, serve_fanout=1, serve_hold_s=120.0)
    await yard.add("t0")
    await yard.add("t1")
    await yard.meet()
    await yard.publish(data)
    m = await yard.learn("t0")
    fetching = asyncio.create_task(yard.arts["t0"].fetch(m))
    f0 = yard.arts["t0"].fetcher
    assert f0 is not None

    def on_its_way() -> bool:  # past the burst: a chunk being metered out of the depot
        return len(list(yard.arts["t0"].store.held(m))) >= 2 and any(
            d in f0.inflight for d in m.chunks
        )

    await wait_until(on_its_way, timeout_s=20, what="t0 fetching a chunk from the depot")
    digest = next(d for d in m.chunks if d in f0.inflight)
    assert not yard.arts["t0"].store.has(digest)
    net = yard.arts["t1"].mesh.network  # type: ignore[union-attr]
    got = b""
    async for piece in net.fetch(  # type: ignore[union-attr]
        "t0", [digest], source="t1", node_id="t1", timeout_s=20.0
    ):
        assert not piece.missing  # it waited for the chunk to land, then sent it
        got += piece.data
    assert hashlib.sha256(got).digest() == digest
    await asyncio.wait_for(fetching, 30)
