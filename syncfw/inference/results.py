"""The result op: provenance, key, the write, and the background work a result may spawn.

Invariants:

1. One successful call writes exactly one result op, at
   ``results/<node>/<model>/<key>`` (built by :mod:`syncfw.keys`), whose value
   names the model that ran it (name, version, sha256), the provider that
   really ran it, the input digest, the prediction and the stage latencies.
   Raw tensors are never in a result.
2. Samples for retraining and escalations to the cloud are background work:
   they never delay or fail the call that caused them, and they are bounded
   (``SamplingPolicy.max_pending``, ``max_pending_escalations``); what is
   dropped or fails is counted and logged, never raised.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from syncfw.inference.config import EngineConfig
from syncfw.inference.latency import Histogram, StageTimes
from syncfw.inference.pipeline import Array, Outcome
from syncfw.inference.prediction import Prediction
from syncfw.inference.sampling import Sampler, encode_sample
from syncfw.inference.signature import ModelInfo
from syncfw.inference.sink import ResultSink
from syncfw.keys import result_key, sample_key
from syncfw.log import Op

__all__ = ["EscalateFn", "EscalationRequest", "InferenceResult", "ResultWriter"]

log = logging.getLogger("syncfw.inference")


@dataclass(frozen=True, slots=True)
class EscalationRequest:
    """An unsure case offered to the cloud (the callback decides what to do with it).

    Attributes:
        result_key: the key of the local result op (already written).
        feeds: the model inputs.
        prediction: the local decision (already acted upon).
        model: the model that made it.
    """

    result_key: str
    feeds: Mapping[str, Array]
    prediction: Prediction
    model: ModelInfo


EscalateFn = Callable[[EscalationRequest], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """What :meth:`Engine.infer` returns.

    Attributes:
        key: the result op's key.
        outputs: the model outputs, by name (this call's rows only).
        prediction: top label(s) and confidence.
        latency: per-stage seconds.
        model: the model that ran.
        input_digest: hex sha256 over the inputs' names, dtypes, shapes and bytes.
        op: the result op as written (its ``hlc`` is the result's timestamp).
        batch_size: how many calls shared the ``session.run``.
        sample_key: where the input was kept for retraining, or None.
    """

    key: str
    outputs: dict[str, Array]
    prediction: Prediction
    latency: StageTimes
    model: ModelInfo
    input_digest: str
    op: Op
    batch_size: int
    sample_key: str | None

    @property
    def hlc(self) -> int:
        """The result op's hybrid logical timestamp."""
        return self.op.hlc


@dataclass(slots=True)
class _Counts:
    samples_written: int = 0
    samples_dropped: int = 0
    escalations_sent: int = 0
    escalations_dropped: int = 0
    escalations_failed: int = 0
    background: set[asyncio.Task[None]] = field(default_factory=set)


class ResultWriter:
    """Turns an outcome into its result op, then spawns its sample and escalation.

    Args:
        sink: the node results are written to.
        config: sampling, ``escalate_below`` and ``max_pending_escalations``.
        escalate: receives unsure cases while :attr:`escalation_enabled`.
    """

    def __init__(self, sink: ResultSink, config: EngineConfig, escalate: EscalateFn | None) -> None:
        self._sink = sink
        self._sampler = (
            Sampler(config.sampling, config.sample_seed) if config.sampling is not None else None
        )
        self._escalate = escalate
        self.escalate_below = config.escalate_below
        self.escalation_enabled = escalate is not None
        self._max_pending_escalations = config.max_pending_escalations
        self._pending_samples = 0
        self._pending_escalations = 0
        self._seq = itertools.count(1)
        self._key_prefix = f"{time.time_ns() // 1_000_000:013d}"
        self.log_write = Histogram()
        self._n = _Counts()

    async def write(self, out: Outcome, key: str | None) -> InferenceResult:
        """Append the result op of ``out`` (named ``key``, default a unique, time-ordered id).

        Raises:
            Exception: whatever the sink's ``put`` raises (a full disk, say):
                the result was computed but not logged.
        """
        info = out.model.info
        node = self._sink.node_id
        rkey = result_key(node, info.name, key or self._auto_key())
        skey = self._choose_sample(out, node)
        value = {
            "model": {"name": info.name, "version": info.version, "sha256": info.sha256},
            "provider": info.provider,
            "input_digest": out.digest,
            "label": out.prediction.label,
            "confidence": out.prediction.confidence,
            "top": [[lbl, score] for lbl, score in out.prediction.top],
            "latency_ms": out.times.as_ms(),
            "batch": out.batch_size,
            "sample": skey,
        }
        t_put = time.perf_counter()
        op = await self._sink.put(rkey, value)
        self.log_write.record(time.perf_counter() - t_put)
        if skey is not None:
            self._spawn_sample(skey, rkey, out)
        if (
            self.escalation_enabled
            and self._escalate is not None
            and out.prediction.confidence < self.escalate_below
        ):
            self._spawn_escalation(EscalationRequest(rkey, out.feeds, out.prediction, info))
        return InferenceResult(
            key=rkey,
            outputs=out.outputs,
            prediction=out.prediction,
            latency=out.times,
            model=info,
            input_digest=out.digest,
            op=op,
            batch_size=out.batch_size,
            sample_key=skey,
        )

    async def flush(self) -> None:
        """Wait for background sample writes and escalations to finish."""
        while self._n.background:
            await asyncio.gather(*list(self._n.background), return_exceptions=True)

    def status(self) -> dict[str, Any]:
        """The samples, escalation and log-write sections of the engine's status."""
        n = self._n
        return {
            "log_write": self.log_write.summary().as_dict(),
            "samples": {"written": n.samples_written, "dropped": n.samples_dropped},
            "escalation": {
                "enabled": self.escalation_enabled,
                "sent": n.escalations_sent,
                "failed": n.escalations_failed,
                "dropped": n.escalations_dropped,
            },
        }

    def _auto_key(self) -> str:
        return f"{self._key_prefix}-{next(self._seq):08d}"

    def _choose_sample(self, out: Outcome, node: str) -> str | None:
        sampler = self._sampler
        if sampler is None:
            return None
        nbytes = sum(a.nbytes for a in out.feeds.values())
        slot = sampler.choose(out.prediction.confidence, nbytes)
        if slot is None:
            return None
        if self._pending_samples >= sampler.policy.max_pending:
            # Telemetry is lower priority than results: drop rather than queue more writes.
            self._n.samples_dropped += 1
            _warn_sometimes(
                self._n.samples_dropped,
                "sample dropped: %d sample writes already in flight",
                self._pending_samples,
            )
            return None
        return sample_key(node, out.model.info.name, slot)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._n.background.add(task)
        task.add_done_callback(self._n.background.discard)

    def _spawn_sample(self, skey: str, rkey: str, out: Outcome) -> None:
        self._pending_samples += 1
        value = {
            "result_key": rkey,
            "model_sha256": out.model.info.sha256,
            "label": out.prediction.label,
            "confidence": out.prediction.confidence,
            "input_digest": out.digest,
            "inputs": encode_sample(out.feeds),
        }

        async def write() -> None:
            try:
                await self._sink.put(skey, value)
                self._n.samples_written += 1
            except (
                Exception
            ) as exc:  # telemetry is best effort: a failed sample never fails a result
                self._n.samples_dropped += 1
                log.warning("sample %s not written: %s: %s", skey, type(exc).__name__, exc)
            finally:
                self._pending_samples -= 1

        self._spawn(write(), "syncfw-inference-sample")

    def _spawn_escalation(self, req: EscalationRequest) -> None:
        assert self._escalate is not None
        if self._pending_escalations >= self._max_pending_escalations:
            self._n.escalations_dropped += 1
            _warn_sometimes(
                self._n.escalations_dropped,
                "escalation of %s dropped: %d escalations already in flight",
                req.result_key,
                self._pending_escalations,
            )
            return
        self._pending_escalations += 1
        escalate = self._escalate

        async def send() -> None:
            try:
                await escalate(req)
                self._n.escalations_sent += 1
            except Exception as exc:  # the cloud is optional: the local decision already stands
                self._n.escalations_failed += 1
                log.warning(
                    "escalation of %s failed: %s: %s", req.result_key, type(exc).__name__, exc
                )
            finally:
                self._pending_escalations -= 1

        self._spawn(send(), "syncfw-inference-escalate")


def _warn_sometimes(count: int, message: str, *args: object) -> None:
    """Log the 1st, 2nd, 4th, 8th, ... drop: a steady overload must not flood the log."""
    if count & (count - 1) == 0:
        log.warning(message + " (%d dropped so far)", *args, count)
