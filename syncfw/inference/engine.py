"""The inference engine: one ONNX Runtime session serving calls, each result an op.

Invariants:

1. A call that fails (bad input, NaN, a model whose outputs break its declared
   signature, a runtime error, the watchdog) raises an
   :class:`~syncfw.errors.InferenceError` subclass and writes no result op.
2. A model is swapped in only once it is fully loaded: read, hashed, session
   created on the planned providers, provider checked, signature read, warmed
   up and its warm-up outputs checked. Any failure raises and leaves the
   previously loaded model serving. Calls already running finish on the model
   they started with, and their ops name that model.
3. The provider recorded is the one the session reports (``get_providers()``),
   not the one asked for: ONNX Runtime falls back silently otherwise.
4. Inference never runs on the event loop. Calls are queued; one job at a
   time runs on one worker thread, started by the call itself when the worker
   is idle or by the end of the previous job. While the worker is busy, calls
   pile up and the next job takes them all at once (micro-batching, when the
   model's first dimension is dynamic), so a lone caller pays no batching
   delay and many callers share ``session.run`` calls.
5. Each job runs under a watchdog. A thread cannot be killed, so on timeout
   the job's calls fail with :class:`InferenceTimeoutError`, the stuck thread
   is abandoned (counted in status until it returns) and a fresh worker
   thread takes the queue, so the engine keeps serving. Past
   ``max_stuck_workers`` abandoned threads the engine refuses calls rather
   than leak more threads. With ``isolation="process"`` the session lives in
   a child process instead, which the watchdog kills and replaces.
6. Samples for retraining and escalations to the cloud are background work:
   they never delay or fail the call that caused them, and they are bounded.

The node is reached only through :class:`~syncfw.inference.sink.ResultSink`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from syncfw.inference.errors import (
    EngineStateError,
    InferenceError,
    InferenceRunError,
    InferenceTimeoutError,
    InputSignatureError,
    ModelLoadError,
    NonFiniteInputError,
    OutputSignatureError,
)
from syncfw.inference.isolation import ProcessSession
from syncfw.inference.latency import Histogram, LatencyBook, StageTimes
from syncfw.inference.prediction import Prediction, top_k, top_k_rows
from syncfw.inference.providers import (
    TENSORRT,
    AcceleratorInfo,
    ProviderPlan,
    available_providers,
    detect_accelerator,
    plan_providers,
    resolve_actual,
)
from syncfw.inference.sampling import Sampler, SamplingPolicy, encode_sample
from syncfw.inference.signature import (
    ModelInfo,
    TensorSpec,
    batchable,
    declared_signature,
    input_digest,
)
from syncfw.inference.sink import ResultSink, StatusHost, results_prefix, telemetry_prefix
from syncfw.log import Op

__all__ = [
    "DEFAULT_SESSION_CONFIG",
    "Engine",
    "EscalationRequest",
    "InferenceResult",
]

DEFAULT_SESSION_CONFIG: dict[str, str] = {
    # ONNX Runtime's intra-op threads spin after each run, waiting for the next. A bare
    # loop of session.run profits; the engine does not: between runs it hashes inputs,
    # post-processes and writes ops, and on a small edge CPU the spinning threads take
    # the cores that work needs (measured in bench/inference.py: spinning on, the
    # engine loses 10-30 % of its throughput on two busy cores).
    "session.intra_op.allow_spinning": "0",
}
"""Session config entries every engine session gets unless ``session_config`` overrides them."""

Array = npt.NDArray[Any]
Feeds = dict[str, Array]
PreFn = Callable[[Any], "Mapping[str, Array] | Array"]
PostFn = Callable[[Mapping[str, Array]], "Prediction"]


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
class _Loaded:
    """A loaded session and what is known about it (swapped as one reference)."""

    session: Any
    info: ModelInfo


@dataclass(slots=True)
class _Call:
    """One queued call."""

    inputs: Any
    future: asyncio.Future[_Outcome]
    enqueued: float


@dataclass(slots=True)
class _Job:
    """One batch of calls on the worker, under the watchdog."""

    batch: list[_Call]
    loaded: _Loaded
    future: concurrent.futures.Future[list[_Outcome | InferenceError]]
    timer: asyncio.TimerHandle | None = None
    finished: bool = False


@dataclass(slots=True)
class _Outcome:
    """What the worker made of one call."""

    model: _Loaded
    feeds: Feeds
    outputs: dict[str, Array]
    prediction: Prediction
    digest: str
    times: StageTimes
    batch_size: int


@dataclass(slots=True)
class _Counters:
    calls: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    batched_calls: int = 0
    max_batch: int = 0
    samples_written: int = 0
    samples_dropped: int = 0
    escalations_sent: int = 0
    escalations_dropped: int = 0
    escalations_failed: int = 0
    loads: int = 0
    load_failures: int = 0


class Engine:
    """Runs one ONNX model at a time for a node and logs every result.

    Use ``async with Engine(node, ...) as engine:`` (or call :meth:`aclose`),
    then ``await engine.load(path)`` and ``await engine.infer(inputs, key=...)``.

    Args:
        sink: the node results are written to.
        name: model name for provenance and keys; default from the model.
        version: model version; default from the model's metadata.
        labels: class labels; default from the model's ``labels`` metadata.
        preprocess: turns a call's ``inputs`` into the model's feeds (a mapping
            of input name to array, or one array for a one-input model); runs
            in the worker thread. None: ``inputs`` already are the feeds.
        postprocess: turns one call's outputs into a :class:`Prediction`; runs
            in the worker thread. None: :func:`top_k` on the first output.
        providers: provider order override (default TensorRT → CUDA → CPU).
        available: the providers to consider available (injectable; default:
            what onnxruntime reports).
        allow_fallback: when False, a session that does not run on the first
            planned provider is a :class:`ProviderError` at load.
        trt_cache_dir: parent of the TensorRT engine and timing caches.
        accelerator: GPU name and TensorRT version (default: detected when a
            GPU provider is planned).
        timeout_s: the per-call watchdog.
        max_batch: the most calls one ``session.run`` serves (1: no batching).
        warmup_runs: runs on zero inputs at load.
        check_finite: refuse NaN and infinity in float inputs.
        sampling: keep some inputs for retraining (None: keep none).
        sample_seed: seeds the sampler.
        escalate: receives unsure cases while escalation is enabled.
        escalate_below: a confidence under this is unsure.
        max_pending_escalations: escalations in flight beyond which new ones are dropped.
        max_stuck_workers: abandoned (hung) worker threads beyond which calls are refused.
        intra_op_threads: ONNX Runtime intra-op threads (None: its default).
        session_config: ONNX Runtime session config entries, over
            :data:`DEFAULT_SESSION_CONFIG` (which turns intra-op spinning off).
        isolation: ``"thread"`` runs the session in this process (a hung call's
            thread is abandoned); ``"process"`` runs it in a child process that
            the watchdog can kill and replace (see :mod:`syncfw.inference.isolation`
            for what that costs; scripts need an ``if __name__ == "__main__":`` guard).
        status_name: the node status section (None: do not register).
    """

    def __init__(
        self,
        sink: ResultSink,
        *,
        name: str | None = None,
        version: str | None = None,
        labels: Sequence[str] | None = None,
        preprocess: PreFn | None = None,
        postprocess: PostFn | None = None,
        providers: Sequence[str] | None = None,
        available: Sequence[str] | None = None,
        allow_fallback: bool = True,
        trt_cache_dir: Path | None = None,
        accelerator: AcceleratorInfo | None = None,
        timeout_s: float = 2.0,
        max_batch: int = 64,
        warmup_runs: int = 2,
        check_finite: bool = True,
        sampling: SamplingPolicy | None = None,
        sample_seed: int | None = None,
        escalate: Callable[[EscalationRequest], Awaitable[None]] | None = None,
        escalate_below: float = 0.6,
        max_pending_escalations: int = 16,
        max_stuck_workers: int = 4,
        intra_op_threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
        isolation: Literal["thread", "process"] = "thread",
        status_name: str | None = "inference",
    ) -> None:
        if isolation not in ("thread", "process"):
            raise ValueError(f"isolation must be 'thread' or 'process', not {isolation!r}")
        if timeout_s <= 0 or max_batch < 1 or warmup_runs < 0 or max_stuck_workers < 1:
            raise ValueError(
                "need timeout_s > 0, max_batch >= 1, warmup_runs >= 0, max_stuck_workers >= 1"
            )
        self._sink = sink
        self._name = name
        self._version = version
        self._labels = tuple(labels) if labels is not None else None
        self._pre = preprocess
        self._post = postprocess
        self._providers = tuple(providers) if providers is not None else None
        self._available = tuple(available) if available is not None else None
        self._allow_fallback = allow_fallback
        self._trt_cache_dir = trt_cache_dir
        self._accelerator = accelerator
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._warmup_runs = warmup_runs
        self._check_finite = check_finite
        self._sampler = Sampler(sampling, sample_seed) if sampling is not None else None
        self._escalate = escalate
        self.escalate_below = escalate_below
        self.escalation_enabled = escalate is not None
        self._max_pending_escalations = max_pending_escalations
        self._max_stuck = max_stuck_workers
        self._intra_op_threads = intra_op_threads
        self._session_config = DEFAULT_SESSION_CONFIG | dict(session_config or {})
        self.isolation = isolation
        self._worker_restarts = 0
        self._worker_restart_s = Histogram()

        self._loaded: _Loaded | None = None
        self._load_lock = asyncio.Lock()
        self._queue: collections.deque[_Call] = collections.deque()
        self._job: _Job | None = None
        self._reviving: asyncio.Task[None] | None = None
        self._executor = self._new_executor()
        self._stuck: set[concurrent.futures.Future[Any]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._pending_samples = 0
        self._pending_escalations = 0
        self._closed = False
        self._seq = itertools.count(1)
        self._key_prefix = f"{time.time_ns() // 1_000_000:013d}"
        self._book = LatencyBook()
        self._log_write = Histogram()
        self._counters = _Counters()
        if status_name is not None and isinstance(sink, StatusHost):
            sink.add_status_source(status_name, self.status)

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def _new_executor() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="syncfw-infer"
        )

    async def aclose(self) -> None:
        """Stop serving: queued calls fail with :class:`EngineStateError`; background writes finish."""
        if self._closed:
            return
        self._closed = True
        job, self._job = self._job, None
        if job is not None:
            # Nobody will deliver these calls' outcomes now.
            job.finished = True
            if job.timer is not None:
                job.timer.cancel()
            for call in job.batch:
                if not call.future.done():
                    call.future.set_exception(EngineStateError("the engine was closed"))
        if self._reviving is not None:
            self._reviving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reviving
        while self._queue:
            call = self._queue.popleft()
            if not call.future.done():
                call.future.set_exception(EngineStateError("the engine was closed"))
        await self.flush()
        if self._loaded is not None and isinstance(self._loaded.session, ProcessSession):
            await asyncio.to_thread(self._loaded.session.close)
        # A stuck worker cannot be joined; do not wait for it (it dies with the process).
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def flush(self) -> None:
        """Wait for background sample writes and escalations to finish."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id with ``isolation="process"`` (None otherwise)."""
        if self._loaded is not None and isinstance(self._loaded.session, ProcessSession):
            return self._loaded.session.pid
        return None

    @property
    def model(self) -> ModelInfo | None:
        """The model serving now, if any."""
        return self._loaded.info if self._loaded is not None else None

    # -- loading -----------------------------------------------------------

    async def load(self, path: str | Path) -> ModelInfo:
        """Load a model and make it the one serving (hot swap).

        Args:
            path: an ``.onnx`` file.

        Returns:
            What is now serving.

        Raises:
            ModelLoadError: the file is missing, unreadable, corrupt, truncated
                or not loadable by ONNX Runtime.
            ProviderError: no wanted provider is available, or fallback was
                forbidden and ONNX Runtime fell back.
            OutputSignatureError: the warm-up outputs do not match the declared outputs.
            EngineStateError: the engine is closed.

        On any error the previously loaded model keeps serving.
        """
        if self._closed:
            raise EngineStateError("the engine is closed")
        async with self._load_lock:
            try:
                loaded = await asyncio.to_thread(self._load_sync, Path(path))
            except InferenceError:
                self._counters.load_failures += 1
                raise
            if self._closed:  # closed while loading: do not start serving
                if isinstance(loaded.session, ProcessSession):
                    await asyncio.to_thread(loaded.session.close)
                raise EngineStateError("the engine was closed while loading")
            old, self._loaded = self._loaded, loaded
            self._counters.loads += 1
            if old is not None and isinstance(old.session, ProcessSession):
                # Queued behind any call still running on it, on the one worker thread.
                self._executor.submit(old.session.close)
            return loaded.info

    def _load_sync(self, path: Path) -> _Loaded:
        import onnxruntime as ort

        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read model {str(path)!r}: {exc}") from None
        if not data:
            raise ModelLoadError(f"model {str(path)!r} is empty")
        sha = hashlib.sha256(data).hexdigest()
        try:
            import onnx

            proto = onnx.load_model_from_string(data)
            inputs = declared_signature(proto, "input")
            outputs = declared_signature(proto, "output")
            meta = {p.key: p.value for p in proto.metadata_props}
        except ModelLoadError:
            raise
        except Exception as exc:  # protobuf's DecodeError and friends: translated here
            raise ModelLoadError(
                f"{str(path)!r} is not a readable ONNX model ({len(data)} bytes): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        available = self._available if self._available is not None else tuple(available_providers())
        wants_trt = TENSORRT in available and (
            self._providers is None or TENSORRT in self._providers
        )
        if self._accelerator is None and wants_trt:
            # Only the TensorRT cache key needs it; detected once (nvidia-smi is slow).
            self._accelerator = detect_accelerator()
        accel = self._accelerator
        plan = plan_providers(
            available,
            model_sha256=sha,
            preferred=self._providers,
            accel=accel,
            cache_root=self._trt_cache_dir,
        )
        if plan.trt_cache_dir is not None:
            plan.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        opts = ort.SessionOptions()
        # Shape mismatches are checked and reported by us, not logged by ORT.
        opts.log_severity_level = 3
        if self._intra_op_threads is not None:
            opts.intra_op_num_threads = self._intra_op_threads
        for k, v in self._session_config.items():
            opts.add_session_config_entry(k, v)
        t0 = time.perf_counter()
        session: Any
        try:
            if self.isolation == "process":
                session = ProcessSession(
                    data,
                    plan.for_session(),
                    intra_op_threads=self._intra_op_threads,
                    session_config=self._session_config,
                )
            else:
                session = ort.InferenceSession(
                    data, sess_options=opts, providers=plan.for_session()
                )
        except ModelLoadError as exc:
            raise ModelLoadError(f"cannot load {str(path)!r}: {exc}") from None
        except Exception as exc:  # ORT raises its own pybind types: translate them here
            raise ModelLoadError(
                f"ONNX Runtime cannot load {str(path)!r} ({len(data)} bytes, sha256 {sha[:12]}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        load_s = time.perf_counter() - t0
        try:
            return self._finish_load(session, path, data, sha, plan, inputs, outputs, meta, load_s)
        except BaseException:
            if isinstance(session, ProcessSession):
                session.close()
            raise

    def _finish_load(
        self,
        session: Any,
        path: Path,
        data: bytes,
        sha: str,
        plan: ProviderPlan,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        meta: dict[str, str],
        load_s: float,
    ) -> _Loaded:
        provider = resolve_actual(
            plan, session.get_providers(), allow_fallback=self._allow_fallback
        )
        if not inputs or not outputs:
            raise ModelLoadError(f"model {str(path)!r} declares no inputs or no outputs")
        labels = self._labels
        if labels is None:
            labels = tuple(x for x in meta.get("labels", "").split(",") if x)
        info = ModelInfo(
            path=str(path),
            name=self._name or meta.get("name") or path.stem,
            version=self._version or meta.get("version") or "0",
            sha256=sha,
            size=len(data),
            inputs=inputs,
            outputs=outputs,
            labels=labels,
            provider=provider,
            session_providers=tuple(session.get_providers()),
            plan=plan,
            batchable=batchable(inputs) and batchable(outputs),
            load_s=load_s,
            warmup_s=0.0,
        )
        loaded = _Loaded(session, info)
        t1 = time.perf_counter()
        zeros = {s.name: np.zeros([d or 1 for d in s.shape], dtype=s.dtype) for s in inputs}
        for _ in range(self._warmup_runs):
            try:
                raw = session.run(None, zeros)
            except Exception as exc:  # translated: ORT's types must not leak
                raise ModelLoadError(
                    f"warm-up of {info.name!r} failed: {type(exc).__name__}: {exc}"
                ) from None
            self._check_outputs(info, raw, 1)
        warmup_s = time.perf_counter() - t1
        loaded.info = dataclasses.replace(info, warmup_s=warmup_s)
        return loaded

    # -- calls -------------------------------------------------------------

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
        if self._loaded is None:
            raise EngineStateError("no model loaded: await engine.load(path) first")
        if len(self._stuck) >= self._max_stuck:
            raise EngineStateError(
                f"{len(self._stuck)} worker threads are stuck in hung calls; refusing new calls"
            )
        self._counters.calls += 1
        loop = asyncio.get_running_loop()
        call = _Call(inputs, loop.create_future(), time.perf_counter())
        self._queue.append(call)
        self._kick()
        try:
            out = await call.future
        except InferenceError as exc:
            name = type(exc).__name__
            self._counters.errors[name] = self._counters.errors.get(name, 0) + 1
            raise
        info = out.model.info
        result_key = f"{results_prefix(self._sink.node_id)}{info.name}/{key or self._auto_key()}"
        sample_slot: int | None = None
        sample_key: str | None = None
        if self._sampler is not None and self._pending_samples < self._sampler.policy.max_pending:
            nbytes = sum(a.nbytes for a in out.feeds.values())
            sample_slot = self._sampler.choose(out.prediction.confidence, nbytes)
            if sample_slot is not None:
                sample_key = (
                    f"{telemetry_prefix(self._sink.node_id)}samples/{info.name}/{sample_slot:05d}"
                )
        value = {
            "model": {"name": info.name, "version": info.version, "sha256": info.sha256},
            "provider": info.provider,
            "input_digest": out.digest,
            "label": out.prediction.label,
            "confidence": out.prediction.confidence,
            "top": [[lbl, score] for lbl, score in out.prediction.top],
            "latency_ms": out.times.as_ms(),
            "batch": out.batch_size,
            "sample": sample_key,
        }
        t_put = time.perf_counter()
        op = await self._sink.put(result_key, value)
        self._log_write.record(time.perf_counter() - t_put)
        self._book.record(info.sha256, info.provider, out.times)
        self._counters.ok += 1
        if sample_key is not None:
            self._spawn_sample(sample_key, result_key, out)
        if (
            self.escalation_enabled
            and self._escalate is not None
            and out.prediction.confidence < self.escalate_below
        ):
            self._spawn_escalation(EscalationRequest(result_key, out.feeds, out.prediction, info))
        return InferenceResult(
            key=result_key,
            outputs=out.outputs,
            prediction=out.prediction,
            latency=out.times,
            model=info,
            input_digest=out.digest,
            op=op,
            batch_size=out.batch_size,
            sample_key=sample_key,
        )

    def _auto_key(self) -> str:
        return f"{self._key_prefix}-{next(self._seq):08d}"

    def _kick(self) -> None:
        """Start a job on the worker if none is running and calls are waiting.

        Runs on the event loop only (from :meth:`infer` and from job completion),
        so there is no dispatcher task to wake: a lone call goes straight to the
        worker, and calls that arrive while it is busy are taken together next.
        """
        if self._job is not None or self._reviving is not None or self._closed or not self._queue:
            return
        loaded = self._loaded
        assert loaded is not None  # calls are only queued once a model is loaded
        n = self.max_batch if loaded.info.batchable else 1
        batch = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        self._counters.batches += 1
        self._counters.max_batch = max(self._counters.max_batch, len(batch))
        loop = asyncio.get_running_loop()
        job = _Job(batch, loaded, self._executor.submit(self._work, loaded, batch))
        self._job = job
        job.timer = loop.call_later(self.timeout_s, self._on_timeout, job)

        def done(_: concurrent.futures.Future[Any]) -> None:  # in the worker thread
            # The loop may be gone if the application exited mid-call; then nobody waits.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_done, job)

        job.future.add_done_callback(done)

    def _on_done(self, job: _Job) -> None:
        """Deliver a finished job's outcomes (event loop)."""
        if job.finished:  # the watchdog already failed it, or the engine closed
            return
        job.finished = True
        if job.timer is not None:
            job.timer.cancel()
        self._job = None
        try:
            outcomes: list[_Outcome | InferenceError] = job.future.result()
        except Exception as exc:  # a bug in _work itself: fail the batch, keep serving
            err = InferenceRunError(f"worker failed: {type(exc).__name__}: {exc}")
            outcomes = [err] * len(job.batch)
        for call, outcome in zip(job.batch, outcomes, strict=True):
            if call.future.done():  # the caller was cancelled
                continue
            if isinstance(outcome, BaseException):
                call.future.set_exception(outcome)
            else:
                call.future.set_result(outcome)
        self._next(job.loaded)

    def _on_timeout(self, job: _Job) -> None:
        """The watchdog: fail the job's calls and get a fresh worker (event loop)."""
        if job.finished:
            return
        job.finished = True
        self._job = None
        loaded = job.loaded
        if isinstance(loaded.session, ProcessSession):
            loaded.session.kill()  # the worker thread sees the child die and returns
            what = "its worker process was killed and replaced"
        else:
            self._abandon(job.future)
            what = "its worker thread was abandoned"
        err = InferenceTimeoutError(
            f"call to {loaded.info.name!r} ran past the {self.timeout_s:g} s watchdog "
            f"(batch of {len(job.batch)}); {what}"
        )
        for call in job.batch:
            if not call.future.done():
                call.future.set_exception(err)
        self._next(loaded)

    def _next(self, loaded: _Loaded) -> None:
        """After a job: replace a dead worker process first if need be, then start the next job."""
        session = loaded.session
        if (
            isinstance(session, ProcessSession)
            and not session.alive()
            and loaded is self._loaded
            and not self._closed
        ):
            self._reviving = asyncio.get_running_loop().create_task(
                self._revive(session), name="syncfw-inference-revive"
            )
            return
        self._kick()

    async def _revive(self, session: ProcessSession) -> None:
        """Replace a dead worker process (killed by the watchdog, or crashed)."""
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(session.restart)
        except ModelLoadError:
            # Calls fail with WorkerDied until a load succeeds; status shows it.
            errors = self._counters.errors
            errors["WorkerRestartFailed"] = errors.get("WorkerRestartFailed", 0) + 1
        else:
            self._worker_restarts += 1
            self._worker_restart_s.record(time.perf_counter() - t0)
        finally:
            self._reviving = None
        self._kick()

    def _abandon(self, fut: concurrent.futures.Future[Any]) -> None:
        """Give up on a hung job: a fresh worker takes the queue; the old thread is counted until it returns."""
        self._stuck.add(fut)
        fut.add_done_callback(self._stuck_done)
        old = self._executor
        self._executor = self._new_executor()
        old.shutdown(wait=False, cancel_futures=True)

    def _stuck_done(self, fut: concurrent.futures.Future[Any]) -> None:
        # Runs in the stuck thread when it finally returns; set.discard is atomic under the GIL.
        self._stuck.discard(fut)

    # -- the worker thread -------------------------------------------------

    def _feeds_of(self, info: ModelInfo, inputs: Any) -> Feeds:
        raw = self._pre(inputs) if self._pre is not None else inputs
        if isinstance(raw, np.ndarray):
            if len(info.inputs) != 1:
                raise InputSignatureError(
                    f"model {info.name!r} has {len(info.inputs)} inputs "
                    f"({[s.name for s in info.inputs]}); pass a mapping of name to array"
                )
            raw = {info.inputs[0].name: raw}
        if not isinstance(raw, Mapping):
            raise InputSignatureError(
                f"inputs must be a mapping of input name to numpy array, got {type(raw).__name__}"
            )
        want = {s.name for s in info.inputs}
        got = set(raw)
        if got != want:
            raise InputSignatureError(
                f"model {info.name!r} takes inputs {sorted(want)}, got {sorted(map(str, got))}"
            )
        feeds: Feeds = {}
        for spec in info.inputs:
            arr = raw[spec.name]
            spec.check(arr, "input", InputSignatureError)
            feeds[spec.name] = arr
        return feeds

    def _check_finite_feeds(self, feeds: Mapping[str, Array]) -> None:
        """Refuse NaN and infinity; run on a whole micro-batch at once (one reduction per input)."""
        if not self._check_finite:
            return
        for name, arr in feeds.items():
            # min and max propagate NaN and expose ±inf: two allocation-free reductions.
            if (
                arr.dtype.kind == "f"
                and arr.size
                and not (math.isfinite(float(arr.min())) and math.isfinite(float(arr.max())))
            ):
                bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
                raise NonFiniteInputError(f"input {name!r} holds {bad} NaN or infinite values")

    @staticmethod
    def _check_outputs(info: ModelInfo, raw: Sequence[Any], rows: int | None) -> dict[str, Array]:
        if len(raw) != len(info.outputs):
            raise OutputSignatureError(
                f"model {info.name!r} declares {len(info.outputs)} outputs but returned {len(raw)}"
            )
        outputs: dict[str, Array] = {}
        for spec, arr in zip(info.outputs, raw, strict=True):
            spec.check(arr, "output", OutputSignatureError)
            if info.batchable and rows is not None and arr.shape[0] != rows:
                raise OutputSignatureError(
                    f"output {spec.name!r} has {arr.shape[0]} rows for {rows} input rows"
                )
            outputs[spec.name] = arr
        return outputs

    def _predict(self, info: ModelInfo, outputs: Mapping[str, Array]) -> Prediction:
        if self._post is not None:
            pred = self._post(outputs)
            if not isinstance(pred, Prediction):
                raise InferenceRunError(
                    f"postprocess must return a Prediction, got {type(pred).__name__}"
                )
            return pred
        return top_k(outputs[info.outputs[0].name], info.labels)

    def _work(self, loaded: _Loaded, batch: Sequence[_Call]) -> list[_Outcome | InferenceError]:
        """Pre, run, post for a batch of calls; errors are per call, never shared by accident."""
        info = loaded.info
        started = time.perf_counter()
        results: list[_Outcome | InferenceError | None] = [None] * len(batch)
        ready: list[tuple[int, Feeds, float, float]] = []  # (index, feeds, queue_s, pre_s)
        for i, call in enumerate(batch):
            t0 = time.perf_counter()
            try:
                feeds = self._feeds_of(info, call.inputs)
            except InferenceError as exc:
                results[i] = exc
                continue
            except Exception as exc:  # the user's preprocess raised
                results[i] = InferenceRunError(f"preprocess raised {type(exc).__name__}: {exc}")
                continue
            ready.append((i, feeds, started - call.enqueued, time.perf_counter() - t0))
        if not ready:
            return [r for r in results if r is not None]
        # One run for the whole batch; if it fails, run the calls one by one so a
        # single bad input cannot fail its batch-mates.
        groups = [ready] if len(ready) > 1 and info.batchable else [[r] for r in ready]
        for group in groups:
            try:
                self._run_group(loaded, group, results, batch_size=len(group))
            except InferenceError as exc:
                if len(group) == 1:
                    results[group[0][0]] = exc
                    continue
                for item in group:
                    try:
                        self._run_group(loaded, [item], results, batch_size=1)
                    except InferenceError as exc1:
                        results[item[0]] = exc1
        out: list[_Outcome | InferenceError] = []
        for r in results:
            assert r is not None
            out.append(r)
        return out

    def _run_group(
        self,
        loaded: _Loaded,
        group: Sequence[tuple[int, Feeds, float, float]],
        results: list[_Outcome | InferenceError | None],
        *,
        batch_size: int,
    ) -> None:
        info = loaded.info
        if len(group) == 1:
            feeds = group[0][1]
            rows = [next(iter(feeds.values())).shape[0]] if info.batchable else [0]
        else:
            feeds = {
                s.name: np.concatenate([g[1][s.name] for g in group], axis=0) for s in info.inputs
            }
            rows = [g[1][info.inputs[0].name].shape[0] for g in group]
        # Batch-wide: if it fails, _work reruns the calls one by one to find the culprit.
        self._check_finite_feeds(feeds)
        t0 = time.perf_counter()
        try:
            raw = loaded.session.run(None, feeds)
        except Exception as exc:  # ORT's pybind errors are translated here
            raise InferenceRunError(
                f"{info.name!r} failed in session.run: {type(exc).__name__}: {exc}"
            ) from None
        infer_s = time.perf_counter() - t0
        outputs = self._check_outputs(info, raw, sum(rows) if info.batchable else None)
        starts = [0]
        for n in rows[:-1]:
            starts.append(starts[-1] + n)
        batch_preds: list[Prediction] | None = None
        shared_post_s = 0.0
        if self._post is None and len(group) > 1:
            # The default post-processing, vectorised over the batch; its time is shared.
            t1 = time.perf_counter()
            first = outputs[info.outputs[0].name]
            batch_preds = top_k_rows(first.reshape(first.shape[0], -1)[starts], info.labels)
            shared_post_s = (time.perf_counter() - t1) / len(group)
        for j, ((i, call_feeds, queue_s, pre_s), n) in enumerate(zip(group, rows, strict=True)):
            if len(group) == 1:
                mine = outputs
            else:
                mine = {k: v[starts[j] : starts[j] + n] for k, v in outputs.items()}
            t1 = time.perf_counter()
            if batch_preds is not None:
                pred = batch_preds[j]
            else:
                try:
                    pred = self._predict(info, mine)
                except InferenceError as exc:
                    results[i] = exc
                    continue
                except Exception as exc:  # the user's postprocess raised
                    results[i] = InferenceRunError(
                        f"postprocess raised {type(exc).__name__}: {exc}"
                    )
                    continue
            digest = input_digest(call_feeds)
            post_s = time.perf_counter() - t1 + shared_post_s
            results[i] = _Outcome(
                model=loaded,
                feeds=call_feeds,
                outputs=mine,
                prediction=pred,
                digest=digest,
                times=StageTimes(queue_s, pre_s, infer_s, post_s),
                batch_size=batch_size,
            )

    # -- background work ---------------------------------------------------

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _spawn_sample(self, sample_key: str, result_key: str, out: _Outcome) -> None:
        self._pending_samples += 1
        value = {
            "result_key": result_key,
            "model_sha256": out.model.info.sha256,
            "label": out.prediction.label,
            "confidence": out.prediction.confidence,
            "input_digest": out.digest,
            "inputs": encode_sample(out.feeds),
        }

        async def write() -> None:
            try:
                await self._sink.put(sample_key, value)
                self._counters.samples_written += 1
            except Exception:  # telemetry is best effort: a failed sample never fails a result
                self._counters.samples_dropped += 1
            finally:
                self._pending_samples -= 1

        self._spawn(write(), "syncfw-inference-sample")

    def _spawn_escalation(self, req: EscalationRequest) -> None:
        assert self._escalate is not None
        if self._pending_escalations >= self._max_pending_escalations:
            self._counters.escalations_dropped += 1
            return
        self._pending_escalations += 1
        escalate = self._escalate

        async def send() -> None:
            try:
                await escalate(req)
                self._counters.escalations_sent += 1
            except Exception:  # the cloud is optional: the local decision already stands
                self._counters.escalations_failed += 1
            finally:
                self._pending_escalations -= 1

        self._spawn(send(), "syncfw-inference-escalate")

    # -- status ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Model, provider, counters and per-stage latency percentiles (node status)."""
        c = self._counters
        return {
            "model": self._loaded.info.as_dict() if self._loaded is not None else None,
            "calls": c.calls,
            "ok": c.ok,
            "errors": dict(c.errors),
            "stuck_workers": len(self._stuck),
            "queued": len(self._queue),
            "batches": {
                "count": c.batches,
                "max": c.max_batch,
            },
            "latency": self._book.summary(),
            "log_write": self._log_write.summary().as_dict(),
            "samples": {"written": c.samples_written, "dropped": c.samples_dropped},
            "escalation": {
                "enabled": self.escalation_enabled,
                "sent": c.escalations_sent,
                "failed": c.escalations_failed,
                "dropped": c.escalations_dropped,
            },
            "loads": {"ok": c.loads, "failed": c.load_failures},
            "isolation": self.isolation,
            "worker_restarts": self._worker_restarts,
            "worker_restart": self._worker_restart_s.summary().as_dict(),
        }

    def latency_book(self) -> LatencyBook:
        """The per-(sha256, provider) histograms."""
        return self._book
