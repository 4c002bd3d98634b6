"""Hostile peers at the gRPC seam, against a real SQLite node with an honest peer alongside.

Each attack comes from another loopback address (another host, to the
server's quotas) through a raw HTTP/2 client (``bench/hostile.py``'s
``RawPeer``), which can do what grpc clients never do: keep its receive
window shut, open streams and say nothing, or send past the window. Each
test shows the honest peer keeps being served, slots are reclaimed, and the
refusal is a clear status, a WARNING and a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import load_bench

from syncfw.exchange import run_exchange
from syncfw.node import Node
from syncfw.testing.waiting import wait_until
from syncfw.transport.admission import Admission, Quotas, Refusal
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import ChannelPool, GrpcServer, TransportConfig

hostile = load_bench("hostile")
CFG = TransportConfig.test(
    exchange_timeout_s=1.5,
    hello_timeout_s=0.5,
    max_exchanges_per_peer=4,
    max_concurrent_exchanges=12,
)


@contextlib.asynccontextmanager
async def _serving(
    tmp_path: Path, cfg: TransportConfig
) -> AsyncIterator[tuple[Node, Node, GrpcServer]]:
    node = await Node.open(tmp_path / "a.db", node_id="a", fleet=hostile.FLEET)
    honest = await Node.open(tmp_path / "b.db", node_id="b", fleet=hostile.FLEET)
    for i in range(50):
        await node.put(f"fleet/a/k{i}", "x" * 200)

    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream, timeout_s=cfg.exchange_timeout_s, metrics=node.metrics)

    server = await GrpcServer.start("127.0.0.1:0", handler, config=cfg, metrics=node.metrics)
    try:
        yield node, honest, server
    finally:
        await server.aclose(grace_s=0)
        await honest.close()
        await node.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, GrpcServer]]:
    async with _serving(tmp_path, CFG) as got:
        yield got


async def _honest_round(honest: Node, server: GrpcServer, n: int) -> int:
    pool = ChannelPool(CFG)
    ok = 0
    try:
        for i in range(n):
            await honest.put("fleet/b/n", i)
            out = await run_exchange(honest, await pool.open(server.address), timeout_s=3.0)
            ok += out.ok
    finally:
        await pool.aclose()
    return ok


def _refused(node: Node) -> dict[str, int]:
    got: dict[str, int] = node.metrics.snapshot()["refused_streams"]
    return got


async def test_zero_window_streams_are_cut_at_the_deadline_and_honest_peers_served(
    served: tuple[Node, Node, GrpcServer], caplog: pytest.LogCaptureFixture
) -> None:
    node, honest, server = served
    caplog.set_level(logging.WARNING, logger="syncfw.transport")
    atk = await hostile.RawPeer("127.0.0.1", server.port, source="127.0.0.2").connect()
    try:
        for _ in range(8):  # twice its quota
            atk.open(hostile.grpc_message(hostile.hello()))
        await wait_until(lambda: len(atk.ended) >= 4, timeout_s=5)
        # over the quota: refused at once with a clear status
        assert any("peer_quota" in msg for _, msg in atk.ended.values()), atk.ended
        assert await _honest_round(honest, server, 5) == 5
        # at the deadline the blocked calls are cut and their slots reclaimed
        await wait_until(lambda: server.admission.active == 0, timeout_s=10)
        assert server.admission.stalled >= 1
        assert _refused(node).get("stalled", 0) >= 1
        assert any("stalled" in r.getMessage() for r in caplog.records)
        # the stalling address keeps only its own quota held, and others are served
        assert await _honest_round(honest, server, 3) == 3
    finally:
        await atk.aclose()


async def test_slowloris_streams_end_at_the_hello_deadline(
    served: tuple[Node, Node, GrpcServer], caplog: pytest.LogCaptureFixture
) -> None:
    node, honest, server = served
    caplog.set_level(logging.WARNING, logger="syncfw.transport")
    atk = await hostile.RawPeer(
        "127.0.0.1", server.port, source="127.0.0.3", window=65535
    ).connect()
    try:
        for _ in range(4):
            atk.open()
        await wait_until(lambda: len(atk.ended) >= 4, timeout_s=5)
        statuses = {status for status, _ in atk.ended.values()}
        assert statuses == {"4"}, atk.ended  # DEADLINE_EXCEEDED
        assert all("no first frame" in msg for _, msg in atk.ended.values())
        assert _refused(node).get("no_hello", 0) >= 4
        assert any("no_hello" in r.getMessage() for r in caplog.records)
        for _ in range(4):  # reopened as they end: the honest peer is still served
            atk.open()
        assert await _honest_round(honest, server, 5) == 5
        await wait_until(lambda: server.admission.active == 0, timeout_s=5)
    finally:
        await atk.aclose()


async def test_a_burst_of_streams_is_refused_beyond_the_quota_and_honest_peers_served(
    served: tuple[Node, Node, GrpcServer], caplog: pytest.LogCaptureFixture
) -> None:
    node, honest, server = served
    caplog.set_level(logging.WARNING, logger="syncfw.transport")
    peers = [
        await hostile.RawPeer("127.0.0.1", server.port, source="127.0.0.4", window=65535).connect()
        for _ in range(7)
    ]
    try:
        for p in peers:
            for _ in range(15):
                p.open()
        await wait_until(lambda: sum(len(p.ended) for p in peers) >= 90, timeout_s=10)
        assert _refused(node).get("peer_quota", 0) >= 90
        assert server.admission.held_by("ipv4:127.0.0.4:1") <= CFG.max_exchanges_per_peer
        assert await _honest_round(honest, server, 5) == 5
        # refusals are logged, rate-limited: a handful of lines, not one per stream
        lines = [r for r in caplog.records if "peer_quota" in r.getMessage()]
        assert 1 <= len(lines) <= 5
    finally:
        for p in peers:
            await p.aclose()


class _Flood:
    """While a flood runs: the honest peer syncing flat out, and what the node shows.

    Samples every 10 ms this process's *current* RSS (``VmRSS``: an earlier
    test's peak cannot hide growth) and, behind the front door, the bytes it
    read against what the host's bucket allows by then.
    """

    def __init__(self, node: Node, honest: Node, server: GrpcServer, cfg: TransportConfig) -> None:
        self.node, self.honest, self.server, self.cfg = node, honest, server, cfg
        self.done = asyncio.Event()
        self.syncs: list[tuple[float, bool]] = []
        self.rss0 = self.rss_peak = hostile.rss_mb()
        self.t0 = time.monotonic()
        front = server.front
        self.read0 = front.bytes_in if front is not None else 0
        self.over_bucket = -float("inf")  # most read beyond burst + rate * t, bytes
        self._tasks = [asyncio.create_task(self._sync()), asyncio.create_task(self._watch())]

    async def _sync(self) -> None:
        pool = ChannelPool(self.cfg)
        try:
            while not self.done.is_set():
                await self.honest.put("fleet/b/n", len(self.syncs))
                t = time.monotonic()
                out = await run_exchange(
                    self.honest, await pool.open(self.server.address), timeout_s=3.0
                )
                self.syncs.append((time.monotonic() - t, out.ok))
                await asyncio.sleep(0.02)
        finally:
            await pool.aclose()

    async def _watch(self) -> None:
        front = self.server.front
        while not self.done.is_set():
            self.rss_peak = max(self.rss_peak, hostile.rss_mb())
            if front is not None:
                allowed = self.cfg.inbound_burst + self.cfg.inbound_rate * (
                    time.monotonic() - self.t0
                )
                self.over_bucket = max(self.over_bucket, front.bytes_in - self.read0 - allowed)
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.done.set()
        await asyncio.gather(*self._tasks)


def _over(atk: Any, sid: int) -> bool:
    """The attacker's stream ended, or its connection is gone."""
    return sid in atk.ended or atk.closed


def _failed_exchanges(node: Node) -> int:
    got: dict[str, int] = node.metrics.snapshot()["exchanges"]
    return sum(n for outcome, n in got.items() if outcome != "OK")


FLOOD_CFG = dataclasses.replace(CFG, refusal_log_interval_s=60.0)  # one line per host and reason
FLOOD_BYTES = 128 << 20
CHUNK = b"\x00" * 16384  # DATA frames of zeros: empty gRPC messages, past any window


async def test_a_sender_that_ignores_flow_control_is_reset_and_read_at_its_hosts_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Behind the front door (on by default: 32 MiB/s a host after an 8 MiB burst),
    # a sender that writes DATA past the HTTP/2 window as fast as its socket takes
    # it gets its stream reset by grpc (PROTOCOL_ERROR: it broke the stream's flow
    # control) at once, and the rest of its flood, sent on the dead stream, is read
    # no faster than its host's rate: what it cannot send waits in its own kernel
    # buffers. One WARNING says so, inbound_throttled_s counts the pauses, and
    # the node's memory stays flat while the honest peer syncs on. Measured here:
    # the reset 10 - 17 ms after the stream opened, the 128 MiB taking 3.6 s to get
    # out (throttled 3.0 - 3.2 s), RSS peak +3 MB, honest syncs at worst 21 - 79 ms.
    caplog.set_level(logging.WARNING, logger="syncfw")
    async with _serving(tmp_path, FLOOD_CFG) as (node, honest, server):
        front = server.front
        assert front is not None
        assert await _honest_round(honest, server, 3) == 3  # warm: channels, caches
        failed0 = _failed_exchanges(node)
        ok0 = node.metrics.snapshot()["exchanges"].get("OK", 0)
        flood = _Flood(node, honest, server, FLOOD_CFG)
        atk = await hostile.RawPeer(
            "127.0.0.1", server.port, source="127.0.0.5", window=65535
        ).connect()
        try:
            sid = atk.open(hostile.opening())
            assert sid is not None
            reset_s: list[float] = []

            async def note_reset() -> None:
                await wait_until(lambda: sid in atk.ended, timeout_s=10, interval_s=0.005)
                reset_s.append(time.monotonic() - flood.t0)

            noted = asyncio.create_task(note_reset())
            sent = await atk.blast(sid, CHUNK, FLOOD_BYTES)
            blast_s = time.monotonic() - flood.t0
            await noted
            # the node's exchange of that call ended (one failure, whichever way it saw it)
            await wait_until(lambda: _failed_exchanges(node) > failed0, timeout_s=5)
        finally:
            await flood.stop()
            await atk.aclose()
        rss1 = hostile.rss_mb()
        metrics = (await node.status())["metrics"]
        honest_s = [took for took, _ in flood.syncs]
        print(
            f"reset after {reset_s[0] * 1000:.0f} ms; {sent >> 20} MiB out in {blast_s:.2f} s, "
            f"{(front.bytes_in - flood.read0) >> 20} MiB read, throttled "
            f"{metrics['inbound_throttled_s']:.2f} s, most over the bucket "
            f"{flood.over_bucket / 1024:.0f} KiB; RSS {flood.rss0:.1f} MB -> peak "
            f"{flood.rss_peak:.1f}, after {rss1:.1f}; {len(honest_s)} honest syncs, worst "
            f"{max(honest_s) * 1000:.0f} ms; connection closed: {atk.closed}"
        )
        # the call's end: grpc reset the stream for breaking its flow control, at
        # once, not at the exchange deadline
        assert atk.ended[sid] == ("reset", "1"), atk.ended  # RST_STREAM PROTOCOL_ERROR
        assert reset_s[0] < 1.0, reset_s
        assert sent == FLOOD_BYTES
        # the host was read no faster than its bucket allows, at every moment sampled
        # (one socket read of 256 KiB may run past it; the honest peer's syncs
        # through the same door are a few KiB each)
        assert flood.over_bucket <= (256 << 10) + len(honest_s) * (16 << 10), flood.over_bucket
        # so the flood took the attacker about its size over the rate, and the pauses
        # are counted: the metric in status() is the front door's own figure
        assert blast_s >= 0.5 * (FLOOD_BYTES - FLOOD_CFG.inbound_burst) / FLOOD_CFG.inbound_rate
        assert metrics["inbound_throttled_s"] > 0.2
        assert metrics["inbound_throttled_s"] == pytest.approx(front.throttled_s)
        # the call was admitted once and took one exchange, no refusal
        assert _failed_exchanges(node) == failed0 + 1
        assert metrics["refused_streams"] == {}
        # one WARNING for the host, not one per frame (4096 of them) or per pause
        lines = [r.getMessage() for r in caplog.records if "127.0.0.5" in r.getMessage()]
        door = [m for m in lines if "front door" in m and "bytes/s" in m]
        assert len(door) == 1, lines
        assert len(lines) <= 2 and all(len(m) < 400 for m in lines), lines
        # memory: current RSS, during and after, well under what was sent
        assert flood.rss_peak - flood.rss0 < 24, (flood.rss0, flood.rss_peak)
        assert rss1 - flood.rss0 < 24, (flood.rss0, rss1)
        # the honest peer synced throughout, every exchange, none slow
        assert len(honest_s) >= 5
        assert all(ok for _, ok in flood.syncs), flood.syncs
        assert max(honest_s) < 2.0, honest_s
        assert node.metrics.snapshot()["exchanges"].get("OK", 0) == ok0 + len(honest_s)
        assert await _honest_round(honest, server, 3) == 3


async def test_without_the_front_door_grpc_resets_such_a_stream_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    # With front_door=False grpc reads the socket itself, as fast as it comes
    # (nothing paces the host: no throttling, no WARNING, no count of its own), and
    # only grpc's HTTP/2 flow control bounds what it keeps: the stream is reset at
    # its window (PROTOCOL_ERROR) and what follows on it is discarded; a sender far
    # enough past the connection's window has the whole connection closed. The
    # flood reconnects as that happens. Measured here: 0.8 - 1.7 GiB out in 1.6 s,
    # RSS peak +28 - 92 MB, back to +1 - 60 MB after (over 12 s and 12 GiB, peaks
    # up to +178 MB and +25 - 40 MB between: grpc's read buffers, which do not grow
    # with what is sent), honest syncs at worst 65 - 290 ms.
    cfg = dataclasses.replace(FLOOD_CFG, front_door=False)
    async with _serving(tmp_path, cfg) as (node, honest, server):
        assert server.front is None
        assert await _honest_round(honest, server, 3) == 3
        failed0 = _failed_exchanges(node)
        flood = _Flood(node, honest, server, cfg)
        ends: list[tuple[str, str] | None] = []
        closed: list[bool] = []
        sent = 0
        try:
            while time.monotonic() - flood.t0 < 1.5 or len(ends) < 3:
                atk = await hostile.RawPeer(
                    "127.0.0.1", server.port, source="127.0.0.5", window=65535
                ).connect()
                try:
                    sid = atk.open(hostile.opening())
                    assert sid is not None
                    sent += await atk.blast(sid, CHUNK, FLOOD_BYTES)
                    with contextlib.suppress(AssertionError):
                        await wait_until(functools.partial(_over, atk, sid), timeout_s=2)
                    ends.append(atk.ended.get(sid))
                    closed.append(atk.closed or atk.writer.is_closing())
                finally:
                    await atk.aclose()
            elapsed = time.monotonic() - flood.t0
        finally:
            await flood.stop()
        rss1 = hostile.rss_mb()
        metrics = (await node.status())["metrics"]
        honest_s = [took for took, _ in flood.syncs]
        print(
            f"{len(ends)} connections, {sent >> 20} MiB out in {elapsed:.2f} s; "
            f"{sum(closed)} closed by the server; ends {set(ends)}; RSS {flood.rss0:.1f} MB -> "
            f"peak {flood.rss_peak:.1f}, after {rss1:.1f}; {len(honest_s)} honest syncs, "
            f"worst {max(honest_s) * 1000:.0f} ms"
        )
        # each stream was reset for breaking its flow control, or its connection
        # closed under it
        for end, cut in zip(ends, closed, strict=True):
            assert end == ("reset", "1") or (end is None and cut), (ends, closed)
        assert ends.count(("reset", "1")) >= len(ends) // 2, ends
        # each call took at most one exchange, each ended failed
        assert 1 <= _failed_exchanges(node) - failed0 <= len(ends)
        assert metrics["refused_streams"] == {}
        # nothing paced it: far more got in than the front door would have read
        assert metrics["inbound_throttled_s"] == 0
        assert sent > 2 * (cfg.inbound_burst + cfg.inbound_rate * elapsed), sent
        # memory still bounded, by grpc's flow control, if far less tightly than behind
        # the front door: current RSS, during and after
        assert flood.rss_peak - flood.rss0 < 256, (flood.rss0, flood.rss_peak)
        assert rss1 - flood.rss0 < 256, (flood.rss0, rss1)
        # the honest peer synced throughout
        assert len(honest_s) >= 3
        assert all(ok for _, ok in flood.syncs), flood.syncs
        assert max(honest_s) < 2.0, honest_s
        assert await _honest_round(honest, server, 3) == 3


def test_admission_quotas_stalled_calls_and_release() -> None:
    now = [0.0]
    adm = Admission(
        Quotas(4, per_peer=2, per_identity=1, per_connection=2, stall_hold_s=10),
        clock=lambda: now[0],
    )
    a = adm.admit("ipv4:10.0.0.1:1", None)
    b = adm.admit("ipv4:10.0.0.1:2", None)
    assert adm.admit("ipv4:10.0.0.1:3", None) is Refusal.PEER_QUOTA
    x = adm.admit("ipv4:10.0.0.2:1", "n2")
    assert adm.admit("ipv4:10.0.0.3:1", "n2") is Refusal.IDENTITY_QUOTA
    y = adm.admit("ipv4:10.0.0.4:1", None)
    assert adm.admit("ipv4:10.0.0.5:1", None) is Refusal.GLOBAL_CAP
    tickets: list[Any] = [a, b, x, y]
    assert not any(isinstance(t, Refusal) for t in tickets)
    adm.release(a, stalled=True)  # a stalled call frees the global slot, not its peer's
    assert adm.active == 3
    assert adm.admit("ipv4:10.0.0.1:4", None) is Refusal.PEER_QUOTA
    now[0] = 11.0
    assert adm.stalled == 0
    assert not isinstance(adm.admit("ipv4:10.0.0.1:4", None), Refusal)


def test_refusals_held_before_their_answer_are_bounded_per_host_and_in_all() -> None:
    adm = Admission(Quotas(4, 2, 2, 2, 10, refusal_hold_s=1.0, held_per_peer=2, max_held=3))
    assert adm.hold("ipv4:10.0.0.1:1") and adm.hold("ipv4:10.0.0.1:2")
    assert not adm.hold("ipv4:10.0.0.1:3")  # that host's bound: answered at once
    assert adm.hold("ipv4:10.0.0.2:1")
    assert not adm.hold("ipv4:10.0.0.3:1")  # the table's bound
    adm.unhold("ipv4:10.0.0.1:1")
    assert adm.held == 2
    assert adm.hold("ipv4:10.0.0.3:1")
    off = Admission(Quotas(4, 2, 2, 2, 10, refusal_hold_s=0))
    assert not off.hold("ipv4:10.0.0.1:1")


async def test_streams_reopened_as_they_are_refused_meet_a_held_answer(
    served: tuple[Node, Node, GrpcServer], caplog: pytest.LogCaptureFixture
) -> None:
    # A peer that reopens every refused stream at once used to cost the node a
    # refusal per round trip (~100 a second from one connection). Refusals of
    # its own quota are held before the answer, keeping its HTTP/2 streams, so
    # it is refused about its stream limit per hold instead.
    node, honest, server = served
    caplog.set_level(logging.WARNING, logger="syncfw.transport")
    atk = await hostile.RawPeer(
        "127.0.0.1", server.port, source="127.0.0.6", window=65535
    ).connect()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            while len(atk.open_ids) < 16 and atk.open() is not None:
                pass
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        refused = _refused(node).get("peer_quota", 0)
        hold = CFG.quotas().refusal_hold_s
        # 12 streams over the quota of 4, refused once per hold each (and 16 per
        # connection is the stream limit the held ones keep)
        assert 1 <= refused <= 12 * (elapsed / hold + 1), refused
        assert server.admission.held <= 12
        # the log bound stated in the README: per peer host and reason at most one
        # line per refusal_log_interval_s, each under 400 bytes
        lines = [r.getMessage() for r in caplog.records if "127.0.0.6" in r.getMessage()]
        reasons = {m.split("(")[1].split(")")[0] for m in lines}
        assert lines and reasons <= {"peer_quota", "no_hello"}, lines
        assert all(len(m) < 400 for m in lines), lines
        per_reason = CFG.refusal_log_interval_s
        assert len(lines) <= len(reasons) * (elapsed / per_reason + 1), lines
        assert await _honest_round(honest, server, 5) == 5
    finally:
        await atk.aclose()
    await wait_until(lambda: server.admission.held == 0, timeout_s=5)
