"""``syncfw demo``: the whole story on loopback, checked at the end.

A cloud aggregator (the fleet authority) with its web dashboard, a depot, four
haul trucks and a factory station, each a node with its own SQLite file,
serving the sync protocol over gRPC on loopback (signed ops and mutual TLS by
default; ``--insecure`` runs the unsigned development mode). The story:

1. connected: every node writes; trucks and the station inspect parts with the
   shipped ONNX model and write each decision, with provenance, to the log;
2. a backbone outage: the cloud and the depot lose the site; the trucks and the
   station keep deciding and gossiping with each other;
3. reconnection: the cloud catches up and every replica is identical;
4. a model rollout with one rollback (:mod:`syncfw.cli.demo_rollout`);
5. the export of every op to an embedded JetStream, when ``nats-server`` is
   installed (otherwise said so and skipped);

and a verified summary (:mod:`syncfw.cli.demo_summary`): a failed check exits 1.

The set-up is :mod:`syncfw.cli.demo_fleet`, acts 1 to 3 are
:mod:`syncfw.cli.demo_acts`. Inference is the optional extra
``syncfw[inference]`` (numpy, onnx, onnxruntime): the demo imports it only when
it runs, so the ``syncfw`` command works on a base install and ``syncfw demo``
there says what to install. The dashboard and the export need ``syncfw[cloud]``;
without it they are skipped, saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from syncfw.cli.demo_fleet import (
    CLOUD,
    DEMO_FLEET,
    DEPOT,
    EDGES,
    MODEL_NAME,
    STATION,
    TRUCKS,
    DemoFleet,
    DemoOptions,
    demo_keys,
)

__all__ = [
    "CLOUD",
    "DEMO_FLEET",
    "DEPOT",
    "EDGES",
    "STATION",
    "TRUCKS",
    "demo",
    "demo_keys",
    "missing_inference",
    "register",
    "run",
]

INFERENCE_MODULES = frozenset({"numpy", "onnx", "onnxruntime"})
"""What ``syncfw[inference]`` adds to a base install."""

INFERENCE_EXTRA = "pip install 'syncfw[inference]'"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run the whole story on loopback: cloud, depot, trucks, a station, an outage, "
        "a rollout with a rollback, JetStream export, a verified summary",
        description="Run a demo fleet on a real gRPC mesh on loopback: a cloud aggregator with "
        "its dashboard, a depot, four trucks and a factory station running inference; a "
        "backbone outage and catch-up; a staged model rollout with one rollback; export to an "
        "embedded JetStream when nats-server is installed. It ends with a verified summary "
        "and exits 1 if any check fails.",
    )
    p.add_argument(
        "--dir", help="keep the nodes' files here, in a new or empty folder (default: a temp dir)"
    )
    p.add_argument("--writes", type=int, default=40, help="writes per node per phase")
    p.add_argument("--frames", type=int, default=20, help="parts each edge inspects per phase")
    p.add_argument("--seed", type=int, default=7, help="seed of the random choices")
    p.add_argument(
        "--quick", action="store_true", help="shorter watch windows and fewer writes (tests, CI)"
    )
    p.add_argument(
        "--http",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where the dashboard listens (port 0: any free one)",
    )
    p.add_argument(
        "--no-nats",
        action="store_true",
        help="skip the JetStream export even when nats-server is installed",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="run the unsigned development mode: no keys, no TLS, no signed releases (anyone "
        "who can sync could forge ops)",
    )
    p.set_defaults(func=run)


def missing_inference() -> str | None:
    """The inference dependency that cannot be imported, or None when the extra is there.

    Raises:
        ModuleNotFoundError: a module other than the extra's is missing (a broken
            install, not a lean one: never reported as "install the extra").
    """
    try:
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        import syncfw.inference.train  # noqa: F401
    except ModuleNotFoundError as exc:
        root = (exc.name or "").partition(".")[0]
        if root in INFERENCE_MODULES:
            return root
        raise
    return None


def run(args: argparse.Namespace) -> int:
    missing = missing_inference()
    if missing is not None:
        print(
            f"syncfw demo: the demo runs embedded inference, which needs the inference extra "
            f"({missing} is not installed): {INFERENCE_EXTRA}",
            file=sys.stderr,
        )
        return 2
    quick = args.quick
    opts = DemoOptions(
        writes=min(args.writes, 20) if quick else args.writes,
        frames=min(args.frames, 8) if quick else args.frames,
        seed=args.seed,
        secure=not args.insecure,
        quick=quick,
        http=args.http,
        nats=not args.no_nats,
    )
    if args.dir:
        folder = Path(args.dir)
        if folder.exists() and any(folder.iterdir()):
            print(
                f"syncfw demo: {folder} is not empty: the demo starts a fleet from scratch "
                "(its releases and rollouts exist once); give a new or empty --dir",
                file=sys.stderr,
            )
            return 2
        folder.mkdir(parents=True, exist_ok=True)
        return _run_in(folder, opts, args)
    with tempfile.TemporaryDirectory(prefix="syncfw-demo-") as tmp:
        return _run_in(Path(tmp), opts, args)


def _run_in(folder: Path, opts: DemoOptions, args: argparse.Namespace) -> int:
    with _logs_to_file(folder, args):
        code, summary = asyncio.run(demo(folder, opts))
        if summary is None:
            return code
        if opts.secure and _model_status(folder) != 0:
            code = 1
    summary.print()
    return code if summary.ok else 1


def _model_status(folder: Path) -> int:
    """The operator's view of the rollouts, from the cloud's file, as the CLI prints it."""
    from syncfw.cli import build_parser

    db = folder / f"{CLOUD}.db"
    print(f"\n$ syncfw model status {MODEL_NAME} --db {db}")
    status = build_parser().parse_args(["model", "status", MODEL_NAME, "--db", str(db)])
    code: int = status.func(status)
    if code != 0:
        print("syncfw model status failed")
    return code


@contextlib.contextmanager
def _logs_to_file(folder: Path, args: argparse.Namespace) -> Iterator[None]:
    """The story on stdout, syncfw's log lines in ``folder/demo.log`` (unless a
    ``--log-level`` or ``-v`` asked for them on stderr)."""
    if getattr(args, "log_level", None) or getattr(args, "verbose", False):
        yield
        return
    from syncfw.cli.logs import configure_logging

    path = folder / "demo.log"
    with path.open("a", encoding="utf-8") as f:
        configure_logging("INFO", getattr(args, "log_format", None) or "text", stream=f)
        print(
            f"log lines go to {path}"
            + ("" if args.dir else " (removed at the end; --dir keeps them)")
        )
        try:
            yield
        finally:
            configure_logging("INFO", getattr(args, "log_format", None) or "text")
            logging.getLogger("syncfw").setLevel(logging.INFO)


async def demo(folder: Path, options: DemoOptions | None = None) -> tuple[int, Any]:
    """Run the story in ``folder``; returns ``(exit status, the verified summary or None)``.

    The summary is None when the story could not finish (a stage timed out: said
    so, status 1). Needs the inference extra (``run`` checks it first).
    """
    import numpy as np

    from syncfw.cli.demo_acts import Ledger, connected, outage, reconnect, same, until
    from syncfw.cli.demo_rollout import rollout
    from syncfw.cli.demo_summary import verify

    opts = options or DemoOptions()
    started = time.perf_counter()
    rng = random.Random(opts.seed)
    frame_rng = np.random.default_rng(opts.seed)
    ledger = Ledger()
    fleet = DemoFleet(folder, opts)
    try:
        await fleet.open()
        await connected(fleet, ledger, rng, frame_rng)
        await outage(fleet, ledger, rng, frame_rng)
        await reconnect(fleet, ledger)
        outcome = None
        if opts.secure:
            outcome = await rollout(fleet, ledger, opts.seed)
        else:
            print(
                "\nact 4, model rollout: skipped in --insecure (releases are signed by the "
                "fleet authority's key)"
            )
        took = await until(lambda: same(fleet.all_nodes()), 60)
        print(
            f"\nact 5, settle: {len(fleet.names)} nodes identical again after {took:.2f} s"
            + ("" if fleet.exporter is None else "; checking the JetStream stream")
        )
        summary = await verify(fleet, ledger, outcome)
        print(f"\nthe story took {time.perf_counter() - started:.1f} s")
        return 0, summary
    except TimeoutError:
        print("NOT CONVERGED: a stage of the story timed out (see the log lines)")
        return 1, None
    finally:
        await fleet.aclose()
