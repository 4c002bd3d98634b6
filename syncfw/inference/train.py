"""Make the shipped inspection models: synthetic data, a numpy-trained classifier, ONNX export.

Run ``python -m syncfw.inference.train`` to regenerate ``syncfw/inference/assets/``.
Everything is seeded, so the same seed gives the same data set and the same
weights (tests regenerate the model and compare). No torch, no downloads: the
data set is drawn here and the graph is written with ``onnx.helper``.

The task: 16x16 grayscale images of a machined part (a bright disc or rounded
square on a darker belt, jittered in place, size, brightness and noise), half of
them with a defect (a scratch, a pit or a chipped edge). Two models share one
input signature (``image``: float32 ``[N, 1, 16, 16]`` in ``[0, 1]``) and one
output (``probs``: float32 ``[N, 2]``, labels ``ok``/``defect``), so the
degradation ladder can swap one for the other:

* ``inspection.onnx`` — a small MLP (256 → 64 → 2), the primary model;
* ``trigger.onnx`` — logistic regression on four image statistics (edge energy,
  intensity), the cheap duty-cycled model of the ``minimal`` mode.

Beside them: ``canary.npz`` (the labelled held-out set every gate measures on),
``calibration.npz`` (unlabelled frames from a third random stream, for static
INT8 quantization: ``syncfw model optimize --calibration``) and
``inspection_bad.onnx``, a deliberately bad INT8 release of the MLP that the
accuracy gate must catch: it was calibrated on the raw 0-255 frames instead of
the ``[0, 1]`` images the model takes (a preprocessing slip), so its activation
ranges are 255 times too wide and it loses well over the 2-point budget.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ASSETS",
    "BAD_MODEL_PATH",
    "CALIBRATION_PATH",
    "CANARY_PATH",
    "IMAGE_SIZE",
    "LABELS",
    "MODEL_PATH",
    "TRIGGER_PATH",
    "TrainReport",
    "accuracy",
    "export_mlp",
    "export_trigger",
    "load_canary",
    "make_dataset",
    "render_part",
    "main",
    "make_bad_variant",
    "save_calibration",
    "save_canary",
    "train_all",
    "train_logreg",
    "train_mlp",
    "trigger_features",
]

ASSETS = Path(__file__).parent / "assets"
MODEL_PATH = ASSETS / "inspection.onnx"
TRIGGER_PATH = ASSETS / "trigger.onnx"
CANARY_PATH = ASSETS / "canary.npz"
CALIBRATION_PATH = ASSETS / "calibration.npz"
BAD_MODEL_PATH = ASSETS / "inspection_bad.onnx"
IMAGE_SIZE = 16
LABELS = ("ok", "defect")
DEFAULT_SEED = 7
# Three disjoint random streams: training, the held-out canary set, calibration.
CANARY_STREAM = 1_000_003
CALIBRATION_STREAM = 2_000_003
N_CALIBRATION = 128
MODEL_VERSION = "1.0.0"
# ONNX opset 17 is understood by every onnxruntime the project supports (>= 1.18).
OPSET = 17

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def render_part(rng: np.random.Generator, defect: bool) -> F32:
    """Draw one part, as the camera sees it.

    Args:
        rng: the random stream (seeded by the caller).
        defect: add a scratch, a pit or a chipped edge.

    Returns:
        A float32 16x16 image in ``[0, 1]``, quantized to 1/255 steps.
    """
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cy, cx = n / 2 + rng.uniform(-1.5, 1.5, size=2)
    radius = rng.uniform(4.5, 6.0)
    belt = rng.uniform(0.05, 0.25)
    part = rng.uniform(0.6, 0.9)
    if rng.random() < 0.5:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:  # a rounded square: the fleet inspects more than one part shape
        inside = (np.abs(yy - cy) <= radius * 0.85) & (np.abs(xx - cx) <= radius * 0.85)
    img = np.where(inside, part, belt).astype(np.float32)
    if defect:
        kind = rng.integers(0, 3)
        if kind == 0:  # scratch: a dark line across the part
            angle = rng.uniform(0, np.pi)
            offset = rng.uniform(-2.0, 2.0)
            dist = np.abs((xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle) - offset)
            img = np.where(inside & (dist < 0.9), belt + 0.05, img)
        elif kind == 1:  # pit: a dark spot inside the part
            py, px = np.array([cy, cx]) + rng.uniform(-radius / 2.5, radius / 2.5, size=2)
            pit = (yy - py) ** 2 + (xx - px) ** 2 <= rng.uniform(1.5, 3.0)
            img = np.where(inside & pit, belt, img)
        else:  # chipped edge: a bite out of the rim
            angle = rng.uniform(0, 2 * np.pi)
            by, bx = cy + radius * np.sin(angle), cx + radius * np.cos(angle)
            bite = (yy - by) ** 2 + (xx - bx) ** 2 <= rng.uniform(5.0, 8.0)
            img = np.where(bite, belt, img)
    noisy = img + rng.normal(0.0, 0.04, size=img.shape)
    # Quantized to 8 bits, as a camera delivers it (and the canary set stores it).
    return (np.round(np.clip(noisy, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def make_dataset(n: int, seed: int) -> tuple[F32, I64]:
    """Draw ``n`` labelled images, half with defects.

    Args:
        n: number of images.
        seed: seed of the generator; equal seeds give equal data sets.

    Returns:
        ``(x, y)``: float32 images ``[n, 1, 16, 16]`` in ``[0, 1]`` and int64
        labels ``[n]`` (0 = ok, 1 = defect).
    """
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(y)
    x = np.stack([render_part(rng, bool(label)) for label in y])[:, None, :, :]
    return x.astype(np.float32), y


def _softmax(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: npt.NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass(frozen=True, slots=True)
class _Adam:
    """Adam hyper-parameters (plain numpy: no framework needed for a model this small)."""

    lr: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def _adam_step(
    params: list[npt.NDArray[np.float64]],
    grads: list[npt.NDArray[np.float64]],
    state: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]],
    t: int,
    opt: _Adam,
) -> None:
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        m, v = state[i]
        m = opt.b1 * m + (1 - opt.b1) * g
        v = opt.b2 * v + (1 - opt.b2) * g * g
        state[i] = (m, v)
        p -= opt.lr * (m / (1 - opt.b1**t)) / (np.sqrt(v / (1 - opt.b2**t)) + opt.eps)


def train_mlp(
    x: F32, y: I64, *, hidden: int = 64, epochs: int = 500, seed: int = DEFAULT_SEED
) -> dict[str, F32]:
    """Train a one-hidden-layer ReLU MLP with full-batch Adam and cross-entropy.

    Args:
        x: images ``[n, 1, 16, 16]``.
        y: labels ``[n]``.
        hidden: hidden width.
        epochs: full-batch steps.
        seed: seed of the weight initialisation.

    Returns:
        float32 weights ``w1 [256, hidden]``, ``b1``, ``w2 [hidden, 2]``, ``b2``.
    """
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1).astype(np.float64)
    d = flat.shape[1]
    w1 = rng.normal(0.0, np.sqrt(2.0 / d), size=(d, hidden))
    b1 = np.zeros(hidden)
    w2 = rng.normal(0.0, np.sqrt(2.0 / hidden), size=(hidden, 2))
    b2 = np.zeros(2)
    params = [w1, b1, w2, b2]
    state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    onehot = np.eye(2)[y]
    opt = _Adam()
    for t in range(1, epochs + 1):
        h_pre = flat @ w1 + b1
        h = np.maximum(h_pre, 0.0)
        p = _softmax(h @ w2 + b2)
        dz = (p - onehot) / len(flat)
        gw2 = h.T @ dz
        gb2 = dz.sum(axis=0)
        dh = (dz @ w2.T) * (h_pre > 0)
        gw1 = flat.T @ dh + 1e-4 * w1  # a little weight decay keeps the weights small and stable
        gb1 = dh.sum(axis=0)
        _adam_step(params, [gw1, gb1, gw2, gb2], state, t, opt)
    return {k: v.astype(np.float32) for k, v in zip(("w1", "b1", "w2", "b2"), params, strict=True)}


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)


def trigger_features(x: F32) -> npt.NDArray[np.float64]:
    """The four features the trigger model sees, computed as its ONNX graph does.

    Mean and max of the absolute Laplacian (defects add edges inside the part),
    and mean and standard deviation of the pixels.

    Args:
        x: images ``[n, 1, 16, 16]``.

    Returns:
        float64 features ``[n, 4]``.
    """
    n = IMAGE_SIZE - 2
    lap = np.zeros((len(x), n, n), dtype=np.float32)
    for i in range(3):
        for j in range(3):
            lap += _LAPLACIAN[i, j] * x[:, 0, i : i + n, j : j + n]
    edges = np.abs(lap).reshape(len(x), -1)
    flat = x.reshape(len(x), -1)
    feats = np.stack([edges.mean(1), edges.max(1), flat.mean(1), flat.std(1)], axis=1)
    return feats.astype(np.float64)


def train_logreg(x: F32, y: I64, *, epochs: int = 300, seed: int = DEFAULT_SEED) -> dict[str, F32]:
    """Train two-class softmax regression on :func:`trigger_features`.

    The features are standardized for training and the scaling is folded back
    into the weights, so the exported graph needs no normalisation step.

    Args:
        x: images ``[n, 1, 16, 16]``.
        y: labels ``[n]``.
        epochs: full-batch steps.
        seed: seed of the weight initialisation.

    Returns:
        float32 weights ``w [4, 2]`` and ``b [2]`` on the raw features.
    """
    rng = np.random.default_rng(seed)
    raw = trigger_features(x)
    mu, sd = raw.mean(axis=0), raw.std(axis=0) + 1e-12
    feats = (raw - mu) / sd
    w = rng.normal(0.0, 0.01, size=(feats.shape[1], 2))
    b = np.zeros(2)
    params = [w, b]
    state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    onehot = np.eye(2)[y]
    opt = _Adam(lr=0.05)
    for t in range(1, epochs + 1):
        p = _softmax(feats @ w + b)
        dz = (p - onehot) / len(feats)
        _adam_step(params, [feats.T @ dz, dz.sum(axis=0)], state, t, opt)
    w_raw = w / sd[:, None]
    b_raw = b - (mu / sd) @ w
    return {"w": w_raw.astype(np.float32), "b": b_raw.astype(np.float32)}


def _metadata(model: object, name: str, seed: int) -> None:
    import onnx

    assert isinstance(model, onnx.ModelProto)
    for key, value in (
        ("name", name),
        ("version", MODEL_VERSION),
        ("labels", ",".join(LABELS)),
        ("seed", str(seed)),
    ):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value


def _io() -> tuple[Any, Any]:
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info(
        "image", TensorProto.FLOAT, ["N", 1, IMAGE_SIZE, IMAGE_SIZE]
    )
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(LABELS)])
    return image, probs


def export_mlp(weights: dict[str, F32], *, seed: int = DEFAULT_SEED) -> bytes:
    """The MLP as a serialized ONNX model (Flatten → Gemm → Relu → Gemm → Softmax).

    Args:
        weights: from :func:`train_mlp`.
        seed: recorded in the model's metadata.

    Returns:
        The model bytes, checked by ``onnx.checker``.
    """
    import onnx
    from onnx import helper, numpy_helper

    image, probs = _io()
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits = [numpy_helper.from_array(weights[k], name=k) for k in ("w1", "b1", "w2", "b2")]
    graph = helper.make_graph(nodes, "inspection_mlp", [image], [probs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by onnxruntime >= 1.18 (newer IR would lock older runtimes out)
    model.producer_name = "syncfw.inference.train"
    _metadata(model, "inspection", seed)
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def export_trigger(weights: dict[str, F32], *, seed: int = DEFAULT_SEED) -> bytes:
    """The trigger model as ONNX (edge and intensity statistics → Gemm → Softmax).

    Args:
        weights: from :func:`train_logreg`.
        seed: recorded in the model's metadata.

    Returns:
        The model bytes, checked by ``onnx.checker``.
    """
    import onnx
    from onnx import helper, numpy_helper

    image, probs = _io()
    mk = helper.make_node
    nodes = [
        mk("Conv", ["image", "laplacian"], ["lap"]),
        mk("Abs", ["lap"], ["edges4d"]),
        mk("Flatten", ["edges4d"], ["edges"], axis=1),
        mk("ReduceMean", ["edges"], ["f_edge_mean"], axes=[1], keepdims=1),
        mk("ReduceMax", ["edges"], ["f_edge_max"], axes=[1], keepdims=1),
        mk("Flatten", ["image"], ["pixels"], axis=1),
        mk("ReduceMean", ["pixels"], ["f_mean"], axes=[1], keepdims=1),
        mk("Mul", ["pixels", "pixels"], ["sq"]),
        mk("ReduceMean", ["sq"], ["m2"], axes=[1], keepdims=1),
        mk("Mul", ["f_mean", "f_mean"], ["mean_sq"]),
        mk("Sub", ["m2", "mean_sq"], ["var_raw"]),
        mk("Relu", ["var_raw"], ["var"]),  # rounding can make E[x^2] - E[x]^2 slightly negative
        mk("Sqrt", ["var"], ["f_std"]),
        mk("Concat", ["f_edge_mean", "f_edge_max", "f_mean", "f_std"], ["feats"], axis=1),
        mk("Gemm", ["feats", "w", "b"], ["logits"]),
        mk("Softmax", ["logits"], ["probs"], axis=1),
    ]
    lap = numpy_helper.from_array(_LAPLACIAN.reshape(1, 1, 3, 3), name="laplacian")
    inits = [lap] + [numpy_helper.from_array(weights[k], name=k) for k in ("w", "b")]
    graph = helper.make_graph(nodes, "inspection_trigger", [image], [probs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "syncfw.inference.train"
    _metadata(model, "trigger", seed)
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def accuracy(model: bytes | str | Path, x: F32, y: I64) -> float:
    """Accuracy of an ONNX model on ``(x, y)``, run with onnxruntime on the CPU.

    Args:
        model: model bytes or path.
        x: images.
        y: labels.

    Returns:
        The fraction of correct top-1 predictions.
    """
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    probs = session.run(None, {"image": x})[0]
    return float((np.argmax(probs, axis=1) == y).mean())


def make_bad_variant(model: bytes, calibration_x: F32) -> bytes:
    """The deliberately bad INT8 release: calibrated on raw 0-255 frames.

    Static quantization picks each activation's INT8 range from what the
    calibration set produces; fed frames 255 times brighter than the model
    ever sees, every range is 255 times too wide and most of the 8 bits go
    unused. Real quantization, real tooling, one realistic slip.

    Args:
        model: the FP32 MLP.
        calibration_x: the calibration images, in ``[0, 1]`` as the model takes them.

    Returns:
        The INT8 model's bytes (its ``quantization`` metadata says what went wrong).
    """
    from syncfw.inference.optimize import quantize_int8

    raw = (calibration_x * np.float32(255.0)).astype(np.float32)
    return quantize_int8(
        model,
        [raw],
        note=(
            f"int8 static QDQ, MinMax over {len(raw)} raw 0-255 frames: deliberately "
            "mis-calibrated (the model takes [0, 1]); the accuracy gate must refuse it"
        ),
    )


@dataclass(frozen=True, slots=True)
class TrainReport:
    """What :func:`train_all` made.

    Attributes:
        model: the MLP, serialized ONNX.
        trigger: the trigger model, serialized ONNX.
        canary_x: held-out images.
        canary_y: their labels.
        model_accuracy: MLP accuracy on the canary set.
        trigger_accuracy: trigger-model accuracy on the canary set.
        calibration_x: unlabelled images for INT8 calibration.
        bad: the deliberately bad INT8 variant (:func:`make_bad_variant`).
        bad_accuracy: its accuracy on the canary set.
    """

    model: bytes
    trigger: bytes
    canary_x: F32
    canary_y: I64
    model_accuracy: float
    trigger_accuracy: float
    calibration_x: F32
    bad: bytes
    bad_accuracy: float


def train_all(
    seed: int = DEFAULT_SEED,
    *,
    n_train: int = 4000,
    n_canary: int = 400,
    n_calibration: int = N_CALIBRATION,
) -> TrainReport:
    """Draw the data sets, train both models, export them and score them on the canary set.

    Args:
        seed: master seed; the canary and calibration sets use streams of their own.
        n_train: training images.
        n_canary: held-out canary images.
        n_calibration: calibration images.

    Returns:
        The models, the canary and calibration sets, the bad variant and the canary accuracies.
    """
    x, y = make_dataset(n_train, seed)
    cx, cy = make_dataset(n_canary, seed + CANARY_STREAM)  # held out: a disjoint random stream
    model = export_mlp(train_mlp(x, y, seed=seed), seed=seed)
    trigger = export_trigger(train_logreg(x, y, seed=seed), seed=seed)
    calibration_x, _ = make_dataset(n_calibration, seed + CALIBRATION_STREAM)
    bad = make_bad_variant(model, calibration_x)
    return TrainReport(
        model=model,
        trigger=trigger,
        canary_x=cx,
        canary_y=cy,
        model_accuracy=accuracy(model, cx, cy),
        trigger_accuracy=accuracy(trigger, cx, cy),
        calibration_x=calibration_x,
        bad=bad,
        bad_accuracy=accuracy(bad, cx, cy),
    )


def save_canary(path: Path, x: F32, y: I64) -> None:
    """Write a canary set; images are stored as 8-bit, exactly as they were drawn.

    Args:
        path: the ``.npz`` to write.
        x: images in ``[0, 1]`` quantized to 1/255 steps.
        y: labels.
    """
    frames = np.round(x * 255.0).astype(np.uint8)
    np.savez_compressed(path, x=frames, y=y, labels=np.array(LABELS))


def save_calibration(path: Path, x: F32) -> None:
    """Write a calibration set: ``x`` as 8-bit frames (no labels: calibration needs none).

    Args:
        path: the ``.npz`` to write.
        x: images in ``[0, 1]`` quantized to 1/255 steps.
    """
    np.savez_compressed(path, x=np.round(x * 255.0).astype(np.uint8))


def load_canary(path: Path = CANARY_PATH) -> tuple[F32, I64]:
    """Read a canary set written by :func:`save_canary`.

    Args:
        path: the ``.npz``; the shipped one by default.

    Returns:
        ``(x, y)`` as float32 images in ``[0, 1]`` and int64 labels.
    """
    with np.load(path) as data:
        x = (data["x"].astype(np.float32) / np.float32(255.0)).astype(np.float32)
        y = data["y"].astype(np.int64)
    return x, y


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate the assets (``--out`` to write elsewhere)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args(argv)
    report = train_all(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_PATH.name).write_bytes(report.model)
    (out / TRIGGER_PATH.name).write_bytes(report.trigger)
    save_canary(out / CANARY_PATH.name, report.canary_x, report.canary_y)
    save_calibration(out / CALIBRATION_PATH.name, report.calibration_x)
    (out / BAD_MODEL_PATH.name).write_bytes(report.bad)
    print(
        f"inspection.onnx {len(report.model)} B, canary accuracy {report.model_accuracy:.3f}; "
        f"trigger.onnx {len(report.trigger)} B, canary accuracy {report.trigger_accuracy:.3f}; "
        f"inspection_bad.onnx {len(report.bad)} B, canary accuracy {report.bad_accuracy:.3f}; "
        f"canary set {len(report.canary_y)} images, calibration set "
        f"{len(report.calibration_x)} images -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
