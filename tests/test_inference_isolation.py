"""Process isolation: a call hung in native code is killed, a crashed worker is replaced."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest_inference import MODEL_PATH, canary, node, result_keys
from onnx import TensorProto, helper, numpy_helper

from syncfw import Node
from syncfw.inference import (
    Engine,
    EngineConfig,
    InferenceRunError,
    InferenceTimeoutError,
    ModelLoadError,
)

__all__ = ["node"]


def spin_model(path: Path) -> Path:
    """``v = 0; repeat n times: v += 1``: with a huge ``n`` it never returns from session.run."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "v0"], ["v"], body=body)],
        "spin",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        initializer=[
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.zeros(1, np.float32), "v0"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


async def test_a_call_hung_in_native_code_is_killed_and_the_worker_replaced(
    node: Node, tmp_path: Path
) -> None:
    async with Engine(node, EngineConfig.isolated().with_(timeout_s=1.0)) as engine:
        await engine.load(spin_model(tmp_path / "spin.onnx"))
        ok = await engine.infer({"n": np.array(3, np.int64)}, key="short")
        np.testing.assert_array_equal(ok.outputs["v"], [3.0])
        first_pid = engine.worker_pid
        with pytest.raises(InferenceTimeoutError, match="worker process was killed and replaced"):
            await engine.infer({"n": np.array(10**15, np.int64)}, key="forever")
        again = await engine.infer({"n": np.array(5, np.int64)}, key="after")
        np.testing.assert_array_equal(again.outputs["v"], [5.0])
        assert engine.worker_pid not in (None, first_pid)  # a fresh child
        status = engine.status()
        assert status["worker_restarts"] == 1
        assert status["stuck_workers"] == 0  # no thread left behind
        assert status["worker_restart"]["count"] == 1
    keys = await result_keys(node)
    assert [k.rsplit("/", 1)[1] for k in keys] == ["after", "short"]


async def test_a_crashed_worker_is_reported_and_replaced(node: Node) -> None:
    x, _ = canary()
    async with Engine(node, EngineConfig.isolated()) as engine:
        info = await engine.load(MODEL_PATH)
        assert info.provider == "CPUExecutionProvider"
        r = await engine.infer(x[:1])
        pid = engine.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # what a segfault in a provider looks like from here
        with pytest.raises(InferenceRunError, match="worker process died"):
            await engine.infer(x[:1])
        r2 = await engine.infer(x[:1])
        assert engine.worker_pid not in (None, pid)
    np.testing.assert_allclose(r.outputs["probs"], r2.outputs["probs"])
    assert len(await result_keys(node)) == 2


async def test_process_isolation_loads_fail_cleanly_and_hot_swap(
    node: Node, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(MODEL_PATH.read_bytes()[:1000])
    x, _ = canary()
    async with Engine(node, EngineConfig.isolated()) as engine:
        first = await engine.load(MODEL_PATH)
        with pytest.raises(ModelLoadError):
            await engine.load(bad)
        assert (await engine.infer(x[:1])).model.sha256 == first.sha256
        results = [await engine.infer(x[i : i + 1]) for i in range(3)]
    assert all(r.model.sha256 == first.sha256 for r in results)


def test_isolation_is_validated() -> None:
    with pytest.raises(ValueError, match="isolation"):
        EngineConfig(isolation="fork")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="isolation"):
        EngineConfig.isolated().with_(isolation="fork")
