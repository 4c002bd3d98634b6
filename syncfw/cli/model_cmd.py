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
        default=SHIPPED_CANARY,
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
