"""What the inference module needs from a node: an id and an async ``put``.

The engine and the ladder depend on these small protocols rather than on
:class:`syncfw.node.Node`, which keeps this package testable in layers and free
of the node's imports; a real ``Node`` satisfies both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from syncfw.log import Op

__all__ = ["ResultSink", "StatusHost", "telemetry_prefix", "results_prefix", "fleet_prefix"]


class ResultSink(Protocol):
    """Where results, samples and mode transitions are written (a ``Node``)."""

    @property
    def node_id(self) -> str:
        """This node's id; it owns ``results/<id>/``, ``telemetry/<id>/`` and ``fleet/<id>/``."""
        ...

    async def put(self, key: str, value: Any) -> Op:
        """Append one op setting ``key`` and return it once it is in the log."""
        ...


@runtime_checkable
class StatusHost(Protocol):
    """A node that shows extra status sections (optional for a sink)."""

    def add_status_source(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Show ``fn()`` under ``name`` in the node's status."""
        ...


def results_prefix(node_id: str) -> str:
    """The node's own results zone."""
    return f"results/{node_id}/"


def telemetry_prefix(node_id: str) -> str:
    """The node's own (bounded, lower priority) telemetry zone."""
    return f"telemetry/{node_id}/"


def fleet_prefix(node_id: str) -> str:
    """The node's own fleet-visible status zone."""
    return f"fleet/{node_id}/"
