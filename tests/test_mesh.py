"""Mesh: membership, failure handling, budgets, presets, gossip rounds, the model view."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncfw.mesh import (
    Membership,
    MemberState,
    Mesh,
    MeshConfig,
    ModelStatus,
    TokenBucket,
    fleet_model_view,
    model_key,
    model_value,
    read_fleet_models,
)
from syncfw.node import Node
from syncfw.sync import PeerInfo
from syncfw.testing import MemoryReplica, wait_until
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import InMemoryNetwork

# -- membership (pure) --------------------------------------------------------------


def test_membership_learns_from_gossip_and_ignores_itself() -> None:
    m = Membership("a", "addr-a", ["addr-b"])
    assert [x.address for x in m.members.values()] == ["addr-b"]
    new = m.merge([PeerInfo("a", "addr-a", 9), PeerInfo("c", "addr-c", 1)], now=0)
    assert [x.node_id for x in new] == ["c"]
    assert "addr-a" not in m.members
    assert m.gossip()[0] == PeerInfo("a", "addr-a", 0)


def test_suspect_then_dead_then_revived() -> None:
    m = Membership("a", "A", ["B"], suspect_after=2, dead_after_s=10, dead_retry_s=5)
    m.succeeded("B", "b", now=0)
    assert m.failed("B", now=1) is MemberState.ALIVE
    assert m.failed("B", now=2) is MemberState.SUSPECT
    m.tick(now=11)
    assert m.members["B"].state is MemberState.SUSPECT
    m.tick(now=12)
    assert m.members["B"].state is MemberState.DEAD
    assert m.live() == []
    rng = random.Random(1)
    assert [x.address for x in m.pick(3, rng, now=13)] == ["B"]  # due a retry
    assert m.failed("B", now=13) is MemberState.DEAD
    assert [x.address for x in m.pick(3, rng, now=15)] == []  # retried only every 5 s
    assert [x.address for x in m.pick(3, rng, now=18.5)] == ["B"]
    # fresher gossip about b (a higher heartbeat) may predate its failure: it marks b
    # for a probe, and the probe decides
    m.merge([PeerInfo("b", "B", 5)], now=20)
    assert m.members["B"].state is MemberState.DEAD
    assert m.members["B"].recheck
    assert [x.address for x in m.probe_targets(set(), rng)] == ["B"]
    m.heard("B", "b", now=20.5)  # the probe reached it
    assert m.members["B"].state is MemberState.ALIVE
    assert not m.members["B"].recheck
    assert [(t.old, t.new) for t in m.drain()] == [
        (MemberState.ALIVE, MemberState.SUSPECT),
        (MemberState.SUSPECT, MemberState.DEAD),
        (MemberState.DEAD, MemberState.ALIVE),
    ]
    m.failed("B", now=21)
    m.failed("B", now=22)
    m.succeeded("B", "b", now=23)
    assert m.members["B"].state is MemberState.ALIVE


def test_pick_is_seeded_and_bounded_by_fanout() -> None:
    m = Membership("a", "A")
    m.merge([PeerInfo(f"n{i}", f"N{i}", 1) for i in range(10)], now=0)
    one = [x.address for x in m.pick(3, random.Random(7), now=0)]
    two = [x.address for x in m.pick(3, random.Random(7), now=0)]
    assert one == two
    assert len(one) == 3


# -- budget and presets -----------------------------------------------------------


async def test_token_bucket_paces_sends() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    b = TokenBucket(1000, 500, clock=lambda: now[0], sleep=fake_sleep)
    await b.spend(500)
    assert slept == []
    await b.spend(250)
    assert slept == [pytest.approx(0.25)]
    await b.spend(2000)  # bigger than the burst: waits for a full bucket, then goes
    assert sum(slept) == pytest.approx(0.75)
    assert b.spent == 2750


def test_presets() -> None:
    lan, metered, test = MeshConfig.lan(), MeshConfig.metered_link(), MeshConfig.test()
    assert metered.peer_bytes_per_s is not None
    assert lan.peer_bytes_per_s is None
    assert metered.interval_s > lan.interval_s > test.interval_s
    assert metered.fanout == 1
    assert metered.session.max_batch_bytes < lan.session.max_batch_bytes
    assert test.with_(fanout=5).fanout == 5
    with pytest.raises(ValueError, match="fanout"):
        MeshConfig(fanout=0)


# -- gossip over the in-memory network ------------------------------------------------


async def _mesh_of(
    n: int, net: MemoryNetwork, **kw: object
) -> tuple[list[MemoryReplica], list[Mesh]]:
    replicas = [MemoryReplica(f"n{i}") for i in range(n)]
    meshes: list[Mesh] = []
    for i, r in enumerate(replicas):
        meshes.append(
            await Mesh.start(
                r,
                listen=f"n{i}",
                seeds=["n0"] if i else [],
                network=InMemoryNetwork(net),
                config=MeshConfig.test().with_(**kw),
                seed=i,
                run_loop=False,
            )
        )
    return replicas, meshes


def _converged(replicas: list[MemoryReplica]) -> bool:
    return all(r.vv() == replicas[0].vv() and r.state == replicas[0].state for r in replicas)


async def test_gossip_rounds_converge_in_logarithmic_rounds() -> None:
    net = MemoryNetwork()
    replicas, meshes = await _mesh_of(16, net, fanout=2)
    for r in replicas:
        r.put(f"fleet/{r.node_id}/x", r.node_id)
    rounds = 0
    while not _converged(replicas):
        rounds += 1
        assert rounds < 20, "no convergence in 20 rounds"
        for m in meshes:
            await m.round()
    assert rounds <= 10
    # everybody learned the whole yard from one seed
    assert all(len(m.membership.members) == 15 for m in meshes)
    for m in meshes:
        await m.aclose()
    await net.aclose()


async def test_a_dead_peer_is_suspected_declared_dead_and_noticed_again() -> None:
    net = MemoryNetwork()
    replicas, meshes = await _mesh_of(3, net, fanout=2, suspect_after=1, dead_after_s=0.0)
    for _ in range(2):
        for m in meshes:
            await m.round()
    assert "n2" in meshes[1].membership.members
    a = meshes[1]
    assert all(x.state is MemberState.ALIVE for x in a.members())
    net.unlisten("n2")
    await a.sync_with("n2")
    a.membership.tick(1e12)
    assert a.membership.members["n2"].state is MemberState.DEAD
    # the others keep serving while one is down
    replicas[1].put("fleet/n1/during", 1)
    assert (await a.sync_with("n0")).ok
    net.listen("n2", meshes[2]._serve)
    a.membership.members["n2"].last_try = None  # due a retry
    await a.round()
    assert a.membership.members["n2"].state is MemberState.ALIVE
    for m in meshes:
        await m.aclose()


async def test_running_loop_with_eager_push_over_grpc() -> None:
    replicas = [MemoryReplica(f"g{i}") for i in range(3)]
    cfg = MeshConfig.test().with_(interval_s=5.0)  # rounds are rare: only a push is fast
    first = await Mesh.start(replicas[0], config=cfg, seed=0)
    meshes = [first]
    for i in (1, 2):
        meshes.append(await Mesh.start(replicas[i], seeds=[first.address], config=cfg, seed=i))
    try:
        for m in meshes[1:]:  # each introduces itself to the seed once
            assert (await m.sync_with(first.address)).ok
        replicas[0].put("fleet/g0/fresh", 42)
        first.poke()
        await wait_until(
            lambda: all(r.get("fleet/g0/fresh") == 42 for r in replicas),
            what="the pushed write on every replica",
        )
    finally:
        for m in meshes:
            await m.aclose()


async def test_changes_feed_triggers_push() -> None:
    net = MemoryNetwork()
    a, b = MemoryReplica("a"), MemoryReplica("b")
    queue: asyncio.Queue[object] = asyncio.Queue()
    a.listeners.append(lambda ops: [queue.put_nowait(op) for op in ops])

    def changes() -> AsyncIterator[object]:
        async def gen() -> AsyncIterator[object]:
            while True:
                yield await queue.get()

        return gen()

    cfg = MeshConfig.test().with_(interval_s=30.0)
    mb = await Mesh.start(b, listen="b", network=InMemoryNetwork(net), config=cfg)
    ma = await Mesh.start(
        a, listen="a", seeds=["b"], network=InMemoryNetwork(net), config=cfg, changes=changes
    )
    try:
        assert (await ma.sync_with("b")).ok
        a.put("fleet/a/k", "v")
        await wait_until(lambda: b.get("fleet/a/k") == "v", what="the change-feed push to reach b")
    finally:
        await ma.aclose()
        await mb.aclose()


async def test_mesh_with_real_nodes(tmp_path: Path) -> None:
    from syncfw.zones import Fleet

    fleet = Fleet(fleet_id="f")
    nodes = [await Node.open(tmp_path / f"{i}.db", node_id=f"r{i}", fleet=fleet) for i in range(3)]
    net = MemoryNetwork()
    meshes = [
        await Mesh.start(
            n,
            listen=f"r{i}",
            seeds=["r0"],
            network=InMemoryNetwork(net),
            config=MeshConfig.test(),
            seed=i,
            run_loop=False,
        )
        for i, n in enumerate(nodes)
    ]
    try:
        for i, n in enumerate(nodes):
            await n.put(
                f"fleet/r{i}/model", model_value(ModelStatus("det", f"1.{i % 2}", "ab" * 32))
            )

        async def converged() -> bool:
            digests = {await n.state_digest() for n in nodes}
            return len(digests) == 1

        for _ in range(6):
            for m in meshes:
                await m.round()
            if await converged():
                break
        assert await converged()
        view = await read_fleet_models(nodes[2])
        assert set(view.nodes) == {"r0", "r1", "r2"}
        assert view.majority == ("det", "1.0")
    finally:
        for m in meshes:
            await m.aclose()
        for n in nodes:
            await n.close()


def test_fleet_model_view_majority_and_bad_entries() -> None:
    state = {
        model_key("a"): model_value(ModelStatus("det", "2", "x")),
        model_key("b"): model_value(ModelStatus("det", "2", "x")),
        model_key("c"): model_value(ModelStatus("det", "1", "y")),
        model_key("d"): model_value(ModelStatus("det", "3", "z", status="rolled_back")),
        "fleet/e/model": "garbage",
        "fleet/f/model": {"name": "det"},
        "fleet/g/other": {},
    }
    view = fleet_model_view(state)
    assert sorted(view.nodes) == ["a", "b", "c", "d"]
    assert view.majority == ("det", "2")
    assert view.counts == {("det", "2"): 2, ("det", "1"): 1}
    assert fleet_model_view({}).majority is None


async def test_per_peer_budget_paces_an_exchange() -> None:
    net = MemoryNetwork()
    a, b = MemoryReplica("a"), MemoryReplica("b")
    import os

    for i in range(400):  # 400 KB of hex: about 240 KB on the wire after zstd
        a.put(f"fleet/a/k{i}", os.urandom(500).hex())
    rate = 1_000_000.0
    cfg = MeshConfig.test().with_(peer_bytes_per_s=rate, peer_burst_bytes=32_000)
    mb = await Mesh.start(b, listen="b", network=InMemoryNetwork(net), config=cfg, run_loop=False)
    ma = await Mesh.start(
        a, listen="a", seeds=["b"], network=InMemoryNetwork(net), config=cfg, run_loop=False
    )
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await ma.sync_with("b")
        elapsed = loop.time() - t0
        assert out.ok, out
        assert b.vv() == {"a": 400}
        spent = ma._budgets["b"].spent
        assert spent >= out.bytes_sent > 200_000
        # the bucket lets `burst` through at once, the rest at `rate`
        assert elapsed >= (spent - 32_000) / rate * 0.95
    finally:
        await ma.aclose()
        await mb.aclose()


@pytest.mark.parametrize("seed", range(4))
async def test_mesh_rounds_converge_through_partitions_and_dead_peers(seed: int) -> None:
    rng = random.Random(seed)
    net = MemoryNetwork()
    replicas, meshes = await _mesh_of(
        8, net, fanout=2, suspect_after=1, dead_after_s=0.0, dead_retry_s=0.0
    )
    names = [f"n{i}" for i in range(8)]
    for step in range(30):
        if step % 10 == 2:  # split the yard in two
            cut = set(rng.sample(names, 4))
            for a in cut:
                for b in set(names) - cut:
                    net.partition(a, b)
        if step % 10 == 7:
            net.heal()
        for _ in range(3):
            r = rng.choice(replicas)
            r.put(f"fleet/{r.node_id}/k{step}", step)
        for m in rng.sample(meshes, len(meshes)):
            await m.round()
    net.heal()
    for _ in range(10):
        if _converged(replicas):
            break
        for m in meshes:
            await m.round()
    assert _converged(replicas), f"seed {seed}: no convergence after healing"
    for m in meshes:
        assert all(x.state is MemberState.ALIVE for x in m.members()), m.membership.snapshot()
        await m.aclose()


async def test_push_fanout_limits_eager_pushes() -> None:
    net = MemoryNetwork()
    replicas, meshes = await _mesh_of(5, net, fanout=4, push_fanout=2)
    for _ in range(2):
        for m in meshes:
            await m.round()
    hub = meshes[0]
    assert len([m for m in hub.members() if m.last_ok is not None]) == 4
    replicas[0].put("fleet/n0/pushed", 1)
    outcomes = await hub.push()
    assert len(outcomes) == 2
    assert sum(r.get("fleet/n0/pushed") == 1 for r in replicas[1:]) == 2
    for m in meshes:
        await m.aclose()


async def test_a_push_to_a_busy_peer_is_repeated_when_it_is_free() -> None:
    net = MemoryNetwork()
    replicas, meshes = await _mesh_of(2, net, fanout=1)
    a = meshes[1]
    assert (await a.sync_with("n0")).ok
    a._busy.add("n0")  # an exchange with n0 is running
    replicas[1].put("fleet/n1/late", 1)
    assert await a.push() == []
    assert "n0" in a._again
    a._busy.discard("n0")
    before = a.outcomes.get("OK", 0)
    await a.sync_with("n0")  # the running exchange ends ... and the push follows it
    assert "n0" not in a._again
    await wait_until(
        lambda: not a._spawned and a.outcomes.get("OK", 0) == before + 2,
        what="the repeated push to finish",
    )
    assert replicas[0].get("fleet/n1/late") == 1
    for m in meshes:
        await m.aclose()


async def test_peer_clock_offsets_are_measured_and_a_large_one_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    net = MemoryNetwork()
    base = 1_700_000_000_000
    a = MemoryReplica("a", wall=lambda: base)
    b = MemoryReplica("b", wall=lambda: base + 2_000)  # b's clock runs 2 s ahead
    cfg = MeshConfig.test()
    mb = await Mesh.start(b, listen="b", network=InMemoryNetwork(net), config=cfg, run_loop=False)
    ma = await Mesh.start(
        a, listen="a", seeds=["b"], network=InMemoryNetwork(net), config=cfg, run_loop=False
    )
    try:
        with caplog.at_level(logging.WARNING, logger="syncfw.mesh"):
            assert (await ma.sync_with("b")).ok
        assert ma.status()["clock_offsets_ms"] == {"b": 2_000}
        await wait_until(  # the serving side ends just after
            lambda: mb.clock_offsets_ms == {"a": -2_000}, what="b's measure of a's offset"
        )
        assert any("+2000 ms off" in r.getMessage() for r in caplog.records)
    finally:
        await ma.aclose()
        await mb.aclose()


# -- dialing is bounded by connect_timeout_s ------------------------------------------


async def test_a_dial_gives_up_after_connect_timeout_not_the_exchange_timeout() -> None:
    from syncfw.sync import Status
    from syncfw.transport.base import FrameStream

    class BlackHole(InMemoryNetwork):
        """A network whose dials never complete (a peer behind a dropping firewall)."""

        def __init__(self) -> None:
            super().__init__(MemoryNetwork())
            self.dial_deadlines: list[float] = []

        async def connect(
            self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
        ) -> FrameStream:
            self.dial_deadlines.append(timeout_s)
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    net = BlackHole()
    cfg = MeshConfig.test().with_(
        connect_timeout_s=0.05, exchange_timeout_s=60.0, max_exchange_s=600.0
    )
    mesh = await Mesh.start(
        MemoryReplica("a"), listen=None, seeds=["b"], network=net, config=cfg, run_loop=False
    )
    try:
        async with asyncio.timeout(30):  # bounds a hang only: 60 s would be the bug
            out = await mesh.sync_with("b")
        assert out.status is Status.UNAVAILABLE
        assert out.reason == "b: no connection in 0.05s"
        assert net.dial_deadlines == [600.0]  # the stream's own deadline: the exchange's cap
        assert mesh.membership.members["b"].failures == 1
        assert mesh.outcomes == {}  # no exchange ran
    finally:
        await mesh.aclose()


async def test_node_serve_dials_grpc_with_the_presets_connect_timeout(tmp_path: Path) -> None:
    from syncfw.transport.network import GrpcNetwork
    from syncfw.zones import Fleet

    async with Node.open(tmp_path / "n.db", node_id="n", fleet=Fleet(fleet_id="f")) as node:
        mesh = await node.serve("127.0.0.1:0", config=MeshConfig.metered_link())
        assert isinstance(mesh.network, GrpcNetwork)
        # the channel-ready wait of the pool, not only the mesh's own bound
        assert mesh.network.config.connect_timeout_s == 15.0


async def test_a_member_heard_from_is_dialed_as_the_node_it_said_it_was() -> None:
    """Under mTLS the dial is then bound to that id (the server's certificate must name
    it); the mesh passes it for every member whose Hello it has seen."""
    from syncfw.transport.base import FrameStream

    class Recording(InMemoryNetwork):
        def __init__(self, net: MemoryNetwork) -> None:
            super().__init__(net)
            self.expected: list[str | None] = []

        async def connect(
            self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
        ) -> FrameStream:
            self.expected.append(expect_id)
            return await super().connect(address, source=source, timeout_s=timeout_s)

    net = MemoryNetwork()
    cfg = MeshConfig.test().with_(interval_s=30.0)
    mb = await Mesh.start(MemoryReplica("nb"), listen="b", network=InMemoryNetwork(net), config=cfg)
    rec = Recording(net)
    ma = await Mesh.start(MemoryReplica("na"), listen="a", seeds=["b"], network=rec, config=cfg,
                          run_loop=False)
    try:
        assert (await ma.sync_with("b")).ok
        assert (await ma.sync_with("b")).ok
        assert rec.expected[0] is None  # a seed not yet heard from
        assert rec.expected[-1] == "nb"
    finally:
        await ma.aclose()
        await mb.aclose()
