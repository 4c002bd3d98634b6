"""Model artifacts between real nodes on the in-memory network: a yard shares one download,
an interrupted fetch resumes, lying peers are skipped, disk full loses nothing, an offline
node catches up from any peer it meets."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncfw import ChunkError, Fleet, Grant, Node, StorageFullError
from syncfw.mesh import MeshConfig
from syncfw.models import (
    ArtifactConfig,
    Artifacts,
    ChunkStore,
    FetchConfig,
    advert_key,
    advert_value,
)
from syncfw.models.manifest import ReleaseManifest
from syncfw.testing import SignedFleet, wait_until
from syncfw.transport.artifacts import ChunkPiece, ChunkRequest
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import InMemoryNetwork

SF = SignedFleet(Fleet(fleet_id="models", authority="depot", grants=(Grant.of("site/", "*"),)))
SIG = {"inputs": [("x", "float32", (None, 4))], "outputs": [("y", "float32", (None, 2))]}
CHUNK = 16 << 10
FAST = FetchConfig(piece_timeout_s=0.5, stall_s=3.0, retry_s=0.02)


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


class Yard:
    """Nodes with meshes on one in-memory network, each with its artifact side."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.net = MemoryNetwork()
        self.nodes: dict[str, Node] = {}
        self.arts: dict[str, Artifacts] = {}

    async def add(
        self, node_id: str, seeds: tuple[str, ...] = ("depot",), *,
        rate: float | None = None, config: ArtifactConfig | None = None,
    ) -> Artifacts:
        node = await Node.open(self.tmp / f"{node_id}.db", node_id=node_id, fleet=SF.fleet,
                               keys=SF.keys(node_id))
        mesh_cfg = MeshConfig.test()
        if rate is not None:
            mesh_cfg = mesh_cfg.with_(peer_bytes_per_s=rate, peer_burst_bytes=32 << 10)
        mesh = await node.serve(node_id, [s for s in seeds if s != node_id], config=mesh_cfg,
                                network=InMemoryNetwork(self.net))
        arts = Artifacts.attach(node, mesh, config=config or ArtifactConfig(
            durable=False, fetch=FAST, advert_every=1))
        self.nodes[node_id], self.arts[node_id] = node, arts
        return arts

    async def drop(self, node_id: str) -> None:
        await self.arts.pop(node_id).aclose()
        await self.nodes.pop(node_id).close()

    async def publish(self, data: bytes, version: int = 1, **kw: object) -> ReleaseManifest:
        return await self.arts["depot"].publish(
            data, name="inspection", version=version, key=SF.authority_key, chunk_size=CHUNK,
            **SIG, **kw,  # type: ignore[arg-type]
        )

    async def learn(self, node_id: str, version: int = 1) -> ReleaseManifest:
        arts = self.arts[node_id]

        async def known() -> bool:
            m = await arts.latest("inspection")
            return m is not None and m.version >= version

        await wait_until(known, what=f"{node_id} learns release {version}")
        m = await arts.release("inspection", version)
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

        await wait_until(met, what="every node knows every other")

    def served(self, node_id: str) -> int:
        return sum(self.arts[node_id].status()["bytes_out"].values())

    async def close(self) -> None:
        for n in list(self.nodes):
            await self.drop(n)
        await self.net.aclose()


@pytest.fixture
async def yard(tmp_path: Path) -> AsyncIterator[Yard]:
    y = Yard(tmp_path)
    yield y
    await y.close()


async def test_a_yard_shares_one_download_from_the_depot(yard: Yard) -> None:
    n = 5
    data = blob(32 * CHUNK)
    # the depot's uplink is the scarce resource (its serving budget), the yard's LAN is not
    await yard.add("depot", rate=3e5)
    for i in range(n):
        await yard.add(f"t{i}")
    await yard.meet()
    m = await yard.publish(data)
    for i in range(n):
        await yard.learn(f"t{i}")
    got = await asyncio.gather(*(yard.arts[f"t{i}"].fetch(m) for i in range(n)))
    for i, p in enumerate(got):
        assert p.done and p.held == len(m.chunks)
        assert await yard.arts[f"t{i}"].read(m) == data
    depot_bytes = yard.served("depot")
    from_peers = sum(sum(v for k, v in p.by_peer.items() if k != "depot") for p in got)
    # alone, every truck would pull the whole artifact from the depot: n copies
    assert depot_bytes <= 0.5 * n * len(data), (depot_bytes / len(data), from_peers)
    assert from_peers + sum(p.by_peer.get("depot", 0) for p in got) == n * len(data)
    assert from_peers >= n * len(data) - depot_bytes
    # the figures say who served whom
    st = (await yard.nodes["t0"].status())["artifacts"]
    assert sum(st["bytes_in"].values()) == len(data)
    assert st["fetches"]["inspection:1"]["done"]


async def test_an_interrupted_fetch_resumes_and_never_fetches_a_chunk_twice(yard: Yard) -> None:
    data = blob(20 * CHUNK + 123, seed=2)
    await yard.add("depot")
    truck = await yard.add("t1")
    await yard.meet()
    m = await yard.publish(data)
    await yard.learn("t1")

    class Cut(Exception):
        pass

    def cut(p: object) -> None:
        if getattr(p, "held", 0) >= 7:
            raise Cut

    with pytest.raises(Cut):
        await truck.fetch(m, progress=cut)
    held_before = len(truck.store.held(m))
    assert 7 <= held_before < len(m.chunks)
    # a power cut: the node and its chunk store open again from disk
    await yard.drop("t1")
    truck = await yard.add("t1")
    await yard.meet()
    p = await truck.fetch(m)
    assert p.resumed == held_before
    assert p.held == len(m.chunks)
    assert await truck.read(m) == data
    # every byte the depot served was needed once: nothing fetched again
    assert yard.served("depot") <= len(data) + yard.arts["depot"].config.fetch.parallel * CHUNK * 4


@pytest.mark.parametrize("mode", ["bad_hash", "silent", "denied"])
async def test_a_peer_that_lies_about_what_it_holds_is_skipped_and_counted(
    yard: Yard, mode: str
) -> None:
    data = blob(24 * CHUNK, seed=3)
    await yard.add("depot")
    liar = await yard.add("liar")
    truck = await yard.add("t1")
    await yard.meet()
    m = await yard.publish(data)

    async def lie(req: ChunkRequest) -> AsyncIterator[ChunkPiece]:
        for h in req.hashes:
            if mode == "bad_hash":
                yield ChunkPiece(h, 0, b"\x00" * 100, last=True)
            elif mode == "denied":
                yield ChunkPiece(h, missing=True)
            else:
                await asyncio.sleep(30)
                yield ChunkPiece(h, 0, b"", last=True)

    assert liar.mesh is not None
    liar.mesh.network.artifacts.serve_with(lie)  # type: ignore[attr-defined]
    # it claims a partial copy (so it is asked first) but serves lies
    await yard.nodes["liar"].put(
        advert_key("liar", m.sha256), advert_value(m.name, m.version, len(m.chunks), range(20))
    )
    await yard.learn("t1")

    async def sees_liar() -> bool:
        return any(s.node_id == "liar" for s in await truck._sources(m))

    await wait_until(sees_liar, what="the truck sees the liar's advert")
    p = await truck.fetch(m)
    assert p.done and await truck.read(m) == data
    assert "liar" in p.skipped and p.skipped["liar"].startswith(mode)
    assert p.by_peer.get("liar", 0) == 0
    bad = truck.status()["bad_chunks"]
    assert bad.get(f"liar/{mode}", 0) >= 1


async def test_a_tampered_chunk_on_disk_is_refused_removed_and_fetched_again(yard: Yard) -> None:
    data = blob(6 * CHUNK, seed=4)
    await yard.add("depot")
    truck = await yard.add("t1")
    await yard.meet()
    m = await yard.publish(data)
    await yard.learn("t1")
    await truck.fetch(m)
    path = truck.store._path(m.chunks[2])
    path.write_bytes(b"x" + path.read_bytes()[1:])
    with pytest.raises(ChunkError, match="no longer matches"):
        await truck.read(m)
    assert not path.exists() and truck.store.missing(m) == [2]
    p = await truck.fetch(m)
    assert p.resumed == len(m.chunks) - 1 and p.bytes_in == CHUNK
    assert await truck.read(m) == data


async def test_disk_full_is_a_clear_error_and_loses_nothing(yard: Yard) -> None:
    data = blob(12 * CHUNK, seed=5)
    await yard.add("depot")
    truck = await yard.add("t1", config=ArtifactConfig(
        durable=False, fetch=FAST, advert_every=1, max_bytes=5 * CHUNK))
    await yard.meet()
    m = await yard.publish(data)
    await yard.learn("t1")
    with pytest.raises(StorageFullError, match="budget"):
        await truck.fetch(m)
    held = truck.store.held(m)
    assert 0 < len(held) <= 5 and truck.store.used_bytes <= 5 * CHUNK
    assert not any(truck.store._tmp.iterdir())
    # more room: the fetch resumes from what it held
    await yard.drop("t1")
    truck = await yard.add("t1")
    await yard.meet()
    p = await truck.fetch(m)
    assert p.resumed == len(held) and await truck.read(m) == data


def test_a_full_disk_mid_write_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ChunkStore(tmp_path / "c.chunks")
    import hashlib

    ok = b"a" * 1000
    store.put(hashlib.sha256(ok).digest(), ok)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    other = b"b" * 1000
    with pytest.raises(StorageFullError, match="disk full"):
        store.put(hashlib.sha256(other).digest(), other)
    monkeypatch.undo()
    assert not any(store._tmp.iterdir())
    assert store.get(hashlib.sha256(ok).digest()) == ok
    assert not store.has(hashlib.sha256(other).digest())
    again = ChunkStore(tmp_path / "c.chunks")
    assert len(again) == 1 and again.used_bytes == 1000


async def test_an_offline_node_catches_up_from_any_peer_it_meets(yard: Yard) -> None:
    v1, v2 = blob(8 * CHUNK, seed=6), blob(8 * CHUNK, seed=7)
    await yard.add("depot")
    t1 = await yard.add("t1")
    await yard.meet()
    t1.watch(["inspection"])
    await yard.publish(v1, 1)
    m2 = await yard.publish(v2, 2)

    async def t1_holds_v2() -> bool:
        return t1.held(m2)

    await wait_until(t1_holds_v2, what="t1 holds release 2")
    # the depot leaves; t2, away all along, meets only t1
    await yard.drop("depot")
    t2 = await yard.add("t2", seeds=("t1",))
    t2.watch()

    async def t2_holds_v2() -> bool:
        return t2.held(m2)

    await wait_until(t2_holds_v2, what="t2 catches up to release 2", timeout_s=15)
    assert await t2.read(m2) == v2
    assert set(t2.fetches["inspection:2"].by_peer) == {"t1"}
    assert (await t2.latest("inspection")) == m2
