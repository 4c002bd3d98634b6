"""Fleet-level series on the aggregator's ``/metrics``, beside the node's own.

Declared once here, in the node's registry (:attr:`syncfw.node.Node.metrics`),
so ``/metrics`` of the aggregator serves them with every node series:

- ``syncfw_fleet_nodes{state}``: nodes in the fleet view by liveness state;
- ``syncfw_fleet_rollout_nodes{model, version, stage}``: nodes per model
  version and rollout stage (``fleet/<node>/model``'s ``status``);
- ``syncfw_subscriber_lag_ops{subscriber}`` and ``syncfw_subscribers``: the
  change feed's subscribers and how far each is behind;
- ``syncfw_export_lag_ops{exporter}``: ops held but not yet exported (no
  sample until an exporter reports one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import Gauge

from syncfw.metrics import NodeMetrics

__all__ = ["FleetMetrics"]


class FleetMetrics:
    """The aggregator's fleet series, registered in ``metrics.registry``."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._node = metrics.node_id
        r = metrics.registry
        n = ("node",)
        self.nodes = Gauge(
            "syncfw_fleet_nodes", "Nodes in the fleet view by liveness state.",
            (*n, "state"), registry=r,
        )
        self.rollout = Gauge(
            "syncfw_fleet_rollout_nodes", "Nodes per model version and rollout stage.",
            (*n, "model", "version", "stage"), registry=r,
        )
        self.subscriber_lag = Gauge(
            "syncfw_subscriber_lag_ops",
            "Ops a change-feed subscriber is behind this node's log.",
            (*n, "subscriber"), registry=r,
        )
        self.subscribers = Gauge(
            "syncfw_subscribers", "Change-feed subscriptions open now.", n, registry=r,
        )
        self.export_lag = Gauge(
            "syncfw_export_lag_ops", "Ops held but not yet exported, per exporter.",
            (*n, "exporter"), registry=r,
        )
        self._rollout_seen: set[tuple[str, str, str]] = set()
        self.subscribers.labels(self._node).set(0)

    def set_nodes(self, by_state: Mapping[str, int]) -> None:
        """Set ``syncfw_fleet_nodes`` for every state (absent states read 0)."""
        for state in ("alive", "suspect", "dead", "not a member"):
            self.nodes.labels(self._node, state).set(by_state.get(state, 0))

    def set_rollout(self, counts: Mapping[tuple[str, str, str], int]) -> None:
        """Set ``syncfw_fleet_rollout_nodes``; series no longer present are removed."""
        for key in self._rollout_seen - set(counts):
            with contextlib.suppress(KeyError):
                self.rollout.remove(self._node, *key)
        for (model, version, stage), count in counts.items():
            self.rollout.labels(self._node, model, version, stage).set(count)
        self._rollout_seen = set(counts)

    def set_subscriber_lag(self, subscriber: str, ops: int) -> None:
        """Set one subscriber's lag."""
        self.subscriber_lag.labels(self._node, subscriber).set(ops)

    def subscriber_opened(self) -> None:
        self.subscribers.labels(self._node).inc()

    def subscriber_closed(self, subscriber: str) -> None:
        """Drop a subscriber's series (its call ended)."""
        self.subscribers.labels(self._node).dec()
        with contextlib.suppress(KeyError):
            self.subscriber_lag.remove(self._node, subscriber)

    def set_export_lag(self, exporter: str, ops: int) -> None:
        """For an exporter (NATS): ops held and not yet acknowledged by its sink."""
        self.export_lag.labels(self._node, exporter).set(ops)
