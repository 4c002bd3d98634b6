"""Factory inspection station: a camera loop running the shipped model into a real syncfw node.

Parts pass the camera at a fixed rate. Each frame is classified ok/defect by the
shipped ONNX model and the result is appended to the node's log with its
provenance. On a schedule the uplink drops and comes back, and later the
battery runs low and the station is plugged in again; the degradation ladder
follows (full → degraded → full → minimal → full), every transition an op.
Unsure cases are escalated to a (simulated) cloud while the link is up, never
blocking the local decision. At the end it prints per-phase figures and the
latency percentiles the engine exposes in node status.

Run: ``.venv/bin/python examples/factory_inspection/run.py`` (about 12 s; see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from syncfw import Fleet, Node
from syncfw.inference import (
    Engine,
    EngineConfig,
    EscalationRequest,
    InferenceError,
    Ladder,
    Mode,
    PowerReading,
    SamplingPolicy,
)
from syncfw.inference.train import IMAGE_SIZE, MODEL_PATH, TRIGGER_PATH, render_part


@dataclass
class Plant:
    """The world the station lives in: the uplink and the power supply (flipped by the schedule)."""

    link_up: bool = True
    battery_pct: float = 90.0
    on_battery: bool = False
    escalated: int = 0
    cloud_refused: int = 0

    def connectivity(self) -> bool:
        return self.link_up

    def power(self) -> PowerReading:
        return PowerReading(battery_pct=self.battery_pct, on_battery=self.on_battery)

    async def cloud(self, req: EscalationRequest) -> None:
        """A stand-in for the cloud's larger model: it takes a while, and needs the link."""
        if not self.link_up:
            self.cloud_refused += 1
            raise ConnectionError("uplink down")
        await asyncio.sleep(0.03)  # simulated round trip to the cloud
        self.escalated += 1


@dataclass
class Phase:
    """Per-phase tallies."""

    name: str
    frames: int = 0
    inferred: int = 0
    correct: int = 0
    errors: int = 0
    modes: Counter[str] = field(default_factory=Counter)


def preprocess(frame: np.ndarray) -> np.ndarray:
    """Camera frame (uint8 HxW) to model input (float32 1x1xHxW in [0, 1])."""
    return (frame.astype(np.float32) / np.float32(255.0)).reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)


def schedule(t: float, plant: Plant) -> str:
    """What happens when (fractions of the run): the link drops, later the battery runs low."""
    if t < 0.30:
        plant.link_up, plant.on_battery, plant.battery_pct = True, False, 90.0
        return "1 connected"
    if t < 0.55:
        plant.link_up = False
        return "2 link down"
    if t < 0.75:
        plant.link_up = True
        return "3 link back"
    if t < 0.90:
        plant.on_battery, plant.battery_pct = True, 15.0
        return "4 battery low"
    plant.on_battery, plant.battery_pct = False, 15.0
    return "5 plugged in"


async def run(seconds: float, rate: float, db: Path, seed: int) -> int:
    plant = Plant()
    rng = np.random.default_rng(seed)
    phases: dict[str, Phase] = {}
    async with Node.open(db, node_id="station-7", fleet=Fleet(fleet_id="factory")) as node:
        primary = Engine(
            node,
            EngineConfig(
                timeout_s=0.5,
                escalate_below=0.8,
                sampling=SamplingPolicy(
                    base_rate=0.02, low_confidence_below=0.75, low_confidence_rate=0.5
                ),
                sample_seed=seed,
            ),
            preprocess=preprocess,
            escalate=plant.cloud,
        )
        trigger = Engine(
            node,
            EngineConfig(timeout_s=0.5, status_name="inference_trigger"),
            preprocess=preprocess,
        )
        await primary.load(MODEL_PATH)
        await trigger.load(TRIGGER_PATH)
        engines = {"primary": primary, "fallback": primary, "trigger": trigger}
        ladder = Ladder(node, connectivity=plant.connectivity, power=plant.power)
        node.add_status_source("ladder", ladder.status)

        period = 1.0 / rate
        n_frames = int(seconds * rate)
        start = time.perf_counter()
        late = 0
        for i in range(n_frames):
            phase_name = schedule(i / n_frames, plant)
            phase = phases.setdefault(phase_name, Phase(phase_name))
            transition = await ladder.poll()
            if transition is not None:
                primary.escalation_enabled = ladder.policy.escalate
                print(
                    f"  t={time.perf_counter() - start:5.2f}s  {transition.previous.value:>8} -> "
                    f"{transition.mode.value:<8} ({transition.reason})"
                )
            defect = bool(rng.random() < 0.5)
            frame = np.round(render_part(rng, defect) * 255).astype(
                np.uint8
            )  # 16x16, as a camera gives it
            phase.frames += 1
            phase.modes[ladder.mode.value] += 1
            if ladder.should_run(i):
                engine = engines[ladder.policy.model]
                try:
                    r = await engine.infer(frame, key=f"item-{i:06d}")
                except InferenceError as exc:
                    phase.errors += 1
                    if phase.errors <= 3:
                        print(f"  item {i}: {type(exc).__name__}: {exc}")
                else:
                    phase.inferred += 1
                    phase.correct += r.prediction.label == ("defect" if defect else "ok")
            # A fixed item rate: the conveyor does not wait for us.
            delay = start + (i + 1) * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late += 1
        elapsed = time.perf_counter() - start
        await primary.flush()
        status = await node.status()
        mode_op = await node.get(ladder.key)
        results = await node.scan("results/station-7/")
        samples = await node.scan("telemetry/station-7/")
        await primary.aclose()
        await trigger.aclose()

    print()
    print(f"{n_frames} frames in {elapsed:.1f} s at {rate:g}/s ({late} late); node file {db}")
    print(f"{'phase':<15}{'mode(s)':<22}{'frames':>7}{'inferred':>9}{'accuracy':>9}{'errors':>7}")
    for p in phases.values():
        modes = ",".join(m for m, _ in p.modes.most_common())
        acc = f"{p.correct / p.inferred:.3f}" if p.inferred else "-"
        print(f"{p.name:<15}{modes:<22}{p.frames:>7}{p.inferred:>9}{acc:>9}{p.errors:>7}")
    print()
    print(
        f"result ops: {len(results)}; sampled inputs kept: {len(samples)}; "
        f"escalated to cloud: {plant.escalated} (refused while offline: {plant.cloud_refused})"
    )
    print(f"transitions logged: {len(ladder.transitions)}; last mode op: {mode_op}")
    print()
    print("latency per (model, provider), from node status (ms)")
    print(
        f"{'model':<12}{'provider':<22}{'stage':<7}{'count':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
    )
    for section in ("inference", "inference_trigger"):
        info: dict[str, Any] = status[section]
        for entry in info["latency"]:
            for stage, h in entry["stages"].items():
                print(
                    f"{info['model']['name']:<12}{entry['provider']:<22}{stage:<7}{h['count']:>6}"
                    f"{h['p50_ms']:>8.3f}{h['p95_ms']:>8.3f}{h['p99_ms']:>8.3f}{h['max_ms']:>8.3f}"
                )
    errors = sum(p.errors for p in phases.values())
    ok = ladder.mode is Mode.FULL and len(ladder.transitions) == 4 and errors == 0 and results
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="factory inspection station demo")
    parser.add_argument("--seconds", type=float, default=12.0, help="run time (default 12)")
    parser.add_argument("--rate", type=float, default=50.0, help="items per second (default 50)")
    parser.add_argument("--db", type=Path, default=None, help="node file (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if args.db is not None:
        return asyncio.run(run(args.seconds, args.rate, args.db, args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(run(args.seconds, args.rate, Path(tmp) / "station.db", args.seed))


if __name__ == "__main__":
    raise SystemExit(main())
