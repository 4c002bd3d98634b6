"""The shipped models are reproducible from their seed and meet their stated accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from syncfw.inference import train

# Stated thresholds on the held-out canary set (400 images); the shipped models
# score 0.960 and 0.868.
MODEL_MIN_ACCURACY = 0.93
TRIGGER_MIN_ACCURACY = 0.80
# The deliberately bad INT8 variant scores 0.750: far more than the 2-point budget below the MLP.
BAD_MIN_LOSS = 0.05

ASSET_PATHS = (
    train.MODEL_PATH,
    train.TRIGGER_PATH,
    train.CANARY_PATH,
    train.CALIBRATION_PATH,
    train.BAD_MODEL_PATH,
)


@pytest.fixture(scope="module")
def regenerated() -> train.TrainReport:
    """Train again from the shipped seed (about 7 s on two cores)."""
    return train.train_all(train.DEFAULT_SEED)


def _weights(model: bytes | str) -> dict[str, np.ndarray]:
    proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_assets_are_small_and_present() -> None:
    sizes = {p.name: p.stat().st_size for p in ASSET_PATHS}
    assert all(0 < s < 200_000 for s in sizes.values()), sizes
    assert sum(sizes.values()) < 1_000_000


def test_dataset_is_seeded() -> None:
    a = train.make_dataset(50, 3)
    b = train.make_dataset(50, 3)
    c = train.make_dataset(50, 4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.float32
    assert a[0].shape == (50, 1, 16, 16)
    assert 0.0 <= a[0].min() <= a[0].max() <= 1.0
    assert set(a[1].tolist()) == {0, 1}


def test_canary_set_is_the_held_out_stream() -> None:
    x, y = train.load_canary()
    cx, cy = train.make_dataset(len(y), train.DEFAULT_SEED + train.CANARY_STREAM)
    np.testing.assert_array_equal(x, cx)
    np.testing.assert_array_equal(y, cy)
    tx, _ = train.make_dataset(200, train.DEFAULT_SEED)
    assert not any(
        (tx == img).all(axis=(1, 2, 3)).any() for img in x[:50]
    )  # disjoint from training


def test_shipped_models_meet_the_accuracy_threshold_on_the_canary_set() -> None:
    x, y = train.load_canary()
    assert train.accuracy(train.MODEL_PATH, x, y) >= MODEL_MIN_ACCURACY
    assert train.accuracy(train.TRIGGER_PATH, x, y) >= TRIGGER_MIN_ACCURACY


def test_regenerating_with_the_same_seed_gives_the_shipped_models(
    regenerated: train.TrainReport,
) -> None:
    for fresh, shipped in (
        (regenerated.model, train.MODEL_PATH),
        (regenerated.trigger, train.TRIGGER_PATH),
    ):
        new, old = _weights(fresh), _weights(str(shipped))
        assert new.keys() == old.keys()
        for name in new:
            # Equal up to BLAS rounding differences between machines.
            np.testing.assert_allclose(new[name], old[name], rtol=1e-4, atol=1e-5, err_msg=name)
    x, y = train.load_canary()
    assert regenerated.model_accuracy == pytest.approx(
        train.accuracy(train.MODEL_PATH, x, y), abs=0.005
    )
    assert regenerated.trigger_accuracy == pytest.approx(
        train.accuracy(train.TRIGGER_PATH, x, y), abs=0.005
    )
    assert regenerated.model_accuracy >= MODEL_MIN_ACCURACY


def test_regenerating_gives_the_shipped_calibration_set_and_bad_variant(
    regenerated: train.TrainReport,
) -> None:
    with np.load(train.CALIBRATION_PATH) as data:
        assert data.files == ["x"]  # no labels: calibration needs none
        shipped = data["x"]
    assert shipped.dtype == np.uint8
    np.testing.assert_array_equal(shipped.astype(np.float32) / 255.0, regenerated.calibration_x)
    canary_x, _ = train.load_canary()
    assert not any(
        (regenerated.calibration_x == img).all(axis=(1, 2, 3)).any() for img in canary_x[:50]
    )
    # The bad variant: the same graph, its INT8 weights within one quantization step
    # (the FP32 weights it quantizes agree up to BLAS rounding), the same canary score.
    new, old = _weights(regenerated.bad), _weights(str(train.BAD_MODEL_PATH))
    assert new.keys() == old.keys()
    assert any(a.dtype == np.int8 for a in old.values())
    for name in new:
        if new[name].dtype == np.int8:
            diff = np.abs(new[name].astype(np.int16) - old[name].astype(np.int16))
            assert diff.max() <= 1, name
        else:
            np.testing.assert_allclose(new[name], old[name], rtol=1e-3, atol=1e-6, err_msg=name)
    x, y = train.load_canary()
    shipped_bad = train.accuracy(train.BAD_MODEL_PATH, x, y)
    assert regenerated.bad_accuracy == pytest.approx(shipped_bad, abs=0.005)
    assert regenerated.model_accuracy - shipped_bad >= BAD_MIN_LOSS
    meta = {p.key: p.value for p in onnx.load(str(train.BAD_MODEL_PATH)).metadata_props}
    assert meta["name"] == "inspection"
    assert "mis-calibrated" in meta["quantization"]


def test_models_carry_their_metadata_and_signature() -> None:
    for path, name in ((train.MODEL_PATH, "inspection"), (train.TRIGGER_PATH, "trigger")):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["name"] == name
        assert meta["labels"] == "ok,defect"
        assert meta["seed"] == str(train.DEFAULT_SEED)
        assert [i.name for i in proto.graph.input] == ["image"]
        assert [o.name for o in proto.graph.output] == ["probs"]


def test_trigger_features_match_the_onnx_graph() -> None:
    import onnxruntime as ort

    x, _ = train.load_canary()
    w = _weights(str(train.TRIGGER_PATH))
    logits = train.trigger_features(x[:32]) @ w["w"].astype(np.float64) + w["b"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = e / e.sum(axis=1, keepdims=True)
    got = ort.InferenceSession(str(train.TRIGGER_PATH), providers=["CPUExecutionProvider"]).run(
        None, {"image": x[:32]}
    )[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_main_writes_the_assets_elsewhere(tmp_path: object, regenerated: train.TrainReport) -> None:
    from pathlib import Path

    out = Path(str(tmp_path))
    train.save_canary(out / "canary.npz", regenerated.canary_x, regenerated.canary_y)
    x, y = train.load_canary(out / "canary.npz")
    np.testing.assert_array_equal(x, regenerated.canary_x)
    np.testing.assert_array_equal(y, regenerated.canary_y)
