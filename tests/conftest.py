"""Shared fixtures: a controllable wall clock (syncfw.testing.FakeClock) and a factory of
real SQLite-backed nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from syncfw import Fleet, Grant, Node, StoreConfig
from syncfw.keyfiles import NodeKeys
from syncfw.testing import FakeClock

__all__ = ["FLEET", "START_MS", "FakeClock", "NodeFactory", "exchange"]

START_MS = 1_790_000_000_000


FLEET = Fleet(
    fleet_id="test-fleet",
    authority="cloud",
    grants=(
        Grant.of("trucks/t7/", "t7"),
        Grant.of("trucks/t9/", "t9"),
        Grant.of("site/", "*"),
    ),
)

NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START_MS)


@pytest.fixture
async def make_node(tmp_path: Path, clock: FakeClock) -> AsyncIterator[NodeFactory]:
    """Open real nodes in ``tmp_path``; all are closed at the end of the test."""
    opened: list[Node] = []

    async def factory(
        node_id: str,
        *,
        fleet: Fleet = FLEET,
        config: StoreConfig | None = None,
        wall: Callable[[], int] | None = None,
        path: Path | None = None,
        keys: NodeKeys | None = None,
    ) -> Node:
        node = await Node.open(
            path or tmp_path / f"{node_id}.db",
            node_id=node_id,
            fleet=fleet,
            config=config,
            clock=wall or clock,
            keys=keys,
        )
        opened.append(node)
        return node

    yield factory
    for node in opened:
        await node.close()


async def exchange(a: Node, b: Node) -> None:
    """Both directions of a full in-process anti-entropy exchange."""
    for src, dst in ((a, b), (b, a)):
        while ops := await src.ops_since(await dst.version_vector(), limit=1000):
            await dst.apply_remote(ops)


async def raw_exchange(
    address: str, frames: list[bytes], *, timeout_s: float = 20.0
) -> tuple[grpc.StatusCode, str]:
    """Send ``frames`` (encoded sync frames) on one raw ``Exchange`` call; its status and details.

    The frames come from a request iterator, not ``call.write()``: the server
    may end the call after any frame (a wrong protocol ends it at Hello), and a
    write racing that end fails locally with INTERNAL, hiding the server's
    status; grpc stops consuming an iterator quietly once the call is over.
    """
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:

        async def requests() -> AsyncIterator[bytes]:
            for f in frames:
                yield f

        call = ch.stream_stream("/syncfw.v1.Sync/Exchange")(requests(), timeout=timeout_s)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            pass
        return await call.code(), await call.details() or ""
