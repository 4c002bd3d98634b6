"""What the inference module needs from a node: an id, an async ``put``, optionally status and metrics.

The engine and the ladder depend on these small protocols rather than on
:class:`syncfw.node.Node`, which keeps this package testable in layers and free
of the node's imports; a real ``Node`` satisfies them. Keys are built with
:mod:`syncfw.keys`, the one place that spells the per-node layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from syncfw.log import Op

if TYPE_CHECKING:
    from syncfw.metrics import NodeMetrics

__all__ = ["MetricsHost", "ResultSink", "StatusHost"]


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


@runtime_checkable
class MetricsHost(Protocol):
    """A node with a Prometheus registry (optional for a sink): the engine records per call there."""

    @property
    def metrics(self) -> NodeMetrics:
        """The node's metric families."""
        ...
