"""What :meth:`Node.open` returns: await it, or use it with ``async with``."""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from syncfw.metrics import NodeMetrics
from syncfw.store import Store, StoreConfig
from syncfw.zones import Fleet

if TYPE_CHECKING:
    from syncfw.node.node import Node

__all__ = ["Opening"]


class Opening:
    """What :meth:`Node.open` returns: await it, or use it with ``async with``."""

    def __init__(
        self,
        cls: type[Node],
        path: str | Path,
        node_id: str,
        fleet: Fleet,
        config: StoreConfig | None,
        clock: Callable[[], int],
    ) -> None:
        self._args = (cls, path, node_id, fleet, config, clock)
        self._node: Node | None = None

    async def _open(self) -> Node:
        cls, path, node_id, fleet, config, clock = self._args
        metrics = NodeMetrics(node_id)
        store = await Store.open(
            path, node_id=node_id, fleet=fleet, wall=clock, config=config, metrics=metrics
        )
        return cls(store, metrics)

    def __await__(self) -> Generator[Any, None, Node]:
        return self._open().__await__()

    async def __aenter__(self) -> Node:
        self._node = await self._open()
        return self._node

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._node is not None:
            await self._node.close()
