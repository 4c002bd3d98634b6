"""Both transports pass the same conformance checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from syncfw.sync import Status
from syncfw.testing.conformance import check_transport
from syncfw.transport.base import FrameStream
from syncfw.transport.memory import memory_pipe
from syncfw.transport.rpc import ChannelPool, GrpcServer, GrpcStream


@asynccontextmanager
async def _memory() -> AsyncIterator[tuple[FrameStream, FrameStream]]:
    yield memory_pipe(window=4)


class _ServerEnd:
    """The server end; closing it lets the handler return (which ends the call)."""

    def __init__(self, stream: GrpcStream) -> None:
        self.inner = stream
        self.done = asyncio.Event()
        self.peer_address = stream.peer_address
        self.peer_identity = stream.peer_identity

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes | None:
        return await self.inner.recv()

    async def close(self, status: Status, reason: str) -> None:
        await self.inner.close(status, reason)
        self.done.set()


async def test_memory_transport_conforms() -> None:
    await check_transport(_memory)


async def test_grpc_transport_conforms() -> None:
    ends: asyncio.Queue[_ServerEnd] = asyncio.Queue()

    async def handler(stream: FrameStream) -> None:
        assert isinstance(stream, GrpcStream)
        end = _ServerEnd(stream)
        await ends.put(end)
        await end.done.wait()

    server = await GrpcServer.start("127.0.0.1:0", handler)
    pool = ChannelPool()

    @asynccontextmanager
    async def grpc_pair() -> AsyncIterator[tuple[FrameStream, FrameStream]]:
        client = await pool.open(server.address)
        await client.send(b"warm-up")
        end = await ends.get()  # the call reaches the server with its first message
        assert await end.recv() == b"warm-up"
        try:
            yield client, end
        finally:
            end.done.set()

    try:
        await check_transport(grpc_pair)
    finally:
        await pool.aclose()
        await server.aclose(grace_s=0)
