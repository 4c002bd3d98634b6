"""Transports: in-memory and gRPC carry the same frames; failures never leak grpc errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from syncfw.errors import ProtocolError
from syncfw.exchange import ExchangeOutcome, run_exchange
from syncfw.metrics import NodeMetrics
from syncfw.node import Node
from syncfw.sync import PROTOCOL_VERSION, Close, Hello, Ops, PeerInfo, SessionConfig, Status
from syncfw.testing.memory import MemoryReplica
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.memory import MemoryNetwork, memory_pipe
from syncfw.transport.rpc import ChannelPool, GrpcServer, TransportConfig, check_health
from syncfw.transport.wire import decode_frame, encode_frame
from syncfw.zones import Fleet


def _fill(r: MemoryReplica, n: int, size: int = 50) -> None:
    for i in range(n):
        r.put(f"fleet/{r.node_id}/k{i}", "x" * size)


@pytest.fixture
async def pool() -> AsyncIterator[ChannelPool]:
    p = ChannelPool(TransportConfig(connect_timeout_s=2.0, exchange_timeout_s=10.0))
    yield p
    await p.aclose()


async def _serve(replica: MemoryReplica, results: list[ExchangeOutcome]) -> GrpcServer:
    async def handler(stream: FrameStream) -> None:
        results.append(await run_exchange(replica, stream))

    return await GrpcServer.start("127.0.0.1:0", handler)


async def test_memory_pipe_exchange_converges_both_ways() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 2000)
    _fill(b, 7)
    x, y = memory_pipe(window=2)
    ra, rb = await asyncio.gather(run_exchange(a, x), run_exchange(b, y))
    assert ra.ok
    assert rb.ok
    assert a.state == b.state
    assert ra.ops_sent == 2000
    assert rb.ops_received == 2000


async def test_memory_network_refuses_unknown_and_partitioned_peers() -> None:
    net = MemoryNetwork()
    b = MemoryReplica("b")
    net.listen("b", lambda s: run_exchange(b, s))
    with pytest.raises(LinkError) as info:
        await net.connect("nowhere", source="a")
    assert info.value.status is Status.UNAVAILABLE
    assert isinstance(info.value, ProtocolError)
    net.partition("a", "b")
    with pytest.raises(LinkError):
        await net.connect("b", source="a")
    net.heal()
    stream = await net.connect("b", source="a")
    assert (await run_exchange(MemoryReplica("a"), stream)).ok
    await net.aclose()


async def test_grpc_exchange_and_in_sync_round(pool: ChannelPool) -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 1500, size=120)
    _fill(b, 20)
    served: list[ExchangeOutcome] = []
    server = await _serve(b, served)
    try:
        assert await check_health(server.address)
        out = await run_exchange(a, await pool.open(server.address))
        assert out.ok, out
        assert a.state == b.state
        again = await run_exchange(a, await pool.open(server.address))
        assert again.reason == "in sync"
        assert again.bytes_sent < 150
        assert len(pool._channels) == 1  # the channel is reused
    finally:
        await server.aclose()
    assert not await check_health(server.address, timeout_s=0.5)


async def test_grpc_unreachable_peer_is_a_link_error(pool: ChannelPool) -> None:
    quick = ChannelPool(TransportConfig(connect_timeout_s=0.3))
    with pytest.raises(LinkError) as info:
        await quick.open("127.0.0.1:1")
    assert info.value.status is Status.UNAVAILABLE
    await quick.aclose()


async def _raw_call(address: str, frames: list[bytes]) -> tuple[list[bytes], grpc.StatusCode, str]:
    """A bare gRPC client that sends arbitrary bytes as frames."""
    async with grpc.aio.insecure_channel(address) as ch:
        method = ch.stream_stream("/syncfw.v1.Sync/Exchange")
        call = method(timeout=5)
        for f in frames:
            await call.write(f)
        await call.done_writing()
        got: list[bytes] = []
        try:
            async for msg in call:
                got.append(msg)
        except grpc.aio.AioRpcError:
            pass  # the status is what the test looks at
        return got, await call.code(), await call.details() or ""


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (Hello(PROTOCOL_VERSION + 7, "default", "x"), "protocol"),
        (Hello(PROTOCOL_VERSION, "another", "x"), "fleet"),
    ],
)
async def test_grpc_bad_hello_gets_a_clear_status(
    hello: Hello, match: str, caplog: pytest.LogCaptureFixture
) -> None:
    b = MemoryReplica("b")
    served: list[ExchangeOutcome] = []
    server = await _serve(b, served)
    try:
        with caplog.at_level(logging.WARNING, logger="syncfw.sync"):
            got, code, details = await _raw_call(server.address, [encode_frame(hello)])
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert match in details
        closes = [decode_frame(g) for g in got if isinstance(decode_frame(g), Close)]
        assert closes
        assert match in closes[0].reason  # type: ignore[union-attr]
        assert any(match in r.getMessage() for r in caplog.records)
    finally:
        await server.aclose()


async def test_grpc_malformed_frame_bytes_end_that_exchange_only(pool: ChannelPool) -> None:
    b = MemoryReplica("b")
    served: list[ExchangeOutcome] = []
    server = await _serve(b, served)
    try:
        _, code, _ = await _raw_call(server.address, [b"\xff\xff\xff garbage"])
        assert code is not grpc.StatusCode.OK
        ok_hello = encode_frame(Hello(PROTOCOL_VERSION, "default", "x"))
        _, code, details = await _raw_call(
            server.address, [ok_hello, encode_frame(Ops(b"\x01\x00\x91\x01"))]
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT, details
        # the node keeps serving its other peers
        a = MemoryReplica("a")
        _fill(a, 10)
        assert (await run_exchange(a, await pool.open(server.address))).ok
        assert b.vv() == {"a": 10}
    finally:
        await server.aclose()


async def test_client_sees_server_side_refusal_as_status(pool: ChannelPool) -> None:
    other = MemoryReplica("b")
    other.fleet = type(other.fleet)(fleet_id="elsewhere")
    server = await _serve(other, [])
    try:
        out = await run_exchange(MemoryReplica("a"), await pool.open(server.address))
        assert out.status is Status.FAILED_PRECONDITION
        assert "fleet" in out.reason
    finally:
        await server.aclose()


async def test_exchange_deadline(pool: ChannelPool) -> None:
    async def silent(stream: FrameStream) -> None:
        await asyncio.Event().wait()

    server = await GrpcServer.start("127.0.0.1:0", silent)
    try:
        out = await run_exchange(MemoryReplica("a"), await pool.open(server.address), timeout_s=0.3)
        assert out.status is Status.DEADLINE_EXCEEDED
    finally:
        await server.aclose(grace_s=0)


async def test_grpc_with_real_nodes(tmp_path: Path, pool: ChannelPool) -> None:
    fleet = Fleet(fleet_id="f")
    a = await Node.open(tmp_path / "a.db", node_id="a", fleet=fleet)
    b = await Node.open(tmp_path / "b.db", node_id="b", fleet=fleet)
    try:
        for i in range(300):
            await a.put(f"fleet/a/k{i}", {"i": i})
        await b.put("fleet/b/x", 1)

        async def handler(stream: FrameStream) -> None:
            await run_exchange(b, stream)

        server = await GrpcServer.start("127.0.0.1:0", handler)
        try:
            out = await run_exchange(a, await pool.open(server.address))
            assert out.ok, out
        finally:
            await server.aclose()
        assert await a.version_vector() == await b.version_vector()
        assert await a.state_digest() == await b.state_digest()
        assert await b.get("fleet/a/k299") == {"i": 299}
        assert await a.peer_ack("b") == await a.version_vector()
    finally:
        await a.close()
        await b.close()


async def test_server_caps_concurrent_exchanges(pool: ChannelPool) -> None:
    release = asyncio.Event()

    async def slow(stream: FrameStream) -> None:
        await release.wait()

    server = await GrpcServer.start(
        "127.0.0.1:0", slow, config=TransportConfig(max_concurrent_exchanges=1)
    )
    try:
        first = asyncio.create_task(
            run_exchange(MemoryReplica("a"), await pool.open(server.address), timeout_s=5)
        )
        refused = await run_exchange(MemoryReplica("b"), await pool.open(server.address))
        assert refused.status is Status.RESOURCE_EXHAUSTED
        release.set()
        out = await first
        assert out.status is not Status.RESOURCE_EXHAUSTED
    finally:
        release.set()
        await server.aclose(grace_s=0)


async def test_a_failing_peers_callback_does_not_end_the_exchange() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 5)

    def broken(peers: object) -> None:
        raise RuntimeError("boom")

    x, y = memory_pipe()
    ra, rb = await asyncio.gather(
        run_exchange(a, x, peers=[PeerInfo("a", "addr")]), run_exchange(b, y, on_peers=broken)
    )
    assert ra.ok
    assert rb.ok
    assert b.vv() == {"a": 5}


async def test_a_replica_bug_ends_the_exchange_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(MemoryReplica):
        async def ops_since(self, vv: object, **kw: object) -> list[object]:  # type: ignore[override]
            raise KeyError("bug")

    a, b = Broken("a"), MemoryReplica("b")
    _fill(b, 3)
    x, y = memory_pipe()
    with caplog.at_level(logging.ERROR, logger="syncfw.sync"):
        ra, rb = await asyncio.gather(run_exchange(a, x), run_exchange(b, y))
    assert ra.status is Status.INTERNAL
    assert rb.status is Status.INTERNAL  # told in band
    assert any("reading ops failed unexpectedly" in r.getMessage() for r in caplog.records)


class _CutAfter:
    """A stream whose link dies after ``n`` Ops frames came in."""

    def __init__(self, inner: FrameStream, n: int) -> None:
        self.inner, self.left = inner, n
        self.peer_address, self.peer_identity = inner.peer_address, inner.peer_identity

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes | None:
        data = await self.inner.recv()
        if data is not None and isinstance(decode_frame(data), Ops):
            self.left -= 1
            if self.left < 0:
                raise LinkError(Status.ABORTED, "cable cut")
        return data

    async def close(self, status: Status, reason: str) -> None:
        await self.inner.close(status, reason)


async def test_a_cut_grpc_exchange_between_sqlite_nodes_resumes(
    tmp_path: Path, pool: ChannelPool
) -> None:
    fleet = Fleet(fleet_id="f")
    a = await Node.open(tmp_path / "a.db", node_id="a", fleet=fleet)
    b = await Node.open(tmp_path / "b.db", node_id="b", fleet=fleet)
    try:
        for i in range(0, 20_000, 500):
            await asyncio.gather(*(a.put(f"fleet/a/k{j}", "v" * 40) for j in range(i, i + 500)))

        async def handler(stream: FrameStream) -> None:
            await run_exchange(a, stream)

        server = await GrpcServer.start("127.0.0.1:0", handler)
        small = SessionConfig(max_batch_bytes=16 * 1024, window=1)
        try:
            cut = await run_exchange(b, _CutAfter(await pool.open(server.address), 5), config=small)
            assert cut.status is Status.ABORTED
            partial = (await b.version_vector()).get("a", 0)
            assert 0 < partial < 20_000  # applied batches stayed applied, whole
            assert (await a.peer_ack("b")).get("a", 0) <= partial  # acks never run ahead
            done = await run_exchange(b, await pool.open(server.address))
            assert done.ok, done
            assert done.ops_received == 20_000 - partial  # resumed, nothing resent
        finally:
            await server.aclose()
        assert await a.state_digest() == await b.state_digest()
    finally:
        await a.close()
        await b.close()


async def test_an_exchange_records_its_outcome_bytes_and_ops_in_the_node_metrics() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 300)
    _fill(b, 4)
    ma, mb = NodeMetrics("a"), NodeMetrics("b")
    x, y = memory_pipe()
    ra, rb = await asyncio.gather(run_exchange(a, x, metrics=ma), run_exchange(b, y, metrics=mb))
    assert ra.ok
    assert rb.ok
    assert ma.value("syncfw_exchanges_total", outcome="OK") == 1
    assert ma.value("syncfw_exchange_seconds_count") == 1
    assert ma.value("syncfw_exchange_ops_total", direction="sent") == 300
    assert ma.value("syncfw_exchange_ops_total", direction="received") == 4
    assert mb.value("syncfw_exchange_ops_total", direction="received") == 300
    out_a = ma.value("syncfw_wire_bytes_total", direction="out")
    assert out_a == ra.bytes_sent > 0
    assert mb.value("syncfw_wire_bytes_total", direction="in") == out_a  # what left a reached b
    assert ma.value("syncfw_wire_bytes_total", direction="in") == rb.bytes_sent
    # a refused exchange is recorded under its status
    other = MemoryReplica("c")
    other.fleet = type(other.fleet)(fleet_id="elsewhere")
    x, y = memory_pipe()
    await asyncio.gather(run_exchange(a, x, metrics=ma), run_exchange(other, y))
    assert ma.value("syncfw_exchanges_total", outcome="FAILED_PRECONDITION") == 1
    assert ma.value("syncfw_exchanges_total", outcome="OK") == 1


async def test_a_cancelled_exchange_is_recorded_and_closes_its_stream() -> None:
    metrics = NodeMetrics("a")
    x, y = memory_pipe()
    task = asyncio.create_task(run_exchange(MemoryReplica("a"), x, metrics=metrics))
    assert await y.recv() is not None  # the exchange is under way (a's Hello)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert metrics.value("syncfw_exchanges_total", outcome="CANCELLED") == 1
    assert await y.recv() is not None  # a's Digest
    with pytest.raises(LinkError) as info:  # then its close
        await y.recv()
    assert info.value.status is Status.CANCELLED


async def test_bytes_that_are_no_frame_end_the_exchange_invalid_argument() -> None:
    x, y = memory_pipe()
    task = asyncio.create_task(run_exchange(MemoryReplica("a"), x))
    await y.send(b"\xff\xff\xff not a frame")
    out = await task
    assert out.status is Status.INVALID_ARGUMENT
    assert "malformed frame" in out.reason
    assert out.frames_received == 1
