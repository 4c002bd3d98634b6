"""Conformance checks every transport must pass (run against in-memory and gRPC).

A transport carries bytes only: each message arrives whole, in order, exactly
as sent, whatever it holds (frames are the exchange runner's business).
``pair`` is an async context manager factory yielding two connected
:class:`~syncfw.transport.base.FrameStream` ends (dialer, listener).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from syncfw.exchange import run_exchange
from syncfw.sync import (
    PROTOCOL_VERSION,
    Ack,
    Close,
    Digest,
    Frame,
    Hello,
    Ops,
    PeerInfo,
    Peers,
    Status,
    Summary,
)
from syncfw.testing.memory import MemoryReplica
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.wire import encode_frame

__all__ = ["SAMPLE_FRAMES", "SAMPLE_MESSAGES", "check_transport"]

PairFactory = Callable[[], AbstractAsyncContextManager[tuple[FrameStream, FrameStream]]]

SAMPLE_FRAMES: tuple[Frame, ...] = (
    Hello(PROTOCOL_VERSION, "f", "n", 7, ("zstd",), 4096),
    Digest(b"\x05" * 16),
    Summary({"a": 3, "b": 1}),
    Ops(b"\x01\x00\x90", last=True),
    Ack({"a": 4}),
    Peers((PeerInfo("x", "127.0.0.1:1", 2),)),
    Close(Status.INVALID_ARGUMENT, "why"),
)

SAMPLE_MESSAGES: tuple[bytes, ...] = (
    *(encode_frame(f) for f in SAMPLE_FRAMES),
    b"\xff\xff\xff not a frame",  # a transport never parses what it carries
    b"\x00",
    bytes(range(256)) * 64,
)
"""Messages every transport must carry unchanged: every frame kind's wire bytes and some that are no frame."""


async def check_transport(pair: PairFactory, *, burst: int = 200) -> None:
    """Assert the transport behaves as the exchange runner assumes.

    Args:
        pair: opens two connected stream ends (dialer, listener).
        burst: messages sent before the other side reads (backpressure).

    Raises:
        AssertionError: a property does not hold.
    """
    await _both_ways(pair)
    await _burst(pair, burst)
    await _closes(pair)
    await _converges(pair)


async def _both_ways(pair: PairFactory) -> None:
    """Every message crosses both ways, in order, byte for byte (sending may wait
    for the reader: that is backpressure, so the sends run beside the reads)."""
    async with pair() as (a, b):
        for src, dst, msgs in ((a, b, SAMPLE_MESSAGES), (b, a, SAMPLE_MESSAGES[::-1])):

            async def send_all(src: FrameStream = src, msgs: tuple[bytes, ...] = msgs) -> None:
                for m in msgs:
                    await src.send(m)

            task = asyncio.create_task(send_all())
            got = [await dst.recv() for _ in msgs]
            await task
            assert got == list(msgs), [len(g or b"") for g in got]
            assert all(type(g) is bytes for g in got), [type(g) for g in got]
        await a.close(Status.OK, "")
        await b.close(Status.OK, "")


async def _burst(pair: PairFactory, burst: int) -> None:
    """A burst sent before the other side reads is delivered whole, in order."""
    async with pair() as (a, b):
        big = [bytes([i % 256]) * 1000 + i.to_bytes(4, "big") for i in range(burst)]

        async def sender() -> None:
            for m in big:
                await a.send(m)

        task = asyncio.create_task(sender())
        got = [await b.recv() for _ in big]
        await task
        assert got == big
        await a.close(Status.OK, "")
        await b.close(Status.OK, "")


async def _closes(pair: PairFactory) -> None:
    """A clean close reads as end of stream; an error close as LinkError with its status."""
    async with pair() as (a, b):
        await a.close(Status.OK, "")
        assert await b.recv() is None
        await b.close(Status.OK, "")
    async with pair() as (a, b):
        await b.close(Status.FAILED_PRECONDITION, "not this fleet")
        status: Status | None = None
        try:
            got = await a.recv()
        except LinkError as exc:
            status = exc.status
        else:
            raise AssertionError(f"expected LinkError, got {got!r}")
        assert status is Status.FAILED_PRECONDITION, status
        await a.close(Status.ABORTED, "")


async def _converges(pair: PairFactory) -> None:
    """A whole exchange over it converges, and both runners count the same bytes."""
    async with pair() as (a, b):
        x, y = MemoryReplica("x"), MemoryReplica("y")
        for i in range(300):
            x.put(f"fleet/x/k{i}", "v" * 100)
        y.put("fleet/y/k", 1)
        rx, ry = await asyncio.gather(run_exchange(x, a), run_exchange(y, b))
        assert rx.ok, rx
        assert ry.ok, ry
        assert x.state == y.state
        assert rx.bytes_sent == ry.bytes_received, (rx, ry)
        assert ry.bytes_sent == rx.bytes_received, (rx, ry)
