"""``syncfw model VERB``: the model lifecycle, one sub-verb per step.

``optimize`` quantizes a model to INT8 and refuses it when it loses more canary
accuracy than the budget. Each verb is one ``_register_<verb>(verbs)`` that adds
its parser and one ``_<verb>(args)`` that runs it; a new verb is a new pair and
one line in :func:`register`.

Exit status: 0 done, 2 bad input (one line, ``syncfw model VERB: ...``), 3 a
gate refused (both figures printed). numpy and ONNX Runtime are imported inside
the verbs, so ``syncfw --help`` works without the inference extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncfw.cli.common import fail
from syncfw.errors import AccuracyBudgetError, SyncfwError

if TYPE_CHECKING:
    from syncfw.inference.optimize import Optimization, Report

# Where the shipped canary set lies, spelled without importing the inference package.
SHIPPED_CANARY = Path(__file__).resolve().parent.parent / "inference" / "assets" / "canary.npz"
REFUSED = 3
"""Exit status of a verb whose gate refused."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "model",
        help="the model lifecycle: optimize (INT8 under an accuracy budget)",
        description="Model lifecycle verbs. Each verb has its own --help.",
    )
    verbs = p.add_subparsers(dest="model_verb", metavar="VERB", required=True)
    _register_optimize(verbs)
    _register_rollout(verbs)
    _register_status(verbs)


# --- optimize -------------------------------------------------------------------------------


def _register_optimize(verbs: Any) -> None:
    p: argparse.ArgumentParser = verbs.add_parser(
        "optimize",
        help="quantize a model to INT8 and refuse it over the accuracy budget",
        description=(
            "Static INT8 quantization with ONNX Runtime (QDQ, MinMax calibration), then "
            "accuracy and p50/p99 latency of the FP32 and the INT8 model on a labelled canary "
            "set. Over the budget nothing is written and the exit status is 3."
        ),
    )
    p.add_argument("model", help="the FP32 .onnx model")
    p.add_argument(
        "--int8",
        action="store_true",
        help="static INT8 quantization (the one optimization so far; required)",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR|NPZ",
        help="calibration samples: a directory of .npy/.npz files or one .npz "
        "(uint8 frames are scaled to [0, 1]; no labels needed)",
    )
    p.add_argument(
        "--canary",
        metavar="NPZ",
        type=Path,
        default=None,
        help="labelled canary set: .npz with x (samples) and y (labels) "
        "(default: the shipped canary.npz, for the shipped inspection model)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=2.0,
        metavar="POINTS",
        help="largest accuracy loss allowed, in percentage points",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="where the INT8 model goes (default: MODEL.int8.onnx beside the model)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_optimize)


def _optimize(args: argparse.Namespace) -> int:
    err = sys.stderr if args.json else None
    verb = "model optimize"
    model = Path(args.model)
    if not args.int8:
        return fail(verb, "choose an optimization: --int8 (the only one so far)", stream=err)
    if not args.calibration:
        return fail(verb, "--int8 needs --calibration DIR|NPZ (static quantization)", stream=err)
    if not (args.budget >= 0 and args.budget != float("inf")):
        return fail(
            verb, f"--budget must be a number of points >= 0, got {args.budget}", stream=err
        )
    out: Path = args.out or model.with_name(model.stem + ".int8.onnx")
    if out.resolve() == model.resolve():
        return fail(verb, f"--out {out} is the model itself; choose another file", stream=err)
    try:
        from syncfw.inference.optimize import optimize_int8
    except ImportError as exc:
        return fail(
            verb,
            f"needs the inference extra ({exc.name} is missing): pip install 'syncfw[inference]'",
            stream=err,
        )
    try:
        if args.canary is None:
            args.canary = SHIPPED_CANARY
        result = optimize_int8(model, args.calibration, args.canary, budget_points=args.budget)
    except SyncfwError as exc:
        return fail(verb, str(exc), stream=err)
    try:
        result.check()
    except AccuracyBudgetError as exc:
        _show(args, result, out=None, refused=str(exc))
        return REFUSED
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_bytes(result.model)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return fail(verb, f"cannot write {out}: {exc.strerror or exc}", stream=err)
    _show(args, result, out=out, refused=None)
    return 0


def _show(
    args: argparse.Namespace, r: Optimization, *, out: Path | None, refused: str | None
) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "canary": str(args.canary),
                    "canary_samples": r.fp32.n,
                    "budget_points": r.budget_points,
                    "loss_points": round(r.loss_points, 4),
                    "passed": refused is None,
                    "refused": refused,
                    "out": str(out) if out else None,
                    "fp32": r.fp32.as_dict(),
                    "int8": r.int8.as_dict(),
                },
                sort_keys=True,
            )
        )
        return
    print(f"{'':<10}{'FP32':>14}{'INT8':>14}")
    for name, get in _ROWS:
        print(f"{name:<10}{get(r.fp32):>14}{get(r.int8):>14}")
    verdict = "within budget" if refused is None else "OVER BUDGET"
    print(
        f"canary {r.fp32.n} samples ({args.canary}); accuracy loss {r.loss_points:+.2f} points, "
        f"budget {r.budget_points:g}: {verdict}"
    )
    if refused is not None:
        print(f"syncfw model optimize: refused: {refused}; nothing written")
    else:
        print(f"wrote {out} ({r.int8.size} B, sha256 {r.int8.sha256[:12]}...)")


def _ms(value: float) -> str:
    return f"{value:.3f} ms"


_ROWS: list[tuple[str, Callable[[Report], str]]] = [
    ("accuracy", lambda rep: f"{rep.accuracy:.2%}"),
    ("p50", lambda rep: _ms(rep.p50_ms)),
    ("p99", lambda rep: _ms(rep.p99_ms)),
    ("size", lambda rep: f"{rep.size} B"),
]


# --- rollout --------------------------------------------------------------------------------


def _register_rollout(verbs: Any) -> None:
    p: argparse.ArgumentParser = verbs.add_parser(
        "rollout",
        help="start a staged rollout of a release (an authority op)",
        description="Write the rollout plan of NAME VERSION at sys/rollouts/NAME/VERSION on the "
        "authority's file: its stages and gate. Nodes in the current stage run the release; "
        "the authority promotes or halts from their reports.",
    )
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--stages", default="5,25,100", help="percentages, increasing, ending at 100")
    p.add_argument("--gate", default="accuracy>=-0.02", help='e.g. "accuracy>=-0.02,p99_ms<=45"')
    p.add_argument("--halt-after", type=int, default=1, help="rolled-back nodes that halt it")
    p.add_argument("--keys", metavar="DIR", required=True, help="the fleet's key directory")
    p.add_argument("--db", metavar="DB", required=True, help="the authority's database file")
    p.set_defaults(func=_rollout)


def _rollout(args: argparse.Namespace) -> int:
    import asyncio

    from syncfw.cli.target import TargetError, fleet_of_file
    from syncfw.models.rollout import Plan, parse_gate
    from syncfw.node import Node
    from syncfw.trust.keydir import load_fleet, load_node

    verb = "model rollout"
    try:
        stages = tuple(int(s) for s in args.stages.split(","))
        Plan(args.name, args.version, stages, parse_gate(args.gate), args.halt_after)
    except ValueError as exc:
        return fail(verb, str(exc))
    if not Path(args.db).exists():
        return fail(verb, f"no database file {args.db}")

    async def go() -> dict[str, Any]:
        from syncfw.models.rollout_ops import start_rollout

        node_id, fleet = fleet_of_file(args.db)
        keys = load_node(args.keys, node_id)
        fleet = load_fleet(args.keys).bind(fleet)
        async with Node.open(args.db, node_id=node_id, fleet=fleet, keys=keys) as node:
            r = await start_rollout(node, args.name, args.version, stages=stages,
                                    gate=args.gate, halt_after=args.halt_after)
            return r.describe()

    try:
        got = asyncio.run(go())
    except (SyncfwError, TargetError, ValueError, PermissionError) as exc:
        return fail(verb, str(exc))
    print(json.dumps(got, sort_keys=True))
    return 0


# --- status ---------------------------------------------------------------------------------


def _register_status(verbs: Any) -> None:
    p: argparse.ArgumentParser = verbs.add_parser(
        "status",
        help="the fleet's state for one model: who runs what, who is updating, and why",
        description="Read every node's lifecycle record for NAME and the rollouts of NAME "
        "from a node's database file.",
    )
    p.add_argument("name")
    p.add_argument("--db", metavar="DB", required=True, help="any node's database file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from syncfw.cli.target import TargetError, fleet_of_file
    from syncfw.node import Node

    verb = "model status"
    if not Path(args.db).exists():
        return fail(verb, f"no database file {args.db}")

    async def go() -> dict[str, Any]:
        from syncfw.models.lifecycle import read_records
        from syncfw.models.rollout_ops import read_rollouts

        node_id, fleet = fleet_of_file(args.db)
        async with Node.open(args.db, node_id=node_id, fleet=fleet) as node:
            recs = await read_records(node, args.name)
            ros = await read_rollouts(node, args.name)
        return {
            "name": args.name,
            "rollouts": [r.describe() for r in ros.values()],
            "nodes": {n: r.value() for n, r in recs.items()},
        }

    try:
        got = asyncio.run(go())
    except (SyncfwError, TargetError) as exc:
        return fail(verb, str(exc))
    if args.json:
        print(json.dumps(got, sort_keys=True))
        return 0
    for r in got["rollouts"]:
        state = "HALTED: " + r["halt_reason"] if r["halted"] else ("done" if r["done"] else "open")
        print(f"rollout {r['name']} v{r['version']} stages {r['stages']} at {r['stage_pct']} % "
              f"gate {r['gate']}: {state}")
    print(f"{'node':<16}{'serving':>8}{'target':>8}  {'step':<12}reason")
    for n, v in got["nodes"].items():
        print(f"{n:<16}{v['serving_version'] or '-':>8}{v['version']:>8}  {v['step']:<12}"
              f"{v['reason']}")
    return 0
