"""Bad input at the gRPC seam, against a real SQLite node.

Each case ends that exchange with a clear gRPC status and a log line, applies
nothing of the bad batch, and the node keeps serving its other peers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import zstandard
from conftest import raw_exchange

from syncfw.codec import BATCH_VERSION, COMPRESS_ZSTD, encode_batch
from syncfw.exchange import run_exchange
from syncfw.exchange.runner import cpu_budget
from syncfw.log import Op
from syncfw.node import Node
from syncfw.sync import PROTOCOL_VERSION, Digest, Hello, Ops, Summary
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.ops import OpWriter
from syncfw.transport.admission import CpuShare
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import ChannelPool, GrpcServer
from syncfw.transport.wire import encode_frame
from syncfw.zones import Fleet

FLEET = Fleet(fleet_id="f")


def _ops(n: int, size: int = 20) -> list[Op]:
    w = OpWriter("evil")
    return [w.write(f"k{i}", "v" * size) for i in range(n)]


def _opening(hello: Hello | None = None) -> list[bytes]:
    return [
        encode_frame(hello or Hello(PROTOCOL_VERSION, "f", "evil")),
        encode_frame(Digest(b"\x01" * 16)),
        encode_frame(Summary({})),
    ]


def _bomb() -> bytes:
    obj = zstandard.ZstdCompressor(level=3).compressobj()  # no declared size
    body = b"".join(obj.compress(b"\x00" * (1 << 20)) for _ in range(64)) + obj.flush()
    return bytes((BATCH_VERSION, COMPRESS_ZSTD)) + body


def _forged() -> bytes:
    ops = _ops(5)
    ops[3] = dataclasses.replace(ops[3], prev=b"\x66" * 32)
    return encode_batch(ops)


def _gap() -> bytes:
    ops = _ops(5)
    return encode_batch([ops[0], ops[1], ops[3], ops[4]])


CASES: dict[str, tuple[list[bytes], grpc.StatusCode, str]] = {
    "malformed frame": (
        [*_opening(), b"\x22\x03\xff\xff"],
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed",
    ),
    "truncated batch": (
        [*_opening(), encode_frame(Ops(encode_batch(_ops(50))[:-7]))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed batch",
    ),
    "oversized batch": (
        [*_opening(), encode_frame(Ops(encode_batch(_ops(3000, 500))))],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "exceeds",
    ),
    "zstd bomb": (
        [*_opening(), encode_frame(Ops(_bomb()))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "cap",
    ),
    "wrong protocol": (
        _opening(Hello(PROTOCOL_VERSION + 1, "f", "evil")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "protocol",
    ),
    "other fleet": (
        _opening(Hello(PROTOCOL_VERSION, "g", "evil")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "fleet",
    ),
    "gap": ([*_opening(), encode_frame(Ops(_gap()))], grpc.StatusCode.INVALID_ARGUMENT, "gap"),
    "forged prev": (
        [*_opening(), encode_frame(Ops(_forged()))],
        grpc.StatusCode.DATA_LOSS,
        "chain",
    ),
}


async def _raw(address: str, frames: list[bytes]) -> tuple[grpc.StatusCode, str]:
    return await raw_exchange(address, frames, timeout_s=10)


@pytest.fixture
async def server_node(tmp_path: Path) -> AsyncIterator[tuple[Any, GrpcServer]]:
    node = await Node.open(tmp_path / "b.db", node_id="b", fleet=FLEET)
    await node.put("fleet/b/x", 1)
    # every peer here is one host (loopback, no mTLS): what a refused batch costs its
    # sender's host (CpuShare.refused_batch_s) is test_hostile_cpu's, not this file's
    budget = cpu_budget(node)
    assert budget is not None
    budget.share = CpuShare(refused_batch_s=0)

    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream)

    server = await GrpcServer.start("127.0.0.1:0", handler)
    yield node, server
    await server.aclose(grace_s=0)
    await node.close()


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_input_ends_the_exchange_cleanly(
    case: str, server_node: tuple[Any, GrpcServer], caplog: pytest.LogCaptureFixture
) -> None:
    node, server = server_node
    frames, code, words = CASES[case]
    before = await node.version_vector()
    with caplog.at_level(logging.WARNING, logger="syncfw.sync"):
        got_code, details = await _raw(server.address, frames)
    assert got_code is code, details
    assert words in details
    # a log line names the peer and the reason
    assert any(words in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # nothing partial: not one op of the bad batch was applied
    assert await node.version_vector() == before
    # the node keeps serving its other peers
    good = MemoryReplica("good", FLEET)
    good.put("fleet/good/y", 2)
    pool = ChannelPool()
    try:
        out = await run_exchange(good, await pool.open(server.address))
    finally:
        await pool.aclose()
    assert out.ok, out
    assert (await node.version_vector())["good"] == 1
