"""Embedded inference: ONNX models run next to the log, results written as ops.

Owns: the ONNX Runtime engine (:class:`Engine`: provider choice TensorRT → CUDA →
CPU with the provider actually used recorded, warm-up, signature checks, a
per-call watchdog, micro-batching, hot swap), per-stage latency histograms,
result and sample ops with provenance, the degradation ladder, and the script
that makes the shipped models (``python -m syncfw.inference.train``).

Modules: ``engine`` (the :class:`Engine` facade), ``config`` (:class:`EngineConfig`
and its presets), ``manifest`` (:class:`ModelManifest`: what a model must be),
``loader`` (checks, session, warm-up, hot swap), ``worker`` (queue,
micro-batching, watchdog), ``pipeline`` (pre / run / post, input and output
checks), ``results`` (the result op, samples, escalations), ``recorder``
(per-call latency book and node metrics), ``signature`` (declared tensors,
model identity, the input digest), ``prediction`` (top label(s) from outputs),
``providers`` (pure provider choice and the TensorRT cache key), ``isolation`` (a session in a killable worker
process), ``latency`` (histograms), ``sampling`` (inputs kept for retraining),
``ladder`` (the degradation state machine: a pure rule table plus a thin I/O
shell), ``sink`` (the protocols a node satisfies), ``errors``, ``train`` (the
shipped models), ``assets/`` (``inspection.onnx``, ``trigger.onnx``, ``canary.npz``).

May import: :mod:`syncfw.errors`, :mod:`syncfw.log` (for ``Op``),
:mod:`syncfw.keys` (the key layout), :mod:`syncfw.metrics` (the node's registry), numpy,
onnxruntime, onnx and the standard library (``multiprocessing`` for process
isolation; psutil only if it happens to be installed). It talks to a node only through the small
:class:`ResultSink` protocol (``node_id`` + async ``put``; optionally
:class:`StatusHost` and :class:`MetricsHost`), never by importing
:mod:`syncfw.node`, and never imports gRPC or the store.
"""

from __future__ import annotations

from syncfw.inference.config import DEFAULT_SESSION_CONFIG, EngineConfig
from syncfw.inference.engine import Engine
from syncfw.inference.errors import (
    EngineStateError,
    InferenceError,
    InferenceRunError,
    InferenceTimeoutError,
    InputSignatureError,
    ModelLoadError,
    NonFiniteInputError,
    OutputSignatureError,
    ProviderError,
    SignatureError,
)
from syncfw.inference.ladder import (
    POLICIES,
    Conditions,
    Ladder,
    Limits,
    Mode,
    ModePolicy,
    PowerReading,
    Transition,
    decide,
    step,
)
from syncfw.inference.latency import Histogram, LatencyBook, LatencySummary, Stage, StageTimes
from syncfw.inference.manifest import ModelManifest
from syncfw.inference.prediction import Prediction, top_k, top_k_rows
from syncfw.inference.providers import (
    CPU,
    CUDA,
    TENSORRT,
    AcceleratorInfo,
    ProviderPlan,
    plan_providers,
    resolve_actual,
    trt_cache_key,
)
from syncfw.inference.results import EscalationRequest, InferenceResult
from syncfw.inference.sampling import Sampler, SamplingPolicy, decode_sample, encode_sample
from syncfw.inference.signature import ModelInfo, TensorSpec, input_digest
from syncfw.inference.sink import MetricsHost, ResultSink, StatusHost

__all__ = [
    "CPU",
    "DEFAULT_SESSION_CONFIG",
    "CUDA",
    "POLICIES",
    "TENSORRT",
    "AcceleratorInfo",
    "Conditions",
    "Engine",
    "EngineConfig",
    "EngineStateError",
    "EscalationRequest",
    "Histogram",
    "InferenceError",
    "InferenceResult",
    "InferenceRunError",
    "InferenceTimeoutError",
    "InputSignatureError",
    "Ladder",
    "LatencyBook",
    "LatencySummary",
    "Limits",
    "Mode",
    "ModePolicy",
    "MetricsHost",
    "ModelInfo",
    "ModelLoadError",
    "ModelManifest",
    "NonFiniteInputError",
    "OutputSignatureError",
    "PowerReading",
    "Prediction",
    "ProviderError",
    "ProviderPlan",
    "ResultSink",
    "Sampler",
    "SamplingPolicy",
    "SignatureError",
    "Stage",
    "StageTimes",
    "StatusHost",
    "TensorSpec",
    "Transition",
    "decide",
    "decode_sample",
    "encode_sample",
    "input_digest",
    "plan_providers",
    "resolve_actual",
    "step",
    "top_k",
    "top_k_rows",
    "trt_cache_key",
]
