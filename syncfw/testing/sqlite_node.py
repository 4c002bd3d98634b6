"""The simulator's SQLite node: a real :class:`~syncfw.node.Node` that crashes and restarts from its file.

Plug it into :class:`~syncfw.testing.sim.Simulation` with
:meth:`SqliteSimNode.factory`; a crash closes the node (only what SQLite made
durable survives) and a restart opens the same file again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from syncfw.log import Op
from syncfw.node import Node
from syncfw.store import StoreConfig
from syncfw.testing.sim import FLEET, NodeFactory, SimNode

__all__ = ["SqliteSimNode"]

# a simulated node's clock drifts and is offset on purpose: the store's max-offset
# guard must not refuse the simulator's own skew
_SIM_MAX_OFFSET_MS = 60_000


class SqliteSimNode(SimNode):
    """A SQLite-backed simulated node.

    Args:
        path: the node's database file (created on first :meth:`open`).
        node_id: the node's id.
        wall: its (drifting) wall clock in milliseconds, from the simulator.
    """

    def __init__(self, path: Path, node_id: str, wall: Callable[[], int]) -> None:
        self.path = path
        self.node_id = node_id
        self.wall = wall
        self.node: Node | None = None

    @classmethod
    def factory(cls, directory: Path) -> NodeFactory:
        """A simulator node factory opening each node at ``directory / "<node id>.db"``.

        Use a fresh ``directory`` per run: a run's nodes start empty.
        """

        async def make(node_id: str, wall: Callable[[], int]) -> SimNode:
            node = cls(directory / f"{node_id}.db", node_id, wall)
            await node.open()
            return node

        return make

    async def open(self) -> None:
        """Open (or reopen) the node from its file."""
        self.node = await Node.open(
            self.path,
            node_id=self.node_id,
            fleet=FLEET,
            clock=self.wall,
            config=StoreConfig(max_offset_ms=_SIM_MAX_OFFSET_MS),
        )
        self.replica = self.node

    def _open_node(self) -> Node:
        if self.node is None:
            raise RuntimeError(f"simulated node {self.node_id} is not open")
        return self.node

    async def write(self, key: str, value: Any) -> Op:
        """A local write through :meth:`Node.put`."""
        op: Op = await self._open_node().put(key, value)
        return op

    async def crash(self) -> None:
        """Close the node: what was not committed is gone."""
        await super().crash()
        await self._open_node().close()

    async def restart(self) -> None:
        """Reopen the node from its file."""
        await self.open()
        await super().restart()

    async def fingerprint(self) -> Any:
        """The node's version vector and state digest."""
        node = self._open_node()
        return (await node.version_vector(), await node.state_digest())

    async def aclose(self) -> None:
        """Close the node if it is up."""
        if self.up and self.node is not None:
            await self.node.close()
