"""The front door (``syncfw.transport.front``) with real sockets on loopback.

Sources are told apart by their loopback address (127.0.0.2, .3, ...: other
hosts to the door). The first tests relay to a plain TCP sink that counts
what reaches it, so the door's bounds are measured at the far side; the last
ones run a real node's gRPC server behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import load_bench, serve_node

from syncfw.exchange import run_exchange
from syncfw.metrics import NodeMetrics
from syncfw.node import Node
from syncfw.testing.waiting import wait_until
from syncfw.transport.front import FrontDoor, FrontLimits, source_of
from syncfw.transport.rpc import ChannelPool, TransportConfig

hostile = load_bench("hostile")



@dataclass
class Sink:
    """The far side: counts bytes per upstream connection and echoes them back when asked."""

    echo: bool = False
    got: dict[int, int] = field(default_factory=dict)
    peers: list[int] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        port = w.get_extra_info("peername")[1]
        self.peers.append(port)
        self.got[port] = 0
        with contextlib.suppress(ConnectionError):
            while data := await r.read(1 << 16):
                self.got[port] += len(data)
                if self.echo:
                    w.write(data)
                    await w.drain()
        w.close()

    @property
    def total(self) -> int:
        return sum(self.got.values())

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()


async def _dial(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = 2.0) -> bool:
    """Whether the door closed this connection (after at most its GOAWAY's bytes)."""
    try:
        said = await asyncio.wait_for(reader.read(), timeout_s)  # to EOF
        return len(said) < 512 and (not said or said[9 + 3] == 7)
    except ConnectionError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink(echo=True)
    await s.start()
    yield s
    await s.aclose()


async def _door(sink: Sink, limits: FrontLimits, metrics: NodeMetrics | None = None) -> FrontDoor:
    assert sink.server is not None
    return await FrontDoor.start(
        "127.0.0.1", 0, sink.server.sockets[0].getsockname()[1], limits, metrics
    )


async def test_a_flooding_host_is_read_at_its_rate_while_another_is_served(
    sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="syncfw.transport.front")
    limits = FrontLimits(rate=1 << 20, burst=256 << 10)
    metrics = NodeMetrics("a")
    door = await _door(sink, limits, metrics)
    flooders = [await _dial(door.port, "127.0.0.2") for _ in range(3)]
    chunk = b"\x00" * (64 << 10)
    stop = asyncio.Event()

    async def flood(w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while not stop.is_set():
                w.write(chunk)
                await w.drain()

    tasks = [asyncio.create_task(flood(w)) for _, w in flooders]
    try:
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        # the honest host's bytes go through and come back promptly meanwhile
        r, w = await _dial(door.port, "127.0.0.3")
        for _ in range(5):
            s0 = time.monotonic()
            w.write(b"y" * 4096)
            assert await asyncio.wait_for(r.readexactly(4096), 2.0) == b"y" * 4096
            assert time.monotonic() - s0 < 0.5
        w.close()
        await asyncio.sleep(1.5)
        elapsed = time.monotonic() - t0
        flooded = sink.total - 5 * 4096
        # invariant 1: burst + rate * T, plus one socket read per connection mid-read
        bound = limits.burst + limits.rate * elapsed + len(flooders) * (256 << 10)
        assert limits.rate * 0.5 < flooded <= bound, (flooded, bound)
        assert door.throttled_s > 0
        assert metrics.snapshot()["inbound_throttled_s"] > 0
        lines = [r.getMessage() for r in caplog.records if "127.0.0.2" in r.getMessage()]
        assert len(lines) == 1 and "bytes/s" in lines[0], lines  # rate-limited per host
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        for _, w in flooders:
            w.close()
        await door.aclose()


async def test_connections_over_the_host_limit_are_closed_counted_and_warned(
    sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="syncfw.transport.front")
    metrics = NodeMetrics("a")
    door = await _door(sink, FrontLimits(per_source=2, max_connections=3), metrics)
    try:
        kept = [await _dial(door.port, "127.0.0.2") for _ in range(2)]
        extra = [await _dial(door.port, "127.0.0.2") for _ in range(3)]
        for r, w in extra:
            assert await _closed_by_peer(r)
            w.close()
        assert door.refused == {"source_connections": 3}
        other = await _dial(door.port, "127.0.0.3")  # another host still gets in
        other[1].write(b"hi")
        assert await asyncio.wait_for(other[0].readexactly(2), 2.0) == b"hi"
        for r, w in kept:  # the admitted ones still relay
            w.write(b"ok")
            assert await asyncio.wait_for(r.readexactly(2), 2.0) == b"ok"
        # the overall limit: three relayed now
        fourth = await _dial(door.port, "127.0.0.4")
        assert await _closed_by_peer(fourth[0])
        fourth[1].close()
        assert door.refused["connections"] == 1
        assert metrics.snapshot()["refused_connections"] == {
            "source_connections": 3, "connections": 1,
        }
        lines = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(lines) == 2, lines  # one per host and reason, not one per connection
        # a host's slots come back when its connections close
        for _, w in kept:
            w.close()
        await wait_until(lambda: door.connections == 1, timeout_s=2)
        again = await _dial(door.port, "127.0.0.2")
        again[1].write(b"back")
        assert await asyncio.wait_for(again[0].readexactly(4), 2.0) == b"back"
        again[1].close()
        other[1].close()
    finally:
        await door.aclose()


async def test_the_upstream_leg_maps_back_to_the_real_peer_while_it_lives(sink: Sink) -> None:
    door = await _door(sink, FrontLimits())
    try:
        r, w = await _dial(door.port, "127.0.0.5")
        w.write(b"x")
        await r.readexactly(1)
        (port,) = sink.peers
        real = f"ipv4:127.0.0.5:{w.get_extra_info('sockname')[1]}"
        assert source_of(f"ipv4:127.0.0.1:{port}") == real
        assert source_of("ipv4:10.1.2.3:4") == "ipv4:10.1.2.3:4"  # not relayed: itself
        w.close()
        await wait_until(lambda: door.connections == 0, timeout_s=2)
        assert source_of(f"ipv4:127.0.0.1:{port}") == f"ipv4:127.0.0.1:{port}"
    finally:
        await door.aclose()


async def test_the_host_table_forgets_idle_hosts_and_stays_bounded(sink: Sink) -> None:
    limits = FrontLimits(rate=1000, burst=1000, max_sources=4, max_connections=4)
    door = await _door(sink, limits)
    try:
        # a host whose bucket is full again is forgotten when it leaves
        r, w = await _dial(door.port, "127.0.0.2")
        w.write(b"a" * 100)
        await r.readexactly(100)
        await asyncio.sleep(0.2)  # 100 bytes at 1,000 a second: repaid
        w.close()
        await wait_until(lambda: door.connections == 0, timeout_s=2)
        await wait_until(lambda: door.sources == 0, timeout_s=2)
        # hosts that leave in debt are remembered (a reconnect gets no new burst) ...
        for i in range(10, 20):
            r, w = await _dial(door.port, f"127.0.0.{i}")
            w.write(b"b" * 1300)
            await asyncio.wait_for(r.readexactly(1300), 2.0)
            w.close()
            # a host in debt is not read, so its close is seen once the debt is repaid
            await wait_until(lambda: door.connections == 0, timeout_s=3)
            # ... but never more of them than the bound
            assert door.sources <= limits.max_sources
        assert door.sources == limits.max_sources
    finally:
        await door.aclose()


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="rate and burst"):
        FrontLimits(rate=0)
    with pytest.raises(ValueError, match="at least one connection"):
        FrontLimits(per_source=0)


# -- behind a real node's gRPC server -------------------------------------------------


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    a = await Node.open(tmp_path / "a.db", node_id="a", fleet=hostile.FLEET)
    b = await Node.open(tmp_path / "b.db", node_id="b", fleet=hostile.FLEET)
    yield a, b
    await b.close()
    await a.close()


async def _sync(honest: Node, cfg: TransportConfig, address: str, n: int) -> list[float]:
    pool = ChannelPool(cfg)
    took = []
    try:
        for i in range(n):
            await honest.put("fleet/b/n", i)
            t0 = time.monotonic()
            out = await run_exchange(honest, await pool.open(address), timeout_s=3.0)
            assert out.ok, out
            took.append(time.monotonic() - t0)
    finally:
        await pool.aclose()
    return took


async def test_an_http2_flood_is_throttled_before_grpc_and_honest_syncs_go_on(
    node: tuple[Node, Node],
) -> None:
    a, b = node
    cfg = TransportConfig.test(inbound_rate=2 << 20, inbound_burst=1 << 20)
    server = await serve_node(a, cfg)
    assert server.front is not None
    stats: dict[str, int] = {}
    flood = asyncio.create_task(hostile.flood(server.port, "127.0.0.2", stats))
    try:
        t0 = time.monotonic()
        await asyncio.sleep(0.5)
        took = await _sync(b, cfg, server.address, 5)
        assert max(took) < 1.0, took
        await asyncio.sleep(0.5)
        # the flooder got no more than its quota through (it tries for ~1 GB/s);
        # the honest peer's bytes are a few KiB
        limit = cfg.inbound_burst + cfg.inbound_rate * (time.monotonic() - t0) + (1 << 20)
        assert cfg.inbound_rate * 0.5 < server.front.bytes_in < limit, server.front.bytes_in
        assert a.metrics.snapshot()["inbound_throttled_s"] > 0
        status = await a.status()
        assert status["metrics"]["inbound_throttled_s"] > 0
    finally:
        flood.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flood
        await server.aclose(grace_s=0)
    assert await b.get("fleet/b/n") == 4
    assert await a.get("fleet/b/n") == 4


async def test_without_the_front_door_grpc_owns_the_port(node: tuple[Node, Node]) -> None:
    a, b = node
    cfg = TransportConfig.test(front_door=False)
    server = await serve_node(a, cfg)
    try:
        assert server.front is None
        assert len(await _sync(b, cfg, server.address, 2)) == 2
    finally:
        await server.aclose(grace_s=0)


async def test_a_refused_client_is_told_why(node: tuple[Node, Node]) -> None:
    """A connection over its host's limit gets an HTTP/2 GOAWAY naming the limit
    before the close, and a syncfw peer's exchange reports it."""
    a, b = node
    cfg = TransportConfig.test(max_connections_per_host=1)
    server = await serve_node(a, cfg)
    try:
        held = await _dial(server.port, "127.0.0.1")  # takes the host's one slot
        r, w = await _dial(server.port, "127.0.0.1")
        got = await asyncio.wait_for(r.read(), 2.0)
        w.close()
        assert got[3] == 4 and got[9 + 3] == 7, got  # SETTINGS, then GOAWAY
        assert int.from_bytes(got[9 + 13 : 9 + 17], "big") == 0xB  # ENHANCE_YOUR_CALM
        assert b"source_connections: 1 connections from this host already" in got
        pool = ChannelPool(cfg)
        try:
            out = await run_exchange(b, await pool.open(server.address), timeout_s=3.0)
        finally:
            await pool.aclose()
        assert not out.ok
        assert "syncfw front door: source_connections" in out.reason, out
        held[1].close()
    finally:
        await server.aclose(grace_s=0)
