"""Signed chains on the real gRPC stack: a hostile fleet member relays forged ops to a served
node; nothing forged is applied, the attacker's exchange is not what stops, honest peers keep
converging, and a cloned key becomes fork evidence."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncfw import Fleet, Grant, Node
from syncfw.exchange import run_exchange
from syncfw.log import Op, OpChain, encode_value, op_hash
from syncfw.testing import MemoryReplica, SignedFleet, wait_until
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import ChannelPool, GrpcServer, TransportConfig
from syncfw.zones import GRANT_KIND

pytestmark = pytest.mark.asyncio

CFG = TransportConfig.test(exchange_timeout_s=5.0)
SF = SignedFleet(Fleet(fleet_id="trust-grpc", grants=(Grant.of("site/", "*"),)))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, GrpcServer]]:
    node = await Node.open(tmp_path / "depot.db", node_id="depot", fleet=SF.fleet,
                           keys=SF.keys("depot"))
    await node.put("fleet/depot/door", "locked")

    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream, timeout_s=CFG.exchange_timeout_s, metrics=node.metrics)

    server = await GrpcServer.start("127.0.0.1:0", handler, config=CFG, metrics=node.metrics)
    yield node, server
    await server.aclose(grace_s=0)
    await node.close()


async def _dial(replica: object, server: GrpcServer) -> bool:
    pool = ChannelPool(CFG)
    try:
        out = await run_exchange(replica, await pool.open(server.address), timeout_s=5.0)  # type: ignore[arg-type]
    finally:
        await pool.aclose()
    return out.ok


def _next(r: MemoryReplica, origin: str, key: str, value: object, *, zone: str | None = None,
          kind: str = "lww", payload: bytes | None = None) -> Op:
    """The op a forger would mint as ``origin``'s next, on the heads it learned by syncing."""
    seq, head = r._head(origin)
    z = zone if zone is not None else f"fleet/{origin}/"
    op = OpChain(origin, seq, head).mint(
        r.hlc_now(), z, 0, key, kind,
        payload if payload is not None else encode_value(value),
    )
    return dataclasses.replace(op, sig=b"\x07" * 64)  # a signature it cannot make


async def test_forged_relayed_ops_are_never_applied_and_honest_peers_converge(
    served: tuple[Node, GrpcServer], tmp_path: Path
) -> None:
    depot, server = served
    honest = await Node.open(tmp_path / "t2.db", node_id="t2", fleet=SF.fleet, keys=SF.keys("t2"))
    try:
        await honest.put("fleet/t2/brakes", "ok")
        assert await _dial(honest, server)
        evil = MemoryReplica("evil", SF.fleet)
        evil.signer = SF.signer("evil")
        evil.put("fleet/evil/hello", 1)
        assert await _dial(evil, server)  # an ordinary sync: it now holds every chain head
        forged = [
            _next(evil, "t2", "fleet/t2/brakes", "disabled"),
            _next(evil, "depot", "fleet/depot/door", "unlocked"),  # the receiver's own chain
            _next(evil, "cloud", "sys/zones/trucks/t7/", None, zone="sys/", kind=GRANT_KIND,
                  payload=encode_value({"prefix": "trucks/t7/", "owners": ["evil"], "epoch": 1})),
        ]
        for op in forged:
            evil._append(op)
        await _dial(evil, server)
        assert await depot.get("fleet/t2/brakes") == "ok"
        assert await depot.get("fleet/depot/door") == "locked"
        assert "cloud" not in await depot.version_vector()
        assert depot.store.pending_counts()["unsigned"] >= 1
        # The genuine op at t2's next seq replaces the forged one; nothing was refused.
        await honest.put("fleet/t2/brakes", "checked")
        assert await _dial(honest, server)
        assert await depot.get("fleet/t2/brakes") == "checked"
        assert (await depot.version_vector())["t2"] == (await honest.version_vector())["t2"]
        await depot.put("fleet/depot/door", "open")  # its own chain goes on
        assert await depot.get("fleet/depot/door") == "open"
    finally:
        await honest.close()


async def test_a_cloned_key_becomes_fork_evidence_over_grpc(
    served: tuple[Node, GrpcServer], tmp_path: Path
) -> None:
    depot, server = served
    truck = await Node.open(tmp_path / "t3.db", node_id="t3", fleet=SF.fleet, keys=SF.keys("t3"))
    try:
        await truck.put("fleet/t3/a", 1)
        assert await _dial(truck, server)
        # A clone of t3's box (same key) holds the same history, then writes its own.
        clone = MemoryReplica("t3", SF.fleet)
        clone.signer = SF.signer("t3")
        await clone.apply_remote(await truck.ops_since({}))
        await truck.put("fleet/t3/a", 2)
        assert await _dial(truck, server)
        clone.put("fleet/t3/a", 666)  # at the seq of t3's genuine a=2: a fork
        seq = clone.vv()["t3"]
        clone.put("fleet/t3/a", 667)  # beyond what depot holds, so it is sent
        assert clone.chains["t3"][-1].prev == op_hash(clone.chains["t3"][-2])
        await _dial(clone, server)
        await wait_until(lambda: "t3" in depot.store.forks, timeout_s=5, what="fork evidence")
        assert depot.store.forks["t3"] == seq
        assert await depot.get("fleet/t3/a") == 2
        st = await depot.status()
        assert st["trust"]["forks"] == {"t3": seq}
    finally:
        await truck.close()
