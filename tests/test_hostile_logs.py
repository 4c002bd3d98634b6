"""Log lines a peer causes are clipped and rate-limited per reason, against a real node.

A hostile peer sends batch after batch of ops from invented origins into a
zone they do not own: every op is rejected (and recorded, as everywhere).
The planner writes one line per rejected op; the store logs them through
:class:`~syncfw.store.plan_log.PlanLog`, so the log holds a few lines per
reason, each saying how many it stands for, while an honest peer syncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from syncfw.codec import encode_batch
from syncfw.exchange import run_exchange
from syncfw.node import Node
from syncfw.store.plan_log import PlanLog, reason_of
from syncfw.sync import PROTOCOL_VERSION, Digest, Hello, Ops, Summary
from syncfw.testing.ops import OpWriter
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import ChannelPool, GrpcServer, TransportConfig
from syncfw.transport.wire import encode_frame
from syncfw.zones import Fleet

FLEET = Fleet(fleet_id="f")
CFG = TransportConfig.test(exchange_timeout_s=3.0, hello_timeout_s=1.0)
EXCHANGE_PATH = "/syncfw.v1.Sync/Exchange"


def test_reasons_are_fixed_words_whatever_the_peer_wrote() -> None:
    assert reason_of("rejected op ('x', 3) on 'fleet/a/k': origin 'x' did not own zone "
                     "'fleet/a/' at epoch 0") == "rejected:not_owner"
    assert reason_of("dropping pending op ('x', 9): broken chain") == "dropped_pending"
    assert reason_of("stripped 3 signature(s) of x that do not verify") == "stripped_sig"
    assert reason_of("held-back ops over max_pending (5 ops) or ...") == "max_pending"
    assert reason_of("anything else \x00 a peer may say") == "other"


def test_one_line_per_reason_per_interval_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    plan_log = PlanLog(logging.getLogger("test.plan"), "a", every_s=10.0)
    plan_log.notices._clock = lambda: now[0]
    caplog.set_level(logging.WARNING, logger="test.plan")
    long_key = "k" * 5000
    batch = [f"rejected op ('e{i}', 1) on {long_key!r}: origin 'e{i}' did not own zone 'z'"
             for i in range(1000)]
    assert plan_log.emit(batch) == 1
    assert plan_log.emit(batch) == 0  # held back and counted
    now[0] = 11.0
    assert plan_log.emit(batch[:1]) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all(len(m) < 500 for m in lines)  # clipped
    assert "999 more like it in this batch" in lines[0]
    assert "[1001 since the last such line]" in lines[1]  # 1000 held back, and this one
    assert plan_log.events == 2001


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, GrpcServer]]:
    node = await Node.open(tmp_path / "a.db", node_id="a", fleet=FLEET)
    honest = await Node.open(tmp_path / "b.db", node_id="b", fleet=FLEET)
    await node.put("fleet/a/k", "v")

    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream, timeout_s=CFG.exchange_timeout_s, metrics=node.metrics)

    server = await GrpcServer.start("127.0.0.1:0", handler, config=CFG, metrics=node.metrics)
    yield node, honest, server
    await server.aclose(grace_s=0)
    await honest.close()
    await node.close()


async def _send_rejected(port: int, origin: str, n: int) -> None:
    """One call: the opening and one batch of ``n`` ops of ``origin`` in a zone it does not own."""
    w = OpWriter(origin, zone="fleet/a/")
    ops = [w.write(f"x{i}", i) for i in range(n)]
    frames = [
        encode_frame(Hello(PROTOCOL_VERSION, FLEET.fleet_id, origin)),
        encode_frame(Digest(b"\x01" * 16)),
        encode_frame(Summary({})),
        encode_frame(Ops(encode_batch(ops), last=True)),
    ]

    async def requests() -> AsyncIterator[bytes]:
        for f in frames:
            yield f
        await asyncio.sleep(0.5)  # the node applies the batch meanwhile

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(EXCHANGE_PATH)(requests(), timeout=2)
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in call:
                pass


async def test_a_flood_of_rejected_ops_costs_a_few_log_lines_and_the_honest_peer_is_served(
    served: tuple[Node, Node, GrpcServer], caplog: pytest.LogCaptureFixture
) -> None:
    node, honest, server = served
    caplog.set_level(logging.WARNING, logger="syncfw")
    pool = ChannelPool(CFG)
    t0 = time.monotonic()
    try:
        for i in range(8):
            await _send_rejected(server.port, f"evil{i}", 200)
            await honest.put("fleet/b/n", i)
            out = await run_exchange(honest, await pool.open(server.address), timeout_s=3.0)
            assert out.ok, out
    finally:
        await pool.aclose()
    assert time.monotonic() - t0 < 20
    rejected = await node.store.rejected()
    assert len(rejected) == 8 * 200  # every one recorded: nothing refused unseen
    assert await honest.get("fleet/a/k") == "v"
    assert await node.get("fleet/b/n") == 7
    store_lines = [r.getMessage() for r in caplog.records if r.name == "syncfw.store"]
    for me in ("a", "b"):  # the honest peer is relayed the rejected ops and rejects them too
        mine = [m for m in store_lines if m.startswith(f"{me}: rejected op")]
        assert len(mine) == 1, mine  # 1,600 rejections within the interval: one line
    rejected_lines = [m for m in store_lines if m.startswith("a: rejected op")]
    assert "199 more like it in this batch" in rejected_lines[0]
    assert len(caplog.text) < 20_000


def test_grpcs_traceback_for_a_call_already_ended_is_one_rate_limited_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from grpc._cython import cygrpc

    from syncfw.transport import rpc

    caplog.set_level(logging.DEBUG)
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    before = rpc._ENDED_CALLS.dropped
    for _ in range(50):  # as a peer stalling call after call would cause
        try:
            raise cygrpc.ExecuteBatchError("Failed grpc_call_start_batch")
        except cygrpc.ExecuteBatchError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [/x]")
    grpc_log.error("something else grpc says")
    assert rpc._ENDED_CALLS.dropped - before == 50
    from_grpc = [r for r in caplog.records if r.name == "grpc._cython.cygrpc"]
    assert [r.getMessage() for r in from_grpc] == ["something else grpc says"]
    ours = [r for r in caplog.records if "could not finish a call" in r.getMessage()]
    assert len(ours) == 1 and ours[0].levelno == logging.WARNING
    assert "Traceback" not in ours[0].getMessage()
