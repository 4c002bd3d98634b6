"""One Prometheus registry per node, and every metric syncfw records in it.

Invariants:

1. Every metric family is declared here, once, with its help text and labels:
   a component never creates its own. Components take a :class:`NodeMetrics`
   and record where the event happens (the store on commit, the exchange
   runner at an exchange's end, the mesh on a membership change, the engine
   per call), so ``/metrics`` and :meth:`Node.status` read the same numbers.
2. Each node has its own :class:`~prometheus_client.CollectorRegistry`: two
   nodes in one process (tests, the simulator, the demo) never mix figures,
   and nothing is registered in prometheus_client's global registry.
3. Label values that come from peers (peer ids) are bounded by the caller:
   the mesh labels per-peer gauges only for members of its bounded table and
   removes a peer's series when it forgets the peer.

Knows nothing of SQLite, gRPC or ONNX Runtime; imports only prometheus_client.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest

__all__ = [
    "HLC_AHEAD_SOURCE", "NTP_SOURCE", "PEER_SOURCE", "MetricsServer", "NodeMetrics", "serve_metrics"]

NTP_SOURCE = "ntp"
"""``clock_offset_ms{source}`` of the NTP measurement."""
HLC_AHEAD_SOURCE = "hlc_ahead"
"""``clock_offset_ms{source}``: how far this node's hybrid clock is ahead of
NTP-checked time (its persisted high-water mark, left by a clock that ran ahead)."""
PEER_SOURCE = "peer:"
"""``clock_offset_ms{source}`` prefix of a peer's offset (``peer:<id>``)."""

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536)


class NodeMetrics:
    """The metric families of one node, in a registry of its own.

    Args:
        node_id: the node's id, attached to every sample as the ``node`` label
            so scrapes from several nodes can be told apart.
        registry: the registry to register in (a fresh one by default).
    """

    def __init__(self, node_id: str, registry: CollectorRegistry | None = None) -> None:
        self.node_id = node_id
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        n = ("node",)

        # -- store (recorded by the writer on commit)
        self.ops_applied = Counter(
            "syncfw_ops_applied", "Ops merged into state.", (*n, "source"), registry=r
        )
        self.ops_rejected = Counter(
            "syncfw_ops_rejected", "Remote ops recorded as rejected (never merged).", n, registry=r
        )
        self.ops_pending = Gauge(
            "syncfw_ops_pending", "Remote ops held back, by reason.", (*n, "reason"), registry=r
        )
        self.ops_duplicate = Counter(
            "syncfw_ops_duplicate", "Remote ops already held (no-ops).", n, registry=r
        )
        self.ops_discarded = Counter(
            "syncfw_ops_discarded",
            "Held-back ops dropped: fork evidence, a broken chain, over max_pending (resent later).",
            (*n, "reason"),
            registry=r,
        )
        self.commit_batch_ops = Histogram(
            "syncfw_commit_batch_ops",
            "Ops per committed transaction (group commit and remote batches).",
            (*n, "source"),
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.writer_busy = Counter(
            "syncfw_writer_busy_seconds",
            "Wall seconds the store's one writer spent on each kind of work (remote: a "
            "remote group's plan and commit; call; local: a local group's plan). Near one "
            "second a second, the writer bounds the node's ingest.",
            (*n, "work"),
            registry=r,
        )
        self.storage_bytes = Gauge(
            "syncfw_storage_bytes", "Size of the node's SQLite file.", n, registry=r
        )
        # -- trust (signed fleets)
        self.trust_mode = Gauge(
            "syncfw_trust_mode",
            "1 for the mode this node runs in: signed (ops verified against registered keys) "
            "or unsigned (development: anyone who can sync can forge ops).",
            (*n, "mode"),
            registry=r,
        )
        self.fork_evidence = Gauge(
            "syncfw_fork_evidence",
            "1 for each origin with verified fork evidence (its later ops are held).",
            (*n, "origin"),
            registry=r,
        )
        self.chain_fenced = Gauge(
            "syncfw_chain_fenced",
            "The own-chain seq local writes wait for after the file lost ops (0: not fenced).",
            n,
            registry=r,
        )
        self.acks_ignored = Counter(
            "syncfw_acks_ignored",
            "Peer acknowledgements not recorded because the peer was not authenticated "
            "(they never drive compaction).",
            n,
            registry=r,
        )
        self.snapshots = Counter(
            "syncfw_snapshots",
            "State snapshots sent to peers below this node's compaction point, and "
            "installed from peers, and snapshots a peer needed but that were larger than "
            "max_snapshot_bytes (direction: sent, installed, too_large).",
            (*n, "direction"),
            registry=r,
        )
        self.peers_evicted = Counter(
            "syncfw_peers_evicted",
            "Acknowledging peers forgotten to keep the peers table within its bound "
            "(ids no zone grant names, least recently heard first).",
            n,
            registry=r,
        )
        # -- exchanges (recorded by the runner when an exchange ends)
        self.exchanges = Counter(
            "syncfw_exchanges", "Sync exchanges, by how they ended.", (*n, "outcome"), registry=r
        )
        self.exchange_seconds = Histogram(
            "syncfw_exchange_seconds",
            "Wall time of sync exchanges.",
            n,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.wire_bytes = Counter(
            "syncfw_wire_bytes", "Sync frame bytes, by direction.", (*n, "direction"), registry=r
        )
        self.exchange_ops = Counter(
            "syncfw_exchange_ops", "Ops sent and received in exchanges.", (*n, "direction"),
            registry=r,
        )
        # -- mesh
        self.peers = Gauge(
            "syncfw_peers", "Known mesh members, by state.", (*n, "state"), registry=r
        )
        self.peer_lag_ops = Gauge(
            "syncfw_peer_lag_ops",
            "Ops this node holds that the peer had not acknowledged at the last exchange.",
            (*n, "peer"),
            registry=r,
        )
        self.members = Gauge(
            "syncfw_members", "Entries in the mesh's member table (bounded).", n, registry=r
        )
        self.peer_transitions = Counter(
            "syncfw_peer_transitions",
            "Member state changes seen by the mesh's failure detector, by the state entered.",
            (*n, "state"),
            registry=r,
        )
        self.gossip_refused = Counter(
            "syncfw_gossip_refused",
            "Gossiped members refused (bad address or id, outside the allowed networks, "
            "over a frame's or the table's cap), by reason.",
            (*n, "reason"),
            registry=r,
        )
        self.gossip_evicted = Counter(
            "syncfw_gossip_evicted",
            "Learned members never reached, dropped to make room in the member table, by why.",
            (*n, "reason"),
            registry=r,
        )
        self.gossip_dials = Counter(
            "syncfw_gossip_dials",
            "Dials of learned members never reached: made (new), or left out by the dial "
            "rate limit (deferred).",
            (*n, "outcome"),
            registry=r,
        )
        # -- transport (recorded by the gRPC server when it refuses or cuts a stream)
        self.refused_streams = Counter(
            "syncfw_refused_streams",
            "Incoming streams the transport refused or cut (over a quota, no first frame "
            "in time, a write left blocked on flow control at the deadline), by reason.",
            (*n, "reason"),
            registry=r,
        )
        self.refused_connections = Counter(
            "syncfw_refused_connections",
            "Incoming connections the front door closed at once (over the per-host or the "
            "overall connection limit), by reason.",
            (*n, "reason"),
            registry=r,
        )
        self.inbound_throttled = Counter(
            "syncfw_inbound_throttled_seconds",
            "Seconds the front door left hosts unread for sending over their byte rate, "
            "all hosts together.",
            n,
            registry=r,
        )
        # -- clock
        self.clock_offset_ms = Gauge(
            "syncfw_clock_offset_ms",
            "Clock offset: local against NTP (source=ntp), or a peer's against ours.",
            (*n, "source"),
            registry=r,
        )
        # -- inference
        self.inference_seconds = Histogram(
            "syncfw_inference_seconds",
            "Inference latency per stage (pre, infer, post, queue).",
            (*n, "model_sha256", "provider", "stage"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_calls = Counter(
            "syncfw_inference_calls",
            "Inference calls, by outcome.",
            (*n, "model_sha256", "provider", "outcome"),
            registry=r,
        )
        self.inference_provider_fallbacks = Counter(
            "syncfw_inference_provider_fallbacks",
            "Model loads that ONNX Runtime runs on a provider other than the first one "
            "wanted (a GPU provider whose libraries or device are missing, say).",
            (*n, "model_sha256", "wanted", "running"),
            registry=r,
        )

    # -- reading back (status() uses these, so it shows what /metrics shows)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0.0 if it was never recorded).

        ``name`` is the sample name as scraped (``syncfw_ops_applied_total``);
        ``node`` is filled in.
        """
        got = self.registry.get_sample_value(name, {"node": self.node_id, **labels})
        return 0.0 if got is None else got

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample of ``name``, keyed by its labels other than ``node``."""
        out: dict[tuple[tuple[str, str], ...], float] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == name and s.labels.get("node") == self.node_id:
                    key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "node"))
                    out[key] = s.value
        return out

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``samples(name)`` summed by one label (``by_label("syncfw_exchanges_total", "outcome")``)."""
        out: dict[str, float] = {}
        for labels, v in self.samples(name).items():
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
        return out

    def set_peers(self, counts: dict[str, int], states: Iterable[str]) -> None:
        """Set the member gauge for every state in ``states`` (absent ones to 0)."""
        for state in states:
            self.peers.labels(self.node_id, state).set(counts.get(state, 0))

    def set_members(self, n: int) -> None:
        """Set ``members``: the size of the mesh's member table."""
        self.members.labels(self.node_id).set(n)

    def gossip_refusal(self, reason: str, n: int = 1) -> None:
        """Count ``n`` gossiped members refused for ``reason`` (a fixed set, chosen by the mesh)."""
        self.gossip_refused.labels(self.node_id, reason).inc(n)

    def gossip_eviction(self, reason: str, n: int = 1) -> None:
        """Count ``n`` members evicted from the member table for ``reason``."""
        self.gossip_evicted.labels(self.node_id, reason).inc(n)

    def gossip_dial(self, outcome: str, n: int = 1) -> None:
        """Count ``n`` dials of new members: ``new`` (made) or ``deferred`` (rate limit)."""
        self.gossip_dials.labels(self.node_id, outcome).inc(n)

    def set_peer_lag(self, peer: str, ops: int) -> None:
        """Set ``peer_lag_ops{peer}`` (the caller bounds ``peer`` to its member table)."""
        self.peer_lag_ops.labels(self.node_id, peer).set(ops)

    def set_clock_offset(self, source: str, offset_ms: float) -> None:
        """Set ``clock_offset_ms{source}``: ``ntp``, or ``peer:<id>`` for a member."""
        self.clock_offset_ms.labels(self.node_id, source).set(offset_ms)

    def forget_peer(self, peer: str) -> None:
        """Drop a peer's per-peer series (the mesh forgot it)."""
        with contextlib.suppress(KeyError):
            self.peer_lag_ops.remove(self.node_id, peer)
        with contextlib.suppress(KeyError):
            self.clock_offset_ms.remove(self.node_id, PEER_SOURCE + peer)

    def snapshot(self) -> dict[str, Any]:
        """The node's figures as plain numbers, for ``status()`` (what ``/metrics`` shows).

        Counters count since this process opened the node; gauges are the
        current state.
        """
        ints = _as_ints
        return {
            "ops_applied": ints(self.by_label("syncfw_ops_applied_total", "source")),
            "ops_rejected": int(self.value("syncfw_ops_rejected_total")),
            "ops_duplicate": int(self.value("syncfw_ops_duplicate_total")),
            "ops_pending": ints(self.by_label("syncfw_ops_pending", "reason")),
            "storage_bytes": int(self.value("syncfw_storage_bytes")),
            "writer_busy_s": self.by_label("syncfw_writer_busy_seconds_total", "work"),
            "exchanges": ints(self.by_label("syncfw_exchanges_total", "outcome")),
            "wire_bytes": ints(self.by_label("syncfw_wire_bytes_total", "direction")),
            "exchange_ops": ints(self.by_label("syncfw_exchange_ops_total", "direction")),
            "peers": ints(self.by_label("syncfw_peers", "state")),
            "peer_lag_ops": ints(self.by_label("syncfw_peer_lag_ops", "peer")),
            "members": int(self.value("syncfw_members")),
            "gossip_refused": ints(self.by_label("syncfw_gossip_refused_total", "reason")),
            "gossip_evicted": ints(self.by_label("syncfw_gossip_evicted_total", "reason")),
            "gossip_dials": ints(self.by_label("syncfw_gossip_dials_total", "outcome")),
            "refused_streams": ints(self.by_label("syncfw_refused_streams_total", "reason")),
            "refused_connections": ints(
                self.by_label("syncfw_refused_connections_total", "reason")
            ),
            "inbound_throttled_s": self.value("syncfw_inbound_throttled_seconds_total"),
            "clock_offset_ms": self.by_label("syncfw_clock_offset_ms", "source"),
            "trust_mode": ints(self.by_label("syncfw_trust_mode", "mode")),
            "fork_evidence": ints(self.by_label("syncfw_fork_evidence", "origin")),
            "acks_ignored": int(self.value("syncfw_acks_ignored_total")),
            "snapshots": ints(self.by_label("syncfw_snapshots_total", "direction")),
            "peers_evicted": int(self.value("syncfw_peers_evicted_total")),
            "chain_fenced": int(self.value("syncfw_chain_fenced")),
        }

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)


def _as_ints(d: dict[str, float]) -> dict[str, int]:
    return {k: int(v) for k, v in sorted(d.items())}


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; :meth:`close` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.address = f"{host}:{port}"

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)


def serve_metrics(metrics: NodeMetrics, address: str) -> MetricsServer:
    """Serve ``metrics`` at ``http://address/metrics`` (``host:port``; port 0: any free).

    Raises:
        ValueError: ``address`` is not ``host:port``.
        OSError: the port cannot be bound.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be host:port, not {address!r}")
    server, thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=metrics.registry)
    return MetricsServer(server, thread)
