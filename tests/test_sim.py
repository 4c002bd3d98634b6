"""The deterministic simulator: hundreds of seeds fast, thousands under -m slow.

A failing run names its seed; reproduce it with
``python -c "import asyncio; from syncfw.testing.sim import Simulation; print(asyncio.run(Simulation(SEED).run()))"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from syncfw.errors import StorageFullError
from syncfw.log import ApplyResult, Op
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.sim import FLEET, MemorySimNode, SimConfig, SimNode, Simulation
from syncfw.testing.sqlite_node import SqliteSimNode


async def _seeds(seeds: range, config: SimConfig | None = None, factory: Any = None) -> None:
    failures = []
    for seed in seeds:
        report = await Simulation(seed, config, factory).run()
        if not report.ok:
            failures.append(f"seed {seed}: {report.problems[:3]} ({report})")
    assert not failures, "failing seeds:\n" + "\n".join(failures[:5])


async def test_300_seeds_converge_under_faults() -> None:
    await _seeds(range(300))


async def test_heavy_faults_and_more_nodes() -> None:
    cfg = SimConfig(
        nodes=8,
        writes=120,
        exchanges=150,
        p_drop=0.05,
        p_duplicate=0.05,
        p_reorder=0.05,
        partitions=4,
        crashes=4,
        settle_rounds=20,
    )
    await _seeds(range(1000, 1060), cfg)


async def test_seeds_converge_with_compaction_through_snapshots() -> None:
    """Nodes compact what the peers they heard from acknowledged; a peer they never heard
    from is then below their compaction point, and converges through a snapshot."""
    cfg = SimConfig(nodes=6, writes=90, exchanges=70, compactions=25, crashes=2)
    failures, snapshots, compacted = [], 0, 0
    for seed in range(2000, 2040):
        sim = Simulation(seed, cfg)
        report = await sim.run()
        if not report.ok:
            failures.append(f"seed {seed}: {report.problems[:3]} ({report})")
        compacted += report.compacted
        snapshots += sum(n.mem.snapshots_installed for n in sim.nodes)  # type: ignore[attr-defined]
    assert not failures, "failing seeds:\n" + "\n".join(failures[:5])
    assert compacted > 0 and snapshots > 0, (compacted, snapshots)  # the path was exercised


def test_same_seed_same_run() -> None:
    import asyncio

    one = asyncio.run(Simulation(42).run())
    two = asyncio.run(Simulation(42).run())
    assert one == two
    assert one.dropped + one.duplicated + one.reordered > 0
    assert one.crashes > 0
    assert one.partitions > 0
    assert asyncio.run(Simulation(43).run()) != one


async def test_the_world_is_actually_faulty() -> None:
    totals = {"dropped": 0, "duplicated": 0, "reordered": 0, "crashes": 0, "aborted": 0}
    for seed in range(30):
        r = await Simulation(seed).run()
        totals["dropped"] += r.dropped
        totals["duplicated"] += r.duplicated
        totals["reordered"] += r.reordered
        totals["crashes"] += r.crashes
        totals["aborted"] += r.statuses.get("ABORTED", 0)
    assert all(v > 0 for v in totals.values()), totals


# -- the checker catches broken replicas --------------------------------------------


class _DoubleApply(MemoryReplica):
    async def apply_remote(self, ops: list[Op]) -> ApplyResult:
        for op in ops:  # bug: re-merges ops already held
            if op.origin in self.chains and op.seq <= len(self.chains[op.origin]):
                self._merge(op)
        return await super().apply_remote(ops)


class _Forgetful(MemorySimNode):
    async def crash(self) -> None:  # bug: the last local write was not durable
        await super().crash()
        chain = self.mem.chains.get(self.node_id)
        if chain:
            chain.pop()
            self.mem.hashes[self.node_id].pop()


async def test_checker_flags_double_apply() -> None:
    async def factory(node_id: str, wall: Callable[[], int]) -> SimNode:
        node = MemorySimNode(node_id, wall)
        if node_id == "n1":
            node.mem = node.replica = _DoubleApply(node_id, FLEET, wall=wall)  # type: ignore[assignment]
        return node

    reports = [await Simulation(s, factory=factory).run() for s in range(5)]
    assert any("twice" in p for r in reports for p in r.problems)


async def test_checker_flags_lost_writes() -> None:
    async def factory(node_id: str, wall: Callable[[], int]) -> SimNode:
        return _Forgetful(node_id, wall)

    reports = [await Simulation(s, SimConfig(crashes=4), factory=factory).run() for s in range(10)]
    assert any(not r.ok for r in reports)


# -- the simulator runs the mesh's performer, failure paths included ----------------------


class _FlakyDisk(MemoryReplica):
    """For its first calls every third batch fails to apply and every fifth read fails."""

    def __init__(self, *args: Any, troubled_calls: int = 25, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls = 0
        self.troubled_calls = troubled_calls  # then the disk recovers (before the checker reads)

    def _fail(self, every: int) -> None:
        self.calls += 1
        if self.calls <= self.troubled_calls and self.calls % every == 0:
            raise StorageFullError("disk trouble (simulated)")

    async def apply_remote(self, ops: list[Op]) -> ApplyResult:
        self._fail(3)
        return await super().apply_remote(ops)

    async def ops_since(self, vv: Any, **kw: Any) -> list[Op]:
        self._fail(5)
        return await super().ops_since(vv, **kw)


async def test_storage_failures_end_exchanges_internal_and_lose_nothing() -> None:
    async def factory(node_id: str, wall: Callable[[], int]) -> SimNode:
        node = MemorySimNode(node_id, wall)
        if node_id in ("n1", "n3"):
            node.mem = node.replica = _FlakyDisk(node_id, FLEET, wall=wall)
        return node

    internal = 0
    for seed in range(10):
        report = await Simulation(seed, factory=factory).run()
        assert report.ok, f"seed {seed}: {report.problems}"
        internal += report.statuses.get("INTERNAL", 0)
    assert internal > 0  # the failures happened, and ended their exchanges as the mesh does


# -- the simulator over the real SQLite node, with crash and restart from the file -----------


async def test_simulation_over_sqlite_nodes_with_crash_restart(tmp_path: Path) -> None:
    cfg = SimConfig(nodes=4, writes=40, exchanges=40, crashes=3, foreign_writes=0)
    for seed in range(3):
        run_dir = tmp_path / f"run{seed}"
        run_dir.mkdir()
        report = await Simulation(seed, cfg, SqliteSimNode.factory(run_dir)).run()
        assert report.ok, f"seed {seed}: {report.problems}"
        assert report.crashes > 0


@pytest.mark.slow
async def test_thousands_of_seeds() -> None:
    await _seeds(range(10_000, 13_000))
