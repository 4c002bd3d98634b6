"""What :meth:`Node.open` returns: await it, or use it with ``async with``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from syncfw.keyfiles import NodeKeys
from syncfw.metrics import NodeMetrics
from syncfw.store import Store, StoreConfig
from syncfw.trust import NodeSigner
from syncfw.zones import Fleet

if TYPE_CHECKING:
    from syncfw.node.node import Node

__all__ = ["Opening"]

log = logging.getLogger("syncfw.node")
_UNSIGNED_WARNED: set[str] = set()


def _fleet_for(node_id: str, fleet: Fleet, keys: NodeKeys | None) -> Fleet:
    """The fleet a node opens in: its keys must match it (refused before any I/O)."""
    if keys is None:
        if fleet.signed:
            raise ValueError(
                f"fleet {fleet.fleet_id!r} is signed (it has an authority key): node "
                f"{node_id!r} needs its keys (Node.open(..., keys=load_node(DIR, {node_id!r})))"
            )
        if fleet.fleet_id not in _UNSIGNED_WARNED:
            _UNSIGNED_WARNED.add(fleet.fleet_id)
            log.warning(
                "fleet %r runs UNSIGNED (development mode): any peer that can sync can forge "
                "any node's ops; give the fleet an authority key (syncfw keys init-fleet)",
                fleet.fleet_id,
            )
        return fleet
    if keys.node_id != node_id:
        raise ValueError(f"keys are for node {keys.node_id!r}, not {node_id!r}")
    if keys.fleet_id != fleet.fleet_id or keys.authority != fleet.authority:
        raise ValueError(
            f"keys are for fleet {keys.fleet_id!r} (authority {keys.authority!r}), not "
            f"{fleet.fleet_id!r} (authority {fleet.authority!r})"
        )
    if not fleet.authority_key:
        return dataclasses.replace(fleet, authority_key=keys.authority_key)
    if fleet.authority_key != keys.authority_key:
        raise ValueError("keys name another authority key than the fleet bootstrap")
    return fleet


async def _announce(node: Node, keys: NodeKeys | None) -> None:
    """Label the trust mode; publish this node's registration in its own zone (once)."""
    mode = "signed" if node.fleet.signed else "unsigned"
    node.metrics.trust_mode.labels(node.node_id, mode).set(1)
    if keys is None or not keys.registration:
        return
    ring = node.store.keys
    assert ring is not None
    if ring.has(keys.registration):
        return
    ring.copy().learn_value(keys.registration)  # TrustError: not the authority's
    await node.publish(keys.registration)


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
        keys: NodeKeys | None = None,
    ) -> None:
        fleet = _fleet_for(node_id, fleet, keys)  # refused before anything is opened
        self._args = (cls, path, node_id, fleet, config, clock, keys)
        self._node: Node | None = None

    async def _open(self) -> Node:
        cls, path, node_id, fleet, config, clock, keys = self._args
        metrics = NodeMetrics(node_id)
        signer = NodeSigner(fleet.fleet_id, keys.signing_key) if keys is not None else None
        store = await Store.open(
            path, node_id=node_id, fleet=fleet, wall=clock, config=config, metrics=metrics,
            signer=signer,
        )
        node = cls(store, metrics)
        try:
            await _announce(node, keys)
        except BaseException:
            await node.close()
            raise
        return node

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
