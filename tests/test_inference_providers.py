"""Provider choice (pure, with injected availability) and the GPU path where there is one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest_inference import MODEL_PATH, canary, node, ort_may_warn_of_missing_providers

from syncfw import Node
from syncfw.inference import (
    CPU,
    CUDA,
    TENSORRT,
    AcceleratorInfo,
    Engine,
    EngineConfig,
    ProviderError,
    ProviderPlan,
    plan_providers,
    resolve_actual,
    trt_cache_key,
)
from syncfw.inference.providers import detect_accelerator

__all__ = ["node"]

SHA = "ab" * 32
H100 = AcceleratorInfo("NVIDIA H100 80GB HBM3", "10.3.0")


def test_order_is_tensorrt_cuda_cpu_from_what_is_available() -> None:
    assert plan_providers([CPU, CUDA, TENSORRT], model_sha256=SHA).providers == (
        TENSORRT,
        CUDA,
        CPU,
    )
    assert plan_providers([CPU, CUDA], model_sha256=SHA).providers == (CUDA, CPU)
    assert plan_providers(["AzureExecutionProvider", CPU], model_sha256=SHA).providers == (CPU,)


def test_override_order_drops_unavailable_and_keeps_cpu_only_if_named() -> None:
    plan = plan_providers([CPU, CUDA, TENSORRT], model_sha256=SHA, preferred=[CUDA])
    assert plan.providers == (CUDA,)
    plan = plan_providers([CPU], model_sha256=SHA, preferred=[TENSORRT, CPU])
    assert plan.providers == (CPU,)
    with pytest.raises(ProviderError, match="none of the wanted providers"):
        plan_providers([CPU], model_sha256=SHA, preferred=[CUDA])
    with pytest.raises(ProviderError):
        plan_providers([], model_sha256=SHA)


def test_tensorrt_caches_are_keyed_by_model_gpu_and_version(tmp_path: Path) -> None:
    plan = plan_providers([TENSORRT, CUDA, CPU], model_sha256=SHA, accel=H100, cache_root=tmp_path)
    trt_opts = plan.for_session()[0][1]
    assert trt_opts["trt_engine_cache_enable"] == "True"
    assert trt_opts["trt_timing_cache_enable"] == "True"
    assert (
        trt_opts["trt_engine_cache_path"]
        == trt_opts["trt_timing_cache_path"]
        == str(plan.trt_cache_dir)
    )
    assert plan.trt_cache_dir == tmp_path / trt_cache_key(SHA, H100)
    keys = {
        trt_cache_key(SHA, H100),
        trt_cache_key("cd" * 32, H100),
        trt_cache_key(SHA, AcceleratorInfo("NVIDIA L4", "10.3.0")),
        trt_cache_key(SHA, AcceleratorInfo(H100.gpu_name, "10.4.0")),
        trt_cache_key(SHA, AcceleratorInfo()),
    }
    assert len(keys) == 5
    assert trt_cache_key(SHA, H100) == trt_cache_key(
        SHA, AcceleratorInfo(H100.gpu_name, H100.trt_version)
    )
    assert "/" not in trt_cache_key(SHA, AcceleratorInfo("a/b", "1/2"))


def test_no_cache_root_means_no_engine_cache() -> None:
    plan = plan_providers([TENSORRT, CPU], model_sha256=SHA, accel=H100)
    assert plan.trt_cache_dir is None
    assert "trt_engine_cache_enable" not in plan.for_session()[0][1]


def test_resolve_actual_reads_what_the_session_reports() -> None:
    plan = ProviderPlan((CUDA, CPU))
    assert resolve_actual(plan, [CUDA, CPU], allow_fallback=False) == CUDA
    assert resolve_actual(plan, [CPU], allow_fallback=True) == CPU
    with pytest.raises(ProviderError, match="fell back to CPUExecutionProvider"):
        resolve_actual(plan, [CPU], allow_fallback=False)
    with pytest.raises(ProviderError, match="no execution provider"):
        resolve_actual(plan, [], allow_fallback=True)


def test_detect_accelerator_never_raises() -> None:
    info = detect_accelerator()
    assert info.gpu_name is None or isinstance(info.gpu_name, str)


def _usable(provider: str) -> bool:
    """``provider`` is in this ONNX Runtime build and really starts here.

    A GPU build lists its GPU providers on any machine, also one without the GPU or
    its libraries (CUDA, cuDNN, TensorRT); there a session falls back to the CPU.
    """
    if provider not in ort.get_available_providers():
        return False
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # the probe's failure is the answer, not a log line
    try:
        sess = ort.InferenceSession(str(MODEL_PATH), sess_options=opts, providers=[provider])
    except Exception:  # ORT's own pybind errors: any failure means not usable
        return False
    return bool(sess.get_providers()[0] == provider)


@pytest.mark.gpu
@pytest.mark.skipif(
    not _usable(CUDA),
    reason="no usable CUDAExecutionProvider here (a CPU-only build, or no GPU or CUDA libraries)",
)
async def test_cuda_is_used_and_recorded(node: Node) -> None:
    x, _ = canary()
    async with Engine(node, EngineConfig(providers=(CUDA,), allow_fallback=False)) as engine:
        info = await engine.load(MODEL_PATH)
        r = await engine.infer(x[:1])
    assert info.provider == CUDA
    assert (await node.get(r.key))["provider"] == CUDA
    bare = ort.InferenceSession(str(MODEL_PATH), providers=[CPU]).run(None, {"image": x[:1]})[0]
    np.testing.assert_allclose(r.outputs["probs"], bare, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(
    not _usable(TENSORRT),
    reason="no usable TensorrtExecutionProvider here (no TensorRT build, GPU or TensorRT libraries)",
)
async def test_tensorrt_builds_and_reuses_its_cached_engine(node: Node, tmp_path: Path) -> None:
    x, _ = canary()
    async with Engine(
        node, EngineConfig(providers=(TENSORRT,), allow_fallback=False, trt_cache_dir=tmp_path)
    ) as engine:
        info = await engine.load(MODEL_PATH)
        await engine.infer(x[:1])
    assert info.provider == TENSORRT
    assert info.plan.trt_cache_dir is not None
    cached = sorted(p.name for p in info.plan.trt_cache_dir.iterdir())
    assert any(name.endswith(".engine") for name in cached), cached
    async with Engine(
        node,
        EngineConfig(
            providers=(TENSORRT,), allow_fallback=False, trt_cache_dir=tmp_path, status_name=None
        ),
    ) as engine:
        again = await engine.load(MODEL_PATH)
    assert again.plan.trt_cache_dir == info.plan.trt_cache_dir
    assert again.load_s < info.load_s  # the engine came from the cache, not a fresh build


async def test_engine_wires_the_tensorrt_cache_and_records_the_fallback(
    node: Node, tmp_path: Path
) -> None:
    # TensorRT "available" by injection: the plan and its cache directory are real, and
    # ONNX Runtime (a CPU build here) falls back, which the engine records rather than hides.
    async with Engine(
        node, EngineConfig(available=(TENSORRT, CPU), accelerator=H100, trt_cache_dir=tmp_path)
    ) as engine:
        with ort_may_warn_of_missing_providers():
            info = await engine.load(MODEL_PATH)
        assert info.fell_back and info.provider == CPU
    assert info.plan.providers == (TENSORRT, CPU)
    assert info.plan.trt_cache_dir == tmp_path / trt_cache_key(info.sha256, H100)
    assert info.plan.trt_cache_dir.is_dir()
    assert info.provider == CPU
    assert info.as_dict()["requested_providers"][0] == TENSORRT
