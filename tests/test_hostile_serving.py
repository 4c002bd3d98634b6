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
import logging
import resource
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


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, GrpcServer]]:
    node = await Node.open(tmp_path / "a.db", node_id="a", fleet=hostile.FLEET)
    honest = await Node.open(tmp_path / "b.db", node_id="b", fleet=hostile.FLEET)
    for i in range(50):
        await node.put(f"fleet/a/k{i}", "x" * 200)

    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream, timeout_s=CFG.exchange_timeout_s, metrics=node.metrics)

    server = await GrpcServer.start("127.0.0.1:0", handler, config=CFG, metrics=node.metrics)
    yield node, honest, server
    await server.aclose(grace_s=0)
    await honest.close()
    await node.close()


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


async def test_a_sender_that_ignores_flow_control_does_not_grow_memory(
    served: tuple[Node, Node, GrpcServer],
) -> None:
    _node, honest, server = served
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    atk = await hostile.RawPeer(
        "127.0.0.1", server.port, source="127.0.0.5", window=65535
    ).connect()
    try:
        sid = atk.open(hostile.opening())
        assert sid is not None
        sent = await atk.blast(sid, b"\x00" * 16384, 128 << 20)
        await wait_until(lambda: atk.closed or sid in atk.ended, timeout_s=10)
        assert sent > 0
    finally:
        await atk.aclose()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mb < 64, grown_mb
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
