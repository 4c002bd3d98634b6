"""Per-call metrics: a sink holding a real NodeMetrics gets the latency book's figures, by outcome."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from conftest_inference import MODEL_PATH, canary, node
from prometheus_client.parser import text_string_to_metric_families

from syncfw import Node
from syncfw.inference import (
    CPU,
    Engine,
    EngineConfig,
    InferenceTimeoutError,
    InputSignatureError,
    MetricsHost,
)
from syncfw.log import Op
from syncfw.metrics import NodeMetrics

__all__ = ["node"]  # the fixture, imported so pytest finds it here

STAGES = ("queue", "pre", "infer", "post")


@dataclass
class MeteredSink:
    """A node stand-in: keeps what is put, and a real per-node registry."""

    node_id: str = "t7"
    metrics: Any = field(default_factory=lambda: NodeMetrics("t7"))
    fail_puts: bool = False
    kept: dict[str, Any] = field(default_factory=dict)

    async def put(self, key: str, value: Any) -> Op:
        if self.fail_puts:
            raise OSError("disk full")
        self.kept[key] = value
        n = len(self.kept)
        return Op(self.node_id, n, n, f"results/{self.node_id}/", 0, key, "lww", b"")


def _calls(m: NodeMetrics, sha: str, outcome: str) -> float:
    return m.value("syncfw_inference_calls_total", model_sha256=sha, provider=CPU, outcome=outcome)


async def test_each_call_is_recorded_by_stage_and_outcome_as_the_latency_book_is() -> None:
    sink = MeteredSink()
    assert isinstance(sink, MetricsHost)
    m: NodeMetrics = sink.metrics
    x, _ = canary()
    async with Engine(sink) as engine:
        info = await engine.load(MODEL_PATH)
        results = [await engine.infer(x[i : i + 1]) for i in range(6)]
        with pytest.raises(InputSignatureError):
            await engine.infer(np.zeros((1, 2), np.float32))
        book = engine.latency_book().summary()
    sha = info.sha256
    assert _calls(m, sha, "ok") == 6
    assert _calls(m, sha, "InputSignatureError") == 1
    (entry,) = book
    for stage in STAGES:
        labels = {"model_sha256": sha, "provider": CPU, "stage": stage}
        count = m.value("syncfw_inference_seconds_count", **labels)
        total = m.value("syncfw_inference_seconds_sum", **labels)
        assert count == entry["stages"][stage]["count"] == 6  # the same calls as the book
        want = sum(getattr(r.latency, f"{stage}_s") for r in results)
        assert total == pytest.approx(want, rel=1e-9, abs=1e-12)  # the same figures
    infer = {"model_sha256": sha, "provider": CPU, "stage": "infer"}
    assert m.value("syncfw_inference_seconds_sum", **infer) > 0  # real figures, not zeros
    # And a scrape parses, with the node label on every inference sample.
    scraped = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    samples = scraped["syncfw_inference_calls"].samples
    assert {s.labels["outcome"] for s in samples} == {"ok", "InputSignatureError"}
    assert all(s.labels["node"] == "t7" for s in samples)


async def test_timeouts_and_failed_writes_are_outcomes_too() -> None:
    sink = MeteredSink()
    release = threading.Event()

    def pre(inputs: Any) -> Any:
        if isinstance(inputs, str):
            release.wait(10)
            return canary()[0][:1]
        return inputs

    x, _ = canary()
    try:
        # 1 s: the hung call passes it, and a loaded machine's ordinary calls do not
        # (at 0.1 s one did, in CI)
        async with Engine(sink, EngineConfig(timeout_s=1.0), preprocess=pre) as engine:
            info = await engine.load(MODEL_PATH)
            with pytest.raises(InferenceTimeoutError):
                await engine.infer("hang")
            sink.fail_puts = True
            with pytest.raises(OSError, match="disk full"):
                await engine.infer(x[:1])
            sink.fail_puts = False
            await engine.infer(x[:1])
    finally:
        release.set()
    m: NodeMetrics = sink.metrics
    assert _calls(m, info.sha256, "InferenceTimeoutError") == 1
    assert _calls(m, info.sha256, "OSError") == 1
    assert _calls(m, info.sha256, "ok") == 1
    assert len(sink.kept) == 1


async def test_a_sink_without_a_node_registry_records_in_the_book_only() -> None:
    sink = MeteredSink(metrics={"not": "a registry"})
    x, _ = canary()
    async with Engine(sink) as engine:
        await engine.load(MODEL_PATH)
        await engine.infer(x[:1])
        (entry,) = engine.latency_book().summary()
    assert entry["stages"]["total"]["count"] == 1


async def test_a_real_node_is_a_metrics_host(node: Node) -> None:
    assert isinstance(node, MetricsHost)
    x, _ = canary()
    async with Engine(node) as engine:
        info = await engine.load(MODEL_PATH)
        await engine.infer(x[:1])
    assert _calls(node.metrics, info.sha256, "ok") == 1
