"""The inference engine: one ONNX Runtime session serving calls, each result an op.

:class:`Engine` is the facade over four parts, one job each:

* :mod:`~syncfw.inference.loader`: bytes and manifest checked, providers
  planned, session made and warmed up, hot swap;
* :mod:`~syncfw.inference.worker`: the queue, micro-batching, the watchdog,
  abandoned threads and the isolated worker's revival;
* :mod:`~syncfw.inference.pipeline`: pre / run / post for a batch, the input
  and output checks, the prediction;
* :mod:`~syncfw.inference.results`: the result op's provenance, key and
  write, and the samples and escalations it spawns.

Invariants (each part states its own at its top):

1. A call that fails (bad input, NaN, a model whose outputs break its declared
   signature, a runtime error, the watchdog) raises an
   :class:`~syncfw.errors.InferenceError` subclass and writes no result op.
2. A model is swapped in only once fully loaded and checked; any failure
   leaves the previous model serving, and calls already running finish on the
   model they started with, their ops naming that model.
3. Inference never runs on the event loop, and every job runs under the watchdog.
4. Every call is recorded once, where it ends: the latency book and, when the
   sink is a :class:`~syncfw.inference.sink.MetricsHost`, the node's registry.

The node is reached only through :class:`~syncfw.inference.sink.ResultSink`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from syncfw.inference.config import DEFAULT_SESSION_CONFIG, EngineConfig, Isolation
from syncfw.inference.errors import EngineStateError, InferenceError
from syncfw.inference.isolation import ProcessSession
from syncfw.inference.latency import LatencyBook
from syncfw.inference.loader import Loader, ModelSource
from syncfw.inference.manifest import ModelManifest
from syncfw.inference.pipeline import Pipeline, PostFn, PreFn
from syncfw.inference.recorder import CallRecorder, metrics_of
from syncfw.inference.results import EscalateFn, EscalationRequest, InferenceResult, ResultWriter
from syncfw.inference.signature import ModelInfo
from syncfw.inference.sink import ResultSink, StatusHost
from syncfw.inference.worker import Worker

log = logging.getLogger("syncfw.inference")

__all__ = [
    "DEFAULT_SESSION_CONFIG",
    "Engine",
    "EscalationRequest",
    "InferenceResult",
]


class Engine:
    """Runs one ONNX model at a time for a node and logs every result.

    Use ``async with Engine(node) as engine:`` (or call :meth:`aclose`), then
    ``await engine.load(path)`` (or ``load(data, manifest)``) and
    ``await engine.infer(inputs, key=...)``.

    Args:
        sink: the node results are written to. When it has a ``metrics``
            attribute holding a :class:`~syncfw.metrics.NodeMetrics`, every call
            is recorded there too.
        config: how the engine serves (default :meth:`EngineConfig.edge`).
        preprocess: turns a call's ``inputs`` into the model's feeds (a mapping
            of input name to array, or one array for a one-input model); runs
            in the worker thread. None: ``inputs`` already are the feeds.
        postprocess: turns one call's outputs into a :class:`Prediction`; runs
            in the worker thread. None: :func:`top_k` on the first output.
        escalate: receives unsure cases (confidence under
            ``config.escalate_below``) while :attr:`escalation_enabled`.
        name: model name for a model loaded from a file (default from the model).
        version: model version for a model loaded from a file (default from its metadata).
        labels: class labels when the manifest does not give them (default
            from the model's ``labels`` metadata).
    """

    def __init__(
        self,
        sink: ResultSink,
        config: EngineConfig | None = None,
        *,
        preprocess: PreFn | None = None,
        postprocess: PostFn | None = None,
        escalate: EscalateFn | None = None,
        name: str | None = None,
        version: str | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        cfg = config if config is not None else EngineConfig.edge()
        self._config = cfg
        self._sink = sink
        self._loader = Loader(cfg, name=name, version=version, labels=labels)
        self._pipeline = Pipeline(preprocess, postprocess, check_finite=cfg.check_finite)
        self._worker = Worker(self._pipeline, lambda: self._loader.current, cfg)
        self._writer = ResultWriter(sink, cfg, escalate)
        self._recorder = CallRecorder(metrics_of(sink))
        self._closed = False
        self._calls = 0
        self._ok = 0
        self._errors: dict[str, int] = {}
        if cfg.status_name is not None and isinstance(sink, StatusHost):
            sink.add_status_source(cfg.status_name, self.status)

    # -- settings ------------------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        """The config the engine was made with."""
        return self._config

    @property
    def timeout_s(self) -> float:
        """The per-call watchdog."""
        return self._worker.timeout_s

    @property
    def max_batch(self) -> int:
        """The most calls one ``session.run`` serves."""
        return self._worker.max_batch

    @property
    def isolation(self) -> Isolation:
        """Where the session runs: ``"thread"`` or ``"process"``."""
        return self._config.isolation

    @property
    def escalation_enabled(self) -> bool:
        """Whether unsure cases go to ``escalate`` (the ladder turns it off when degraded)."""
        return self._writer.escalation_enabled

    @escalation_enabled.setter
    def escalation_enabled(self, value: bool) -> None:
        self._writer.escalation_enabled = value

    @property
    def escalate_below(self) -> float:
        """A confidence under this is unsure."""
        return self._writer.escalate_below

    @escalate_below.setter
    def escalate_below(self, value: float) -> None:
        self._writer.escalate_below = value

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop serving: queued calls fail with :class:`EngineStateError`; background writes finish."""
        if self._closed:
            return
        self._closed = True
        self._loader.closed = True
        await self._worker.close()
        await self._writer.flush()
        current = self._loader.current
        if current is not None and isinstance(current.session, ProcessSession):
            await asyncio.to_thread(current.session.close)
        self._worker.shutdown()

    async def flush(self) -> None:
        """Wait for background sample writes and escalations to finish."""
        await self._writer.flush()

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id with ``isolation="process"`` (None otherwise)."""
        current = self._loader.current
        if current is not None and isinstance(current.session, ProcessSession):
            return current.session.pid
        return None

    @property
    def model(self) -> ModelInfo | None:
        """The model serving now, if any."""
        current = self._loader.current
        return current.info if current is not None else None

    # -- loading -------------------------------------------------------------

    async def load(self, model: ModelSource, manifest: ModelManifest | None = None) -> ModelInfo:
        """Load a model and make it the one serving (hot swap).

        Args:
            model: an ``.onnx`` file, or the model's bytes (held in memory).
            manifest: what the model must be: its size and sha256 are checked
                against the bytes, its signature against the one the model
                declares, and results carry its name, version and sha256.
                Required with bytes; optional with a path (without one, the
                manifest is built from the file: name from ``name=``, else
                the model's metadata, else the file's stem).

        Returns:
            What is now serving.

        Raises:
            ModelLoadError: the file is missing, unreadable, corrupt, truncated
                or not loadable by ONNX Runtime; or it is not what its manifest
                says (size, sha256 or signature).
            ProviderError: no wanted provider is available, or fallback was
                forbidden and ONNX Runtime fell back.
            OutputSignatureError: the warm-up outputs do not match the declared outputs.
            EngineStateError: the engine is closed.
            TypeError: bytes without a manifest.

        On any error the previously loaded model keeps serving.

        A model that ONNX Runtime runs on a provider other than the first one wanted
        (fallback allowed) is logged as a WARNING, counted in
        ``syncfw_inference_provider_fallbacks`` and shown as ``fell_back`` in status.
        """
        info = await self._loader.swap(model, manifest, self._worker.retire)
        if info.fell_back:
            log.warning(
                "model %r %s (sha256 %s) runs on %s, not %s as wanted: ONNX Runtime could "
                "not start %s here (session providers %s)",
                info.name,
                info.version,
                info.sha256[:12],
                info.provider,
                info.plan.preferred,
                ", ".join(p for p in info.plan.providers if p not in info.session_providers),
                list(info.session_providers),
            )
            self._recorder.fell_back(info)
        return info

    async def unload(self) -> ModelInfo | None:
        """Stop serving the current model and serve none (a first model that rolled back
        has nothing to fall back to). Calls already running finish on it; later calls
        raise :class:`EngineStateError` until the next :meth:`load`.

        Returns:
            The model that was serving, or None.
        """
        return await self._loader.unload(self._worker.retire)

    # -- calls ---------------------------------------------------------------

    async def infer(self, inputs: Any, *, key: str | None = None) -> InferenceResult:
        """Run the model on one call's inputs and append the result op.

        Args:
            inputs: what ``preprocess`` takes; without one, a mapping of input
                name to array (or one array for a one-input model).
            key: names the result: ``results/<node>/<model>/<key>``; default a
                unique, time-ordered id.

        Returns:
            The outputs, the prediction, the stage latencies and the op written.

        Raises:
            InputSignatureError: wrong input names, shapes or dtypes.
            NonFiniteInputError: NaN or infinity in an input.
            OutputSignatureError: outputs that break the declared signature.
            InferenceRunError: the runtime or a pre/post function raised.
            InferenceTimeoutError: the watchdog fired.
            EngineStateError: no model loaded, the engine is closed (also while the
                call was queued or running), or too many worker threads are stuck.

        On any of these no result op is written. Errors of the node's ``put``
        (a full disk, say) propagate unchanged: the result was computed but not logged.
        """
        if self._closed:
            raise EngineStateError("the engine is closed")
        current = self._loader.current
        if current is None:
            raise EngineStateError("no model loaded: await engine.load(path) first")
        try:
            call = self._worker.submit(inputs)
        except EngineStateError as exc:
            self._recorder.failed(current.info, type(exc).__name__)
            raise
        self._calls += 1
        try:
            out = await call.future
        except InferenceError as exc:
            outcome = type(exc).__name__
            self._errors[outcome] = self._errors.get(outcome, 0) + 1
            ran_on = call.loaded if call.loaded is not None else current
            self._recorder.failed(ran_on.info, outcome)
            raise
        try:
            result = await self._writer.write(out, key)
        except Exception as exc:
            self._recorder.failed(out.model.info, type(exc).__name__)
            raise
        self._recorder.ok(out.model.info, out.times)
        self._ok += 1
        return result

    # -- status --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Model, provider, counters and per-stage latency percentiles (node status)."""
        w = self._worker
        errors = dict(self._errors)
        if w.restart_failures:
            errors["WorkerRestartFailed"] = w.restart_failures
        return (
            {
                "model": self.model.as_dict() if self.model is not None else None,
                "calls": self._calls,
                "ok": self._ok,
                "errors": errors,
                "stuck_workers": w.stuck,
                "queued": w.queued,
                "batches": {"count": w.batches, "max": w.max_batch_seen},
                "latency": self._recorder.book.summary(),
            }
            | self._writer.status()
            | {
                "loads": {"ok": self._loader.loads, "failed": self._loader.failures},
                "isolation": self.isolation,
                "worker_restarts": w.restarts,
                "worker_restart": w.restart_s.summary().as_dict(),
            }
        )

    def latency_book(self) -> LatencyBook:
        """The per-(sha256, provider) histograms."""
        return self._recorder.book
