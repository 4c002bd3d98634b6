"""Shared fixtures: a controllable wall clock (syncfw.testing.FakeClock) and a factory of
real SQLite-backed nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from syncfw import Fleet, Grant, Node, StoreConfig
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
    ) -> Node:
        node = await Node.open(
            path or tmp_path / f"{node_id}.db",
            node_id=node_id,
            fleet=fleet,
            config=config,
            clock=wall or clock,
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
