"""Which inputs to keep for retraining, and how they are stored.

Raw tensors are not logged with results. A :class:`SamplingPolicy` keeps a
small share of inputs (``base_rate``), more of them when the model was unsure
(``low_confidence_rate`` below ``low_confidence_below``), because those are the
cases retraining needs. Kept inputs go to the node's telemetry zone, which is
lower priority and bounded: samples are written to ``max_samples`` ring slots,
so the materialized telemetry never holds more than that many per model, and
the log's retention compacts the rest.

The decision is a pure function of the confidence and a uniform draw; the
:class:`Sampler` only owns a seeded random stream and the ring position.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["SamplingPolicy", "Sampler", "decode_sample", "encode_sample"]


@dataclass(frozen=True, slots=True)
class SamplingPolicy:
    """How many inputs to keep.

    Attributes:
        base_rate: probability of keeping a confident case (0.01 to 0.10 is typical).
        low_confidence_below: a confidence under this counts as unsure.
        low_confidence_rate: probability of keeping an unsure case.
        max_samples: ring slots per model: the bound on stored samples.
        max_sample_bytes: inputs larger than this are never stored.
        max_pending: sample writes in flight; beyond this a sample is dropped
            rather than delaying results (telemetry is lower priority).
    """

    base_rate: float = 0.02
    low_confidence_below: float = 0.75
    low_confidence_rate: float = 0.5
    max_samples: int = 256
    max_sample_bytes: int = 256 * 1024
    max_pending: int = 8

    def __post_init__(self) -> None:
        for name in ("base_rate", "low_confidence_rate", "low_confidence_below"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.max_samples < 1 or self.max_sample_bytes < 1 or self.max_pending < 1:
            raise ValueError("max_samples, max_sample_bytes and max_pending must be >= 1")

    def probability(self, confidence: float) -> float:
        """The chance a call with this confidence is kept."""
        return (
            self.low_confidence_rate if confidence < self.low_confidence_below else self.base_rate
        )

    def decide(self, confidence: float, draw: float) -> bool:
        """Keep this input? ``draw`` is uniform in ``[0, 1)``."""
        return draw < self.probability(confidence)


class Sampler:
    """A policy plus a seeded random stream and the ring position.

    Args:
        policy: the sampling policy.
        seed: seeds the random stream (reproducible tests and simulations).
    """

    __slots__ = ("_next_slot", "_rng", "policy")

    def __init__(self, policy: SamplingPolicy, seed: int | None = None) -> None:
        self.policy = policy
        self._rng = random.Random(seed)
        self._next_slot = 0

    def choose(self, confidence: float, nbytes: int) -> int | None:
        """The ring slot to store this input in, or None to skip it."""
        if nbytes > self.policy.max_sample_bytes:
            return None
        if not self.policy.decide(confidence, self._rng.random()):
            return None
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.policy.max_samples
        return slot


def encode_sample(feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, dict[str, Any]]:
    """Tensors as msgpack-friendly data: ``{name: {dtype, shape, data}}``."""
    return {
        name: {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
        for name, arr in feeds.items()
    }


def decode_sample(value: Mapping[str, Mapping[str, Any]]) -> dict[str, npt.NDArray[Any]]:
    """The inverse of :func:`encode_sample`."""
    return {
        name: np.frombuffer(t["data"], dtype=np.dtype(t["dtype"])).reshape(t["shape"]).copy()
        for name, t in value.items()
    }
