"""Edge telemetry as ops: heartbeats and metric summaries in the node's telemetry zone.

An edge runs a :class:`TelemetryPublisher`; every ``interval_s`` it writes two
keys in one group commit: ``telemetry/<node>/heartbeat`` and
``telemetry/<node>/metrics`` (:data:`syncfw.cloud.view.HEARTBEAT`,
:data:`~syncfw.cloud.view.METRICS`), which the aggregator's fleet view folds.

Invariants:

1. Bounded: two keys per node, overwritten (lww), so the state holds two
   values whatever the uptime; the summary is a fixed set of figures.
2. Batched and lower priority: one commit per interval; ``telemetry/`` zones
   sort after state and alerts in a sync exchange (``Fleet.priorities``,
   ``-10`` by default) and are bounded by retention (``Fleet.telemetry``).
3. Compactable: once the aggregator acknowledged them (an authenticated ack
   in a signed fleet; the exchange performer ignores others), the edge's
   :meth:`~syncfw.Node.compact` drops the old ops; their effect stays.
4. A failed write (a full disk) is a WARNING and a count, never a crash of
   the publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from syncfw.cloud.view import HEARTBEAT, METRICS
from syncfw.keys import telemetry_prefix

if TYPE_CHECKING:
    from syncfw.node import Node

__all__ = ["TelemetryPublisher", "metric_summary"]

log = logging.getLogger("syncfw.cloud.telemetry")


def metric_summary(figures: dict[str, Any]) -> dict[str, Any]:
    """The fixed summary an edge publishes, from ``node.metrics.snapshot()``."""
    return {
        "ops_applied": dict(figures.get("ops_applied", {})),
        "ops_rejected": int(figures.get("ops_rejected", 0)),
        "ops_pending": int(sum(figures.get("ops_pending", {}).values())),
        "storage_bytes": int(figures.get("storage_bytes", 0)),
        "exchanges": dict(figures.get("exchanges", {})),
        "peers": dict(figures.get("peers", {})),
        "refused_streams": int(sum(figures.get("refused_streams", {}).values())),
    }


class TelemetryPublisher:
    """Publishes ``node``'s heartbeat and metric summary every ``interval_s``.

    Use ``async with TelemetryPublisher(node):`` or :meth:`start` / :meth:`aclose`;
    :meth:`publish` writes once (tests, or an edge driving its own schedule).
    """

    def __init__(self, node: Node, interval_s: float = 10.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.node = node
        self.interval_s = interval_s
        self.beats = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        prefix = telemetry_prefix(node.node_id)
        self.keys = (prefix + HEARTBEAT, prefix + METRICS)

    async def publish(self) -> None:
        """Write the heartbeat and the summary in one commit."""
        self.beats += 1
        vv = self.node.store.version_vector
        beat = {
            "beat": self.beats,
            "wall_ms": self.node.wall_ms(),
            "interval_s": self.interval_s,
            "log_ops": int(sum(vv.values())),
            "origins": len(vv),
        }
        await self.node.put_many(
            [(self.keys[0], beat), (self.keys[1], metric_summary(self.node.metrics.snapshot()))]
        )

    async def _loop(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as exc:  # a full disk must not end the heartbeats
                self.failures += 1
                log.warning("%s: telemetry not written: %s", self.node.node_id, exc)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Start publishing in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="syncfw-telemetry")

    async def aclose(self) -> None:
        """Stop publishing. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> TelemetryPublisher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
