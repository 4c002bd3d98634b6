"""Failure detection in seconds: probes, indirect probes, deadlines, cleanup, persistence."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

from syncfw.mesh import MemberFile, MemberState, Mesh, MeshConfig, Saved
from syncfw.node import Node
from syncfw.sync import Status
from syncfw.testing import MemoryReplica, wait_until
from syncfw.transport.base import FrameStream
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import GrpcNetwork, InMemoryNetwork
from syncfw.transport.rpc import GrpcServer
from syncfw.zones import Fleet


async def _meshes(
    names: list[str],
    net: MemoryNetwork,
    cfg: MeshConfig,
    network: type[InMemoryNetwork] = InMemoryNetwork,
) -> list[Mesh]:
    out = []
    for i, name in enumerate(names):
        out.append(
            await Mesh.start(
                MemoryReplica(name),
                listen=name,
                seeds=[n for n in names if n != name],
                network=network(net),
                config=cfg,
                seed=i,
                run_loop=False,
            )
        )
    return out


async def _close(meshes: list[Mesh]) -> None:
    for m in meshes:
        await m.aclose()


def _transitions(mesh: Mesh, state: str) -> int:
    return int(mesh.metrics.value("syncfw_peer_transitions_total", state=state))


# -- a peer that takes the TCP handshake and never says hello ------------------------


async def test_a_peer_taking_tcp_but_never_hello_is_suspected_within_the_probe_time() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)  # accept, then say nothing, ever

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    raw = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    cfg = MeshConfig.test().with_(
        interval_s=0.05, probe_timeout_s=0.3, connect_timeout_s=3.0, indirect_probes=0
    )
    t0 = time.monotonic()
    mesh = await Mesh.start(MemoryReplica("a"), seeds=[raw], config=cfg, seed=0)
    try:
        await wait_until(
            lambda: mesh.membership.members[raw].state is not MemberState.ALIVE,
            timeout_s=5.0,
            what="the silent peer suspected",
        )
        elapsed = time.monotonic() - t0
        # probe time plus a round's wait, well before the 3 s connect timeout
        assert elapsed < cfg.probe_timeout_s + 3 * cfg.interval_s + 0.5, elapsed
        assert held, "the raw server never saw a connection"
    finally:
        await mesh.aclose()
        for w in held:
            w.close()
        server.close()


async def test_a_dialed_peer_that_never_sends_its_hello_fails_in_probe_time() -> None:
    net = MemoryNetwork()

    async def mute(stream: FrameStream) -> None:
        await asyncio.sleep(60)  # takes the stream, never answers

    net.listen("b", mute)
    cfg = MeshConfig.test().with_(probe_timeout_s=0.2, exchange_timeout_s=30.0, indirect_probes=0)
    mesh = await Mesh.start(
        MemoryReplica("a"),
        listen="a",
        seeds=["b"],
        network=InMemoryNetwork(net),
        config=cfg,
        run_loop=False,
    )
    try:
        t0 = time.monotonic()
        out = await mesh.sync_with("b")
        assert time.monotonic() - t0 < 2.0
        assert out.status is Status.DEADLINE_EXCEEDED
        assert "no Hello within 0.2s" in out.reason
        # no Hello and nobody to vouch for it: suspect, within the probe time
        assert mesh.membership.members["b"].state is MemberState.SUSPECT
    finally:
        await mesh.aclose()
        await net.aclose()


# -- indirect probes: a cut between two members alone does not flap -------------------


@pytest.mark.parametrize("indirect", [2, 0])
async def test_a_non_transitive_cut_does_not_flap(indirect: int) -> None:
    net = MemoryNetwork()
    cfg = MeshConfig.test().with_(indirect_probes=indirect, dead_after_s=0.2, fanout=2)
    meshes = await _meshes(["n0", "n1", "n2"], net, cfg)
    try:
        for _ in range(2):
            for m in meshes:
                await m.round()
        net.partition("n0", "n1")  # both still reach n2
        for _ in range(10):
            for m in meshes:
                await m.round()
            await asyncio.sleep(0.03)
        a = meshes[0]
        if indirect:
            assert a.membership.members["n1"].state is MemberState.ALIVE
            assert meshes[1].membership.members["n0"].state is MemberState.ALIVE
            assert a.membership.members["n1"].vouched is not None
            assert _transitions(a, "suspect") == 0
            assert _transitions(meshes[1], "suspect") == 0
        else:  # without helpers the same cut makes n1 suspect at once: the test can fail
            assert _transitions(a, "suspect") >= 1
        assert a.membership.members["n2"].state is MemberState.ALIVE
    finally:
        await _close(meshes)


# -- cleanup on every transition to dead ----------------------------------------------


class _Forgetting(InMemoryNetwork):
    forgotten: ClassVar[list[str]] = []

    async def forget(self, address: str) -> None:
        self.forgotten.append(address)


async def test_the_dead_peer_cleanup_runs_however_the_transition_happens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _Forgetting.forgotten = []
    net = MemoryNetwork()
    cfg = MeshConfig.test().with_(dead_after_s=0.3, dead_retry_s=60.0)
    meshes = await _meshes(["n0", "n1", "n2"], net, cfg, _Forgetting)
    a = meshes[0]
    try:
        for m in meshes:
            await m.round()
        net.unlisten("n2")
        with caplog.at_level(logging.INFO, logger="syncfw.mesh"):
            await a.probe("n2")  # direct and indirect fail: suspect
            assert a.membership.members["n2"].state is MemberState.SUSPECT
            await asyncio.sleep(0.35)
            a.start_round()  # n2 goes dead in tick()
            assert a.membership.members["n2"].state is MemberState.DEAD
            net.unlisten("n1")
            a.membership.dead_after_s = 0.0
            await a.sync_with("n1")  # n1 goes dead in failed()
            assert a.membership.members["n1"].state is MemberState.DEAD
        await wait_until(lambda: len(_Forgetting.forgotten) == 2, what="both channels dropped")
        assert sorted(_Forgetting.forgotten) == ["n1", "n2"]
        assert _transitions(a, "dead") == 2
        assert any("n2 is dead" in r.getMessage() for r in caplog.records)
    finally:
        await _close(meshes)


async def test_a_suspect_is_declared_dead_on_time_by_the_running_loop() -> None:
    net = MemoryNetwork()
    cfg = MeshConfig.test().with_(interval_s=5.0, dead_after_s=0.2)  # rounds too rare to do it
    meshes = await _meshes(["n0", "n1"], net, cfg)
    a = meshes[0]
    await a.round()
    a._tasks.append(asyncio.create_task(a._loop()))
    try:
        net.unlisten("n1")
        await a.probe("n1")
        assert a.membership.members["n1"].state is MemberState.SUSPECT
        t0 = time.monotonic()
        await wait_until(
            lambda: a.membership.members["n1"].state is MemberState.DEAD,
            timeout_s=3.0,
            what="the suspect declared dead",
        )
        assert time.monotonic() - t0 < 1.0
    finally:
        await _close(meshes)


# -- rounds and pushes never wait on the slowest peer ---------------------------------


class _Blackhole(InMemoryNetwork):
    """Dials to "hole" never complete; probes of it never answer in time."""

    async def connect(
        self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
    ) -> FrameStream:
        if address == "hole":
            await asyncio.Event().wait()
        return await super().connect(address, source=source, timeout_s=timeout_s)


async def test_rounds_and_pushes_move_on_while_a_peer_hangs() -> None:
    net = MemoryNetwork()
    net.listen("hole", lambda s: asyncio.sleep(60))
    cfg = MeshConfig.test().with_(
        interval_s=0.05, connect_timeout_s=30.0, fanout=2, indirect_probes=0
    )
    b = await Mesh.start(MemoryReplica("b"), listen="b", network=InMemoryNetwork(net), config=cfg)
    ra = MemoryReplica("a")
    a = await Mesh.start(
        ra, listen="a", seeds=["b", "hole"], network=_Blackhole(net), config=cfg, seed=1
    )
    try:
        await wait_until(lambda: "hole" in a._busy, what="a dial to the hole hanging")
        rounds = a.rounds
        ok = a.outcomes.get("OK", 0)
        await wait_until(
            lambda: a.rounds >= rounds + 5 and a.outcomes.get("OK", 0) >= ok + 3,
            timeout_s=5.0,
            what="rounds and exchanges with b going on",
        )
        assert "hole" in a._busy  # still hanging, never waited on
        ra.put("fleet/a/k", 1)
        t0 = time.monotonic()
        tasks = a.start_push()
        assert time.monotonic() - t0 < 0.1
        await asyncio.gather(*tasks)  # b may be mid-exchange: then the push follows it
        await wait_until(
            lambda: b.replica.get("fleet/a/k") == 1,  # type: ignore[attr-defined]
            timeout_s=2.0,
            what="the push reaching b while the hole hangs",
        )
        assert time.monotonic() - t0 < 1.0
    finally:
        await a.aclose()
        await b.aclose()


async def test_pushes_during_an_exchange_coalesce_into_one_more() -> None:
    gate = asyncio.Event()
    dials: list[str] = []

    class Slow(InMemoryNetwork):
        async def connect(
            self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
        ) -> FrameStream:
            dials.append(address)
            await gate.wait()
            return await super().connect(address, source=source, timeout_s=timeout_s)

    net = MemoryNetwork()
    cfg = MeshConfig.test()
    mb = await Mesh.start(
        MemoryReplica("b"), listen="b", network=InMemoryNetwork(net), config=cfg, run_loop=False
    )
    ra = MemoryReplica("a")
    ma = await Mesh.start(
        ra, listen="a", seeds=["b"], network=Slow(net), config=cfg, run_loop=False
    )
    try:
        gate.set()
        assert (await ma.sync_with("b")).ok
        gate.clear()
        dials.clear()
        first = ma.start_push()
        await wait_until(lambda: dials == ["b"], what="the first push dialing")
        for i in range(5):
            ra.put(f"fleet/a/k{i}", i)
            assert ma.start_push() == []  # coalesced
        assert ma._again == {"b"}
        gate.set()
        await asyncio.gather(*first)
        await wait_until(lambda: not ma._spawned, what="the follow-up exchange")
        assert dials == ["b", "b"]  # the first one, and exactly one more
        assert all(mb.replica.get(f"fleet/a/k{i}") == i for i in range(5))  # type: ignore[attr-defined]
    finally:
        await ma.aclose()
        await mb.aclose()


# -- the probe RPC over gRPC ----------------------------------------------------------


async def test_probe_rpc_direct_and_indirect_over_grpc() -> None:
    cfg = MeshConfig.test()
    b = await Mesh.start(MemoryReplica("b"), config=cfg, run_loop=False)
    c = await Mesh.start(MemoryReplica("c"), seeds=[b.address], config=cfg, run_loop=False)
    plain = await GrpcServer.start("127.0.0.1:0", lambda s: asyncio.sleep(0))  # no Probe served
    net = GrpcNetwork(cfg.transport())
    try:
        direct = await net.probe(b.address, source="x", timeout_s=2.0)
        assert direct.reachable and direct.node_id == "b"
        via = await net.probe(c.address, source="x", target=b.address, timeout_s=2.0)
        assert via.reachable and via.node_id == "c"
        stranger = await net.probe(c.address, source="x", target="10.9.9.9:1", timeout_s=2.0)
        assert not stranger.reachable and stranger.reason == "not a member here"
        old = await net.probe(plain.address, source="x", timeout_s=2.0)
        assert old.reachable  # UNIMPLEMENTED: it answered
        assert not (
            await net.probe(plain.address, source="x", target=b.address, timeout_s=2.0)
        ).reachable
        await b.aclose()
        gone = await net.probe(c.address, source="x", target=b.address, timeout_s=2.0)
        assert not gone.reachable and gone.node_id == "c"
    finally:
        await net.aclose()
        await plain.aclose()
        await c.aclose()
        await b.aclose()


def test_presets_state_their_timings_and_reach_the_channels() -> None:
    lan = MeshConfig.lan()
    assert (lan.connect_timeout_s, lan.probe_timeout_s, lan.dead_after_s) == (1.0, 0.5, 2.0)
    # a killed peer is dead within about interval + connect + probe + dead_after
    assert lan.interval_s + lan.connect_timeout_s + lan.probe_timeout_s + lan.dead_after_s <= 5.0
    opts = dict(lan.transport().channel_options())
    assert opts["grpc.initial_reconnect_backoff_ms"] == 200
    assert opts["grpc.max_reconnect_backoff_ms"] == 1000
    assert opts["grpc.min_reconnect_backoff_ms"] == 1000
    metered = MeshConfig.metered_link().transport()
    assert metered.connect_timeout_s == 15.0 and metered.max_reconnect_backoff_s == 30.0
    with pytest.raises(ValueError, match="reconnect_backoff"):
        MeshConfig(reconnect_backoff_s=2.0, max_reconnect_backoff_s=1.0)
    with pytest.raises(ValueError, match="probe_timeout_s"):
        MeshConfig(probe_timeout_s=0)


# -- membership kept across restarts --------------------------------------------------


_MEMBER_WORKER = """
import asyncio, signal, sys
from syncfw.mesh import MeshConfig
from syncfw.node import Node
from syncfw.zones import Fleet

async def main(db: str, seed: str) -> None:
    # no periodic save within the test: what the file holds after is the close's doing
    cfg = MeshConfig.test().with_(save_members_every_s=3600.0)
    async with Node.open(db, node_id="b", fleet=Fleet(fleet_id="f")) as node:
        mesh = await node.serve("127.0.0.1:0", [seed], config=cfg)
        while not any(m.last_ok is not None for m in mesh.members()):
            await asyncio.sleep(0.02)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("met", flush=True)
        await stop.wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("how", ["close", "kill"])
async def test_members_are_saved_at_a_clean_close_and_a_kill_keeps_the_last_save(
    tmp_path: Path, how: str
) -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = MeshConfig.test()
    async with Node.open(tmp_path / "a.db", node_id="a", fleet=Fleet(fleet_id="f")) as a:
        ma = await a.serve("127.0.0.1:0", config=cfg)
        db = tmp_path / "b.db"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _MEMBER_WORKER, str(db), ma.address,
            cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(60):
                line = await proc.stdout.readline()
            assert line == b"met\n", (line, await proc.stderr.read() if proc.stderr else b"")
            proc.send_signal(signal.SIGTERM if how == "close" else signal.SIGKILL)
            async with asyncio.timeout(60):
                rc = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        saved = await MemberFile(db).load()
    if how == "close":
        assert rc == 0
        assert [(s.node_id, s.address) for s in saved] == [("a", ma.address)]
    else:
        assert rc == -signal.SIGKILL
        assert saved == []  # no save had come due: a kill forgets what the close keeps


async def test_members_are_kept_in_the_nodes_file_across_a_restart(tmp_path: Path) -> None:
    fleet = Fleet(fleet_id="f")
    net = MemoryNetwork()
    cfg = MeshConfig.test().with_(gossip=MeshConfig.test().gossip.with_(require_port=False))
    async with Node.open(tmp_path / "a.db", node_id="a", fleet=fleet) as a:
        await a.serve("a", config=cfg, network=InMemoryNetwork(net))
        async with Node.open(tmp_path / "b.db", node_id="b", fleet=fleet) as b:
            mb = await b.serve("b", ["a"], config=cfg, network=InMemoryNetwork(net))
            assert (await mb.sync_with("a")).ok
            assert await mb.save_members()  # what the rounds do every save_members_every_s
        # b closed (saving its members again); it restarts with no seeds at all
        async with Node.open(tmp_path / "b.db", node_id="b", fleet=fleet) as b:
            mb = await b.serve("b2", [], config=cfg, network=InMemoryNetwork(net))
            assert "a" in mb.membership.members
            assert mb.membership.members["a"].node_id == "a"
            assert not mb.membership.is_new(mb.membership.members["a"])  # not a new dial
            assert (await mb.sync_with("a")).ok


async def test_a_member_file_that_cannot_be_used_warns_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = tmp_path / "other.sqlite"
    import sqlite3

    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    before = foreign.read_bytes()
    f = MemberFile(foreign)
    with caplog.at_level(logging.WARNING, logger="syncfw.mesh"):
        assert await f.load() == []
        assert not await f.save([Saved("b", "b:1", 1)])
    assert any("not a syncfw store" in r.getMessage() for r in caplog.records)
    assert foreign.read_bytes() == before
    assert await MemberFile(tmp_path / "missing.db").load() == []


async def test_an_in_memory_node_keeps_no_members_and_says_nothing_at_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = Fleet(fleet_id="f")
    net = MemoryNetwork()
    cfg = MeshConfig.test().with_(gossip=MeshConfig.test().gossip.with_(require_port=False))
    with caplog.at_level(logging.WARNING, logger="syncfw.mesh"):
        async with Node.open(":memory:", node_id="a", fleet=fleet) as a:
            await a.serve("a", config=cfg, network=InMemoryNetwork(net))
            async with Node.open(":memory:", node_id="b", fleet=fleet) as b:
                mb = await b.serve("b", ["a"], config=cfg, network=InMemoryNetwork(net))
                assert (await mb.sync_with("a")).ok
                assert not await mb.save_members()
    assert not [r for r in caplog.records if "members of" in r.getMessage()]
    assert await MemberFile(":memory:").load() == []
