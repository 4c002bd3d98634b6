"""Inference benchmark: bare ``session.run`` against ``Engine.infer`` writing to a real node.

Two models, same inputs, same run:

* a generated conv net (random weights, a few Conv+Relu layers on 1x3x128x128),
  one caller: latency percentiles and items/s, bare vs engine;
* the shipped inspection model, 64 concurrent callers: items/s, bare (one
  ``session.run`` per item, back to back) vs engine (micro-batched, one result
  op per item through the node's group commit);
* the shipped inspection model quantized to INT8 (``syncfw.inference.optimize``,
  the shipped calibration set) against its FP32 self, the floor: canary
  accuracy, single-frame p50/p99 and size, and the deliberately bad INT8
  variant's accuracy.

Bare and engine runs alternate in rounds so drift (thermal, other load) hits
both alike. Prints a table; the LAST line is one JSON object.

Run: ``.venv/bin/python bench/inference.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from syncfw import Fleet, Node
from syncfw.inference import Engine, EngineConfig
from syncfw.inference.train import MODEL_PATH, load_canary
from syncfw.log import Op


def conv_net(path: Path, *, seed: int = 0) -> Path:
    """Four 3x3 Conv+Relu (3→32, 32→64 s2, 64→64, 64→64 s2), global pool, Gemm → 10 classes."""
    rng = np.random.default_rng(seed)
    chans = [(3, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 2)]
    nodes: list[Any] = []
    inits: list[Any] = []
    prev = "x"
    for i, (cin, cout, stride) in enumerate(chans):
        w = (rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}"),
        ]
        nodes.append(
            helper.make_node(
                "Conv",
                [prev, f"w{i}", f"b{i}"],
                [f"c{i}"],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits += [
        numpy_helper.from_array((rng.normal(size=(64, 10)) * 0.3).astype(np.float32), "fw"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fb"),
    ]
    graph = helper.make_graph(
        nodes,
        "bench_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 128, 128])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


class NoLog:
    """A sink that keeps nothing: isolates the engine's own overhead from the node's ``put``.

    Diagnostic only; the headline engine figures write to a real node.
    """

    node_id = "bench"

    def __init__(self) -> None:
        self.seq = 0

    async def put(self, key: str, value: Any) -> Op:
        self.seq += 1
        return Op("bench", self.seq, self.seq, "results/bench/", 0, key, "lww", b"")


CPU = "CPUExecutionProvider"


def bare_session(model: Path, provider: str) -> ort.InferenceSession:
    """The floor: a plain session on ``provider``, refusing to run anywhere else."""
    sess = ort.InferenceSession(str(model), providers=[provider])
    if sess.get_providers()[0] != provider:
        raise SystemExit(f"onnxruntime did not start {provider}: {sess.get_providers()}")
    return sess


def engine_config(provider: str, status_name: str | None) -> EngineConfig:
    return EngineConfig(status_name=status_name, providers=(provider,), allow_fallback=False)


async def bench_conv(
    node: Node, model: Path, *, rounds: int, per_round: int, provider: str = CPU
) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    inputs = [rng.random((1, 3, 128, 128), dtype=np.float32) for _ in range(32)]
    bare = bare_session(model, provider)
    lat: dict[str, list[float]] = {"bare": [], "engine": [], "nolog": []}
    busy: dict[str, float] = {"bare": 0.0, "engine": 0.0, "nolog": 0.0}
    async with (
        Engine(node, engine_config(provider, "inference_conv"), name="conv") as engine,
        Engine(NoLog(), engine_config(provider, None), name="conv") as nolog,
    ):
        await engine.load(model)
        await nolog.load(model)

        async def run_engine(e: Engine, x: np.ndarray) -> None:
            await e.infer(x)

        for i in range(5):  # warm every path alike
            bare.run(None, {"x": inputs[i]})
            await engine.infer(inputs[i])
            await nolog.infer(inputs[i])
        # Interleaved rounds: drift and neighbours' load hit every variant alike.
        for r in range(rounds):
            for variant in ("bare", "engine", "nolog"):
                t_round = time.perf_counter()
                for i in range(per_round):
                    x = inputs[(r * per_round + i) % len(inputs)]
                    t0 = time.perf_counter()
                    if variant == "bare":
                        bare.run(None, {"x": x})
                    else:
                        await (engine if variant == "engine" else nolog).infer(x)
                    lat[variant].append(time.perf_counter() - t0)
                busy[variant] += time.perf_counter() - t_round
        stages = engine.status()["latency"][0]["stages"]
    n = rounds * per_round
    return {
        "bare_p50_ms": pct(lat["bare"], 50) * 1e3,
        "bare_p99_ms": pct(lat["bare"], 99) * 1e3,
        "engine_p50_ms": pct(lat["engine"], 50) * 1e3,
        "engine_p99_ms": pct(lat["engine"], 99) * 1e3,
        "bare_items_per_s": n / busy["bare"],
        "engine_items_per_s": n / busy["engine"],
        "engine_nolog_p50_ms": pct(lat["nolog"], 50) * 1e3,
        "engine_nolog_p99_ms": pct(lat["nolog"], 99) * 1e3,
        "engine_nolog_items_per_s": n / busy["nolog"],
        "_stages": stages,
    }


async def bench_process(node: Node, model: Path, *, n: int) -> dict[str, float]:
    """The price of ``isolation="process"``: per-call IPC on the conv net, and a worker restart."""
    from syncfw.inference.isolation import ProcessSession

    rng = np.random.default_rng(1)
    inputs = [rng.random((1, 3, 128, 128), dtype=np.float32) for _ in range(32)]
    lat: list[float] = []
    async with Engine(
        node, EngineConfig(isolation="process", status_name=None), name="conv_proc"
    ) as engine:
        await engine.load(model)
        for i in range(5):
            await engine.infer(inputs[i])
        t_all = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            await engine.infer(inputs[i % len(inputs)])
            lat.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
    starts: list[float] = []
    data = await asyncio.to_thread(model.read_bytes)
    for _ in range(2):
        t0 = time.perf_counter()
        worker = await asyncio.to_thread(ProcessSession, data, [("CPUExecutionProvider", {})])
        starts.append(time.perf_counter() - t0)
        await asyncio.to_thread(worker.close)
    return {
        "process_p50_ms": pct(lat, 50) * 1e3,
        "process_p99_ms": pct(lat, 99) * 1e3,
        "process_items_per_s": n / total,
        "process_restart_s": statistics.median(starts),
    }


async def bench_small(
    node: Node, *, rounds: int, items: int, callers: int, provider: str = CPU
) -> dict[str, float]:
    x, _ = load_canary()
    inputs = [x[i : i + 1] for i in range(len(x))]
    bare = bare_session(MODEL_PATH, provider)
    bare_rates: list[float] = []
    eng_rates: list[float] = []
    batches: list[int] = []
    async with Engine(node, engine_config(provider, "inference_small")) as engine:
        await engine.load(MODEL_PATH)

        async def caller(c: int, n: int) -> None:
            for i in range(n):
                r = await engine.infer(inputs[(c * n + i) % len(inputs)])
                batches.append(r.batch_size)

        for _ in range(20):
            bare.run(None, {"image": inputs[0]})
        await asyncio.gather(*(caller(c, 4) for c in range(callers)))
        per_caller = max(1, items // callers)
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(per_caller * callers):
                bare.run(None, {"image": inputs[i % len(inputs)]})
            bare_rates.append(per_caller * callers / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            await asyncio.gather(*(caller(c, per_caller) for c in range(callers)))
            eng_rates.append(per_caller * callers / (time.perf_counter() - t0))
    return {
        "small_bare_items_per_s": statistics.median(bare_rates),
        "small_engine_items_per_s": statistics.median(eng_rates),
        "_mean_batch": float(np.mean(batches)),
    }


async def bench_node_put(node: Node, *, n: int, callers: int) -> dict[str, float]:
    """The node alone: what one result-sized ``put`` costs, sequential and with 64 callers."""
    value = {
        "model": {"name": "inspection", "version": "1.0.0", "sha256": "0" * 64},
        "provider": "CPUExecutionProvider",
        "input_digest": "0" * 64,
        "label": "ok",
        "confidence": 0.99,
        "top": [["ok", 0.99], ["defect", 0.01]],
        "latency_ms": {"queue": 0.1, "pre": 0.1, "infer": 0.1, "post": 0.1, "total": 0.4},
        "batch": 1,
        "sample": None,
    }
    lat: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        await node.put(f"results/bench/put/{i}", value)
        lat.append(time.perf_counter() - t0)
    per = max(1, (4 * n) // callers)

    async def caller(c: int) -> None:
        for i in range(per):
            await node.put(f"results/bench/put64/{c}/{i}", value)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    return {
        "node_put_p50_ms": pct(lat, 50) * 1e3,
        "node_put_p99_ms": pct(lat, 99) * 1e3,
        "node_put_items_per_s_64": per * callers / (time.perf_counter() - t0),
    }


def bench_int8(*, repeat: int) -> dict[str, float]:
    """FP32 against INT8 on the canary set (median of ``repeat`` measurements of each)."""
    from syncfw.inference.optimize import evaluate, optimize_int8
    from syncfw.inference.train import BAD_MODEL_PATH, CALIBRATION_PATH, CANARY_PATH

    t0 = time.perf_counter()
    result = optimize_int8(MODEL_PATH, CALIBRATION_PATH, CANARY_PATH)
    optimize_s = time.perf_counter() - t0
    fp32 = [result.fp32] + [evaluate(MODEL_PATH, CANARY_PATH) for _ in range(repeat - 1)]
    int8 = [result.int8] + [evaluate(result.model, CANARY_PATH) for _ in range(repeat - 1)]
    bad = evaluate(BAD_MODEL_PATH, CANARY_PATH)
    return {
        "fp32_accuracy": result.fp32.accuracy,
        "int8_accuracy": result.int8.accuracy,
        "int8_loss_points": result.loss_points,
        "fp32_canary_p50_ms": statistics.median(r.p50_ms for r in fp32),
        "fp32_canary_p99_ms": statistics.median(r.p99_ms for r in fp32),
        "int8_p50_ms": statistics.median(r.p50_ms for r in int8),
        "int8_p99_ms": statistics.median(r.p99_ms for r in int8),
        "int8_size_ratio": result.int8.size / result.fp32.size,
        "int8_optimize_s": optimize_s,
        "bad_int8_accuracy": bad.accuracy,
    }


async def main_async(quick: bool, provider: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model = conv_net(Path(tmp) / "conv.onnx")
        async with Node.open(Path(tmp) / "bench.db", node_id="bench", fleet=Fleet()) as node:
            conv = await bench_conv(
                node,
                model,
                rounds=2 if quick else 6,
                per_round=30 if quick else 150,
                provider=provider,
            )
            small = await bench_small(
                node,
                rounds=1 if quick else 5,
                items=640 if quick else 6400,
                callers=64,
                provider=provider,
            )
            put = await bench_node_put(node, n=200 if quick else 1000, callers=64)
            proc = await bench_process(node, model, n=60 if quick else 300)
    int8 = bench_int8(repeat=1 if quick else 5)
    return conv | small | put | proc | int8


def main() -> int:
    parser = argparse.ArgumentParser(description="bare session.run vs Engine.infer")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument(
        "--provider",
        default=CPU,
        help="the execution provider of the bare session and the engine alike in the conv"
        " and inspection-model runs (e.g. CUDAExecutionProvider); the process-isolation and"
        " INT8 runs stay on CPU",
    )
    args = parser.parse_args()
    if args.provider not in ort.get_available_providers():
        parser.error(f"{args.provider} is not in {ort.get_available_providers()}")
    t0 = time.perf_counter()
    res = asyncio.run(main_async(args.quick, args.provider))
    stages = res.pop("_stages")
    mean_batch = res.pop("_mean_batch")
    print(
        f"onnxruntime {ort.__version__}, {args.provider}, {sys.platform};"
        f" wall {time.perf_counter() - t0:.1f} s"
    )
    print()
    print("conv net 1x3x128x128, one caller      bare        engine      ratio / delta")
    print(
        f"  p50 latency (ms)                 {res['bare_p50_ms']:8.3f}    {res['engine_p50_ms']:8.3f}    {res['engine_p50_ms'] - res['bare_p50_ms']:+.3f} ms"
    )
    print(
        f"  p99 latency (ms)                 {res['bare_p99_ms']:8.3f}    {res['engine_p99_ms']:8.3f}    {res['engine_p99_ms'] - res['bare_p99_ms']:+.3f} ms  (target <= +1)"
    )
    print(
        f"  items/s                          {res['bare_items_per_s']:8.1f}    {res['engine_items_per_s']:8.1f}    x{res['engine_items_per_s'] / res['bare_items_per_s']:.3f}  (target >= 0.95)"
    )
    print(
        f"  engine, results not logged       {res['engine_nolog_p50_ms']:8.3f} p50 {res['engine_nolog_p99_ms']:8.3f} p99"
        f"   x{res['engine_nolog_items_per_s'] / res['bare_items_per_s']:.3f} items/s  (diagnostic: the engine without the node)"
    )
    print(
        "  engine stages p50 (ms): "
        + ", ".join(f"{k} {v['p50_ms']:.3f}" for k, v in stages.items())
    )
    print()
    print("inspection model 1x1x16x16, 64 callers")
    print(
        f"  items/s                          {res['small_bare_items_per_s']:8.0f}    {res['small_engine_items_per_s']:8.0f}    x{res['small_engine_items_per_s'] / res['small_bare_items_per_s']:.3f}  (target >= 0.5)"
    )
    print(f"  mean micro-batch size: {mean_batch:.1f}")
    print()
    print("the node alone (one result-sized put)")
    print(
        f"  sequential put p50 / p99 (ms)    {res['node_put_p50_ms']:8.3f}    {res['node_put_p99_ms']:8.3f}"
    )
    print(
        f"  64 callers, puts/s               {res['node_put_items_per_s_64']:8.0f}    (ceiling for engine items/s)"
    )
    print()
    print('isolation="process" (conv net, one caller)')
    print(
        f"  p50 / p99 latency (ms)           {res['process_p50_ms']:8.3f}    {res['process_p99_ms']:8.3f}"
    )
    print(
        f"  items/s                          {res['process_items_per_s']:8.1f}    x{res['process_items_per_s'] / res['bare_items_per_s']:.3f} of bare"
    )
    print(f"  worker (re)start (s)             {res['process_restart_s']:8.3f}")
    print()
    print("inspection model, FP32 vs static INT8 (400 canary frames, one at a time, 1 thread)")
    print("                                     fp32        int8        ratio / delta")
    print(
        f"  canary accuracy                  {res['fp32_accuracy']:8.4f}    {res['int8_accuracy']:8.4f}    {-res['int8_loss_points']:+.2f} points  (budget -2)"
    )
    print(
        f"  p50 latency (ms)                 {res['fp32_canary_p50_ms']:8.4f}    {res['int8_p50_ms']:8.4f}    x{res['int8_p50_ms'] / res['fp32_canary_p50_ms']:.2f}"
    )
    print(
        f"  p99 latency (ms)                 {res['fp32_canary_p99_ms']:8.4f}    {res['int8_p99_ms']:8.4f}    x{res['int8_p99_ms'] / res['fp32_canary_p99_ms']:.2f}"
    )
    print(f"  size                                          x{res['int8_size_ratio']:.3f}")
    print(
        f"  bad INT8 variant accuracy                    {res['bad_int8_accuracy']:8.4f}    (the gate refuses it)"
    )
    print(f"  quantize + measure both (s)      {res['int8_optimize_s']:8.3f}")
    figures: dict[str, Any] = {
        k: round(v, 4) if k.startswith(("int8", "fp32", "bad")) else round(v, 3)
        for k, v in res.items()
    }
    print(json.dumps(figures | {"provider": args.provider}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
