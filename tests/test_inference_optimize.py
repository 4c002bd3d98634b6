"""INT8 under an accuracy budget: real ONNX Runtime quantization, real canary measurements, the gate."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest_inference import linear_model
from onnx import TensorProto, helper, numpy_helper

from syncfw import AccuracyBudgetError, DatasetError, InferenceError, ModelLoadError
from syncfw.inference import optimize as opt
from syncfw.inference import train
from syncfw.inference.signature import TensorSpec

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def optimized() -> opt.Optimization:
    """The shipped model quantized with the shipped calibration set (well under a second)."""
    return opt.optimize_int8(train.MODEL_PATH, train.CALIBRATION_PATH, train.CANARY_PATH)


@pytest.fixture(scope="module")
def canary() -> opt.CanarySet:
    return opt.load_canary_set(train.CANARY_PATH)


def _report(correct: int, n: int = 400, *, label: str = "", digest: str = "d") -> opt.Report:
    return opt.Report(label, correct / n, correct, n, 0.1, 0.2, 10, "0" * 64, "CPU", digest)


# --- the shipped model ------------------------------------------------------------------------


def test_int8_of_the_shipped_model_is_within_budget_smaller_and_really_quantized(
    optimized: opt.Optimization,
) -> None:
    loss = optimized.check()
    assert loss <= opt.DEFAULT_BUDGET_POINTS
    assert loss == pytest.approx(optimized.loss_points)
    assert optimized.fp32.accuracy == pytest.approx(0.96)
    assert optimized.int8.accuracy >= 0.94
    assert optimized.int8.size < 0.5 * optimized.fp32.size  # INT8 weights: about a quarter
    proto = onnx.load_model_from_string(optimized.model)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in proto.graph.initializer if t.data_type == TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in int8_weights) >= 256 * 64  # w1 is stored as INT8
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["name"] == "inspection"
    assert meta["labels"] == "ok,defect"
    assert meta["quantization"] == "int8 static QDQ, MinMax over 128 calibration samples"
    # The bytes it returned are the ones it measured.
    assert opt.evaluate(optimized.model, train.CANARY_PATH).correct == optimized.int8.correct


def test_evaluate_measures_accuracy_and_latency_on_the_canary_set(
    optimized: opt.Optimization, canary: opt.CanarySet
) -> None:
    r = optimized.fp32
    x, y = train.load_canary()
    assert (r.n, r.label, r.provider) == (400, "fp32", "CPUExecutionProvider")
    assert r.accuracy == train.accuracy(train.MODEL_PATH, x, y)
    assert r.correct == round(r.accuracy * r.n)
    assert 0 < r.p50_ms <= r.p99_ms < 1000
    assert r.size == train.MODEL_PATH.stat().st_size
    assert r.canary_digest == canary.digest == optimized.int8.canary_digest
    assert set(r.as_dict()) >= {"accuracy", "p50_ms", "p99_ms", "size", "sha256", "provider"}
    # The same set from arrays is the same set.
    again = opt.CanarySet.of((x * 255).round().astype(np.uint8), y)
    assert again.digest == canary.digest


def test_the_bad_variant_is_refused_naming_both_figures(optimized: opt.Optimization) -> None:
    bad = opt.evaluate(train.BAD_MODEL_PATH, train.CANARY_PATH, label="int8")
    assert optimized.fp32.accuracy - bad.accuracy > opt.DEFAULT_BUDGET_POINTS / 100
    with pytest.raises(AccuracyBudgetError) as exc:
        opt.gate(optimized.fp32, bad)
    err = exc.value
    assert isinstance(err, InferenceError)
    assert "96.00%" in str(err) and f"{bad.accuracy:.2%}" in str(err)
    assert "budget of 2 points" in str(err)
    assert err.baseline == optimized.fp32.accuracy
    assert err.candidate == bad.accuracy
    assert err.loss_points == pytest.approx((optimized.fp32.accuracy - bad.accuracy) * 100)
    assert err.budget_points == 2.0
    # A budget wide enough lets it through: the gate is the budget, nothing else.
    assert opt.gate(optimized.fp32, bad, budget_points=25) == pytest.approx(err.loss_points)


def test_miscalibrated_quantization_is_caught_by_the_same_gate() -> None:
    """The bad variant's slip, made again here: raw 0-255 frames as calibration."""
    with np.load(train.CALIBRATION_PATH) as data:
        raw = data["x"].astype(np.float32)  # 0..255, not the [0, 1] the model takes
    result = opt.optimize_int8(train.MODEL_PATH, [raw], train.CANARY_PATH)
    assert result.loss_points > 5
    with pytest.raises(AccuracyBudgetError):
        result.check()


# --- the gate's arithmetic --------------------------------------------------------------------


def test_gate_counts_predictions_at_the_edge_of_the_budget() -> None:
    base = _report(384)
    assert opt.gate(base, _report(376)) == pytest.approx(2.0)  # 8 of 400 lost: exactly 2 points
    with pytest.raises(AccuracyBudgetError):
        opt.gate(base, _report(375))  # 9 lost: 2.25 points
    assert opt.gate(base, _report(390)) == pytest.approx(-1.5)  # a gain passes
    assert opt.gate(base, base, budget_points=0) == 0
    with pytest.raises(AccuracyBudgetError):
        opt.gate(base, _report(383), budget_points=0)
    # 0.1 points of 1000 samples is one prediction: no float rounding at the edge.
    assert opt.gate(_report(900, 1000), _report(899, 1000), budget_points=0.1) == pytest.approx(0.1)


def test_gate_refuses_reports_from_different_canary_sets_and_bad_budgets() -> None:
    with pytest.raises(DatasetError, match="different canary sets"):
        opt.gate(_report(384), _report(384, digest="other"))
    with pytest.raises(DatasetError, match="different canary sets"):
        opt.gate(_report(384), _report(384, 401))
    for budget in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="budget_points"):
            opt.gate(_report(384), _report(384), budget_points=budget)


# --- calibration sets -------------------------------------------------------------------------


def _spec() -> TensorSpec:
    return TensorSpec("image", "float32", (None, 1, 16, 16))


def test_calibration_from_a_directory_of_npy_and_npz(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with np.load(train.CALIBRATION_PATH) as data:
        frames = data["x"]
    d = tmp_path / "cal"
    d.mkdir()
    np.save(d / "a_frames.npy", frames[:50])  # uint8: scaled to [0, 1]
    np.save(d / "b_one.npy", frames[50].astype(np.float32) / 255)  # one sample, no batch axis
    np.savez(d / "c_named.npz", image=frames[51:128].astype(np.float32) / 255, y=np.zeros(77))
    (d / "notes.txt").write_text("not data")
    with caplog.at_level(logging.WARNING, logger="syncfw.inference.datasets"):
        batches = opt.load_calibration(d, _spec())
    assert "notes.txt" in caplog.text
    assert [len(b) for b in batches] == [50, 1, 64, 13]
    assert all(b.dtype == np.float32 and b.shape[1:] == (1, 16, 16) for b in batches)
    np.testing.assert_allclose(np.concatenate(batches), frames.astype(np.float32) / 255, atol=1e-7)
    result = opt.optimize_int8(train.MODEL_PATH, d, train.CANARY_PATH)
    assert result.check() <= 2


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing.npz", "does not exist"),
        (lambda p: p, "holds no .npy or .npz files"),
        (lambda p: _write(p / "junk.npz", b"not a zip file"), "not a readable .npz"),
        (lambda p: _write(p / "junk.npy", b"\x93NUMPY garbage"), "not a readable .npy"),
        (lambda p: _npz(p, x=np.zeros((4, 3, 16, 16), np.float32)), r"\[4, 3, 16, 16\] do not fit"),
        (lambda p: _npz(p, x=np.zeros((4, 16, 16), np.float32)), "do not fit"),
        (lambda p: _npz(p, x=np.zeros((0, 1, 16, 16), np.float32)), "no samples"),
        (lambda p: _npz(p, x=np.full((2, 1, 16, 16), np.nan, np.float32)), "NaN or infinity"),
        (lambda p: _npz(p, x=np.zeros((2, 1, 16, 16), np.int32)), "uint8 frames or floats"),
        (
            lambda p: _npz(p, a=np.zeros((2, 1, 16, 16)), b=np.zeros(2)),
            "name the samples 'image' or 'x'",
        ),
        (lambda p: _npz(p, x=np.array([object()], dtype=object)), "not a readable .npz"),
    ],
)
def test_bad_calibration_sets_are_clear_errors(tmp_path: Path, make: object, match: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(DatasetError, match=match):
        opt.quantize_int8(train.MODEL_PATH, path)


def test_bad_calibration_arrays_are_clear_errors() -> None:
    with pytest.raises(DatasetError, match="empty"):
        opt.quantize_int8(train.MODEL_PATH, [])
    with pytest.raises(DatasetError, match=r"calibration array 1: samples of shape \[2, 256\]"):
        opt.quantize_int8(
            train.MODEL_PATH, [np.zeros((2, 1, 16, 16), np.float32), np.zeros((2, 256), np.float32)]
        )


# --- canary sets ------------------------------------------------------------------------------


def test_canary_sets_without_labels_or_that_do_not_fit_are_clear_errors(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 16, 16), np.uint8)
    cases = {
        "no_labels": (dict(x=x), "no 'y' \\(labels\\)"),
        "no_samples": (dict(y=np.zeros(4, np.int64)), "no 'x'"),
        "count": (dict(x=x, y=np.zeros(3, np.int64)), "4 samples but 3 labels"),
        "float_labels": (dict(x=x, y=np.zeros(4)), "integer labels"),
        "negative": (dict(x=x, y=np.array([0, 1, -1, 0])), "negative label"),
        "shape": (dict(x=np.zeros((4, 1, 8, 8), np.uint8), y=np.zeros(4, np.int64)), "do not fit"),
        "classes": (
            dict(x=x, y=np.array([0, 1, 2, 0])),
            "labels up to 2, but model .* scores 2 classes",
        ),
    }
    for name, (arrays, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(DatasetError, match=match):
            opt.evaluate(train.MODEL_PATH, path)
    with pytest.raises(DatasetError, match="does not exist"):
        opt.load_canary_set(tmp_path / "nope.npz")
    with pytest.raises(DatasetError, match=r"not a readable \.npz"):
        opt.load_canary_set(_write(tmp_path / "bad.npz", b"PK\x03\x04 truncated"))
    np.save(tmp_path / "bare.npy", x)
    with pytest.raises(DatasetError, match=r"bare \.npy array, not an \.npz"):
        opt.load_canary_set(tmp_path / "bare.npy")
    with pytest.raises(DatasetError, match="is a directory"):
        opt.load_canary_set(tmp_path)
    # The whole step reads the canary set before it quantizes anything.
    with pytest.raises(DatasetError, match="no 'y'"):
        opt.optimize_int8(train.MODEL_PATH, train.CALIBRATION_PATH, tmp_path / "no_labels.npz")


# --- models -----------------------------------------------------------------------------------


def test_corrupt_truncated_missing_and_unsupported_models_are_clear_errors(tmp_path: Path) -> None:
    data = train.MODEL_PATH.read_bytes()
    for bad, match in (
        (b"", "is empty"),
        (b"\x00garbage\xff" * 10, "not a readable ONNX model"),
        (data[: len(data) // 2], "not a readable ONNX model"),
    ):
        with pytest.raises(ModelLoadError, match=match):
            opt.evaluate(bad, train.CANARY_PATH)
        with pytest.raises(ModelLoadError, match=match):
            opt.quantize_int8(bad, train.CALIBRATION_PATH)
    with pytest.raises(ModelLoadError, match=r"missing\.onnx"):
        opt.optimize_int8(tmp_path / "missing.onnx", train.CALIBRATION_PATH, train.CANARY_PATH)
    # Parses, but ONNX Runtime refuses it (a node reading a tensor nobody makes).
    proto = onnx.load(str(train.MODEL_PATH))
    proto.graph.node[1].input[0] = "nowhere"
    with pytest.raises(ModelLoadError, match="does not load"):
        opt.quantize_int8(proto.SerializeToString(), train.CALIBRATION_PATH)
    with pytest.raises(ModelLoadError, match="only one-input models"):
        opt.evaluate(_two_inputs(), train.CANARY_PATH)
    with pytest.raises(ModelLoadError, match=r"class scores \[N, classes\]"):
        opt.evaluate(_flat_output(), train.CANARY_PATH)


def test_another_model_with_its_own_sets(tmp_path: Path) -> None:
    """Not just the shipped model: a linear classifier on float vectors, sets from arrays."""
    model = linear_model(tmp_path / "lin.onnx", n_in=8, n_out=3, seed=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    y = np.argmax(
        x @ weights["w"] + weights["b"], axis=1
    )  # the FP32 model is right by construction
    result = opt.optimize_int8(model, [x[:100]], opt.CanarySet.of(x, y))
    assert result.fp32.accuracy == 1.0
    assert result.check() <= 2


def test_quantizing_writes_nothing_and_installs_no_log_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers = list(root.handlers)
    opt.quantize_int8(train.MODEL_PATH, train.CALIBRATION_PATH)
    assert list(tmp_path.iterdir()) == []
    assert root.handlers == handlers
    assert root.filters == []


def test_reports_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        _report(1).accuracy = 1.0  # type: ignore[misc]


# --- helpers ----------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npz(dir_: Path, **arrays: object) -> Path:
    path = dir_ / "cal.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _two_inputs() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["probs"])],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
        ],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _flat_output() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=0)],
        "flat",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, "M", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_the_whole_step_checks_every_input_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_measuring(*_: object, **__: object) -> opt.Report:
        raise AssertionError("measured before the inputs were checked")

    monkeypatch.setattr(opt, "evaluate", no_measuring)
    with pytest.raises(DatasetError, match="does not exist"):
        opt.optimize_int8(train.MODEL_PATH, tmp_path / "missing", train.CANARY_PATH)
    np.savez(tmp_path / "small.npz", x=np.zeros((4, 1, 8, 8), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match="do not fit"):
        opt.optimize_int8(train.MODEL_PATH, train.CALIBRATION_PATH, tmp_path / "small.npz")
    with pytest.raises(ValueError, match="budget_points"):
        opt.optimize_int8(
            train.MODEL_PATH, train.CALIBRATION_PATH, train.CANARY_PATH, budget_points=-2
        )
