"""Latency histograms: percentiles within one bucket of the exact ones, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from syncfw.inference import Histogram, LatencyBook, Stage, StageTimes


def test_percentiles_match_numpy_within_one_bucket() -> None:
    rng = np.random.default_rng(0)
    xs = rng.lognormal(mean=np.log(2e-3), sigma=0.8, size=5000)
    h = Histogram()
    for x in xs:
        h.record(float(x))
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(xs, q, method="inverted_cdf"))
        assert h.percentile(q) == pytest.approx(exact, rel=0.021)
    assert h.max_s == pytest.approx(float(xs.max()))
    assert h.percentile(1.0) == pytest.approx(float(xs.max()))
    s = h.summary()
    assert s.count == 5000
    assert s.p50_ms <= s.p95_ms <= s.p99_ms <= s.max_ms
    assert s.mean_ms == pytest.approx(float(xs.mean()) * 1e3, abs=1e-3)  # rounded to µs


def test_extremes_and_empty() -> None:
    h = Histogram()
    assert h.percentile(0.5) == 0.0
    h.record(-1.0)
    h.record(0.0)
    h.record(1e6)  # beyond the last bucket: still counted, max exact
    assert h.count == 3
    assert h.max_s == 1e6
    assert h.percentile(1.0) == 1e6
    with pytest.raises(ValueError, match="q must be"):
        h.percentile(0.0)
    with pytest.raises(ValueError, match="growth"):
        Histogram(growth=1.0)


def test_stage_times_total_and_ms() -> None:
    t = StageTimes(queue_s=0.001, pre_s=0.002, infer_s=0.003, post_s=0.0005)
    assert t.total_s == pytest.approx(0.0065)
    assert t.as_ms() == {"queue": 1.0, "pre": 2.0, "infer": 3.0, "post": 0.5, "total": 6.5}


def test_book_keeps_one_set_of_histograms_per_model_and_provider() -> None:
    book = LatencyBook()
    book.record("a" * 64, "CPUExecutionProvider", StageTimes(0, 0, 0.001, 0))
    book.record("a" * 64, "CPUExecutionProvider", StageTimes(0, 0, 0.003, 0))
    book.record("a" * 64, "CUDAExecutionProvider", StageTimes(0, 0, 0.0005, 0))
    book.record("b" * 64, "CPUExecutionProvider", StageTimes(0, 0, 0.002, 0))
    summary = book.summary()
    assert len(summary) == 3
    cpu = book.histogram("a" * 64, "CPUExecutionProvider", Stage.INFER)
    assert cpu is not None
    assert cpu.count == 2
    assert book.histogram("c" * 64, "CPUExecutionProvider", Stage.INFER) is None
    (entry,) = [e for e in summary if e["provider"] == "CUDAExecutionProvider"]
    assert entry["stages"]["infer"]["max_ms"] == pytest.approx(0.5)
    assert set(entry["stages"]) == {s.value for s in Stage}
