"""Optimize a model under an accuracy budget: calibrate, quantize to INT8, measure, gate.

The release step before a model is published: ONNX Runtime's static
quantization (``quantize_static``, QDQ format, signed INT8 weights and
activations, MinMax calibration) with a :class:`CalibrationDataReader` over a
calibration set; :func:`evaluate` measures accuracy and single-item latency
(p50/p99) on a labelled canary set; :func:`gate` refuses a candidate whose
accuracy loss against its baseline exceeds the budget (2 points by default),
naming both figures.

Invariants:

1. Pure inference: numpy, onnx, onnxruntime, the standard library and the
   inference package's own modules. No store, transport, mesh or node import
   (an import contract checks it); nothing here writes a file the caller did
   not name: the quantizer works on paths, so it runs in a private temporary
   directory that is removed afterwards, and the result comes back as bytes.
2. Every bad input is a :class:`~syncfw.errors.SyncfwError` naming the file
   and what is wrong: :class:`DatasetError` for a calibration or canary set
   (missing, unreadable, empty, without labels, wrong shape or dtype),
   :class:`ModelLoadError` for a model that does not load or quantize,
   :class:`AccuracyBudgetError` for a loss over budget. ONNX Runtime's own
   exceptions are translated here and never leak.
3. Data sets are read by :mod:`syncfw.inference.datasets` (one convention:
   ``uint8`` arrays are 8-bit frames scaled to ``[0, 1]``, floats as they are).
4. Both sides of a gate are measured the same way on the same canary set (its
   digest is in every :class:`Report`; the gate refuses reports on different
   sets), and the loss is counted in whole predictions, so a budget of 2
   points over 400 images allows exactly 8 more mistakes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from syncfw.errors import (
    AccuracyBudgetError,
    DatasetError,
    InferenceRunError,
    ModelLoadError,
)
from syncfw.inference.datasets import CanarySet, fit_input, load_calibration, load_canary_set
from syncfw.inference.manifest import parse_model
from syncfw.inference.signature import TensorSpec

__all__ = [
    "DEFAULT_BUDGET_POINTS",
    "CanarySet",
    "Optimization",
    "Report",
    "evaluate",
    "gate",
    "load_calibration",
    "load_canary_set",
    "optimize_int8",
    "quantize_int8",
]

log = logging.getLogger(__name__)

DEFAULT_BUDGET_POINTS = 2.0

F32 = npt.NDArray[np.float32]
ModelSource = bytes | str | Path


# --- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """How a model does on a canary set.

    Attributes:
        label: what it is (``"fp32"``, ``"int8"``).
        accuracy: fraction of top-1 predictions equal to the label.
        correct: how many were.
        n: canary samples.
        p50_ms: median latency of one single-sample ``session.run``, in ms.
        p99_ms: 99th percentile of the same, in ms.
        size: model bytes.
        sha256: hex sha256 of the model bytes.
        provider: the execution provider the session used.
        canary_digest: :attr:`CanarySet.digest` of the set it was measured on.
    """

    label: str
    accuracy: float
    correct: int
    n: int
    p50_ms: float
    p99_ms: float
    size: int
    sha256: str
    provider: str
    canary_digest: str

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the CLI's ``--json``)."""
        return {
            "label": self.label,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "n": self.n,
            "p50_ms": round(self.p50_ms, 4),
            "p99_ms": round(self.p99_ms, 4),
            "size": self.size,
            "sha256": self.sha256,
            "provider": self.provider,
        }


def _model_bytes(model: ModelSource) -> tuple[bytes, str]:
    if isinstance(model, bytes):
        return model, "model bytes"
    try:
        return Path(model).read_bytes(), str(model)
    except OSError as exc:
        raise ModelLoadError(f"model {model}: {exc.strerror or exc}") from None


def _only_input(data: bytes, where: str) -> tuple[TensorSpec, TensorSpec]:
    parsed = parse_model(data, where)
    if len(parsed.inputs) != 1:
        names = [s.name for s in parsed.inputs]
        raise ModelLoadError(
            f"model {where} takes inputs {names}; only one-input models are supported"
        )
    out = parsed.outputs[0]
    if len(out.shape) != 2:
        raise ModelLoadError(
            f"model {where} output {out.name!r} has shape {out.display_shape}; "
            "class scores [N, classes] are needed"
        )
    return parsed.inputs[0], out


def _session(data: bytes, where: str, providers: Sequence[str], threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: a refusal is translated below
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=list(providers))
    except Exception as exc:  # onnxruntime's Fail/InvalidGraph/... translated here
        raise ModelLoadError(f"model {where} does not load: {type(exc).__name__}: {exc}") from None


def evaluate(
    model: ModelSource,
    canary: CanarySet | str | Path,
    *,
    label: str = "",
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 1,
    warmup: int = 10,
) -> Report:
    """Accuracy and single-sample latency of ``model`` on a labelled canary set.

    Each sample is one ``session.run`` (as a node serving one frame at a time
    runs it); its prediction is the top class, and the call's wall time goes
    into the percentiles. One intra-op thread by default, so figures from two
    models measured in one process compare.

    Args:
        model: ONNX bytes or a path.
        canary: a :class:`CanarySet` or the path of one (:func:`load_canary_set`).
        label: names the report.
        providers: ONNX Runtime execution providers, in order.
        threads: intra-op threads of the session.
        warmup: untimed calls before measuring.

    Raises:
        ModelLoadError: the model does not load, has more than one input, or
            does not output class scores ``[N, classes]``.
        DatasetError: the canary set is unusable, does not fit the model's
            input, or has labels beyond the model's classes.
        InferenceRunError: ONNX Runtime failed during a call.
    """
    data, where = _model_bytes(model)
    spec, out = _only_input(data, where)
    cs = canary if isinstance(canary, CanarySet) else load_canary_set(canary)
    x = fit_input(cs.x, spec, cs.source)
    session = _session(data, where, providers, threads)
    feed, fetch = spec.name, [out.name]
    times = np.empty(len(x), dtype=np.float64)
    preds = np.empty(len(x), dtype=np.int64)
    classes = 0
    try:
        for i in range(min(warmup, len(x))):
            session.run(fetch, {feed: x[i : i + 1]})
        for i in range(len(x)):
            t0 = time.perf_counter()
            scores = session.run(fetch, {feed: x[i : i + 1]})[0]
            times[i] = time.perf_counter() - t0
            preds[i] = int(np.argmax(scores[0]))
            classes = scores.shape[-1]
    except Exception as exc:
        raise InferenceRunError(
            f"model {where} failed on {cs.source}: {type(exc).__name__}: {exc}"
        ) from None
    if int(cs.y.max()) >= classes:
        raise DatasetError(
            f"{cs.source} has labels up to {int(cs.y.max())}, but model {where} scores {classes} classes"
        )
    correct = int((preds == cs.y).sum())
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    return Report(
        label=label,
        accuracy=correct / len(x),
        correct=correct,
        n=len(x),
        p50_ms=float(p50),
        p99_ms=float(p99),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        provider=session.get_providers()[0],
        canary_digest=cs.digest,
    )


def gate(
    baseline: Report, candidate: Report, budget_points: float = DEFAULT_BUDGET_POINTS
) -> float:
    """Refuse ``candidate`` when it loses more than ``budget_points`` of accuracy against ``baseline``.

    Args:
        baseline: the reference (the FP32 model).
        candidate: the optimized model, measured on the same canary set.
        budget_points: the largest loss allowed, in percentage points (``>= 0``).

    Returns:
        The loss in points (negative when the candidate does better).

    Raises:
        AccuracyBudgetError: the loss exceeds the budget; the message names both accuracies.
        DatasetError: the two reports were measured on different canary sets.
        ValueError: a negative or non-finite budget.
    """
    if not math.isfinite(budget_points) or budget_points < 0:
        raise ValueError(f"budget_points must be a finite number >= 0, got {budget_points}")
    if baseline.canary_digest != candidate.canary_digest or baseline.n != candidate.n:
        raise DatasetError(
            f"{baseline.label or 'baseline'} and {candidate.label or 'candidate'} were measured "
            "on different canary sets; compare them on one"
        )
    # Counted in predictions (invariant 4): no float rounding decides a verdict at the edge.
    lost = baseline.correct - candidate.correct
    loss_points = lost * 100.0 / baseline.n
    if lost * 100 > budget_points * baseline.n + 1e-9:
        b, c = baseline.label or "baseline", candidate.label or "candidate"
        raise AccuracyBudgetError(
            f"{c} accuracy {candidate.accuracy:.2%} against {b} {baseline.accuracy:.2%} on "
            f"{baseline.n} canary samples: a loss of {loss_points:.2f} points exceeds the budget "
            f"of {budget_points:g} points",
            baseline=baseline.accuracy,
            candidate=candidate.accuracy,
            loss_points=loss_points,
            budget_points=budget_points,
        )
    return loss_points


# --- quantizing -----------------------------------------------------------------------------


class _QuantizerLog(logging.Filter):
    """ONNX Runtime's quantizer logs advice on the root logger (and would install a
    handler there on its own); it goes to this module's logger at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname:
            log.debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    guard = logging.NullHandler()
    flt = _QuantizerLog()
    root.addHandler(guard)  # present, so logging.warning() does not call basicConfig()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)
        root.removeHandler(guard)


def _reader(name: str, batches: Sequence[F32]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        """Feeds the calibration batches once, in order."""

        def __init__(self) -> None:
            self._next = iter(batches)

        def get_next(self) -> dict[str, F32] | None:
            batch = next(self._next, None)
            return None if batch is None else {name: batch}

    return _Reader()


def quantize_int8(
    model: ModelSource,
    calibration: str | Path | Sequence[npt.NDArray[Any]],
    *,
    per_channel: bool = False,
    note: str | None = None,
) -> bytes:
    """Static INT8 quantization with ONNX Runtime (QDQ, signed INT8, MinMax calibration).

    Args:
        model: the FP32 ONNX model, bytes or a path.
        calibration: a calibration set (:func:`load_calibration`) or sample arrays.
        per_channel: per-channel weight scales (per-tensor by default: on the
            shipped model, per-tensor scores better).
        note: recorded in the result's ``quantization`` metadata instead of the default.

    Returns:
        The quantized model's bytes; the model's metadata is kept and
        ``quantization`` is added.

    Raises:
        ModelLoadError: the model does not load, or quantization failed.
        DatasetError: the calibration set is unusable for this model.
    """
    data, where = _model_bytes(model)
    spec, _ = _only_input(data, where)
    _session(data, where, ("CPUExecutionProvider",), 1)  # refuse a model that will not load first
    batches = _batches(calibration, spec)
    n = sum(len(b) for b in batches)
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="syncfw-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        try:
            with _quiet_quantizer():
                quantize_static(
                    str(src),
                    str(dst),
                    _reader(spec.name, batches),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=per_channel,
                    calibrate_method=CalibrationMethod.MinMax,
                )
            out = dst.read_bytes()
        except Exception as exc:
            raise ModelLoadError(
                f"quantizing {where} failed: {type(exc).__name__}: {exc}"
            ) from None
    return _annotate(out, note or f"int8 static QDQ, MinMax over {n} calibration samples")


def _batches(calibration: str | Path | Sequence[npt.NDArray[Any]], spec: TensorSpec) -> list[F32]:
    if isinstance(calibration, str | Path):
        return load_calibration(calibration, spec)
    if not calibration:
        raise DatasetError("the calibration set is empty")
    return [fit_input(a, spec, f"calibration array {i}") for i, a in enumerate(calibration)]


def _annotate(data: bytes, note: str) -> bytes:
    import onnx

    proto = onnx.load_model_from_string(data)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "quantization"]
    del proto.metadata_props[:]
    for key, value in [*kept, ("quantization", note)]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    out: bytes = proto.SerializeToString()
    return out


# --- the whole step -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Optimization:
    """An FP32 model, its INT8 version, and how both did on one canary set.

    Attributes:
        fp32: the original's report.
        int8: the quantized model's report.
        model: the quantized model's bytes.
        budget_points: the budget it is gated against.
    """

    fp32: Report
    int8: Report
    model: bytes
    budget_points: float

    @property
    def loss_points(self) -> float:
        """Accuracy lost, in points (negative: INT8 does better)."""
        return (self.fp32.correct - self.int8.correct) * 100.0 / self.fp32.n

    def check(self) -> float:
        """:func:`gate` on the two reports; returns the loss in points.

        Raises:
            AccuracyBudgetError: over budget.
        """
        return gate(self.fp32, self.int8, self.budget_points)


def optimize_int8(
    model: ModelSource,
    calibration: str | Path | Sequence[npt.NDArray[Any]],
    canary: CanarySet | str | Path,
    *,
    budget_points: float = DEFAULT_BUDGET_POINTS,
    per_channel: bool = False,
) -> Optimization:
    """Quantize ``model`` and measure both versions on ``canary``; gate with :meth:`Optimization.check`.

    Raises:
        ModelLoadError, DatasetError, InferenceRunError: as :func:`quantize_int8`
            and :func:`evaluate` do; the model, the canary set and the
            calibration set are all read and checked before anything is measured.
        ValueError: a negative or non-finite budget.
    """
    if not math.isfinite(budget_points) or budget_points < 0:
        raise ValueError(f"budget_points must be a finite number >= 0, got {budget_points}")
    data, where = _model_bytes(model)
    spec, _ = _only_input(data, where)
    # Every input is read and checked before anything is measured or quantized.
    cs = canary if isinstance(canary, CanarySet) else load_canary_set(canary)
    fit_input(cs.x, spec, cs.source)
    batches = _batches(calibration, spec)
    fp32 = evaluate(data, cs, label="fp32")
    int8_model = quantize_int8(data, batches, per_channel=per_channel)
    int8 = evaluate(int8_model, cs, label="int8")
    log.info(
        "optimized %s: fp32 %.4f, int8 %.4f on %d canary samples",
        where,
        fp32.accuracy,
        int8.accuracy,
        cs.x.shape[0],
    )
    return Optimization(fp32=fp32, int8=int8, model=int8_model, budget_points=budget_points)
