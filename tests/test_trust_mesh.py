"""Identity bound on both ends, and acks only from authenticated peers, on the real gRPC mesh.

Every node here has real keys from :mod:`syncfw.keyfiles` (fleet CA, node
certificates naming the node in CN and SAN, registrations). Each attack is
refused with a clear status, recorded (a metric, a WARNING), and the honest
nodes keep converging.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from syncfw.exchange import ExchangeOutcome, run_exchange
from syncfw.keyfiles import NodeKeys, add_node, init_fleet, load_fleet, load_node
from syncfw.mesh import MeshConfig
from syncfw.node import Node
from syncfw.sync import Status
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.waiting import wait_until
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.rpc import ChannelPool, GrpcServer, TlsConfig, TransportConfig
from syncfw.zones import Fleet

CFG = TransportConfig.test(connect_timeout_s=1.0)


def _tls(keys: NodeKeys) -> TlsConfig:
    return TlsConfig(keys.ca_pem, keys.cert_pem, keys.key_pem)


class Pki:
    def __init__(self, root: Path) -> None:
        init_fleet(root / "fleet", "trust-mesh", authority="cloud")
        for n in ("cloud", "t7", "t9", "evil"):
            add_node(root / "fleet", n)
        init_fleet(root / "rogue", "trust-mesh", authority="cloud")  # another CA, same names
        for n in ("cloud", "t7"):
            add_node(root / "rogue", n)
        self.root = root
        self.fleet: Fleet = load_fleet(root / "fleet").bind(
            Fleet(fleet_id="trust-mesh", authority="cloud")
        )

    def keys(self, node: str, *, rogue: bool = False) -> NodeKeys:
        return load_node(self.root / ("rogue" if rogue else "fleet"), node)

    def tls(self, node: str, *, rogue: bool = False) -> TlsConfig:
        return _tls(self.keys(node, rogue=rogue))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def _open(pki: Pki, tmp: Path, node: str) -> Node:
    return await Node.open(tmp / f"{node}.db", node_id=node, fleet=pki.fleet, keys=pki.keys(node))


async def _server(
    replica: object, tls: TlsConfig | None, seen: list[ExchangeOutcome], metrics: object = None
) -> GrpcServer:
    async def handler(stream: FrameStream) -> None:
        seen.append(await run_exchange(replica, stream, timeout_s=3.0, metrics=metrics))  # type: ignore[arg-type]

    return await GrpcServer.start(
        "127.0.0.1:0", handler, config=CFG if tls is None else TransportConfig.test(tls=tls)
    )


@pytest.fixture
async def cloud(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[Node, GrpcServer, list[ExchangeOutcome]]]:
    node = await _open(pki, tmp_path, "cloud")
    seen: list[ExchangeOutcome] = []
    server = await _server(node, pki.tls("cloud"), seen, node.metrics)
    yield node, server, seen
    await server.aclose(grace_s=0)
    await node.close()


async def _true(cond: bool) -> bool:
    return cond


def _pool(tls: TlsConfig | None, metrics: object = None) -> ChannelPool:
    return ChannelPool(TransportConfig.test(tls=tls, connect_timeout_s=1.0), metrics=metrics)  # type: ignore[arg-type]


async def _honest_sync(node: Node, address: str, pki: Pki) -> ExchangeOutcome:
    pool = _pool(pki.tls(node.node_id), node.metrics)
    try:
        return await run_exchange(node, await pool.open(address), metrics=node.metrics,
                                  initiator=True, timeout_s=3.0)
    finally:
        await pool.aclose()


async def test_honest_signed_nodes_converge_over_a_seed_and_record_each_others_acks(
    pki: Pki, tmp_path: Path
) -> None:
    cloud = await _open(pki, tmp_path, "cloud")
    t7 = await _open(pki, tmp_path, "t7")
    try:
        mesh = await cloud.serve("127.0.0.1:0", config=MeshConfig.test(), tls=pki.tls("cloud"))
        # a seed address: t7 does not know who serves it and learns it from the certificate
        await t7.serve("127.0.0.1:0", [mesh.address], config=MeshConfig.test(), tls=pki.tls("t7"))
        await t7.put("fleet/t7/odometer", 1234)
        await cloud.put("sys/notice", "hello")
        await wait_until(lambda: cloud.get("fleet/t7/odometer"), what="t7's op at the cloud")
        await wait_until(lambda: t7.get("sys/notice"), what="the cloud's op at t7")

        async def acked() -> bool:
            return (await t7.peer_ack("cloud")).get("t7", 0) >= 1

        await wait_until(acked, what="the cloud's ack of t7's op, recorded at t7")
        assert t7.metrics.value("syncfw_acks_ignored_total") == 0
        assert cloud.metrics.value("syncfw_acks_ignored_total") == 0
    finally:
        await t7.close()
        await cloud.close()


async def test_a_node_without_a_certificate_or_from_another_ca_does_not_get_in(
    pki: Pki, cloud: tuple[Node, GrpcServer, list[ExchangeOutcome]], tmp_path: Path
) -> None:
    node, server, seen = cloud
    outsider = MemoryReplica("t7", pki.fleet)
    outsider.put("fleet/t7/brakes", "disabled")
    for tls in (None, pki.tls("t7", rogue=True)):
        pool = _pool(tls)
        try:
            with pytest.raises(LinkError) as info:
                await run_exchange(outsider, await pool.open(server.address))
            assert info.value.status is Status.UNAVAILABLE
            if tls is not None:  # the rogue node's dial reads the cloud's certificate first
                assert "did not prove a fleet certificate" in info.value.reason
        finally:
            await pool.aclose()
    assert seen == []  # the TLS handshake refused them: the exchange handler never ran
    assert await node.get("fleet/t7/brakes") is None
    # the honest t7 still gets in and converges
    t7 = await _open(pki, tmp_path, "t7")
    try:
        await t7.put("fleet/t7/brakes", "ok")
        out = await _honest_sync(t7, server.address, pki)
        assert out.ok, out
        await wait_until(lambda: node.get("fleet/t7/brakes"), what="t7's op")
        assert await node.get("fleet/t7/brakes") == "ok"
    finally:
        await t7.close()


async def test_a_server_with_another_cas_certificate_is_refused_and_recorded(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    impostor = await _server(MemoryReplica("cloud", pki.fleet), pki.tls("cloud", rogue=True), [])
    t7 = await _open(pki, tmp_path, "t7")
    pool = _pool(pki.tls("t7"), t7.metrics)
    try:
        with caplog.at_level(logging.WARNING, "syncfw.transport"):
            for expect in (None, "cloud"):
                with pytest.raises(LinkError) as info:
                    await pool.open(impostor.address, expect_id=expect)
                assert info.value.status is Status.UNAVAILABLE
        assert "did not prove a fleet certificate" in info.value.reason
        assert t7.metrics.value("syncfw_refused_streams_total", reason="server_certificate") == 2
        assert any("did not prove a fleet certificate" in r.getMessage() for r in caplog.records)
    finally:
        await pool.aclose()
        await impostor.aclose(grace_s=0)
        await t7.close()


async def test_a_certified_server_claiming_another_id_is_refused_and_acks_nothing(
    pki: Pki, tmp_path: Path
) -> None:
    """The issue's case: a certified server says hello as 'cloud' to make t7 compact."""
    fake = MemoryReplica("cloud", pki.fleet)
    seen: list[ExchangeOutcome] = []
    evil = await _server(fake, pki.tls("evil"), seen)  # evil's real certificate, "cloud" in Hello
    t7 = await _open(pki, tmp_path, "t7")
    pool = _pool(pki.tls("t7"), t7.metrics)
    try:
        for i in range(5):
            await t7.put(f"fleet/t7/k{i}", i)
        # dialing a seed address: the certificate says evil, the Hello says cloud
        out = await run_exchange(t7, await pool.open(evil.address), metrics=t7.metrics,
                                 initiator=True, timeout_s=3.0)
        assert out.status is Status.FAILED_PRECONDITION
        assert "expected peer 'evil', it says it is 'cloud'" in out.reason
        # dialing it as the cloud: the handshake refuses a certificate that is not the cloud's
        with pytest.raises(LinkError) as info:
            await pool.open(evil.address, expect_id="cloud")
        assert info.value.status is Status.FAILED_PRECONDITION
        assert "presents a certificate for 'evil', not 'cloud'" in info.value.reason
        assert t7.metrics.value("syncfw_refused_streams_total", reason="server_identity") == 1
        assert await t7.peer_ack("cloud") == {}
        ops_before = len(await t7.ops_since({}))
        assert await t7.store.compact() == 0
        assert len(await t7.ops_since({})) == ops_before
    finally:
        await pool.aclose()
        await evil.aclose(grace_s=0)
        await t7.close()


async def test_a_certified_client_claiming_another_id_is_refused(
    pki: Pki, cloud: tuple[Node, GrpcServer, list[ExchangeOutcome]]
) -> None:
    node, server, seen = cloud
    await node.put("sys/door", "locked")
    liar = MemoryReplica("t9", pki.fleet)  # evil's certificate, "t9" in its Hello
    pool = _pool(pki.tls("evil"))
    try:
        out = await run_exchange(liar, await pool.open(server.address), initiator=True)
        assert out.status is Status.FAILED_PRECONDITION, out
        await wait_until(lambda: len(seen) == 1, what="the cloud's outcome")
        assert seen[0].status is Status.FAILED_PRECONDITION
        assert "expected peer 'evil', it says it is 't9'" in seen[0].reason
        assert await node.peer_ack("t9") == {}
        assert await node.store.compact() == 0
    finally:
        await pool.aclose()


async def _ack_from_a_plain_peer(
    fleet: Fleet, victim: Node, handled: Callable[[], Awaitable[bool]]
) -> int:
    """A plaintext peer claiming to be t9 syncs everything from ``victim``; its ops before.

    ``handled``: true once the victim has dealt with the peer's ack (the dialer's
    end can cancel the server's call before the server's exchange returns).
    """
    for i in range(6):
        await victim.put(f"fleet/{victim.node_id}/k{i}", i)
    server = await _server(victim, None, [], victim.metrics)  # the victim serves without TLS
    claimer = MemoryReplica("t9", fleet)
    pool = _pool(None)
    try:
        out = await run_exchange(claimer, await pool.open(server.address), initiator=True)
        assert out.ok, out
        await wait_until(handled, what="the victim handling the ack")
    finally:
        await pool.aclose()
        await server.aclose(grace_s=0)
    # the claimer really holds the victim's ops: were its ack recorded, they could go
    assert (await claimer.version_vector()).get(victim.node_id, 0) >= 6
    return len(await victim.ops_since({}))


async def test_an_unauthenticated_ack_never_drives_compaction_in_a_signed_fleet(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t7 = await _open(pki, tmp_path, "t7")
    try:
        with caplog.at_level(logging.WARNING, "syncfw.sync"):
            before = await _ack_from_a_plain_peer(
                pki.fleet, t7, lambda: _true(t7.metrics.value("syncfw_acks_ignored_total") >= 1)
            )
        assert t7.metrics.value("syncfw_acks_ignored_total") >= 1
        assert any("ignored the ack of 't9'" in r.getMessage() for r in caplog.records)
        assert await t7.peer_ack("t9") == {}
        assert await t7.store.compact() == 0
        assert len(await t7.ops_since({})) == before
    finally:
        await t7.close()


async def test_an_unsigned_fleet_without_tls_still_records_acks(tmp_path: Path) -> None:
    """Development mode keeps today's behaviour (and is labelled unsigned elsewhere)."""
    fleet = Fleet(fleet_id="dev")
    t7 = await Node.open(tmp_path / "t7.db", node_id="t7", fleet=fleet)
    try:
        async def recorded() -> bool:
            return (await t7.peer_ack("t9")).get("t7", 0) >= 6

        before = await _ack_from_a_plain_peer(fleet, t7, recorded)
        assert t7.metrics.value("syncfw_acks_ignored_total") == 0
        assert await t7.store.compact() >= 6
        assert len(await t7.ops_since({})) < before
    finally:
        await t7.close()
