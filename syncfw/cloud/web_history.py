"""The dashboard's recent past: per-node samples of sync lag and inference latency.

The fleet view (:mod:`syncfw.cloud.view`) says how each node is *now*; the
dashboard's charts need how it was a moment ago. :class:`History` keeps, per
node, the last ``points`` samples taken from :meth:`Aggregator.view()
<syncfw.cloud.Aggregator.view>` every ``sample_s`` seconds. It is pure:
:meth:`History.record` takes a view document and a time, and nothing here
reads a clock or awaits.

Invariants:

1. Bounded: at most ``max_nodes`` nodes, each with at most ``points`` samples
   of a fixed shape; a node past ``max_nodes`` is not sampled and is counted
   in :attr:`History.untracked` (shown by the API, never dropped unseen).
2. A sample only repeats what the view said at that time: the figures are the
   view's own (``sync_lag_ops``, ``sync_lag_s``, ``latency_ms``, ``inferences``).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

__all__ = ["History", "Sample"]

Sample = dict[str, Any]
"""One point: ``t_ms``, ``state``, ``lag_ops``, ``lag_s``, ``p50_ms``, ``p95_ms``,
``p99_ms``, ``inferences`` (figures the view did not have are None)."""


def _sample(entry: Mapping[str, Any], t_ms: int) -> Sample:
    lat = entry.get("latency_ms") or {}
    return {
        "t_ms": t_ms,
        "state": entry.get("state"),
        "lag_ops": entry.get("sync_lag_ops"),
        "lag_s": entry.get("sync_lag_s"),
        "p50_ms": lat.get("p50_ms"),
        "p95_ms": lat.get("p95_ms"),
        "p99_ms": lat.get("p99_ms"),
        "inferences": entry.get("inferences"),
    }


class History:
    """Recent samples per node (see the module).

    Args:
        points: samples kept per node (the newest).
        max_nodes: nodes sampled at most.
    """

    def __init__(self, points: int = 300, max_nodes: int = 1024) -> None:
        if points < 1 or max_nodes < 1:
            raise ValueError("points and max_nodes must be at least 1")
        self.points = points
        self.max_nodes = max_nodes
        self._nodes: dict[str, collections.deque[Sample]] = {}
        self.untracked: set[str] = set()
        self.samples = 0

    def record(self, view: Mapping[str, Any], t_ms: int) -> dict[str, Sample]:
        """Take one sample of every node in ``view`` (a fleet view document).

        Returns:
            The samples just taken, by node (the nodes tracked only).
        """
        out: dict[str, Sample] = {}
        nodes: Mapping[str, Any] = view.get("nodes", {})
        for node_id, entry in nodes.items():
            ring = self._nodes.get(node_id)
            if ring is None:
                if len(self._nodes) >= self.max_nodes:
                    self.untracked.add(node_id)
                    continue
                ring = self._nodes[node_id] = collections.deque(maxlen=self.points)
            s = _sample(entry, t_ms)
            ring.append(s)
            out[node_id] = s
        self.samples += 1
        return out

    def nodes(self) -> list[str]:
        """The nodes sampled, sorted."""
        return sorted(self._nodes)

    def has(self, node_id: str) -> bool:
        """True if ``node_id`` has samples."""
        return node_id in self._nodes

    def points_of(self, node_id: str, n: int | None = None) -> list[Sample]:
        """The last ``n`` samples of ``node_id`` (all when None), oldest first."""
        ring = self._nodes.get(node_id)
        if ring is None:
            return []
        items = list(ring)
        return items if n is None else items[-n:]

    def all_points(self, n: int | None = None) -> dict[str, list[Sample]]:
        """The last ``n`` samples of every node."""
        return {k: self.points_of(k, n) for k in sorted(self._nodes)}
