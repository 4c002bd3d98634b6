"""Artifacts over real gRPC on loopback under mTLS: chunks ride syncfw.v1.Artifacts/Fetch on
the mesh's own server and channels, the server names the caller by its certificate, and a
request out of bounds is refused before any handler runs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from syncfw import Fleet, Node
from syncfw.keyfiles import add_node, init_fleet, load_fleet, load_node
from syncfw.mesh import MeshConfig
from syncfw.models import ArtifactConfig, Artifacts, FetchConfig
from syncfw.models.fetch import busy_takers
from syncfw.sync.frames import Status
from syncfw.testing import wait_until
from syncfw.transport.base import LinkError
from syncfw.transport.network import GrpcNetwork
from syncfw.transport.rpc import TlsConfig

SIG = {"inputs": [("x", "float32", (None, 4))], "outputs": [("y", "float32", (None, 2))]}


async def test_a_fetch_over_mtls_grpc_names_the_caller_by_its_certificate(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    init_fleet(root, "grpc-models", authority="depot")
    for n in ("depot", "t1", "t2"):
        add_node(root, n)
    fleet = load_fleet(root).bind(Fleet(fleet_id="grpc-models", authority="depot"))
    nodes: list[Node] = []
    arts: dict[str, Artifacts] = {}
    try:
        for n in ("depot", "t1", "t2"):
            keys = load_node(root, n)
            node = await Node.open(tmp_path / f"{n}.db", node_id=n, fleet=fleet, keys=keys)
            nodes.append(node)
            seeds = [] if n == "depot" else [arts["depot"].mesh.address]  # type: ignore[union-attr]
            mesh = await node.serve(
                "127.0.0.1:0",
                seeds,
                config=MeshConfig.test(),
                tls=TlsConfig(keys.ca_pem, keys.cert_pem, keys.key_pem),
            )
            assert isinstance(mesh.network, GrpcNetwork)
            arts[n] = Artifacts.attach(
                node,
                mesh,
                config=ArtifactConfig(
                    durable=False, fetch=FetchConfig(piece_timeout_s=3.0, stall_s=10.0)
                ),
            )
        data = random.Random(9).randbytes(300_000)
        m = await arts["depot"].publish(
            data,
            name="inspection",
            version=1,
            key=load_node(root, "depot").signing_key,
            chunk_size=64 << 10,
            **SIG,  # type: ignore[arg-type]
        )
        for n in ("t1", "t2"):

            async def knows(n: str = n) -> bool:
                return (await arts[n].latest("inspection")) is not None

            await wait_until(knows, what=f"{n} learns the release", timeout_s=20)
            p = await arts[n].fetch(m)
            assert p.done and await arts[n].read(m) == data
        # the depot counted what it served under the callers' certificate ids
        out = arts["depot"].status()["bytes_out"]
        assert set(out) <= {"t1", "t2"} and sum(out.values()) >= len(data)
        # a request out of bounds never reaches the handler
        net = arts["t1"].mesh.network  # type: ignore[union-attr]
        with pytest.raises(LinkError) as err:
            async for _ in net.fetch(  # type: ignore[union-attr]
                arts["depot"].mesh.address,  # type: ignore[union-attr]
                [b"short"],
                source="t1",
                node_id="t1",
                timeout_s=5.0,
            ):
                pass
        assert err.value.status is Status.INVALID_ARGUMENT
    finally:
        for a in arts.values():
            await a.aclose()
        for node in nodes:
            await node.close()


async def test_a_busy_metered_depot_names_its_taker_over_grpc(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    init_fleet(root, "grpc-busy", authority="depot")
    for n in ("depot", "t1", "t2"):
        add_node(root, n)
    fleet = load_fleet(root).bind(Fleet(fleet_id="grpc-busy", authority="depot"))
    nodes: list[Node] = []
    arts: dict[str, Artifacts] = {}
    try:
        for n in ("depot", "t1", "t2"):
            keys = load_node(root, n)
            node = await Node.open(tmp_path / f"{n}.db", node_id=n, fleet=fleet, keys=keys)
            nodes.append(node)
            cfg = MeshConfig.test()
            if n == "depot":  # a metered uplink: each chunk to one caller per hold
                cfg = cfg.with_(peer_bytes_per_s=4e6, peer_burst_bytes=256 << 10)
            seeds = [] if n == "depot" else [arts["depot"].mesh.address]  # type: ignore[union-attr]
            mesh = await node.serve(
                "127.0.0.1:0",
                seeds,
                config=cfg,
                tls=TlsConfig(keys.ca_pem, keys.cert_pem, keys.key_pem),
            )
            arts[n] = Artifacts.attach(
                node,
                mesh,
                config=ArtifactConfig(
                    durable=False,
                    serve_fanout=1,
                    serve_hold_s=120.0,
                    fetch=FetchConfig(piece_timeout_s=3.0, stall_s=20.0, busy_s=0.05),
                ),
            )
        data = random.Random(10).randbytes(200_000)
        m = await arts["depot"].publish(
            data,
            name="inspection",
            version=1,
            key=load_node(root, "depot").signing_key,
            chunk_size=64 << 10,
            **SIG,  # type: ignore[arg-type]
        )
        for n in ("t1", "t2"):

            async def knows(n: str = n) -> bool:
                return (await arts[n].latest("inspection")) is not None

            await wait_until(knows, what=f"{n} learns the release", timeout_s=20)
        assert (await arts["t1"].fetch(m)).by_peer == {"depot": len(data)}
        net = arts["t2"].mesh.network  # type: ignore[union-attr]
        with pytest.raises(LinkError) as err:
            async for _ in net.fetch(  # type: ignore[union-attr]
                arts["depot"].mesh.address,  # type: ignore[union-attr]
                [m.chunks[0]],
                source="t2",
                node_id="t2",
                timeout_s=5.0,
            ):
                pass
        assert err.value.status is Status.RESOURCE_EXHAUSTED
        assert busy_takers(err.value.reason) == ["t1"]  # by its certificate, whole
        p = await arts["t2"].fetch(m)  # from t1, the taker: the depot sends nothing more
        assert p.done and await arts["t2"].read(m) == data
        assert p.by_peer == {"t1": len(data)} and "depot" not in p.skipped
        assert sum(arts["depot"].status()["bytes_out"].values()) == len(data)
    finally:
        for a in arts.values():
            await a.aclose()
        for node in nodes:
            await node.close()
