"""Helpers shared by the inference tests: tiny ONNX models made here and a real node.

Not a pytest conftest (that file belongs to the whole suite): test modules import
what they need from it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from syncfw import Fleet, Node
from syncfw.inference.train import CANARY_PATH, MODEL_PATH, TRIGGER_PATH, load_canary
from syncfw.keys import results_prefix

__all__ = [
    "CANARY_PATH",
    "MODEL_PATH",
    "TRIGGER_PATH",
    "canary",
    "identity_model",
    "linear_model",
    "node",
    "ort_may_warn_of_missing_providers",
    "result_keys",
    "wrong_output_model",
]

NODE_ID = "t7"


@contextlib.contextmanager
def ort_may_warn_of_missing_providers() -> Iterator[None]:
    """Let ONNX Runtime's own warning about a provider it lacks pass, or not come.

    Its CPU build warns (``UserWarning: Specified provider ... is not in available
    provider names``); its GPU build, on a machine without the GPU libraries, logs
    instead. The tests assert what the engine itself says, which both builds share.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Specified provider", UserWarning)
        yield


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    """A real SQLite-backed node in memory."""
    async with Node.open(":memory:", node_id=NODE_ID, fleet=Fleet()) as n:
        yield n


def canary() -> tuple[np.ndarray, np.ndarray]:
    """The shipped canary set."""
    return load_canary()


async def result_keys(node: Node) -> list[str]:
    """Every result key the node holds."""
    return sorted(await node.scan(results_prefix(node.node_id)))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def linear_model(
    path: Path, n_in: int = 4, n_out: int = 3, *, seed: int = 0, name: str = "lin"
) -> Path:
    """``probs = softmax(x @ W + b)`` with a dynamic batch dim; input ``x`` float32 [N, n_in]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    b = rng.normal(size=(n_out,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = model.metadata_props.add()
    meta.key, meta.value = "name", name
    return _save(model, path)


def identity_model(path: Path, shape: Sequence[int | str] = ("N", 4)) -> Path:
    """``y = x`` (float32), for exact output checks."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "ident",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def wrong_output_model(path: Path) -> Path:
    """Declares ``y`` as [N, 2] but really returns [N, 3] (x concatenated with a column)."""
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x1"], ["y"], axis=1)],
        "liar",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("x1", TensorProto.FLOAT, ["N", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    # No checker: shape inference would rightly object to the declared shape.
    path.write_bytes(model.SerializeToString())
    return path
