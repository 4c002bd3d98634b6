"""Latency histograms: ``t_total = t_queue + t_pre + t_infer + t_post``.

A :class:`Histogram` has logarithmic buckets (2 % wide), so recording is O(1),
memory is fixed (about 1,000 ints) whatever the call count, and a percentile is
exact to within one bucket (±1 %). The maximum is kept exactly.

Pure: no I/O, no clocks (callers measure and record).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Histogram", "LatencyBook", "LatencySummary", "Stage", "StageTimes"]


class Stage(enum.Enum):
    """The stages of one call."""

    QUEUE = "queue"
    PRE = "pre"
    INFER = "infer"
    POST = "post"
    TOTAL = "total"


@dataclass(frozen=True, slots=True)
class StageTimes:
    """Seconds spent in each stage of one call.

    Attributes:
        queue_s: waiting for the worker (batching, a busy session).
        pre_s: the user pre-processing function.
        infer_s: ``session.run`` (for a micro-batch: the whole batch's run).
        post_s: the user post-processing function.
    """

    queue_s: float
    pre_s: float
    infer_s: float
    post_s: float

    @property
    def total_s(self) -> float:
        """The sum of the stages."""
        return self.queue_s + self.pre_s + self.infer_s + self.post_s

    def as_ms(self) -> dict[str, float]:
        """The stages in milliseconds, rounded to microseconds (the form logged in ops)."""
        return {
            "queue": round(self.queue_s * 1e3, 3),
            "pre": round(self.pre_s * 1e3, 3),
            "infer": round(self.infer_s * 1e3, 3),
            "post": round(self.post_s * 1e3, 3),
            "total": round(self.total_s * 1e3, 3),
        }


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of one histogram, in milliseconds."""

    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    def as_dict(self) -> dict[str, float | int]:
        """A plain dict (for node status)."""
        return {
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
        }


class Histogram:
    """A log-bucketed latency histogram.

    Args:
        lo_s: lower edge of the first bucket; anything faster lands in it.
        hi_s: values above land in the last bucket (the exact max is kept anyway).
        growth: ratio between consecutive bucket edges.
    """

    __slots__ = ("_buckets", "_count", "_growth_log", "_inv_growth_log", "_lo", "_max", "_sum")

    def __init__(self, *, lo_s: float = 1e-6, hi_s: float = 100.0, growth: float = 1.02) -> None:
        if not 0 < lo_s < hi_s or growth <= 1.0:
            raise ValueError("need 0 < lo_s < hi_s and growth > 1")
        self._lo = lo_s
        self._growth_log = math.log(growth)
        self._inv_growth_log = 1.0 / self._growth_log
        n = math.ceil(math.log(hi_s / lo_s) / self._growth_log) + 1
        self._buckets = [0] * n
        self._count = 0
        self._sum = 0.0
        self._max = 0.0

    def record(self, seconds: float) -> None:
        """Add one observation (negative values count as zero)."""
        s = seconds if seconds > 0.0 else 0.0
        buckets = self._buckets
        i = 0 if s <= self._lo else int(math.log(s / self._lo) * self._inv_growth_log) + 1
        buckets[i if i < len(buckets) else -1] += 1
        self._count += 1
        self._sum += s
        if s > self._max:
            self._max = s

    @property
    def count(self) -> int:
        """Observations recorded."""
        return self._count

    @property
    def max_s(self) -> float:
        """The largest observation, exactly."""
        return self._max

    def percentile(self, q: float) -> float:
        """The ``q``-quantile (``0 < q <= 1``) in seconds: the upper edge of its bucket.

        Raises:
            ValueError: ``q`` out of range.
        """
        if not 0.0 < q <= 1.0:
            raise ValueError("q must be in (0, 1]")
        if self._count == 0:
            return 0.0
        rank = math.ceil(q * self._count)
        seen = 0
        last = len(self._buckets) - 1
        for i, c in enumerate(self._buckets):
            seen += c
            if seen >= rank:
                if i == last:  # the overflow bucket has no upper edge: the max is the answer
                    return self._max
                edge = self._lo * math.exp(i * self._growth_log)
                # The bucket's upper edge overstates by up to one bucket width; never past max.
                return min(edge, self._max)
        return self._max

    def summary(self) -> LatencySummary:
        """p50/p95/p99/max/mean in milliseconds."""
        mean = self._sum / self._count if self._count else 0.0
        return LatencySummary(
            count=self._count,
            p50_ms=round(self.percentile(0.50) * 1e3, 3),
            p95_ms=round(self.percentile(0.95) * 1e3, 3),
            p99_ms=round(self.percentile(0.99) * 1e3, 3),
            max_ms=round(self._max * 1e3, 3),
            mean_ms=round(mean * 1e3, 3),
        )


class LatencyBook:
    """One histogram per (model sha256, provider, stage)."""

    __slots__ = ("_hists",)

    def __init__(self) -> None:
        # One histogram per stage, in _ORDER (a tuple, not a dict keyed by Enum: this is
        # on every call's path, and Enum hashing costs more than the record itself).
        self._hists: dict[tuple[str, str], tuple[Histogram, ...]] = {}

    def record(self, sha256: str, provider: str, times: StageTimes) -> None:
        """Record one call's stage times under ``(sha256, provider)``."""
        hists = self._hists.get((sha256, provider))
        if hists is None:
            hists = tuple(Histogram() for _ in _ORDER)
            self._hists[(sha256, provider)] = hists
        q, pre, inf, post, total = hists
        q.record(times.queue_s)
        pre.record(times.pre_s)
        inf.record(times.infer_s)
        post.record(times.post_s)
        total.record(times.total_s)

    def histogram(self, sha256: str, provider: str, stage: Stage) -> Histogram | None:
        """The histogram of one stage, if any call was recorded for that key."""
        hists = self._hists.get((sha256, provider))
        return None if hists is None else hists[_ORDER.index(stage)]

    def summary(self) -> list[dict[str, Any]]:
        """Every key's per-stage percentiles, as plain data for node status."""
        return [
            {
                "sha256": sha,
                "provider": provider,
                "stages": {
                    stage.value: h.summary().as_dict()
                    for stage, h in zip(_ORDER, hists, strict=True)
                },
            }
            for (sha, provider), hists in self._hists.items()
        ]


_ORDER = (Stage.QUEUE, Stage.PRE, Stage.INFER, Stage.POST, Stage.TOTAL)
