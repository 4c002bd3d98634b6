"""The fleet-wide view of which model each node runs.

Each node writes its running model at :func:`syncfw.keys.model_key`
(``fleet/<node>/model``, its own zone) as a small map; the view folds every
node's entry and names the version most nodes run. Pure functions over a
``scan`` result: they work on any replica's state. The key layout is
:mod:`syncfw.keys`'s; nothing here spells it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from syncfw.keys import FLEET_TEMPLATE, fleet_prefix, model_key, node_of_fleet_key

__all__ = [
    "FleetModelView",
    "ModelStatus",
    "SupportsPut",
    "SupportsScan",
    "fleet_model_view",
    "model_key",
    "model_value",
    "publish_model",
    "read_fleet_models",
]

# every node's fleet zone, ``fleet/``: what the view scans
_FLEET_SCAN = FLEET_TEMPLATE.partition("{node}")[0]
# the name under a node's fleet zone that model_key uses, ``model``
_MODEL_NAME = model_key("_")[len(fleet_prefix("_")) :]


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """The model one node runs.

    Attributes:
        name: model name.
        version: model version.
        sha256: hex digest of the artifact.
        status: ``active``, ``canary``, ``rolled_back``, ``failed``, ...
    """

    name: str
    version: str
    sha256: str
    status: str = "active"


def model_value(model: ModelStatus) -> dict[str, str]:
    """The value to write at :func:`model_key`."""
    return {
        "name": model.name,
        "version": model.version,
        "sha256": model.sha256,
        "status": model.status,
    }


class SupportsPut(Protocol):
    """A node that can write a key (``Node.put``)."""

    async def put(self, key: str, value: Any) -> Any:
        """Write ``value`` at ``key``."""
        ...


class SupportsScan(Protocol):
    """A node that can read a prefix (``Node.scan``)."""

    async def scan(self, prefix: str) -> dict[str, Any]:
        """Every key under ``prefix`` with its value."""
        ...


async def publish_model(node: SupportsPut, node_id: str, model: ModelStatus) -> None:
    """Record that ``node_id`` now runs ``model`` (an op in its own zone, gossiped to the fleet)."""
    await node.put(model_key(node_id), model_value(model))


async def read_fleet_models(node: SupportsScan) -> FleetModelView:
    """The fleet's model view as ``node`` holds it now."""
    return fleet_model_view(await node.scan(_FLEET_SCAN))


@dataclass(frozen=True, slots=True)
class FleetModelView:
    """Every node's model and the fleet's majority.

    Attributes:
        nodes: node id to its model status.
        majority: ``(name, version)`` most nodes run actively (ties: the
            highest version string), or None if no node reports one.
        counts: active nodes per ``(name, version)``.
    """

    nodes: dict[str, ModelStatus]
    majority: tuple[str, str] | None
    counts: dict[tuple[str, str], int]


def fleet_model_view(state: Mapping[str, Any]) -> FleetModelView:
    """Fold a ``scan("fleet/")`` result into the fleet's model view.

    Malformed entries are skipped (a node running old code must not break the view).
    """
    nodes: dict[str, ModelStatus] = {}
    for key, value in state.items():
        node = node_of_fleet_key(key, _MODEL_NAME)
        if node is None or not isinstance(value, Mapping):
            continue
        try:
            nodes[node] = ModelStatus(
                str(value["name"]),
                str(value["version"]),
                str(value["sha256"]),
                str(value.get("status", "active")),
            )
        except KeyError:
            continue
    counts = Counter((m.name, m.version) for m in nodes.values() if m.status == "active")
    majority = max(counts, key=lambda nv: (counts[nv], nv[1], nv[0])) if counts else None
    return FleetModelView(dict(sorted(nodes.items())), majority, dict(counts))
