"""Conformance checks every transport must pass (run against in-memory and gRPC).

``pair`` is an async context manager factory yielding two connected
:class:`~syncfw.transport.base.FrameStream` ends (dialer, listener).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

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
from syncfw.transport.runner import run_exchange

__all__ = ["SAMPLE_FRAMES", "check_transport"]

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


async def check_transport(pair: PairFactory, *, burst: int = 200) -> None:
    """Assert the transport behaves as the exchange runner assumes.

    Raises:
        AssertionError: a property does not hold.
    """
    # 1. every frame kind crosses both ways, in order, unchanged (sending may wait
    #    for the reader: that is backpressure, so the sends run beside the reads)
    async with pair() as (a, b):
        for src, dst, frames in ((a, b, SAMPLE_FRAMES), (b, a, SAMPLE_FRAMES[::-1])):

            async def send_all(src: FrameStream = src, frames: tuple[Frame, ...] = frames) -> None:
                for frame in frames:
                    assert await src.send(frame) > 0

            task = asyncio.create_task(send_all())
            got = [await dst.recv() for _ in frames]
            await task
            assert got == list(frames), got
        await a.close(Status.OK, "")
        await b.close(Status.OK, "")

    # 2. a burst sent before the other side reads is delivered whole, in order
    async with pair() as (a, b):
        big = [Ops(bytes([1, 0]) + bytes([i % 256]) * 1000) for i in range(burst)]

        async def sender() -> None:
            for frame in big:
                await a.send(frame)

        task = asyncio.create_task(sender())
        got = [await b.recv() for _ in big]
        await task
        assert got == big
        await a.close(Status.OK, "")
        await b.close(Status.OK, "")

    # 3. a clean close reads as end of stream; an error close as LinkError with its status
    async with pair() as (a, b):
        await a.close(Status.OK, "")
        assert await b.recv() is None
        await b.close(Status.OK, "")
    async with pair() as (a, b):
        await b.close(Status.FAILED_PRECONDITION, "not this fleet")
        status: Status | None = None
        try:
            got_frame = await a.recv()
        except LinkError as exc:
            status = exc.status
        else:
            raise AssertionError(f"expected LinkError, got {got_frame!r}")
        assert status is Status.FAILED_PRECONDITION, status
        await a.close(Status.ABORTED, "")

    # 4. a whole exchange over it converges
    async with pair() as (a, b):
        x, y = MemoryReplica("x"), MemoryReplica("y")
        for i in range(300):
            x.put(f"fleet/x/k{i}", "v" * 100)
        y.put("fleet/y/k", 1)
        rx, ry = await asyncio.gather(run_exchange(x, a), run_exchange(y, b))
        assert rx.ok, rx
        assert ry.ok, ry
        assert x.state == y.state
