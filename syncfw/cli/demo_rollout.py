"""The demo's rollout act: a good release reaches the fleet through peers, a bad one halts.

1. The cloud optimizes the shipped model to INT8 under the accuracy budget
   (:func:`syncfw.inference.optimize.optimize_int8`, calibrated on the shipped
   set), publishes it as release 2 (signed manifest, content-addressed chunks) and
   starts a staged rollout (20 % then 100 %, gated on canary accuracy, error rate
   and latency).
2. Every edge runs its lifecycle (:func:`syncfw.models.rollout_ops.follow`): the
   canary stage fetches, validates, hot-swaps and commits; the authority's loop
   (:func:`syncfw.models.rollout_ops.advance`, run here by the cloud) promotes to
   100 %, and the rest fetch the chunks from each other and the depot.
3. The cloud publishes the deliberately bad variant (``inspection_bad.onnx``) as
   release 3 with the same plan: its canaries' validation fails the accuracy
   gate, they roll back to release 2 and say why, and the authority halts the
   rollout; the halt op reaches every node, so the others never run it.

The authority's loop is glue that lives here until the aggregator runs it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from syncfw.cli.demo_acts import Ledger, Load, until
from syncfw.cli.demo_fleet import CLOUD, DEPOT, EDGES, MODEL_NAME, DemoFleet
from syncfw.models.lifecycle import TERMINAL, read_records
from syncfw.models.rollout import Verdict, in_stage
from syncfw.models.rollout_ops import advance, follow, read_rollout, start_rollout

__all__ = ["BAD", "GOOD", "GATE", "STAGES", "RolloutOutcome", "rollout"]

GOOD, BAD = 2, 3
"""The release versions of the act (the factory image is 1.0.0, not a release)."""
STAGES = (20, 100)
GATE = "accuracy>=-0.02,error_rate<=0.01,p99_ms<=250"
CHUNK = 4 << 10


@dataclass
class RolloutOutcome:
    """What the act did, for the verified summary.

    Attributes:
        sha256: release version to its artifact's sha256.
        canaries: the edges in the first stage.
        by_peer: per edge, bytes of release ``GOOD`` fetched from each peer.
        cloud_bytes_out: artifact bytes the cloud uploaded, per caller.
        size: release ``GOOD``'s size in bytes.
        decisions: the authority's verdicts, in order, as printed.
        int8_loss_points: accuracy the INT8 model lost on the canary set.
    """

    sha256: dict[int, str] = field(default_factory=dict)
    canaries: tuple[str, ...] = ()
    by_peer: dict[str, dict[str, int]] = field(default_factory=dict)
    cloud_bytes_out: dict[str, int] = field(default_factory=dict)
    size: int = 0
    decisions: list[str] = field(default_factory=list)
    int8_loss_points: float = 0.0


async def _authority(fleet: DemoFleet, out: RolloutOutcome) -> None:
    """The cloud's rollout loop: decide, write promote/halt/done ops, say what changed."""
    start = time.perf_counter()
    seen: dict[tuple[str, int], tuple[Verdict, int | None]] = {}
    while True:
        try:
            got = await advance(fleet.cloud)
        except Exception as exc:  # logged and retried: the loop must outlive one bad pass
            print(f"  authority: a rollout pass failed: {exc}")
            got = {}
        for (name, version), d in got.items():
            tag = (d.verdict, d.next_stage)
            if d.verdict is Verdict.WAIT or seen.get((name, version)) == tag:
                continue
            seen[(name, version)] = tag
            line = f"authority: {name} v{version} {d.verdict.value.upper()}: {d.reason}"
            out.decisions.append(line)
            print(f"  [{time.perf_counter() - start:5.1f} s] {line}")
        await asyncio.sleep(0.25)


async def _publish(fleet: DemoFleet, data: bytes, version: int, note: str, **figures: Any) -> str:
    arts = fleet.artifacts[CLOUD]
    key = fleet.keys[CLOUD].signing_key
    m = await arts.publish(
        data, name=MODEL_NAME, version=version, key=key, chunk_size=CHUNK, note=note, **figures
    )
    print(
        f"  cloud published {MODEL_NAME} v{version}: {m.size} bytes in {len(m.chunks)} chunks, "
        f"sha256 {m.sha256[:12]}, signed by the authority ({note})"
    )
    depot = fleet.artifacts[DEPOT]

    async def staged() -> bool:
        return depot.held(m)

    # The yard's copy first: the canaries then share the depot's uplink with the cloud's.
    took = await until(staged, 30, every_s=0.05)
    print(f"  the depot holds v{version} {took:.1f} s later (its copy for the yard)")
    return m.sha256


async def _records(fleet: DemoFleet) -> dict[str, Any]:
    return await read_records(fleet.cloud, MODEL_NAME)


def _table(recs: dict[str, Any]) -> None:
    for n, r in recs.items():
        why = f"  ({r.reason[:90]})" if r.reason else ""
        print(f"    {n:<10} serving v{r.serving_version or '-'}  v{r.version} {r.step}{why}")


async def rollout(fleet: DemoFleet, ledger: Ledger, seed: int) -> RolloutOutcome:
    """Act 4 (see the module). Raises TimeoutError if a stage never settles."""
    from syncfw.inference.optimize import optimize_int8
    from syncfw.inference.train import BAD_MODEL_PATH, MODEL_PATH

    out = RolloutOutcome()
    out.canaries = tuple(n for n in EDGES if in_stage_of(n))
    print("\nact 4, model rollout: optimize, sign, stage, gate; one release rolled back")
    assets = MODEL_PATH.parent
    opt = await asyncio.to_thread(
        optimize_int8, MODEL_PATH, assets / "calibration.npz", assets / "canary.npz"
    )
    out.int8_loss_points = opt.check()  # over budget raises AccuracyBudgetError: no release
    print(
        f"  cloud: INT8 under the 2-point budget: fp32 {opt.fp32.accuracy:.3f}, int8 "
        f"{opt.int8.accuracy:.3f} on {opt.fp32.n} canary images (loss "
        f"{out.int8_loss_points:+.2f} points), p99 {opt.int8.p99_ms:.2f} ms"
    )
    load = Load(fleet, ledger, seed)
    load.start("rollout")
    tasks = [asyncio.create_task(_authority(fleet, out), name="demo-authority")]
    tasks += [
        asyncio.create_task(follow(lc, every_s=0.3), name=f"demo-lifecycle-{n}")
        for n, lc in fleet.lifecycles.items()
    ]
    try:
        out.sha256[GOOD] = await _publish(
            fleet,
            opt.model,
            GOOD,
            "INT8, calibrated",
            canary_accuracy=opt.int8.accuracy,
            canary_p50_ms=opt.int8.p50_ms,
            canary_p99_ms=opt.int8.p99_ms,
        )
        out.size = len(opt.model)
        await start_rollout(fleet.cloud, MODEL_NAME, GOOD, stages=STAGES, gate=GATE)
        print(
            f"  rollout v{GOOD}: stages {list(STAGES)} %, gate {GATE}; canaries "
            f"{', '.join(out.canaries)} (by a stable hash of the node id)"
        )

        async def good_everywhere() -> bool:
            recs = await _records(fleet)
            r = await read_rollout(fleet.cloud, MODEL_NAME, GOOD)
            return (
                r is not None
                and r.done
                and all(
                    n in recs and recs[n].version == GOOD and recs[n].step == "committed"
                    for n in EDGES
                )
            )

        took = await until(good_everywhere, 90, every_s=0.1)
        print(
            f"  v{GOOD} committed on all {len(EDGES)} edges in {took:.1f} s, "
            f"{load.calls} inspections served meanwhile:"
        )
        _table(await _records(fleet))
        _sources(fleet, out)

        bad = BAD_MODEL_PATH.read_bytes()
        out.sha256[BAD] = await _publish(fleet, bad, BAD, "INT8, mis-calibrated on purpose")
        await start_rollout(fleet.cloud, MODEL_NAME, BAD, stages=STAGES, gate=GATE)
        print(f"  rollout v{BAD}: stages {list(STAGES)} %, gate {GATE}")

        async def halted_everywhere() -> bool:
            recs = await _records(fleet)
            for n in fleet.names:
                r = await read_rollout(fleet.nodes[n], MODEL_NAME, BAD)
                if r is None or not r.halted:
                    return False
            return all(
                n in recs and (recs[n].version < BAD or recs[n].step in TERMINAL)
                for n in out.canaries
            )

        took = await until(halted_everywhere, 90, every_s=0.1)
        print(f"  v{BAD} halted on every node {took:.1f} s after its rollout began:")
        _table(await _records(fleet))
    finally:
        await load.stop()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
    return out


def in_stage_of(node_id: str) -> bool:
    """True if ``node_id`` is in the act's first stage (a canary)."""
    from syncfw.models.rollout import Plan

    return in_stage(Plan(MODEL_NAME, GOOD, STAGES), 0, node_id)


def _sources(fleet: DemoFleet, out: RolloutOutcome) -> None:
    for n in (DEPOT, *EDGES):
        p = fleet.artifacts[n].fetches.get(f"{MODEL_NAME}:{GOOD}")
        out.by_peer[n] = dict(p.by_peer) if p is not None else {}
    out.cloud_bytes_out = dict(fleet.artifacts[CLOUD].status().get("bytes_out", {}))
    from_peers = sum(b for n in EDGES for src, b in out.by_peer[n].items() if src != CLOUD)
    total = sum(sum(out.by_peer[n].values()) for n in EDGES)
    print(
        f"  chunks of v{GOOD} the edges fetched: {total} bytes, {from_peers} of them from "
        f"peers (not the cloud); the cloud uploaded {sum(out.cloud_bytes_out.values())} bytes "
        f"for {len(EDGES)} edges and the depot ({out.size} bytes each)"
    )
    for n in (DEPOT, *EDGES):
        got = ", ".join(f"{src} {b}" for src, b in sorted(out.by_peer[n].items())) or "none"
        print(f"    {n:<10} from {got}")
