"""``syncfw model VERB``: the model lifecycle, one sub-verb per step.

``optimize`` quantizes a model to INT8 and refuses it when it loses more canary
accuracy than the budget; ``publish`` signs a release (chunks beside the authority's
database, the manifest into ``sys/``); ``fetch`` brings a release's chunks from peers
(or follows a running node's fetch) with a progress bar; ``rollout`` writes a staged
rollout; ``status`` shows the fleet. ``publish``, ``rollout`` and ``status`` act on a
node's file (``--db DB``) or on a running node's admin endpoint (``ADDR``). Each verb is one ``_register_<verb>(verbs)`` that adds
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
        help="the model lifecycle: optimize, publish, fetch, rollout, status",
        description="Model lifecycle verbs. Each verb has its own --help.",
    )
    verbs = p.add_subparsers(dest="model_verb", metavar="VERB", required=True)
    _register_optimize(verbs)
    _register_publish(verbs)
    _register_fetch(verbs)
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


# --- targets --------------------------------------------------------------------------------


def _one_target(verb: str, db: str | None, address: str | None) -> tuple[str | None, str | None]:
    """``(db, address)``: exactly one of ``--db DB`` and ``ADDR``.

    Raises:
        ValueError: neither or both, a missing file, or an ADDR that is no ``host:port``.
    """
    from syncfw.cli.common import check_dial_address

    if (db is None) == (address is None):
        raise ValueError("give the node's file (--db DB) or its admin endpoint (ADDR), one of them")
    if db is not None:
        if not Path(db).is_file():
            raise ValueError(f"no database file {db}")
        return db, None
    addr = str(address).removeprefix("http://").rstrip("/")
    why = check_dial_address(addr)
    if why is not None:
        raise ValueError(f"ADDR {address!r} is not an admin endpoint host:port ({why})")
    return None, addr


def _admin_scan(address: str, prefix: str) -> dict[str, Any]:
    from syncfw.cli.target import AdminClient

    got = AdminClient(address).call("GET", "/v1/scan", {"prefix": prefix, "limit": 1 << 30})
    return {k: v for k, v in got["items"]}


def _locked_hint(verb: str, db: str, exc: Exception) -> str:
    from syncfw.cli.target import read_admin_address

    address = read_admin_address(db)
    where = address or "HOST:PORT (the address it printed as 'admin')"
    return f"{exc}; a node runs on it: syncfw model {verb} ... {where}"


# --- publish --------------------------------------------------------------------------------


def _register_publish(verbs: Any) -> None:
    from syncfw.models.manifest import DEFAULT_CHUNK_BYTES

    p: argparse.ArgumentParser = verbs.add_parser(
        "publish",
        help="sign a release: its chunks beside the authority's database, its manifest into sys/",
        description="Cut MODEL into content-addressed chunks stored beside the authority's "
        "database (not in the op log), measure it on the labelled canary set, and write the "
        "manifest signed by the fleet authority's key at sys/models/NAME/VERSION (name, "
        "version, sha256, size, chunk hashes, input/output signature, canary accuracy and "
        "latency). Versions only move forward: a rollback is a new, higher version. Acts on "
        "the authority's file (--db DB) or on the running authority (ADDR, its admin "
        "endpoint; the chunk folder must be on this machine). Prints the manifest as JSON.",
    )
    p.add_argument("model", help="the .onnx file")
    p.add_argument(
        "address", nargs="?", metavar="ADDR", help="the running authority's admin endpoint"
    )
    p.add_argument("--name", required=True, help="model name")
    p.add_argument(
        "--version", type=int, required=True, help="release version (above every one before)"
    )
    p.add_argument("--keys", metavar="DIR", required=True, help="the fleet's key directory")
    p.add_argument("--db", metavar="DB", help="the authority's database file")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        metavar="BYTES",
        help="the size of each content-addressed chunk",
    )
    p.add_argument(
        "--canary",
        type=Path,
        default=None,
        metavar="NPZ",
        help="labelled canary set measured into the manifest (default: the shipped one)",
    )
    p.add_argument("--no-canary", action="store_true", help="publish with no canary figures")
    p.add_argument("--note", default="", help="why this release")
    p.set_defaults(func=_publish)


def _publish(args: argparse.Namespace) -> int:
    import asyncio

    from syncfw.cli.target import TargetError
    from syncfw.errors import DatabaseLockedError

    verb = "model publish"
    try:
        db, address = _one_target(verb, args.db, args.address)
        data = Path(args.model).read_bytes()
    except ValueError as exc:
        return fail(verb, str(exc))
    except OSError as exc:
        return fail(verb, f"cannot read {args.model}: {exc.strerror or exc}")
    try:
        release = _release_of(args, data)
    except ImportError as exc:
        return fail(
            verb,
            f"needs the inference extra ({exc.name} is missing): pip install 'syncfw[inference]'",
        )
    except SyncfwError as exc:
        return fail(verb, str(exc))
    try:
        if db is not None:
            got = asyncio.run(_publish_file(args, db, data, release))
        else:
            assert address is not None
            got = _publish_live(args, address, data, release)
    except DatabaseLockedError as exc:
        return fail(verb, _locked_hint("publish", str(db), exc))
    except (SyncfwError, TargetError, ValueError, OSError) as exc:
        return fail(verb, str(exc))
    print(json.dumps(got, sort_keys=True))
    return 0


def _release_of(args: argparse.Namespace, data: bytes) -> dict[str, Any]:
    """The signature and canary figures of ``data`` (what the manifest records)."""
    from syncfw.inference.manifest import ModelManifest

    mm = ModelManifest.of(data, name=args.name, version=str(args.version))
    out: dict[str, Any] = {
        "inputs": [(t.name, t.dtype, t.shape) for t in mm.inputs],
        "outputs": [(t.name, t.dtype, t.shape) for t in mm.outputs],
        "labels": mm.labels,
    }
    if not args.no_canary:
        from syncfw.inference.optimize import evaluate

        canary = args.canary or SHIPPED_CANARY
        try:
            rep = evaluate(data, canary, label=f"{args.name} v{args.version}")
        except SyncfwError as exc:
            raise SyncfwError(
                f"canary set {canary}: {exc} (--canary NPZ, or --no-canary)"
            ) from None
        out |= {
            "canary_accuracy": rep.accuracy,
            "canary_p50_ms": rep.p50_ms,
            "canary_p99_ms": rep.p99_ms,
        }
    return out


async def _publish_file(
    args: argparse.Namespace, db: str, data: bytes, release: dict[str, Any]
) -> dict[str, Any]:
    from syncfw.cli.target import fleet_of_file
    from syncfw.keyfiles import load_fleet, load_node
    from syncfw.models.artifacts import ArtifactConfig, Artifacts
    from syncfw.node import Node

    node_id, fleet = fleet_of_file(db)
    keys = load_node(args.keys, node_id)
    fleet = load_fleet(args.keys).bind(fleet)
    async with Node.open(db, node_id=node_id, fleet=fleet, keys=keys) as node:
        arts = Artifacts.attach(node, None, config=ArtifactConfig())
        try:
            m = await arts.publish(
                data,
                name=args.name,
                version=args.version,
                key=keys.signing_key,
                chunk_size=args.chunk_size,
                note=args.note,
                **release,
            )
        finally:
            await arts.aclose()
    return m.describe() | {"key": m.key, "chunk_folder": str(arts.store.root)}


def _publish_live(
    args: argparse.Namespace, address: str, data: bytes, release: dict[str, Any]
) -> dict[str, Any]:
    from syncfw.cli.target import AdminClient
    from syncfw.clock import hlc_pack, wall_ms
    from syncfw.keyfiles import load_fleet, load_node
    from syncfw.models.chunks import ChunkStore
    from syncfw.models.manifest import (
        MANIFEST_PREFIX,
        build_manifest,
        judge_releases,
        open_manifest,
        seal_manifest,
    )

    client = AdminClient(address)
    st = client.call("GET", "/v1/status")
    trust = load_fleet(args.keys)
    if st.get("fleet_id") != trust.fleet_id or st.get("node_id") != trust.authority:
        raise ValueError(
            f"{address} is node {st.get('node_id')!r} of fleet {st.get('fleet_id')!r}: only the "
            f"authority {trust.authority!r} of fleet {trust.fleet_id!r} publishes releases"
        )
    folder = ((st.get("models") or {}).get("artifacts") or {}).get("store", {}).get("folder")
    if not folder:
        raise ValueError(f"{address} runs no chunk store (a node without the model side)")
    if not Path(folder).is_dir():
        raise ValueError(
            f"{address}'s chunk folder {folder} is not on this machine: run "
            "publish where the node runs, or on its file with --db"
        )
    manifests: list[Any] = []
    for value in _admin_scan(address, f"{MANIFEST_PREFIX}{args.name}/").values():
        try:
            manifests.append(open_manifest(value, trust.authority_key, trust.fleet_id))
        except SyncfwError:
            continue  # refused releases never count (the node says why in its status)
    latest = judge_releases(manifests).latest
    if latest is not None and args.version <= latest.version:
        raise ValueError(
            f"{args.name} version {args.version} is not above the latest release "
            f"{latest.version}: versions only move forward (a rollback is a new, higher version)"
        )
    issued = max(hlc_pack(wall_ms()), int(st.get("hlc") or 0) + 1)
    m = build_manifest(
        data,
        name=args.name,
        version=args.version,
        chunk_size=args.chunk_size,
        issued=issued,
        note=args.note,
        **release,
    )
    store = ChunkStore(folder, sweep=False)  # beside a running node: never sweep its tmp/
    for i, digest in enumerate(m.chunks):
        store.put(digest, data[i * m.chunk_size : (i + 1) * m.chunk_size])
    sealed = seal_manifest(m, load_node(args.keys, trust.authority).signing_key, trust.fleet_id)
    client.call("POST", "/v1/put", body={"key": m.key, "value": sealed})
    return m.describe() | {"key": m.key, "chunk_folder": folder}


# --- fetch ----------------------------------------------------------------------------------


def _register_fetch(verbs: Any) -> None:
    p: argparse.ArgumentParser = verbs.add_parser(
        "fetch",
        help="bring a release's chunks from peers, with a progress bar (or follow a node's fetch)",
        description="With --db DB --seed HOST:PORT: open the node's file, join the mesh and "
        "fetch the chunks of NAME VERSION (default: the latest release) from whichever peers "
        "advertise them, every chunk verified; what is held already is not fetched again. "
        "With ADDR: follow the fetch a running node makes on its own. The progress bar "
        "(stderr) shows chunks, bytes and where they came from; stdout gets one JSON object.",
    )
    p.add_argument("name")
    p.add_argument("version", nargs="?", help="default: the latest release")
    p.add_argument("address", nargs="?", metavar="ADDR", help="a running node's admin endpoint")
    p.add_argument("--db", metavar="DB", help="the node's database file (not while it runs)")
    p.add_argument(
        "--seed", action="append", default=[], metavar="HOST:PORT", help="a peer (repeatable)"
    )
    p.add_argument("--keys", metavar="DIR", help="this node's key directory (a signed fleet)")
    p.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="give up after S seconds"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_fetch)


def _fetch(args: argparse.Namespace) -> int:
    import asyncio

    from syncfw.cli.target import TargetError
    from syncfw.errors import DatabaseLockedError

    verb = "model fetch"
    if args.version is not None and not args.version.isdigit():
        if args.address is not None:
            return fail(verb, f"VERSION {args.version!r} is not a whole number", stream=sys.stderr)
        args.address, args.version = args.version, None  # fetch NAME ADDR
    args.version = None if args.version is None else int(args.version)
    try:
        db, address = _one_target(verb, args.db, args.address)
        if db is not None and not args.seed:
            raise ValueError("--db needs at least one --seed HOST:PORT to fetch from")
    except ValueError as exc:
        return fail(verb, str(exc), stream=sys.stderr)
    bar = _Bar(args.quiet)
    try:
        with bar:
            if db is not None:
                got = asyncio.run(_fetch_file(args, db, bar))
            else:
                assert address is not None
                got = asyncio.run(_follow_fetch(args, address, bar))
    except DatabaseLockedError as exc:
        return fail(verb, _locked_hint("fetch", str(db), exc), stream=sys.stderr)
    except TimeoutError:
        return fail(verb, f"not done after --timeout {args.timeout:g}s", stream=sys.stderr)
    except (SyncfwError, TargetError, ValueError) as exc:
        return fail(verb, str(exc), stream=sys.stderr)
    print(json.dumps(got, sort_keys=True))
    return 0


class _Bar:
    """The fetch's progress bar on stderr (``rich``): chunks, bytes, rate, and per peer."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bar:
        if not self.quiet:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("chunks {task.fields[mib]:.1f} MiB"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[peers]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def show(
        self,
        what: str,
        held: int,
        total: int,
        bytes_in: int,
        by_peer: dict[str, int],
        skipped: dict[str, str],
    ) -> None:
        if self._progress is None:
            return
        peers = "from " + (
            ", ".join(f"{p} {n / bytes_in:.0%}" for p, n in sorted(by_peer.items()))
            if bytes_in
            else "-"
        )
        if skipped:
            peers += f" (skipped: {', '.join(sorted(skipped))})"
        fields = {"peers": peers, "mib": bytes_in / (1 << 20)}
        if self._task is None:
            self._task = self._progress.add_task(what, total=total, **fields)
        self._progress.update(self._task, description=what, completed=held, total=total, **fields)


def _summary(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "version": p.version,
        "sha256": p.sha256,
        "chunks": p.total,
        "held": p.held,
        "resumed": p.resumed,
        "bytes_in": p.bytes_in,
        "by_peer": dict(p.by_peer),
        "skipped": dict(p.skipped),
        "done": p.done,
    }


async def _fetch_file(args: argparse.Namespace, db: str, bar: _Bar) -> dict[str, Any]:
    import asyncio

    from syncfw.cli.target import fleet_of_file
    from syncfw.mesh import MeshConfig
    from syncfw.models.artifacts import Artifacts
    from syncfw.node import Node
    from syncfw.transport.rpc import TlsConfig

    node_id, fleet = fleet_of_file(db)
    keys, tls = None, None
    if args.keys:
        from syncfw.keyfiles import load_fleet, load_node

        keys = load_node(args.keys, node_id)
        fleet = load_fleet(args.keys).bind(fleet)
        tls = TlsConfig(keys.ca_pem, keys.cert_pem, keys.key_pem)
    async with asyncio.timeout(args.timeout):
        async with Node.open(db, node_id=node_id, fleet=fleet, keys=keys) as node:
            mesh = await node.serve(None, list(args.seed), config=MeshConfig.lan(), tls=tls)
            arts = Artifacts.attach(node, mesh)
            try:
                while True:
                    m = (
                        await arts.release(args.name, args.version)
                        if args.version is not None
                        else await arts.latest(args.name)
                    )
                    if m is not None:
                        break
                    await asyncio.sleep(0.2)
                what = f"{m.name} v{m.version}"
                got = await arts.fetch(
                    m, lambda p: bar.show(what, p.held, p.total, p.bytes_in, p.by_peer, p.skipped)
                )
            finally:
                await arts.aclose()
    return _summary(got)


async def _follow_fetch(args: argparse.Namespace, address: str, bar: _Bar) -> dict[str, Any]:
    import asyncio

    from syncfw.cli.target import AdminClient

    client = AdminClient(address)
    async with asyncio.timeout(args.timeout):
        while True:
            st = await asyncio.to_thread(client.call, "GET", "/v1/status")
            models = st.get("models") or {}
            fetches = (models.get("artifacts") or {}).get("fetches") or {}
            ours = {k: v for k, v in fetches.items() if k.partition(":")[0] == args.name}
            rec = models.get(f"model_lifecycle:{args.name}") or {}
            version = args.version or max(
                [int(k.partition(":")[2]) for k in ours] + [int(rec.get("version") or 0)]
            )
            f = ours.get(f"{args.name}:{version}")
            if f is not None:
                bar.show(
                    f"{args.name} v{version}",
                    f["held"],
                    f["total"],
                    f["bytes_in"],
                    f["by_peer"],
                    f["skipped"],
                )
                if f["done"]:
                    return {
                        "name": args.name,
                        "version": version,
                        "chunks": f["total"],
                        "held": f["held"],
                        "resumed": f["resumed"],
                        "bytes_in": f["bytes_in"],
                        "by_peer": f["by_peer"],
                        "skipped": f["skipped"],
                        "done": True,
                    }
            elif (
                version
                and rec.get("version") == version
                and rec.get("step") not in (None, "downloading")
            ):
                # held before this process started: nothing was fetched
                return {
                    "name": args.name,
                    "version": version,
                    "done": True,
                    "bytes_in": 0,
                    "by_peer": {},
                    "held_before": True,
                    "step": rec.get("step"),
                }
            await asyncio.sleep(0.25)


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
    p.add_argument(
        "address",
        nargs="?",
        metavar="ADDR",
        help="the running authority's admin endpoint (instead of --db)",
    )
    p.add_argument("--keys", metavar="DIR", help="the fleet's key directory (with --db)")
    p.add_argument("--db", metavar="DB", help="the authority's database file")
    p.set_defaults(func=_rollout)


def _rollout(args: argparse.Namespace) -> int:
    import asyncio

    from syncfw.cli.target import TargetError, fleet_of_file
    from syncfw.errors import DatabaseLockedError
    from syncfw.keyfiles import load_fleet, load_node
    from syncfw.models.rollout import Plan, parse_gate
    from syncfw.node import Node

    verb = "model rollout"
    try:
        stages = tuple(int(s) for s in args.stages.split(","))
        Plan(args.name, args.version, stages, parse_gate(args.gate), args.halt_after)
        db, address = _one_target(verb, args.db, args.address)
        if db is not None and not args.keys:
            raise ValueError("--db needs --keys DIR (the authority signs the plan)")
    except ValueError as exc:
        return fail(verb, str(exc))
    if address is not None:
        try:
            got = _rollout_live(args, address, stages)
        except (TargetError, ValueError) as exc:
            return fail(verb, str(exc))
        print(json.dumps(got, sort_keys=True))
        return 0

    async def go() -> dict[str, Any]:
        from syncfw.models.rollout_ops import start_rollout

        node_id, fleet = fleet_of_file(args.db)
        keys = load_node(args.keys, node_id)
        fleet = load_fleet(args.keys).bind(fleet)
        async with Node.open(args.db, node_id=node_id, fleet=fleet, keys=keys) as node:
            r = await start_rollout(
                node,
                args.name,
                args.version,
                stages=stages,
                gate=args.gate,
                halt_after=args.halt_after,
            )
            return r.describe()

    try:
        got = asyncio.run(go())
    except DatabaseLockedError as exc:
        return fail(verb, _locked_hint("rollout", str(db), exc))
    except (SyncfwError, TargetError, ValueError, PermissionError) as exc:
        return fail(verb, str(exc))
    print(json.dumps(got, sort_keys=True))
    return 0


def _rollout_live(
    args: argparse.Namespace, address: str, stages: tuple[int, ...]
) -> dict[str, Any]:
    from syncfw.cli.target import AdminClient
    from syncfw.models.rollout import Plan, parse_gate
    from syncfw.models.rollout_ops import Rollout, plan_value, rollout_key

    client = AdminClient(address)
    key = rollout_key(args.name, args.version)
    if client.call("GET", "/v1/get", {"key": key}).get("found"):
        raise ValueError(f"a rollout of {args.name} {args.version} already exists ({key})")
    plan = Plan(args.name, args.version, stages, parse_gate(args.gate), args.halt_after)
    client.call("POST", "/v1/put", body={"key": key, "value": plan_value(plan, args.gate)})
    return Rollout(plan, args.gate).describe()


# --- status ---------------------------------------------------------------------------------


def _register_status(verbs: Any) -> None:
    p: argparse.ArgumentParser = verbs.add_parser(
        "status",
        help="the fleet's state for one model: who runs what, who is updating, and why",
        description="Read every node's lifecycle record for NAME and the rollouts of NAME "
        "from a node's database file.",
    )
    p.add_argument("name")
    p.add_argument(
        "address",
        nargs="?",
        metavar="ADDR",
        help="a running node's admin endpoint (instead of --db)",
    )
    p.add_argument("--db", metavar="DB", help="any node's database file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from syncfw.cli.target import TargetError, fleet_of_file
    from syncfw.node import Node

    verb = "model status"
    try:
        db, address = _one_target(verb, args.db, args.address)
    except ValueError as exc:
        return fail(verb, str(exc))

    async def go() -> dict[str, Any]:
        if address is not None:
            return await asyncio.to_thread(_status_live, args.name, address)
        from syncfw.models.lifecycle import read_records
        from syncfw.models.rollout_ops import read_rollouts

        node_id, fleet = fleet_of_file(str(db))
        async with Node.open(str(db), node_id=node_id, fleet=fleet) as node:
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
    _print_status(got)
    return 0


def _status_live(name: str, address: str) -> dict[str, Any]:
    from syncfw.models.lifecycle import records_of
    from syncfw.models.rollout_ops import ROLLOUT_PREFIX, rollouts_of

    recs = records_of(_admin_scan(address, "fleet/"), name)
    ros = rollouts_of(_admin_scan(address, f"{ROLLOUT_PREFIX}{name}/"))
    return {
        "name": name,
        "rollouts": [r.describe() for r in ros.values()],
        "nodes": {n: r.value() for n, r in recs.items()},
    }


def _print_status(got: dict[str, Any]) -> None:
    for r in got["rollouts"]:
        state = "HALTED: " + r["halt_reason"] if r["halted"] else ("done" if r["done"] else "open")
        print(
            f"rollout {r['name']} v{r['version']} stages {r['stages']} at {r['stage_pct']} % "
            f"gate {r['gate']}: {state}"
        )
    print(f"{'node':<16}{'serving':>8}{'target':>8}  {'step':<12}reason")
    for n, v in got["nodes"].items():
        print(
            f"{n:<16}{v['serving_version'] or '-':>8}{v['version']:>8}  {v['step']:<12}"
            f"{v['reason']}"
        )
