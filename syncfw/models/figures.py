"""The artifact figures, in the node's own registry (what ``/metrics`` and ``status()`` read).

| family | labels | what |
| --- | --- | --- |
| ``syncfw_artifact_bytes_total`` | ``peer``, ``direction`` (``in``/``out``) | chunk bytes fetched from / served to each peer |
| ``syncfw_artifact_chunks_total`` | ``peer``, ``direction`` | chunks fetched / served |
| ``syncfw_artifact_bad_chunks_total`` | ``peer``, ``reason`` | chunks refused: ``bad_hash``, ``malformed``, ``denied``, ``silent``, ``link`` |
| ``syncfw_artifact_deferred_total`` | ``peer`` | chunks this node refused a caller "busy" (its metered uplink's per-chunk fan-out) |
| ``syncfw_artifact_seed_fallbacks_total`` | ``peer`` | chunks a seed deferred that came from that seed in the end (no peer shared them in time) |
| ``syncfw_artifact_fetch_chunks`` | ``artifact``, ``kind`` (``held``/``total``) | a fetch's progress |
| ``syncfw_model_manifests_refused_total`` | ``reason`` | release manifests refused (see :class:`~syncfw.errors.ManifestError`) |
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import Counter, Gauge

from syncfw.metrics import NodeMetrics

__all__ = ["ArtifactMetrics"]

_BY_NODE: weakref.WeakKeyDictionary[NodeMetrics, ArtifactMetrics] = weakref.WeakKeyDictionary()


class ArtifactMetrics:
    """The artifact families of one node; :meth:`of` gives the one per registry."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.node_id = metrics.node_id
        self._m = metrics
        r, n = metrics.registry, ("node",)
        self.bytes = Counter(
            "syncfw_artifact_bytes",
            "Chunk bytes fetched from (in) or served to (out) each peer.",
            (*n, "peer", "direction"),
            registry=r,
        )
        self.chunks = Counter(
            "syncfw_artifact_chunks",
            "Chunks fetched from (in) or served to (out) each peer.",
            (*n, "peer", "direction"),
            registry=r,
        )
        self.bad = Counter(
            "syncfw_artifact_bad_chunks",
            "Chunks refused from a peer, by reason.",
            (*n, "peer", "reason"),
            registry=r,
        )
        self.deferred = Counter(
            "syncfw_artifact_deferred",
            "Chunks refused to a caller as busy (the metered uplink's per-chunk fan-out).",
            (*n, "peer"),
            registry=r,
        )
        self.fallbacks = Counter(
            "syncfw_artifact_seed_fallbacks",
            "Chunks a seed deferred that came from it in the end (no peer shared them in time).",
            (*n, "peer"),
            registry=r,
        )
        self.progress = Gauge(
            "syncfw_artifact_fetch_chunks",
            "A fetch's chunks: held and total.",
            (*n, "artifact", "kind"),
            registry=r,
        )
        self.refused = Counter(
            "syncfw_model_manifests_refused",
            "Release manifests refused, by reason.",
            (*n, "reason"),
            registry=r,
        )

    @classmethod
    def of(cls, metrics: NodeMetrics) -> ArtifactMetrics:
        """The families registered in ``metrics`` (registered on first use)."""
        got = _BY_NODE.get(metrics)
        if got is None:
            got = _BY_NODE[metrics] = cls(metrics)
        return got

    def moved(self, peer: str, direction: str, nbytes: int) -> None:
        """One chunk of ``nbytes`` fetched (``in``) or served (``out``)."""
        self.bytes.labels(self.node_id, peer, direction).inc(nbytes)
        self.chunks.labels(self.node_id, peer, direction).inc()

    def refused_chunk(self, peer: str, reason: str) -> None:
        """A chunk refused from ``peer``."""
        self.bad.labels(self.node_id, peer, reason).inc()

    def snapshot(self) -> dict[str, Any]:
        """Plain figures for ``status()``."""
        m = self._m

        def by(name: str, *labels: str) -> dict[str, int]:
            out: dict[str, int] = {}
            for key, v in m.samples(name).items():
                d = dict(key)
                k = "/".join(d.get(label, "") for label in labels)
                out[k] = out.get(k, 0) + int(v)
            return dict(sorted(out.items()))

        moved = by("syncfw_artifact_bytes_total", "peer", "direction")
        chunks = by("syncfw_artifact_chunks_total", "direction")
        return {
            "bytes_in": {k[:-3]: v for k, v in moved.items() if k.endswith("/in")},
            "bytes_out": {k[:-4]: v for k, v in moved.items() if k.endswith("/out")},
            "chunks_in": chunks.get("in", 0),
            "chunks_out": chunks.get("out", 0),
            "deferred": by("syncfw_artifact_deferred_total", "peer"),
            "seed_fallbacks": by("syncfw_artifact_seed_fallbacks_total", "peer"),
            "bad_chunks": by("syncfw_artifact_bad_chunks_total", "peer", "reason"),
            "manifests_refused": by("syncfw_model_manifests_refused_total", "reason"),
        }
