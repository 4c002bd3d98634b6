"""The watch window measures the canary set again (accuracy and latency against the gate),
and a first model that rolls back is unloaded: the node serves no model, and says so.

Real nodes (SQLite files, the chunk store, ONNX Runtime). A regression after activation is
made by changing the canary set the window measures against (its labels moved to the next class), the
same file the validation step read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from syncfw.inference.errors import EngineStateError
from syncfw.inference.train import CANARY_PATH
from syncfw.keys import model_key
from syncfw.models.lifecycle import Lifecycle
from syncfw.models.rollout import parse_gate
from tests.test_models_lifecycle import (
    BAD_PATH,
    NODE,
    cfg,
    frames,
    open_node,
    publish_all,
    release,
)


def spoil(canary: Path) -> None:
    """Every canary label moved to the next class, in place: a good model now scores low."""
    with np.load(canary) as d:
        x, y = d["x"], d["y"]
    bad = (y + 1) % (int(y.max()) + 1)
    tmp = canary.with_name("spoiled.npz")
    np.savez(tmp, x=x, y=bad)
    tmp.replace(canary)


def _regress_when_active(lc: Lifecycle, canary: Path) -> None:
    """Spoil the canary as soon as the next release is active."""

    def hook(rec: object) -> None:
        if getattr(rec, "step", "") == "active":
            spoil(canary)

    lc.on_step = hook


async def test_the_window_measures_the_canary_again_and_rolls_back_a_regression(
    tmp_path: Path,
) -> None:
    canary = tmp_path / "canary.npz"
    shutil.copy(CANARY_PATH, canary)
    key = Ed25519PrivateKey.generate()
    node, arts, engine = await open_node(tmp_path / "n.db", key)
    try:
        await publish_all(arts, key)
        lc = Lifecycle(
            node,
            arts,
            engine,
            "inspection",
            cfg(canary=canary, window_s=0.4, remeasure_every_s=0.1),
        )
        r1 = await lc.update(await release(arts, 1))
        # committed on figures measured in the window, not only those of the validation
        assert r1.step == "committed" and r1.p99_ms is not None and r1.accuracy is not None
        v1 = engine.model
        assert v1 is not None
        _regress_when_active(lc, canary)
        r2 = await lc.update(await release(arts, 2))
        assert r2.step == "rolled_back", r2
        assert "watch window" in r2.reason and "canary measured again" in r2.reason
        assert "accuracy>=-0.02" in r2.reason
        assert r2.accuracy_delta is not None and r2.accuracy_delta < -0.3
        # back on v1, serving
        assert (r2.serving_version, engine.model is not None) == (1, True)
        assert engine.model is not None and engine.model.sha256 == v1.sha256
        assert (await engine.infer(frames(1)[0])).model.version == "1"
    finally:
        await engine.aclose()
        await arts.aclose()
        await node.close()


async def test_a_first_model_that_regresses_in_the_window_is_unloaded(tmp_path: Path) -> None:
    canary = tmp_path / "canary.npz"
    shutil.copy(CANARY_PATH, canary)
    key = Ed25519PrivateKey.generate()
    node, arts, engine = await open_node(tmp_path / "n.db", key)
    try:
        await publish_all(arts, key)
        lc = Lifecycle(
            node,
            arts,
            engine,
            "inspection",
            cfg(canary=canary, window_s=0.4, remeasure_every_s=0.1),
        )
        served: list[str] = []

        def hook(rec: object) -> None:
            if getattr(rec, "step", "") == "active":
                served.append(engine.model.version if engine.model else "")
                spoil(canary)

        lc.on_step = hook
        rec = await lc.update(await release(arts, 1))
        assert served == ["1"]  # it did serve before the window caught it
        assert rec.step == "rolled_back" and rec.serving_version == 0 and rec.prev_version == 0
        assert engine.model is None
        with pytest.raises(EngineStateError, match="no model loaded"):
            await engine.infer(frames(1)[0])
        st = (await node.status())["model_lifecycle:inspection"]
        assert st["serving"].startswith("none") and "first model rolled back" in st["serving"]
        assert st["engine_sha256"] is None and st["step"] == "rolled_back"
        view = await node.get(model_key(NODE))
        assert (view["version"], view["status"]) == ("1", "rolled_back")
        # a restart serves nothing either, and does not try v1 again
        lc2 = Lifecycle(node, arts, engine, "inspection", cfg(canary=canary))
        again = await lc2.recover()
        assert again is not None and again.step == "rolled_back" and engine.model is None
        assert (await lc2.update(await release(arts, 1))).step == "rolled_back"
    finally:
        await engine.aclose()
        await arts.aclose()
        await node.close()


async def test_a_first_model_that_fails_validation_never_serves(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    node, arts, engine = await open_node(tmp_path / "n.db", key)
    try:
        # the release claims the figure the optimize step measured; the node measures
        # the bytes it got far below it, with no previous model to fall back to
        await arts.publish(
            BAD_PATH.read_bytes(),
            name="inspection",
            version=1,
            key=key,
            chunk_size=16 << 10,
            canary_accuracy=0.96,
        )
        lc = Lifecycle(node, arts, engine, "inspection", cfg())
        rec = await lc.update(await release(arts, 1))
        assert rec.step == "rolled_back" and "validation failed the gate" in rec.reason
        assert rec.serving_version == 0 and engine.model is None
        st = (await node.status())["model_lifecycle:inspection"]
        assert "first model rolled back" in st["serving"]
        assert (await node.get(model_key(NODE)))["status"] == "rolled_back"
    finally:
        await engine.aclose()
        await arts.aclose()
        await node.close()


def conv_model(note: str) -> bytes:
    """A small conv net over images of any size (``[N, 1, H, W]``, global average pooled
    to two class scores): its latency grows with the image, its weights stay the same."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (16, 1, 7, 7)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.1, (16, 2)).astype(np.float32), "fc")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[3, 3, 3, 3]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    e = model.metadata_props.add()
    e.key, e.value = "release_note", note
    out: bytes = model.SerializeToString()
    return out


def canary_of(path: Path, side: int, n: int = 10) -> None:
    """``n`` labelled images ``side`` pixels square (the labels do not matter here)."""
    rng = np.random.default_rng(side)
    x = rng.integers(0, 256, (n, 1, side, side), dtype=np.uint8)
    tmp = path.with_name("next.npz")
    np.savez(tmp, x=x, y=np.arange(n) % 2)
    tmp.replace(path)


async def test_a_latency_regression_in_the_window_rolls_back(tmp_path: Path) -> None:
    """The window's p99 re-measure: v2 validates well inside the gate's p99, then, once
    it is active, the canary the window measures again costs ~16,000x the work per call
    (its images grown from 16 to 2048 pixels square, the same file validation read:
    768 pixels ran under the 25 ms gate on a quiet CI machine), so the p99 measured
    again is over the gate: v2 rolls back with that reason, and v1 serves again."""
    canary = tmp_path / "canary.npz"
    canary_of(canary, 16)
    key = Ed25519PrivateKey.generate()
    node, arts, engine = await open_node(tmp_path / "n.db", key)
    try:
        for v in (1, 2):
            await arts.publish(
                conv_model(f"v{v}"), name="inspection", version=v, key=key, chunk_size=16 << 10
            )
        gate = parse_gate("p99_ms<=25")
        lc = Lifecycle(
            node,
            arts,
            engine,
            "inspection",
            cfg(canary=canary, gate=gate, window_s=0.3, remeasure_every_s=0.1),
        )
        r1 = await lc.update(await release(arts, 1))
        assert r1.step == "committed", r1
        v1 = engine.model
        assert v1 is not None

        def slower_when_active(rec: object) -> None:
            if getattr(rec, "step", "") == "active":
                canary_of(canary, 2048, n=4)

        lc.on_step = slower_when_active
        r2 = await lc.update(await release(arts, 2))
        assert r2.step == "rolled_back", r2
        assert "canary measured again" in r2.reason and "p99_ms<=25" in r2.reason, r2.reason
        assert r2.p99_ms is not None and r2.p99_ms > 25
        assert r2.serving_version == 1
        assert engine.model is not None and engine.model.sha256 == v1.sha256
        rec = await node.get(lc.key)
        assert rec["step"] == "rolled_back" and "p99_ms" in rec["reason"]
    finally:
        await engine.aclose()
        await arts.aclose()
        await node.close()
