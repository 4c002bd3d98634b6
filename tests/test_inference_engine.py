"""The inference engine against a real node: results as ops, bad input, watchdog, hot swap."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest_inference import (
    MODEL_PATH,
    TRIGGER_PATH,
    canary,
    identity_model,
    linear_model,
    node,
    ort_may_warn_of_missing_providers,
    result_keys,
    wrong_output_model,
)

from syncfw import Node
from syncfw.errors import InferenceError
from syncfw.inference import (
    Engine,
    EngineConfig,
    EngineStateError,
    EscalationRequest,
    InferenceRunError,
    InferenceTimeoutError,
    InputSignatureError,
    ModelLoadError,
    NonFiniteInputError,
    OutputSignatureError,
    Prediction,
    ProviderError,
    SamplingPolicy,
    decode_sample,
    top_k,
)

__all__ = ["node"]  # the fixture, imported so pytest finds it here


def _image(i: int = 0) -> np.ndarray:
    x, _ = canary()
    return x[i : i + 1]


async def test_infer_writes_one_result_op_with_provenance(node: Node) -> None:
    async with Engine(node) as engine:
        info = await engine.load(MODEL_PATH)
        assert info.provider == "CPUExecutionProvider"
        assert info.session_providers[0] == "CPUExecutionProvider"
        assert info.name == "inspection" and info.version == "1.0.0"
        assert info.labels == ("ok", "defect")
        assert info.batchable
        r = await engine.infer(_image(0), key="part-0001")

    assert r.key == "results/t7/inspection/part-0001"
    assert r.op.key == r.key and r.op.origin == "t7" and r.hlc == r.op.hlc > 0
    assert r.outputs["probs"].shape == (1, 2)
    assert r.prediction.label in ("ok", "defect")
    assert r.prediction.confidence == pytest.approx(float(r.outputs["probs"].max()), abs=1e-6)
    stored = await node.get(r.key)
    assert stored["model"] == {"name": "inspection", "version": "1.0.0", "sha256": info.sha256}
    assert stored["provider"] == "CPUExecutionProvider"
    assert stored["input_digest"] == r.input_digest and len(r.input_digest) == 64
    assert stored["label"] == r.prediction.label
    assert stored["confidence"] == r.prediction.confidence
    assert set(stored["latency_ms"]) == {"queue", "pre", "infer", "post", "total"}
    assert stored["latency_ms"]["total"] >= stored["latency_ms"]["infer"] > 0
    assert "inputs" not in stored and stored["sample"] is None  # raw tensors are not logged
    assert await result_keys(node) == [r.key]


async def test_predictions_match_a_bare_session_and_the_labels(node: Node) -> None:
    x, _y = canary()
    bare = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    expected = bare.run(None, {"image": x[:20]})[0]
    async with Engine(node) as engine:
        await engine.load(MODEL_PATH)
        results = [await engine.infer(x[i : i + 1]) for i in range(20)]
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.outputs["probs"][0], expected[i], rtol=1e-5, atol=1e-6)
        assert r.prediction.label == ("defect" if expected[i].argmax() == 1 else "ok")
    assert len(await result_keys(node)) == 20
    assert len({r.key for r in results}) == 20  # auto keys are unique


async def test_input_digest_depends_on_the_input_only(node: Node) -> None:
    async with Engine(node) as engine:
        await engine.load(MODEL_PATH)
        a = await engine.infer(_image(3))
        b = await engine.infer(_image(3).copy())
        c = await engine.infer(_image(4))
    assert a.input_digest == b.input_digest != c.input_digest


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (np.zeros((1, 1, 16, 15), np.float32), "shape"),
        (np.zeros((1, 16, 16), np.float32), "shape"),
        (np.zeros((1, 1, 16, 16), np.float64), "float32"),
        (np.zeros((1, 1, 16, 16), np.uint8), "float32"),
        ({"img": np.zeros((1, 1, 16, 16), np.float32)}, "takes inputs"),
        ([[0.0] * 16] * 16, "mapping|numpy array"),
        ({"image": [[0.0]]}, "numpy array"),
    ],
)
async def test_bad_input_is_a_clear_error_and_writes_nothing(
    node: Node, inputs: Any, match: str
) -> None:
    async with Engine(node) as engine:
        await engine.load(MODEL_PATH)
        with pytest.raises(InputSignatureError, match=match) as info:
            await engine.infer(inputs)
        assert isinstance(info.value, InferenceError) and isinstance(info.value, ValueError)
        assert await result_keys(node) == []
        await engine.infer(_image(0))  # and the engine still serves
        assert engine.status()["errors"] == {"InputSignatureError": 1}
    assert len(await result_keys(node)) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
async def test_non_finite_input_is_refused(node: Node, bad: float) -> None:
    x = _image(0).copy()
    x[0, 0, 3, 4] = bad
    async with Engine(node) as engine:
        await engine.load(MODEL_PATH)
        with pytest.raises(NonFiniteInputError, match="1 NaN or infinite"):
            await engine.infer(x)
    assert await result_keys(node) == []


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "empty", "missing", "flip"],
)
async def test_corrupt_model_fails_to_load_and_the_old_one_keeps_serving(
    node: Node, tmp_path: Path, damage: str
) -> None:
    good = MODEL_PATH.read_bytes()
    bad = tmp_path / "bad.onnx"
    if damage == "truncate":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "flip":  # damage the graph's structure, not just a weight
        bad.write_bytes(good[:40] + bytes(b ^ 0xFF for b in good[40:200]) + good[200:])
    async with Engine(node) as engine:
        before = await engine.load(MODEL_PATH)
        with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
            await engine.load(bad)
        assert engine.model is not None and engine.model.sha256 == before.sha256
        r = await engine.infer(_image(1))
        assert r.model.sha256 == before.sha256
        assert engine.status()["loads"] == {"ok": 1, "failed": 1}


async def test_first_load_failure_leaves_no_model(node: Node, tmp_path: Path) -> None:
    (tmp_path / "x.onnx").write_bytes(b"\x00" * 10)
    async with Engine(node) as engine:
        with pytest.raises(ModelLoadError):
            await engine.load(tmp_path / "x.onnx")
        with pytest.raises(EngineStateError, match="no model loaded"):
            await engine.infer(_image(0))


async def test_model_breaking_its_output_signature_is_refused_at_load(
    node: Node, tmp_path: Path
) -> None:
    liar = wrong_output_model(tmp_path / "liar.onnx")
    async with Engine(node) as engine:
        before = await engine.load(MODEL_PATH)
        with pytest.raises(OutputSignatureError, match=r"shape \['\?', 2\], got \[1, 3\]"):
            await engine.load(liar)
        assert engine.model is not None and engine.model.sha256 == before.sha256


async def test_model_breaking_its_output_signature_is_refused_at_call(
    node: Node, tmp_path: Path
) -> None:
    liar = wrong_output_model(tmp_path / "liar.onnx")
    async with Engine(node, EngineConfig(warmup_runs=0)) as engine:
        await engine.load(liar)
        feeds = {"x": np.ones((2, 2), np.float32), "x1": np.ones((2, 1), np.float32)}
        with pytest.raises(OutputSignatureError, match="output 'y'"):
            await engine.infer(feeds)
    assert await result_keys(node) == []


async def test_watchdog_fails_a_hung_call_and_the_engine_keeps_serving(node: Node) -> None:
    release = threading.Event()
    entered = threading.Event()

    def pre(inputs: Any) -> Any:
        if isinstance(inputs, str) and inputs == "hang":
            entered.set()
            release.wait(10)  # a hung camera driver, say; released at the end of the test
            return _image(0)
        return inputs

    try:
        async with Engine(node, EngineConfig(timeout_s=0.2), preprocess=pre) as engine:
            await engine.load(MODEL_PATH)
            with pytest.raises(InferenceTimeoutError, match=r"0\.2 s watchdog") as err:
                await engine.infer("hang", key="stuck")
            assert isinstance(err.value, TimeoutError)
            assert entered.is_set()
            assert engine.status()["stuck_workers"] == 1
            # The stuck thread is still stuck, yet calls are served by a fresh worker.
            r = await engine.infer(_image(2), key="after")
            assert r.key.endswith("/after")
            assert await result_keys(node) == [r.key]
    finally:
        release.set()


async def test_too_many_stuck_workers_refuse_calls(node: Node) -> None:
    release = threading.Event()

    def pre(inputs: Any) -> Any:
        release.wait(10)
        return inputs

    try:
        async with Engine(
            node, EngineConfig(timeout_s=0.05, max_stuck_workers=2), preprocess=pre
        ) as engine:
            await engine.load(MODEL_PATH)
            for _ in range(2):
                with pytest.raises(InferenceTimeoutError):
                    await engine.infer(_image(0))
            with pytest.raises(EngineStateError, match="2 worker threads are stuck"):
                await engine.infer(_image(0))
    finally:
        release.set()
    assert await result_keys(node) == []


async def test_crashing_pre_post_or_runtime_is_reported_and_recovered(
    node: Node, tmp_path: Path
) -> None:
    def pre(inputs: Any) -> Any:
        if isinstance(inputs, str):
            raise RuntimeError("sensor unplugged")
        return inputs

    def post(outputs: Any) -> Prediction:
        if float(outputs["probs"][0, 0]) < 0:  # never: see the bad_post below
            raise AssertionError
        return Prediction("x", 1.0)

    async with Engine(node, preprocess=pre, postprocess=post) as engine:
        await engine.load(MODEL_PATH)
        with pytest.raises(
            InferenceRunError, match="preprocess raised RuntimeError: sensor unplugged"
        ):
            await engine.infer("boom")
        assert (await engine.infer(_image(0))).prediction.label == "x"

    def bad_post(outputs: Any) -> Prediction:
        raise KeyError("labels")

    async with Engine(node, EngineConfig(status_name=None), postprocess=bad_post) as engine:
        await engine.load(MODEL_PATH)
        with pytest.raises(InferenceRunError, match="postprocess raised KeyError"):
            await engine.infer(_image(0))

    # A runtime failure inside session.run: Reshape to an impossible shape at run time.
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        "bad_reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("s", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "reshape.onnx"
    path.write_bytes(model.SerializeToString())
    async with Engine(
        node,
        EngineConfig(warmup_runs=0, status_name=None),
        postprocess=lambda o: Prediction("y", 1.0),
    ) as engine:
        await engine.load(path)
        ok = await engine.infer({"x": np.ones(4, np.float32), "s": np.array([4], np.int64)})
        assert ok.outputs["y"].shape == (4,)
        with pytest.raises(InferenceRunError, match=r"session\.run"):
            await engine.infer({"x": np.ones(4, np.float32), "s": np.array([3], np.int64)})
        again = await engine.infer({"x": np.ones(4, np.float32), "s": np.array([4], np.int64)})
    assert len(await result_keys(node)) == 3
    assert again.key != ok.key


async def test_hot_swap_serves_the_new_model_and_records_it(node: Node) -> None:
    async with Engine(node, name="inspect") as engine:
        a = await engine.load(MODEL_PATH)
        r1 = await engine.infer(_image(5))
        b = await engine.load(TRIGGER_PATH)
        r2 = await engine.infer(_image(5))
    assert a.sha256 != b.sha256
    assert (await node.get(r1.key))["model"]["sha256"] == a.sha256
    assert (await node.get(r2.key))["model"]["sha256"] == b.sha256
    assert r1.key.startswith("results/t7/inspect/")


async def test_a_swap_during_calls_finishes_them_on_the_model_they_started_with(
    node: Node,
) -> None:
    gate = threading.Event()
    started = threading.Event()

    def pre(inputs: Any) -> Any:
        started.set()
        gate.wait(5)
        return inputs

    async with Engine(node, EngineConfig(timeout_s=5), preprocess=pre) as engine:
        a = await engine.load(MODEL_PATH)
        call = asyncio.ensure_future(engine.infer(_image(0)))
        await asyncio.to_thread(started.wait, 5)
        b = await engine.load(TRIGGER_PATH)
        gate.set()
        r = await call
    assert r.model.sha256 == a.sha256 != b.sha256


async def test_concurrent_calls_are_micro_batched_with_exact_per_call_results(node: Node) -> None:
    x, _ = canary()
    bare = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    expected = bare.run(None, {"image": x[:64]})[0]
    async with Engine(node, EngineConfig(max_batch=64)) as engine:
        await engine.load(MODEL_PATH)
        results = await asyncio.gather(
            *(engine.infer(x[i : i + 1], key=f"i{i:02d}") for i in range(64))
        )
        status = engine.status()
    assert max(r.batch_size for r in results) > 1
    assert status["batches"]["count"] < 64
    for i, r in enumerate(results):
        assert r.key.endswith(f"/i{i:02d}")
        np.testing.assert_allclose(r.outputs["probs"][0], expected[i], rtol=1e-5, atol=1e-6)
        assert r.outputs["probs"].shape == (1, 2)
    assert len(await result_keys(node)) == 64


async def test_one_bad_call_does_not_fail_its_batch_mates(node: Node) -> None:
    x, _ = canary()
    calls: list[Any] = [x[i : i + 1] for i in range(16)]
    calls[7] = np.full((1, 1, 16, 16), np.nan, np.float32)
    async with Engine(node) as engine:
        await engine.load(MODEL_PATH)
        outcomes = await asyncio.gather(*(engine.infer(c) for c in calls), return_exceptions=True)
    assert isinstance(outcomes[7], NonFiniteInputError)
    assert all(not isinstance(o, BaseException) for i, o in enumerate(outcomes) if i != 7)
    assert len(await result_keys(node)) == 15


async def test_multi_row_calls_and_fixed_batch_models(node: Node, tmp_path: Path) -> None:
    lin = linear_model(tmp_path / "lin.onnx")
    fixed = identity_model(tmp_path / "fixed.onnx", shape=(2, 4))
    async with Engine(
        node, EngineConfig(status_name=None), postprocess=lambda o: Prediction("v", 1.0)
    ) as engine:
        info = await engine.load(lin)
        assert info.batchable and info.name == "lin"
        rs = await asyncio.gather(
            engine.infer(np.ones((3, 4), np.float32)), engine.infer(np.zeros((2, 4), np.float32))
        )
        assert rs[0].outputs["probs"].shape == (3, 3) and rs[1].outputs["probs"].shape == (2, 3)
        info = await engine.load(fixed)
        assert not info.batchable
        rs = await asyncio.gather(*(engine.infer(np.full((2, 4), i, np.float32)) for i in range(5)))
        for i, r in enumerate(rs):
            np.testing.assert_array_equal(r.outputs["y"], np.full((2, 4), i, np.float32))
            assert r.batch_size == 1


async def test_sampling_keeps_inputs_in_a_bounded_telemetry_ring(node: Node) -> None:
    x, _ = canary()
    policy = SamplingPolicy(base_rate=1.0, low_confidence_rate=1.0, max_samples=3)
    async with Engine(node, EngineConfig(sampling=policy, sample_seed=1)) as engine:
        await engine.load(MODEL_PATH)
        results = [await engine.infer(x[i : i + 1]) for i in range(5)]
        await engine.flush()
    samples = await node.scan("telemetry/t7/samples/")
    assert sorted(samples) == [f"telemetry/t7/samples/inspection/{i:05d}" for i in range(3)]
    newest = samples["telemetry/t7/samples/inspection/00000"]  # slot 0 was reused by call 3
    assert newest["result_key"] == results[3].key
    np.testing.assert_array_equal(decode_sample(newest["inputs"])["image"], x[3:4])
    assert (await node.get(results[3].key))["sample"] == "telemetry/t7/samples/inspection/00000"


async def test_sampling_prefers_unsure_cases(node: Node) -> None:
    x, _ = canary()
    probs = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"]).run(
        None, {"image": x[:100]}
    )[0]
    conf = probs.max(axis=1)
    unsure, sure = int(conf.argmin()), int(conf.argmax())
    assert conf[unsure] < conf[sure]
    threshold = float(conf[unsure] + conf[sure]) / 2
    # Never keep a confident case, always keep an unsure one.
    policy = SamplingPolicy(base_rate=0.0, low_confidence_below=threshold, low_confidence_rate=1.0)
    async with Engine(node, EngineConfig(sampling=policy)) as engine:
        await engine.load(MODEL_PATH)
        kept = await engine.infer(x[unsure : unsure + 1])
        skipped = await engine.infer(x[sure : sure + 1])
        await engine.flush()
    assert kept.sample_key is not None and skipped.sample_key is None
    assert list(await node.scan("telemetry/t7/")) == [kept.sample_key]


async def test_escalation_is_async_and_never_blocks_the_local_decision(node: Node) -> None:
    x, _ = canary()
    release = asyncio.Event()
    seen: list[EscalationRequest] = []

    async def to_cloud(req: EscalationRequest) -> None:
        await release.wait()  # the uplink is slow: the local result must not wait for it
        seen.append(req)

    async with Engine(node, EngineConfig(escalate_below=1.01), escalate=to_cloud) as engine:
        await engine.load(MODEL_PATH)
        r = await engine.infer(x[:1], key="unsure")
        assert await node.get(r.key) is not None and seen == []
        release.set()
        await engine.flush()
        assert [s.result_key for s in seen] == [r.key]
        np.testing.assert_array_equal(seen[0].feeds["image"], x[:1])
        engine.escalation_enabled = False  # what the ladder does when it degrades
        await engine.infer(x[1:2])
        await engine.flush()
        assert len(seen) == 1
        assert engine.status()["escalation"]["sent"] == 1


async def test_failing_escalation_is_counted_not_raised(node: Node) -> None:
    async def broken(req: EscalationRequest) -> None:
        raise ConnectionError("uplink down")

    async with Engine(node, EngineConfig(escalate_below=1.01), escalate=broken) as engine:
        await engine.load(MODEL_PATH)
        await engine.infer(_image(0))
        await engine.flush()
        assert engine.status()["escalation"]["failed"] == 1


async def test_latency_histograms_are_in_node_status(node: Node) -> None:
    async with Engine(node) as engine:
        info = await engine.load(MODEL_PATH)
        for i in range(10):
            await engine.infer(_image(i))
        status = await node.status()
    inf = status["inference"]
    assert (
        inf["model"]["sha256"] == info.sha256 and inf["model"]["provider"] == "CPUExecutionProvider"
    )
    (entry,) = inf["latency"]
    assert (entry["sha256"], entry["provider"]) == (info.sha256, "CPUExecutionProvider")
    total = entry["stages"]["total"]
    assert total["count"] == 10
    assert 0 < total["p50_ms"] <= total["p95_ms"] <= total["p99_ms"] <= total["max_ms"]
    assert set(entry["stages"]) == {"queue", "pre", "infer", "post", "total"}
    assert inf["calls"] == inf["ok"] == 10


async def test_strict_provider_refuses_a_silent_fallback(node: Node) -> None:
    # Pretend CUDA is available (or have a GPU build on a machine without the GPU's
    # libraries): ONNX Runtime falls back to the CPU.
    async with Engine(
        node,
        EngineConfig(
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            available=("CUDAExecutionProvider", "CPUExecutionProvider"),
            allow_fallback=False,
        ),
    ) as engine:
        with (
            ort_may_warn_of_missing_providers(),
            pytest.raises(ProviderError, match="fell back to CPUExecutionProvider"),
        ):
            await engine.load(MODEL_PATH)
        assert engine.model is None


async def test_fallback_is_recorded_when_allowed(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    async with Engine(node, EngineConfig(providers=(cuda, cpu), available=(cuda, cpu))) as engine:
        with ort_may_warn_of_missing_providers(), caplog.at_level("WARNING", "syncfw.inference"):
            info = await engine.load(MODEL_PATH)
        assert info.plan.preferred == cuda
        assert info.provider == cpu  # what actually runs, not what was asked
        # Said three ways, whatever the ONNX Runtime build says or does not say itself.
        (warning,) = [r for r in caplog.records if r.name == "syncfw.inference"]
        assert warning.levelname == "WARNING"
        assert f"runs on {cpu}, not {cuda}" in warning.getMessage()
        assert f"could not start {cuda}" in warning.getMessage()
        model = (await node.status())["inference"]["model"]
        assert (model["provider"], model["fell_back"]) == (cpu, True)
        fallbacks = node.metrics.value(
            "syncfw_inference_provider_fallbacks_total",
            model_sha256=info.sha256,
            wanted=cuda,
            running=cpu,
        )
        assert fallbacks == 1
        r = await engine.infer(_image(0))
    assert (await node.get(r.key))["provider"] == cpu


async def test_a_model_on_its_wanted_provider_did_not_fall_back(node: Node) -> None:
    async with Engine(node, EngineConfig(providers=("CPUExecutionProvider",))) as engine:
        info = await engine.load(MODEL_PATH)
        assert info.provider == info.plan.preferred == "CPUExecutionProvider"
        assert (await node.status())["inference"]["model"]["fell_back"] is False


async def test_no_wanted_provider_available(node: Node) -> None:
    async with Engine(
        node,
        EngineConfig(providers=("TensorrtExecutionProvider",), available=("CPUExecutionProvider",)),
    ) as engine:
        with pytest.raises(ProviderError, match="none of the wanted providers"):
            await engine.load(MODEL_PATH)


async def test_closed_engine_refuses_calls_and_loads(node: Node) -> None:
    engine = Engine(node)
    await engine.load(MODEL_PATH)
    await engine.aclose()
    with pytest.raises(EngineStateError, match="closed"):
        await engine.infer(_image(0))
    with pytest.raises(EngineStateError, match="closed"):
        await engine.load(MODEL_PATH)
    await engine.aclose()  # idempotent


async def test_closing_fails_calls_queued_or_running(node: Node) -> None:
    gate = threading.Event()
    started = threading.Event()

    def pre(inputs: Any) -> Any:
        started.set()
        gate.wait(5)
        return inputs

    engine = Engine(node, EngineConfig(timeout_s=10, max_batch=1), preprocess=pre)
    await engine.load(MODEL_PATH)
    running = asyncio.ensure_future(engine.infer(_image(0)))
    queued = asyncio.ensure_future(engine.infer(_image(1)))
    await asyncio.to_thread(started.wait, 5)  # both tasks have run: one in the worker, one queued
    assert engine.status()["queued"] == 1
    try:
        await engine.aclose()
    finally:
        gate.set()
    for call in (running, queued):
        with pytest.raises(EngineStateError, match="closed"):
            await call
    assert await result_keys(node) == []


def test_top_k_handles_probabilities_logits_and_rows() -> None:
    from syncfw.inference import top_k_rows

    p = top_k(np.array([0.1, 0.7, 0.2], np.float32), ["a", "b", "c"], k=2)
    assert p.label == "b"
    assert p.confidence == pytest.approx(0.7, abs=1e-6)
    assert [lbl for lbl, _ in p.top] == ["b", "c"]
    logits = top_k(np.array([[2.0, 0.0]]), ["x"])  # label past the end: its index
    assert logits.label == "x"
    assert logits.confidence == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-6)
    assert logits.top[1][0] == "1"
    first_row = top_k(np.array([[0.9, 0.1], [0.2, 0.8]]), ["ok", "defect"])
    assert first_row.label == "ok"
    rows = top_k_rows(np.array([[0.9, 0.1], [0.2, 0.8], [-1.0, 3.0]]), ["ok", "defect"])
    assert [r.label for r in rows] == ["ok", "defect", "defect"]
    with pytest.raises(OutputSignatureError, match="no class scores"):
        top_k(np.zeros((1, 0)), ["a"])


def test_public_surface_is_exported_and_errors_share_one_root() -> None:
    import inspect

    import syncfw.inference as inference
    from syncfw.errors import SyncfwError

    public = {
        n
        for n, v in vars(inference).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"
    }
    assert public == set(inference.__all__)
    errors = [
        v for v in vars(inference).values() if isinstance(v, type) and issubclass(v, Exception)
    ]
    assert errors
    assert all(issubclass(e, InferenceError) and issubclass(e, SyncfwError) for e in errors)
