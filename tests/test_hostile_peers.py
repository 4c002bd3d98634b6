"""The peers table is bounded: acks from many invented peer ids, against a real node.

Peers acknowledge what they hold, and the node records it (table ``peers``).
In an unsigned fleet any id is recorded, so a peer inventing ids could grow
the table without end. Past its bound (:mod:`syncfw.store.budget`) the least
recently heard ids no zone grant names are forgotten, in the same
transaction, with a count and a rate-limited WARNING; zone owners are kept,
and the honest peer keeps being served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncfw.exchange import run_exchange
from syncfw.node import Node
from syncfw.store.budget import PeerBound
from syncfw.testing.memory import MemoryReplica
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import ChannelPool, GrpcServer, TransportConfig
from syncfw.zones import Fleet, Grant

FLEET = Fleet(fleet_id="f", grants=(Grant.of("site/", "b", epoch=0),))
CFG = TransportConfig.test(exchange_timeout_s=3.0, hello_timeout_s=1.0)
BOUND = 16


def test_the_oldest_unprotected_make_room() -> None:
    bound = PeerBound(4)
    acks: dict[str, object] = {p: None for p in ("owner", "x1", "x2", "x3")}
    assert bound.evictions(acks, "x1", {"owner"}) == []  # known: nothing to do
    assert bound.evictions(acks, "new", {"owner"}) == ["x1"]
    assert bound.evictions(acks, "new", {"owner", "x1", "x2", "x3"}) == []  # all protected


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, GrpcServer]]:
    node = await Node.open(tmp_path / "a.db", node_id="a", fleet=FLEET)
    honest = await Node.open(tmp_path / "b.db", node_id="b", fleet=FLEET)
    node.store._peer_bound = PeerBound(BOUND)
    await node.put("fleet/a/k", "v")

    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream, timeout_s=CFG.exchange_timeout_s, metrics=node.metrics)

    server = await GrpcServer.start("127.0.0.1:0", handler, config=CFG, metrics=node.metrics)
    yield node, honest, server
    await server.aclose(grace_s=0)
    await honest.close()
    await node.close()


async def test_acks_from_invented_ids_never_grow_the_peers_table_past_its_bound(
    served: tuple[Node, Node, GrpcServer], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    node, honest, server = served
    caplog.set_level(logging.WARNING, logger="syncfw.store")
    pool = ChannelPool(CFG)
    try:
        assert (await run_exchange(honest, await pool.open(server.address), timeout_s=3.0)).ok
        for i in range(5 * BOUND):
            ghost = MemoryReplica(f"ghost{i}", FLEET)
            out = await run_exchange(ghost, await pool.open(server.address), timeout_s=3.0)
            assert out.ok, out
            if i % 16 == 0:  # the honest peer keeps being served
                await honest.put("site/n", i)
                assert (
                    await run_exchange(honest, await pool.open(server.address), timeout_s=3.0)
                ).ok
    finally:
        await pool.aclose()
    acks = await node.store.peer_acks()
    assert len(acks) <= BOUND
    assert "b" in acks  # a zone owner is never evicted
    assert f"ghost{5 * BOUND - 1}" in acks  # the most recent stay
    assert "ghost0" not in acks
    assert node.metrics.snapshot()["peers_evicted"] >= 4 * BOUND - 1
    lines = [r.getMessage() for r in caplog.records if "peers table is full" in r.getMessage()]
    assert len(lines) == 1, lines  # rate-limited
    await node.close()  # the table on disk is bounded too, and survives a restart
    again = await Node.open(tmp_path / "a.db", node_id="a", fleet=FLEET)
    try:
        assert set(await again.store.peer_acks()) == set(acks)
    finally:
        await again.close()


async def test_a_cancelled_ack_caller_is_recorded_and_the_next_one_too(tmp_path: Path) -> None:
    node = await Node.open(tmp_path / "a.db", node_id="a", fleet=FLEET)
    try:
        first = asyncio.ensure_future(node.store.acknowledge("p1", {"a": 1}))
        second = asyncio.ensure_future(node.store.acknowledge("p2", {"a": 2}))
        await asyncio.sleep(0)
        first.cancel()
        await second
        assert node.store.peer_ack("p1") == {"a": 1}  # recorded all the same
        assert node.store.peer_ack("p2") == {"a": 2}
    finally:
        await node.close()
