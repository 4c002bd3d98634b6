"""A backlog over a thin, shaped TCP link: steady progress, nothing sent twice.

The link is a :class:`~syncfw.testing.shaping.ShapedLink` on loopback in front
of a real gRPC server; the backlog is 1 KiB writes of random bytes (zstd cannot
shrink them), scaled to a few seconds of the link so the test stays short.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

from syncfw.codec import encode_batch
from syncfw.exchange import ExchangeOutcome, run_exchange
from syncfw.sync import Status
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.shaping import ShapedLink
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import ChannelPool, GrpcServer
from syncfw.zones import Fleet

FLEET = Fleet(fleet_id="thin")
RATE = 48 * 1024  # bytes/s: 64 kbit/s scaled up 6x to keep the test short
WRITES = 160


async def _setup() -> tuple[
    MemoryReplica, MemoryReplica, GrpcServer, ShapedLink, list[ExchangeOutcome]
]:
    a, b = MemoryReplica("a", FLEET), MemoryReplica("b", FLEET)
    served: list[ExchangeOutcome] = []

    async def handler(stream: FrameStream) -> None:
        served.append(await run_exchange(b, stream, timeout_s=5.0))

    server = await GrpcServer.start("127.0.0.1:0", handler)
    link = await ShapedLink(server.address, rate_bps=RATE).start()
    for k in range(WRITES):
        a.put(f"fleet/a/k{k}", os.urandom(1024))
    return a, b, server, link, served


async def test_a_backlog_crosses_a_thin_link_with_steady_progress() -> None:
    a, b, server, link, _served = await _setup()
    backlog = len(encode_batch(a.all_ops(), zstd=True, elide_prev=True))
    samples: list[tuple[float, int]] = []

    async def watch() -> None:
        while True:
            samples.append((time.monotonic(), b.vv().get("a", 0)))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    pool = ChannelPool()
    outs: list[ExchangeOutcome] = []
    t0 = time.monotonic()
    try:
        while b.vv().get("a", 0) < WRITES and time.monotonic() - t0 < 30:
            outs.append(
                await run_exchange(a, await pool.open(link.address), timeout_s=5.0, initiator=True)
            )
        took = time.monotonic() - t0
    finally:
        watcher.cancel()
        await pool.aclose()
        await link.aclose()
        await server.aclose()
    assert b.vv().get("a", 0) == WRITES, outs
    assert all(o.status is Status.OK for o in outs), outs
    # applied as it arrives: the first op lands long before the backlog could cross
    first = next(t for t, n in samples if n > 0)
    assert first - t0 < 0.25 * backlog / RATE, (first - t0, backlog / RATE)
    # steady: no stretch of two seconds without an op applied (batches take about one)
    moved = [t for (t, n), (_, m) in itertools.pairwise(samples) if m > n]
    gaps = [y - x for x, y in zip([t0, *moved], moved, strict=False)]
    assert max(gaps) < 2.0, max(gaps)
    efficiency = (backlog / RATE) / took
    assert efficiency >= 0.5, (efficiency, took)
    # outcomes count what was acknowledged, and it is what b applied
    assert sum(o.ops_sent for o in outs) == WRITES
    assert sum(o.ops_queued for o in outs) == WRITES


async def test_two_live_exchanges_with_one_peer_never_send_one_op_twice() -> None:
    a, b, server, link, _served = await _setup()
    pool = ChannelPool()
    try:
        streams = [await pool.open(link.address) for _ in range(3)]
        outs = list(
            await asyncio.gather(
                *(run_exchange(a, s, timeout_s=5.0, initiator=True) for s in streams)
            )
        )
        while b.vv().get("a", 0) < WRITES:  # the ones that finished first left the rest
            outs.append(
                await run_exchange(a, await pool.open(link.address), timeout_s=5.0, initiator=True)
            )
    finally:
        await pool.aclose()
        await link.aclose()
        await server.aclose()
    assert all(o.ok for o in outs), outs
    assert b.vv()["a"] == WRITES
    # parallel copies would multiply this; sharing one link, each op went once
    assert sum(o.ops_queued for o in outs) == WRITES, [o.ops_queued for o in outs]
    assert max(b.apply_count.values()) == 1


async def test_one_exchange_longer_than_the_idle_deadline_runs_on_while_it_progresses() -> None:
    """The server's idle cut (``exchange_timeout_s``) never cuts an exchange that keeps
    moving: the whole backlog crosses the thin link in one exchange of several seconds."""
    from syncfw.transport.rpc import TransportConfig

    a, b = MemoryReplica("a", FLEET), MemoryReplica("b", FLEET)
    idle = 3.0  # longer than one batch takes to cross the link
    cfg = TransportConfig.test(exchange_timeout_s=idle, max_exchange_s=60.0)

    async def handler(stream: FrameStream) -> None:
        await run_exchange(b, stream, timeout_s=idle)

    server = await GrpcServer.start("127.0.0.1:0", handler, config=cfg)
    link = await ShapedLink(server.address, rate_bps=RATE).start()
    for k in range(3 * WRITES):
        a.put(f"fleet/a/k{k}", os.urandom(1024))
    pool = ChannelPool(cfg)
    t0 = time.monotonic()
    try:
        out = await run_exchange(a, await pool.open(link.address), timeout_s=idle, initiator=True)
    finally:
        await pool.aclose()
        await link.aclose()
        await server.aclose()
    took = time.monotonic() - t0
    assert out.status is Status.OK, out
    assert took > 2 * idle, took  # well past the idle deadline, and not cut
    assert b.vv().get("a", 0) == 3 * WRITES
