"""The fleet view: what every node did, folded from the log, plus the mesh's live figures.

:class:`FleetView` is pure: :meth:`FleetView.fold` takes feed items (the
aggregator's ``follow()`` from ``{}`` at start, then live), :meth:`FleetView.set_live`
takes the mesh-side snapshot (liveness, sync lag, clock offsets, forks), and
:meth:`FleetView.to_dict` is the documented, versioned JSON document
(:data:`VIEW_VERSION`; see ``README.md``, "Cloud aggregator").

Invariants:

1. Bounded: per node a fixed set of figures and at most
   :data:`LATENCY_WINDOW` latency samples; nodes only as many as the log names.
2. Rebuilt the same from the same log: the log-derived part depends only on
   the ops folded, never on when.
3. Malformed values (a node running old code) are skipped, never raised: the
   node's ``bad_values`` counts them.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from syncfw.clock import LOGICAL_BITS
from syncfw.keys import FLEET_TEMPLATE, RESULTS_TEMPLATE, TELEMETRY_TEMPLATE
from syncfw.store.follow import FeedItem

__all__ = ["HEARTBEAT", "LATENCY_WINDOW", "METRICS", "VIEW_VERSION", "FleetView", "NodeView"]

VIEW_VERSION = 1
"""Bumped whenever a field of :meth:`FleetView.to_dict` changes meaning or goes away."""
LATENCY_WINDOW = 1024
"""Latency samples kept per node (the newest), for the percentiles."""
HEARTBEAT = "heartbeat"
"""``telemetry/<node>/heartbeat``: an edge's heartbeat (:mod:`syncfw.cloud.telemetry`)."""
METRICS = "metrics"
"""``telemetry/<node>/metrics``: an edge's metric summary."""

_FLEET = FLEET_TEMPLATE.partition("{node}")[0]
_RESULTS = RESULTS_TEMPLATE.partition("{node}")[0]
_TELEMETRY = TELEMETRY_TEMPLATE.partition("{node}")[0]


def _wall(hlc: int) -> int:
    return hlc >> LOGICAL_BITS


def _split(key: str, head: str) -> tuple[str, str] | None:
    """``(node, rest)`` of ``head<node>/rest``."""
    node, sep, rest = key[len(head) :].partition("/")
    return (node, rest) if sep and node else None


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return math.nan
    i = min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))
    return sorted_ms[i]


@dataclass(slots=True)
class NodeView:
    """What the log says of one node (see :meth:`FleetView.to_dict` for the fields)."""

    node_id: str
    ops: int = 0
    last_seq: int = 0
    last_op_ms: int = 0
    rejected: int = 0
    bad_values: int = 0
    model: dict[str, str] | None = None
    mode: str | None = None
    mode_reason: str | None = None
    mode_at_ms: int | None = None
    inferences: int = 0
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW)
    )
    heartbeat: dict[str, Any] | None = None
    heartbeat_ms: int | None = None
    summary: dict[str, Any] | None = None

    def latency(self) -> dict[str, float | int | None]:
        s = sorted(self.latencies)
        if not s:
            return {"samples": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None}
        return {
            "samples": len(s),
            "p50_ms": _percentile(s, 0.50),
            "p95_ms": _percentile(s, 0.95),
            "p99_ms": _percentile(s, 0.99),
        }


class FleetView:
    """The fleet view of one aggregator (see the module)."""

    def __init__(self, aggregator: str) -> None:
        self.aggregator = aggregator
        self.nodes: dict[str, NodeView] = {}
        self.live: dict[str, Any] = {}
        self.folded = 0
        self.position: dict[str, int] = {}
        self.models_changed = 0
        """Counts the folded ops that set or cleared a node's model (its rollout stage)."""

    def _node(self, node_id: str) -> NodeView:
        nv = self.nodes.get(node_id)
        if nv is None:
            nv = self.nodes[node_id] = NodeView(node_id)
        return nv

    def fold(self, items: Iterable[FeedItem]) -> set[str]:
        """Fold feed items in; returns the nodes whose entry changed."""
        changed: set[str] = set()
        nodes, position = self.nodes, self.position
        n = 0
        for item in items:  # the hot loop of the view: locals, no call per op when it can
            n += 1
            op = item.op
            origin = op.origin
            position[origin] = op.seq
            nv = nodes.get(origin)
            if nv is None:
                nv = nodes[origin] = NodeView(origin)
            changed.add(origin)
            nv.ops += 1
            nv.last_seq = op.seq
            wall = op.hlc >> LOGICAL_BITS
            if wall > nv.last_op_ms:
                nv.last_op_ms = wall
            if item.rejected:
                nv.rejected += 1
                continue
            key = op.key
            if key.startswith(_RESULTS):
                self._result(item, key, changed)
            elif key.startswith(_FLEET):
                self._fleet(item, key, changed)
            elif key.startswith(_TELEMETRY):
                self._telemetry(item, key, changed)
        self.folded += n
        return changed

    def _result(self, item: FeedItem, key: str, changed: set[str]) -> None:
        parts = _split(key, _RESULTS)
        if parts is None:
            return
        nv = self._node(parts[0])
        changed.add(nv.node_id)
        nv.inferences += 1
        value = item.value
        try:
            total = float(value["latency_ms"]["total"])
        except (TypeError, KeyError, ValueError):
            nv.bad_values += 1
            return
        nv.latencies.append(total)

    def _fleet(self, item: FeedItem, key: str, changed: set[str]) -> None:
        parts = _split(key, _FLEET)
        if parts is None:
            return
        node, rest = parts
        value = item.value
        if rest == "model":
            nv = self._node(node)
            self.models_changed += 1
            if item.deleted:
                nv.model = None
            elif isinstance(value, Mapping) and {"name", "version"} <= set(value):
                nv.model = {
                    "name": str(value["name"]),
                    "version": str(value["version"]),
                    "sha256": str(value.get("sha256", "")),
                    "status": str(value.get("status", "active")),
                }
            else:
                nv.bad_values += 1
            changed.add(node)
        elif rest == "inference/mode":
            nv = self._node(node)
            if isinstance(value, Mapping) and "mode" in value:
                nv.mode = str(value["mode"])
                nv.mode_reason = str(value.get("reason", "")) or None
                at = value.get("at_ms")
                nv.mode_at_ms = int(at) if isinstance(at, int) else None
            elif not item.deleted:
                nv.bad_values += 1
            changed.add(node)

    def _telemetry(self, item: FeedItem, key: str, changed: set[str]) -> None:
        parts = _split(key, _TELEMETRY)
        if parts is None:
            return
        node, rest = parts
        if rest not in (HEARTBEAT, METRICS):
            return
        nv = self._node(node)
        changed.add(node)
        if not isinstance(item.value, Mapping):
            if not item.deleted:
                nv.bad_values += 1
            return
        if rest == HEARTBEAT:
            nv.heartbeat = dict(item.value)
            nv.heartbeat_ms = _wall(item.hlc)
        else:
            nv.summary = dict(item.value)

    def set_live(self, live: Mapping[str, Any]) -> set[str]:
        """Replace the live part; returns the nodes whose live figures changed."""
        old = self.live.get("nodes", {})
        new = dict(live.get("nodes", {}))
        self.live = dict(live)
        changed = {n for n in set(old) | set(new) if old.get(n) != new.get(n)}
        for n in new:
            self._node(n)
        return changed

    def rollout_counts(self) -> dict[tuple[str, str, str], int]:
        """Nodes per ``(model, version, stage)``."""
        out: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for nv in self.nodes.values():
            if nv.model is not None:
                out[(nv.model["name"], nv.model["version"], nv.model["status"])] += 1
        return dict(out)

    def node_dict(self, node_id: str, now_ms: int) -> dict[str, Any]:
        """One node's entry of :meth:`to_dict`."""
        nv = self._node(node_id)
        live = self.live.get("nodes", {}).get(node_id, {})
        return {
            "node_id": node_id,
            # alive, suspect, dead (the mesh's member table), "not a member"
            # (known from the log only) or "self" (the aggregator)
            "state": live.get("state", "not a member"),
            "address": live.get("address"),
            "last_contact_ago_s": live.get("last_contact_ago_s"),
            "sync_lag_ops": live.get("lag_ops"),
            "sync_lag_s": live.get("lag_s"),
            "clock_offset_ms": live.get("clock_offset_ms"),
            "clock_skewed": live.get("clock_skewed", False),
            "ops": nv.ops,
            "last_seq": nv.last_seq,
            "last_op_age_s": round((now_ms - nv.last_op_ms) / 1000, 3) if nv.last_op_ms else None,
            "rejected": nv.rejected,
            "forked": node_id in self.live.get("forks", {}),
            "model": nv.model,
            "rollout_stage": nv.model["status"] if nv.model else None,
            "mode": nv.mode,
            "mode_reason": nv.mode_reason,
            "inferences": nv.inferences,
            "latency_ms": nv.latency(),
            "heartbeat": nv.heartbeat,
            "heartbeat_age_s": (
                round((now_ms - nv.heartbeat_ms) / 1000, 3) if nv.heartbeat_ms else None
            ),
            "metrics": nv.summary,
            "bad_values": nv.bad_values,
        }

    def to_dict(self, now_ms: int) -> dict[str, Any]:
        """The whole view as plain JSON-able data (version :data:`VIEW_VERSION`)."""
        nodes = {n: self.node_dict(n, now_ms) for n in sorted(self.nodes)}
        states = collections.Counter(d["state"] for d in nodes.values())
        return {
            "version": VIEW_VERSION,
            "aggregator": self.aggregator,
            "time_ms": now_ms,
            "ops_folded": self.folded,
            "position": dict(self.position),
            "nodes": nodes,
            "totals": {
                "nodes": len(nodes),
                "by_state": dict(sorted(states.items())),
                "rejected": sum(d["rejected"] for d in nodes.values()),
                "inferences": sum(d["inferences"] for d in nodes.values()),
                "degraded": sorted(
                    n for n, d in nodes.items() if d["mode"] not in (None, "full")
                ),
                "rollout": [
                    {"model": m, "version": v, "stage": s, "nodes": c}
                    for (m, v, s), c in sorted(self.rollout_counts().items())
                ],
            },
            "forks": dict(self.live.get("forks", {})),
            "pending_by_reason": dict(self.live.get("pending_by_reason", {})),
            "subscribers": dict(self.live.get("subscribers", {})),
        }
