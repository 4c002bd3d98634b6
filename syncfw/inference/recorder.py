"""Per-call figures: the engine's own latency book and, on a node, its Prometheus registry.

The same stage times go to both, recorded once per call where the call ends:
the :class:`~syncfw.inference.latency.LatencyBook` (status, percentiles) and,
when the sink is a :class:`~syncfw.inference.sink.MetricsHost` holding a
:class:`~syncfw.metrics.NodeMetrics`, ``syncfw_inference_seconds{stage}`` and
``syncfw_inference_calls{outcome}``. Labels are bounded: a model's sha256,
its provider, four stages and the outcomes (``ok`` or an error class name).
"""

from __future__ import annotations

from typing import Any

from syncfw.inference.latency import LatencyBook, StageTimes
from syncfw.inference.signature import ModelInfo
from syncfw.inference.sink import MetricsHost
from syncfw.metrics import NodeMetrics

__all__ = ["OK", "CallRecorder", "metrics_of"]

OK = "ok"
"""The ``outcome`` label of a call that wrote its result."""

_STAGES = ("queue", "pre", "infer", "post")


def metrics_of(sink: object) -> NodeMetrics | None:
    """The sink's :class:`NodeMetrics`, if it is a :class:`MetricsHost` holding one."""
    if isinstance(sink, MetricsHost):
        metrics = sink.metrics
        if isinstance(metrics, NodeMetrics):
            return metrics
    return None


class CallRecorder:
    """Records each call's stage times and outcome.

    Args:
        metrics: the node's registry (None: the latency book only).
    """

    __slots__ = ("_children", "_metrics", "book")

    def __init__(self, metrics: NodeMetrics | None) -> None:
        self._metrics = metrics
        self.book = LatencyBook()
        # Labelled children cached per (sha256, provider): labels() takes a lock and a
        # dict lookup, and this runs for every call.
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def ok(self, info: ModelInfo, times: StageTimes) -> None:
        """A call wrote its result: its stage times, and an ``ok`` outcome."""
        self.book.record(info.sha256, info.provider, times)
        if self._metrics is None:
            return
        queue, pre, infer, post, ok = self._for(info.sha256, info.provider)
        queue.observe(times.queue_s)
        pre.observe(times.pre_s)
        infer.observe(times.infer_s)
        post.observe(times.post_s)
        ok.inc()

    def failed(self, info: ModelInfo | None, outcome: str) -> None:
        """A call raised ``outcome`` (an error class name) and wrote nothing."""
        if self._metrics is None:
            return
        sha, provider = (info.sha256, info.provider) if info is not None else ("", "")
        m = self._metrics
        m.inference_calls.labels(m.node_id, sha, provider, outcome).inc()

    def fell_back(self, info: ModelInfo) -> None:
        """A model loaded on a provider other than the first wanted one."""
        if self._metrics is None:
            return
        m = self._metrics
        m.inference_provider_fallbacks.labels(
            m.node_id, info.sha256, info.plan.preferred, info.provider
        ).inc()

    def _for(self, sha: str, provider: str) -> tuple[Any, ...]:
        got = self._children.get((sha, provider))
        if got is None:
            m = self._metrics
            assert m is not None
            node = m.node_id
            stages = tuple(
                m.inference_seconds.labels(node, sha, provider, stage) for stage in _STAGES
            )
            got = (*stages, m.inference_calls.labels(node, sha, provider, OK))
            self._children[(sha, provider)] = got
        return got
