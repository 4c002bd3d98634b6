"""Per-connection limits of a real node's gRPC server on loopback, seen from raw HTTP/2.

The server runs as a node runs it (the front door on, as by default, unless a
test says otherwise); the attacker is a raw HTTP/2 client (:class:`Wire`) on
another loopback address (another host to the server) that records every
frame the server sends with the time it came, and keeps reading after a
GOAWAY (``h2`` stops taking frames once it has seen one). Each test shows a
limit of ``TransportConfig`` doing what it says:

- ``max_exchanges_per_connection``: one connection's exchanges beyond it are
  refused ``RESOURCE_EXHAUSTED`` (``connection_quota``), counted, warned about
  once, while another connection from the same host and an honest peer are
  served;
- ``max_streams_per_connection``: the server advertises it as
  ``SETTINGS_MAX_CONCURRENT_STREAMS`` and resets streams past it
  ``REFUSED_STREAM`` before they reach the node;
- ``max_connection_idle_s``: a connection with no call is sent GOAWAY and
  closed after about that long;
- ``max_connection_age_s`` and ``max_connection_age_grace_s``: an old
  connection is sent GOAWAY while its calls run on; a call that ends within
  the grace ends OK, one still running at its end is cut ``UNAVAILABLE`` and
  the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import hpack
import pytest
from conftest import load_bench, serve_node
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from syncfw.exchange import run_exchange
from syncfw.mesh import MeshConfig
from syncfw.node import Node
from syncfw.sync import Digest
from syncfw.testing.waiting import wait_until
from syncfw.transport.rpc import ChannelPool, GrpcServer, TransportConfig
from syncfw.transport.wire import decode_frame, encode_frame

hostile = load_bench("hostile")

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_REFUSED_STREAM = 7  # the HTTP/2 error code
_RESOURCE_EXHAUSTED, _UNAVAILABLE = "8", "14"  # grpc-status values
_QUOTA_TEXT = "too many exchanges at once on this connection (connection_quota)"


@dataclass(frozen=True, slots=True)
class GoAway:
    at: float  # seconds after the connection opened
    last_stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class Ended:
    at: float
    status: str  # grpc-status, or "reset" for RST_STREAM
    message: str  # grpc-message, or the RST_STREAM error code


class Wire:
    """A raw HTTP/2 client of ``Exchange`` that records what the server sends, and when.

    It acknowledges the server's SETTINGS and PINGs and grants a 1 MiB window,
    and nothing else: no pings, no window updates, so the server sees a call
    only when a stream is opened on it.
    """

    def __init__(self, port: int, source: str) -> None:
        self.port, self.source = port, source
        self.settings: dict[int, int] = {}
        self.goaways: list[GoAway] = []
        self.ended: dict[int, Ended] = {}
        self.data: dict[int, bytes] = {}
        self.eof_at: float | None = None
        self._headers: dict[int, dict[str, str]] = {}
        self._enc, self._dec = hpack.Encoder(), hpack.Decoder()
        self._next_id = 1
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> Wire:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(self.source, 0)
        )
        self._t0 = time.monotonic()
        settings = SettingsFrame(0)
        settings.settings = {SettingsFrame.ENABLE_PUSH: 0, SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20}
        self.writer.write(_PREFACE + settings.serialize())
        self._task = asyncio.create_task(self._pump())
        await wait_until(lambda: bool(self.settings), timeout_s=5, what="the server's SETTINGS")
        return self

    def now(self) -> float:
        """Seconds since the connection opened."""
        return time.monotonic() - self._t0

    def open(self, first: bytes | None = None) -> int:
        """Open one Exchange stream, sending ``first`` (gRPC message bytes) on it; its id."""
        sid, self._next_id = self._next_id, self._next_id + 2
        headers = HeadersFrame(sid)
        headers.data = self._enc.encode([
            (":method", "POST"),
            (":scheme", "http"),
            (":path", hostile.EXCHANGE_PATH),
            (":authority", f"127.0.0.1:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])
        headers.flags.add("END_HEADERS")
        self.writer.write(headers.serialize())
        if first is not None:
            self.send(sid, first)
        return sid

    def send(self, sid: int, body: bytes) -> None:
        data = DataFrame(sid)
        data.data = body
        self.writer.write(data.serialize())

    def cancel(self, sid: int) -> None:
        rst = RstStreamFrame(sid)
        rst.error_code = 8  # CANCEL
        self.writer.write(rst.serialize())

    def frames(self, sid: int) -> list[object]:
        """The sync frames the server sent on ``sid`` so far."""
        out, buf = [], self.data.get(sid, b"")
        while len(buf) >= 5:
            (n,) = struct.unpack(">I", buf[1:5])
            if len(buf) < 5 + n:
                break
            out.append(decode_frame(buf[5 : 5 + n]))
            buf = buf[5 + n :]
        return out

    async def _pump(self) -> None:
        buf = b""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await self.reader.read(65536):
                buf += data
                while len(buf) >= 9:
                    frame, n = Frame.parse_frame_header(memoryview(buf[:9]))
                    if len(buf) < 9 + n:
                        break
                    frame.parse_body(memoryview(buf[9 : 9 + n]))
                    buf = buf[9 + n :]
                    self._on(frame)
        self.eof_at = self.now()

    def _on(self, f: Frame) -> None:
        at = self.now()
        if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
            ack = SettingsFrame(0)
            ack.flags.add("ACK")
            self.writer.write(ack.serialize())
            self.settings.update(f.settings)
        elif isinstance(f, PingFrame) and "ACK" not in f.flags:
            pong = PingFrame(0)
            pong.flags.add("ACK")
            pong.opaque_data = f.opaque_data
            self.writer.write(pong.serialize())
        elif isinstance(f, GoAwayFrame):
            self.goaways.append(GoAway(at, f.last_stream_id, f.error_code))
        elif isinstance(f, DataFrame):
            self.data[f.stream_id] = self.data.get(f.stream_id, b"") + bytes(f.data)
        elif isinstance(f, (HeadersFrame, ContinuationFrame)):
            got = self._headers.setdefault(f.stream_id, {})
            for k, v in self._dec.decode(f.data):
                got[str(k)] = str(v)
            if "END_STREAM" in f.flags:
                self.ended[f.stream_id] = Ended(
                    at, got.get("grpc-status", "?"), got.get("grpc-message", "")
                )
        elif isinstance(f, RstStreamFrame):
            self.ended.setdefault(f.stream_id, Ended(at, "reset", str(f.error_code)))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def _hello() -> bytes:
    return hostile.grpc_message(hostile.hello())


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    a = await Node.open(tmp_path / "a.db", node_id="a", fleet=hostile.FLEET)
    b = await Node.open(tmp_path / "b.db", node_id="b", fleet=hostile.FLEET)
    for i in range(20):
        await a.put(f"fleet/a/k{i}", "x" * 100)
    yield a, b
    await b.close()
    await a.close()


async def _sync(honest: Node, cfg: TransportConfig, address: str, n: int) -> None:
    pool = ChannelPool(cfg)
    try:
        for i in range(n):
            await honest.put("fleet/b/n", i)
            out = await run_exchange(honest, await pool.open(address), timeout_s=5.0)
            assert out.ok, out
    finally:
        await pool.aclose()


def test_the_connection_limits_become_the_grpc_server_options() -> None:
    cfg = TransportConfig(
        max_streams_per_connection=5,
        max_connection_idle_s=1.5,
        max_connection_age_s=2.25,
        max_connection_age_grace_s=0.75,
    )
    want = {
        "grpc.max_concurrent_streams": 5,
        "grpc.max_connection_idle_ms": 1500,
        "grpc.max_connection_age_ms": 2250,
        "grpc.max_connection_age_grace_ms": 750,
    }
    # a mesh (Node.serve) keeps the base config's limits, changing only dial timings
    for c in (cfg, MeshConfig.lan().transport(cfg)):
        options = dict(c.server_options())
        assert {k: options[k] for k in want} == want
    assert cfg.quotas().per_connection == cfg.max_exchanges_per_connection


async def test_one_connection_over_its_exchange_quota_is_refused_and_others_are_served(
    nodes: tuple[Node, Node], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = nodes
    caplog.set_level(logging.WARNING, logger="syncfw.transport")
    quota = 3
    cfg = TransportConfig.test(
        max_exchanges_per_connection=quota,
        max_exchanges_per_peer=8,
        max_streams_per_connection=2 * quota,
        hello_timeout_s=5.0,
        exchange_timeout_s=8.0,  # the held calls outlive the test's checks
        refusal_log_interval_s=60.0,  # one line for the whole test
    )
    server = await serve_node(a, cfg)
    assert server.front is not None  # the default path: through the front door
    atk = await Wire(server.port, "127.0.0.2").connect()
    other: Wire | None = None
    try:
        held = [atk.open(_hello()) for _ in range(quota)]
        await wait_until(lambda: server.admission.active == quota, timeout_s=5)
        extra = [atk.open(_hello()) for _ in range(quota)]  # within the stream limit
        # meanwhile an honest peer syncs, and another connection from the same host
        # gets exchanges of its own: the quota is the connection's, not the host's
        await _sync(b, cfg, server.address, 3)
        other = await Wire(server.port, "127.0.0.2").connect()
        mine = [other.open(_hello()) for _ in range(quota)]
        await wait_until(lambda: server.admission.active == 2 * quota, timeout_s=5)
        await wait_until(lambda: all(s in atk.ended for s in extra), timeout_s=5)
        for sid in extra:
            assert atk.ended[sid].status == _RESOURCE_EXHAUSTED, atk.ended
            assert atk.ended[sid].message == _QUOTA_TEXT, atk.ended
        assert not any(s in atk.ended for s in held), atk.ended
        assert not any(s in other.ended for s in mine), other.ended
        assert a.metrics.value("syncfw_refused_streams_total", reason="connection_quota") == quota
        status = await a.status()
        assert status["metrics"]["refused_streams"] == {"connection_quota": quota}
        lines = [
            r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "connection_quota" in r.getMessage()
        ]
        assert len(lines) == 1, lines  # one line, not one per stream
        assert "127.0.0.2" in lines[0]
        # "at once": a slot the connection gives back is its own again
        atk.cancel(held[0])
        await wait_until(lambda: server.admission.active == 2 * quota - 1, timeout_s=5)
        again = atk.open(_hello())
        await wait_until(lambda: server.admission.active == 2 * quota, timeout_s=5)
        await wait_until(lambda: any(isinstance(f, Digest) for f in atk.frames(again)), timeout_s=5)
        assert again not in atk.ended
        assert a.metrics.value("syncfw_refused_streams_total", reason="connection_quota") == quota
    finally:
        await atk.aclose()
        if other is not None:
            await other.aclose()
        await server.aclose(grace_s=0)
    assert await a.get("fleet/b/n") == 2


async def test_the_server_advertises_its_stream_limit_and_resets_streams_past_it(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    limit = 4
    cfg = TransportConfig.test(
        max_streams_per_connection=limit,
        max_exchanges_per_connection=8,  # above it: HTTP/2 refuses first
        hello_timeout_s=5.0,
        exchange_timeout_s=8.0,
    )
    server = await serve_node(a, cfg)
    atk = await Wire(server.port, "127.0.0.3").connect()
    try:
        assert atk.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == limit
        served = [atk.open(_hello()) for _ in range(limit)]
        past = [atk.open(_hello()) for _ in range(2)]
        await wait_until(lambda: all(s in atk.ended for s in past), timeout_s=5)
        for sid in past:
            assert atk.ended[sid] == Ended(atk.ended[sid].at, "reset", str(_REFUSED_STREAM))
        await wait_until(lambda: server.admission.active == limit, timeout_s=5)
        assert not any(s in atk.ended for s in served), atk.ended
        # refused by grpc before the node saw them: no refusal counted, the connection lives
        assert a.metrics.snapshot()["refused_streams"] == {}
        assert atk.goaways == [] and atk.eof_at is None
        await _sync(b, cfg, server.address, 2)
    finally:
        await atk.aclose()
        await server.aclose(grace_s=0)


@pytest.mark.parametrize("front_door", [True, False], ids=["front_door", "grpc_port"])
async def test_an_idle_connection_is_sent_goaway_and_closed_after_the_idle_limit(
    nodes: tuple[Node, Node], front_door: bool
) -> None:
    a, _ = nodes
    idle = 1.5
    cfg = TransportConfig.test(front_door=front_door, max_connection_idle_s=idle)
    server = await serve_node(a, cfg)
    assert (server.front is not None) is front_door
    w = await Wire(server.port, "127.0.0.4").connect()
    try:
        await wait_until(lambda: w.eof_at is not None, timeout_s=idle + 5, what="the close")
        assert w.eof_at is not None
        assert len(w.goaways) == 1, w.goaways
        (goaway,) = w.goaways
        assert goaway.last_stream_id == 0  # no stream was ever opened
        # about the idle limit (grpc's timer is not to the millisecond), never long before it
        assert 0.5 * idle <= goaway.at <= idle + 3.0, goaway
        assert w.eof_at - goaway.at < 2.0, (goaway, w.eof_at)
        if server.front is not None:  # the relay let its connection go too
            await wait_until(lambda: server.front is not None and server.front.connections == 0)
    finally:
        await w.aclose()
        await server.aclose(grace_s=0)


@pytest.mark.parametrize("front_door", [True, False], ids=["front_door", "grpc_port"])
async def test_an_old_connection_is_sent_goaway_and_its_calls_get_the_grace_period(
    nodes: tuple[Node, Node], front_door: bool
) -> None:
    a, _ = nodes
    age, grace = 2.0, 2.0
    cfg = TransportConfig.test(
        front_door=front_door,
        max_connection_age_s=age,
        max_connection_age_grace_s=grace,
        max_connection_idle_s=1.0,  # below the age: calls in flight keep it from applying
        hello_timeout_s=5.0,
        exchange_timeout_s=8.0,  # the node never cuts the calls itself in this test
    )
    server = await serve_node(a, cfg)
    w = await Wire(server.port, "127.0.0.5").connect()
    try:
        done, cut = w.open(_hello()), w.open(_hello())
        await wait_until(
            lambda: all(any(isinstance(f, Digest) for f in w.frames(s)) for s in (done, cut)),
            timeout_s=5,
        )
        await wait_until(lambda: bool(w.goaways), timeout_s=age + 5, what="the GOAWAY")
        first = w.goaways[0]
        # grpc jitters the age by up to 10%; the idle limit (1 s) did not close it
        assert 0.75 * age <= first.at <= 1.1 * age + 3.0, first
        assert first.error_code == 0  # NO_ERROR: a graceful GOAWAY
        assert not w.ended, w.ended  # both calls still run
        # within the grace a call ends as it would have: equal digests, one round trip
        digest = next(f for f in w.frames(done) if isinstance(f, Digest))
        w.send(done, hostile.grpc_message(encode_frame(digest)))
        await wait_until(lambda: done in w.ended, timeout_s=grace)
        assert w.ended[done].status == "0", w.ended
        assert w.ended[done].at < first.at + grace
        # a call still running at the end of the grace is cut and the connection closed
        await wait_until(lambda: w.eof_at is not None, timeout_s=grace + 5, what="the close")
        assert w.eof_at is not None
        assert w.goaways[-1].last_stream_id == cut  # the streams it had were let run
        assert w.ended[cut].status == _UNAVAILABLE, w.ended
        assert first.at + 0.75 * grace <= w.ended[cut].at <= first.at + grace + 3.0, (
            first, w.ended,
        )
        assert w.eof_at - w.ended[cut].at < 2.0
        await wait_until(lambda: server.admission.active == 0, timeout_s=5)
    finally:
        await w.aclose()
        await server.aclose(grace_s=0)


async def test_node_serve_takes_the_transport_settings_and_tls_over_them(tmp_path: Path) -> None:
    """An operator sets connection limits and refusal holds through Node.serve itself."""
    node = await Node.open(tmp_path / "a.db", node_id="a", fleet=hostile.FLEET)
    try:
        cfg = TransportConfig.test(max_connections_per_host=3, refusal_hold_s=0.25)
        mesh = await node.serve("127.0.0.1:0", config=MeshConfig.test(), transport=cfg)
        server = mesh.listener
        assert isinstance(server, GrpcServer) and server.front is not None
        assert server.front.limits.per_source == 3
        assert server.admission.quotas.refusal_hold_s == 0.25
        await mesh.aclose()
        plain = await node.serve("127.0.0.1:0", config=MeshConfig.test())
        assert isinstance(plain.listener, GrpcServer) and plain.listener.front is not None
        assert plain.listener.front.limits.per_source == TransportConfig().max_connections_per_host
    finally:
        await node.close()
