"""The cloud: the aggregator, the change feed's server and consumer, the fleet view.

A second composition root beside :class:`syncfw.Node` (the edge's), not a
bigger node: :class:`Aggregator` wires one node holding the fleet authority's
key to the mesh, the served change feed (:class:`FeedServer`, on the mesh's
gRPC port) and the materialized fleet view (:class:`FleetView`).
:class:`Consumer` reads the feed from anywhere; :class:`TelemetryPublisher` is
what an edge runs to report heartbeats and metric summaries as ops.

Owns: the fleet view's schema (``VIEW_VERSION``), the feed's serving policy
(lag limit, checkpoints), the fleet-level metric series. Future exporters
(NATS JetStream) and the web dashboard live here too: this is the only
package that may import NATS and web frameworks.

May import: everything in syncfw but the CLI and the testing kit.
"""

from syncfw.cloud.aggregator import Aggregator, AggregatorConfig, ViewUpdates
from syncfw.cloud.consumer import Consumer
from syncfw.cloud.feed import FeedConfig, FeedServer
from syncfw.cloud.metrics import FleetMetrics
from syncfw.cloud.telemetry import TelemetryPublisher, metric_summary
from syncfw.cloud.view import VIEW_VERSION, FleetView

__all__ = [
    "VIEW_VERSION",
    "Aggregator",
    "AggregatorConfig",
    "Consumer",
    "FeedConfig",
    "FeedServer",
    "FleetMetrics",
    "FleetView",
    "TelemetryPublisher",
    "ViewUpdates",
    "metric_summary",
]
