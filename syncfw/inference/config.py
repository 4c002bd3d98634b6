"""The engine's tunables in one frozen value, with named presets.

:class:`EngineConfig` holds everything about *how* an engine serves (providers,
watchdog, batching, warm-up, input checks, sampling, escalation bounds, threads,
isolation); the callables and the model identity stay keywords of
:class:`~syncfw.inference.Engine`. Pick a preset and adjust it with
:meth:`EngineConfig.with_`::

    Engine(node, EngineConfig.isolated().with_(timeout_s=1.0))

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from syncfw.inference.providers import AcceleratorInfo
from syncfw.inference.sampling import SamplingPolicy

__all__ = ["DEFAULT_SESSION_CONFIG", "EngineConfig", "Isolation"]

Isolation = Literal["thread", "process"]

DEFAULT_SESSION_CONFIG: dict[str, str] = {
    # ONNX Runtime's intra-op threads spin after each run, waiting for the next. A bare
    # loop of session.run profits; the engine does not: between runs it hashes inputs,
    # post-processes and writes ops, and on a small edge CPU the spinning threads take
    # the cores that work needs (measured in bench/inference.py: spinning on, the
    # engine loses 10-30 % of its throughput on two busy cores).
    "session.intra_op.allow_spinning": "0",
}
"""Session config entries every engine session gets unless ``session_config`` overrides them."""


def _pairs(value: Mapping[str, str] | Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an engine serves.

    Attributes:
        providers: provider order override (None: TensorRT → CUDA → CPU).
        available: the providers to consider available (injectable for tests;
            None: what onnxruntime reports).
        allow_fallback: when False, a session that does not run on the first
            planned provider is a :class:`~syncfw.errors.ProviderError` at load.
        trt_cache_dir: parent of the TensorRT engine and timing caches.
        accelerator: GPU name and TensorRT version (None: detected when a GPU
            provider is planned).
        timeout_s: the per-call watchdog.
        max_batch: the most calls one ``session.run`` serves (1: no batching).
        warmup_runs: runs on zero inputs at load.
        check_finite: refuse NaN and infinity in float inputs.
        sampling: keep some inputs for retraining (None: keep none).
        sample_seed: seeds the sampler.
        escalate_below: a confidence under this is unsure (offered to ``escalate``).
        max_pending_escalations: escalations in flight beyond which new ones are dropped.
        max_stuck_workers: abandoned (hung) worker threads beyond which calls are refused.
        intra_op_threads: ONNX Runtime intra-op threads (None: its default).
        session_config: ONNX Runtime session config entries over
            :data:`DEFAULT_SESSION_CONFIG`, as sorted ``(key, value)`` pairs (a
            mapping is accepted and normalised, so the config stays hashable).
        isolation: ``"thread"`` runs the session in this process (a hung call's
            thread is abandoned); ``"process"`` runs it in a child process that
            the watchdog kills and replaces (see :mod:`syncfw.inference.isolation`
            for the cost; scripts need an ``if __name__ == "__main__":`` guard).
        status_name: the node status section (None: do not register).

    Raises:
        ValueError: a value out of range (checked at construction).
    """

    providers: tuple[str, ...] | None = None
    available: tuple[str, ...] | None = None
    allow_fallback: bool = True
    trt_cache_dir: Path | None = None
    accelerator: AcceleratorInfo | None = None
    timeout_s: float = 2.0
    max_batch: int = 64
    warmup_runs: int = 2
    check_finite: bool = True
    sampling: SamplingPolicy | None = None
    sample_seed: int | None = None
    escalate_below: float = 0.6
    max_pending_escalations: int = 16
    max_stuck_workers: int = 4
    intra_op_threads: int | None = None
    session_config: tuple[tuple[str, str], ...] = field(default=())
    isolation: Isolation = "thread"
    status_name: str | None = "inference"

    def __post_init__(self) -> None:
        # Sequences given as lists (or a dict for session_config) are frozen here.
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
        if self.available is not None:
            object.__setattr__(self, "available", tuple(self.available))
        object.__setattr__(self, "session_config", _pairs(self.session_config))
        if self.isolation not in ("thread", "process"):
            raise ValueError(f"isolation must be 'thread' or 'process', not {self.isolation!r}")
        if (
            self.timeout_s <= 0
            or self.max_batch < 1
            or self.warmup_runs < 0
            or self.max_stuck_workers < 1
            or self.max_pending_escalations < 0
        ):
            raise ValueError(
                "need timeout_s > 0, max_batch >= 1, warmup_runs >= 0, max_stuck_workers >= 1 "
                "and max_pending_escalations >= 0"
            )

    @property
    def session_entries(self) -> dict[str, str]:
        """The session config entries a session gets: the defaults, then ``session_config``."""
        return DEFAULT_SESSION_CONFIG | dict(self.session_config)

    def with_(self, **changes: Any) -> EngineConfig:
        """A copy with ``changes`` applied (validated like a new config).

        Raises:
            TypeError: an unknown field name.
            ValueError: a value out of range.
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def edge(cls) -> EngineConfig:
        """The default: an edge box serving one model to many callers.

        Micro-batches of up to 64, a 2 s watchdog, two warm-up runs, intra-op
        spinning off (the engine's own work between runs needs the cores).
        """
        return cls()

    @classmethod
    def low_latency(cls) -> EngineConfig:
        """One or few callers on a dedicated machine, where the tail matters most.

        Small batches (a call never waits behind 63 others), a tight watchdog,
        more warm-up runs so the first real call meets warm caches, and intra-op
        spinning on: with spare cores, spinning saves the wake-up of each run.
        """
        return cls(
            timeout_s=0.5,
            max_batch=4,
            warmup_runs=5,
            session_config=(("session.intra_op.allow_spinning", "1"),),
        )

    @classmethod
    def isolated(cls) -> EngineConfig:
        """A model that may hang in native code: the session runs in a killable child process.

        The watchdog is wider than :meth:`edge`'s because every call crosses a
        pipe, and a restart costs a Python start and a session load.
        """
        return cls(isolation="process", timeout_s=5.0)

    @classmethod
    def test(cls) -> EngineConfig:
        """Tests on a shared machine: a wide watchdog, one warm-up, one intra-op thread, seeded sampling.

        The wide watchdog keeps a loaded CI machine from failing calls; tests
        of the watchdog set ``timeout_s`` themselves.
        """
        return cls(timeout_s=10.0, warmup_runs=1, intra_op_threads=1, sample_seed=0)
