"""Signed fleets in the deterministic simulator: seeded partitions, drops, duplicates,
reordering, crashes and clock drift, with a fleet member that forges every other origin's
next op into each batch it sends. Nothing forged is ever applied, no acknowledged write is
lost, and every replica converges."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from syncfw.log import Op, encode_value
from syncfw.testing import MemoryReplica, SignedFleet
from syncfw.testing.sim import FLEET, MemorySimNode, SimConfig, SimNode, Simulation

pytestmark = pytest.mark.asyncio

SFL = SignedFleet(FLEET)


class ForgingReplica(MemoryReplica):
    """Honest in what it holds; appends a forged next op of every other origin it knows
    (the chain head it learned, a signature it cannot make) to every batch it sends."""

    forged = 0

    async def ops_since(
        self, vv: Mapping[str, int], *, limit: int = 10_000, max_bytes: int | None = None
    ) -> list[Op]:
        out = await super().ops_since(vv, limit=limit, max_bytes=max_bytes)
        for origin in sorted(self.chains):
            if origin == self.node_id:
                continue
            seq, head = self._head(origin)
            out.append(
                Op(origin, seq + 1, self.clock.now(), f"fleet/{origin}/", 0,
                   f"fleet/{origin}/pwned", "lww", encode_value("forged"), head, b"\x66" * 64)
            )
            ForgingReplica.forged += 1
        return out


class SignedSimNode(MemorySimNode):
    def __init__(self, node_id: str, wall: Callable[[], int], *, forging: bool) -> None:
        self.node_id = node_id
        cls = ForgingReplica if forging else MemoryReplica
        self.mem = cls(node_id, SFL.fleet, wall=wall)
        self.mem.signer = SFL.signer(node_id)
        self.mem.publish(SFL.keys(node_id).registration)
        self.replica = self.mem

    async def write_foreign(self, key: str, value: object) -> Op | None:
        return None  # a signed write outside the zones is covered in test_trust_store


async def signed_factory(node_id: str, wall: Callable[[], int]) -> SimNode:
    return SignedSimNode(node_id, wall, forging=node_id == "n1")


@pytest.mark.parametrize("seed", range(4))
async def test_signed_fleet_converges_with_a_forger_among_faults(seed: int) -> None:
    ForgingReplica.forged = 0
    cfg = SimConfig(nodes=5, writes=60, exchanges=120, partitions=2, crashes=2,
                    foreign_writes=0)
    sim = Simulation(seed, cfg, signed_factory)
    report = await sim.run()
    assert report.ok, report.problems
    assert ForgingReplica.forged > 0
    for node in sim.nodes:
        assert isinstance(node, SignedSimNode)
        assert not any(k.endswith("/pwned") for k in node.mem.state), node.node_id
        assert node.mem.forks == {}
