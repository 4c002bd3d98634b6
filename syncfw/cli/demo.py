"""``syncfw demo``: a small fleet on a real gRPC mesh that splits, keeps working, and converges.

Three haul trucks and a depot, each a node with its own SQLite file, serving
the sync protocol over gRPC on loopback and gossiping with each other. Every
node dials its peers through its own egress proxy, which is how the demo cuts
the backbone: the depot is partitioned from the trucks while the trucks keep
talking truck to truck. Meanwhile every truck inspects parts with the shipped
ONNX model (embedded inference) and writes each decision, with provenance,
into its own results zone. Then the link heals and the demo prints each
node's state digest: identical digests mean identical state, and the depot
holds every truck's results.

The fleet is signed and every link is mutual TLS by default: the demo makes the
fleet's keys in its folder (``keys/``: an authority key, a fleet CA, a
certificate and an op-signing key per node, as ``syncfw keys`` does), every
node signs its chain heads and verifies everyone else's. ``--insecure`` runs the
unsigned development mode instead, without TLS.

Inference is the optional extra ``syncfw[inference]`` (numpy, onnx,
onnxruntime): this module imports it only when the demo runs, so the ``syncfw``
command works on a base install and ``syncfw demo`` there says what to install.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncfw.errors import ZoneOwnershipError
from syncfw.keys import results_prefix, status_key
from syncfw.mesh import MeshConfig
from syncfw.node import Node
from syncfw.testing.partition import EgressProxy, Partition
from syncfw.transport.network import GrpcNetwork
from syncfw.transport.rpc import TlsConfig, TransportConfig
from syncfw.trust.keydir import NodeKeys, add_node, init_fleet, load_fleet, load_node
from syncfw.zones import Fleet, Grant

if TYPE_CHECKING:
    import numpy as np

    from syncfw.inference import Engine

INFERENCE_MODULES = frozenset({"numpy", "onnx", "onnxruntime"})
"""What ``syncfw[inference]`` adds to a base install."""

INFERENCE_EXTRA = "pip install 'syncfw[inference]'"
TRUCKS = ("t7", "t9", "t12")
DEPOT = "depot"

DEMO_FLEET = Fleet(
    fleet_id="demo-mine",
    authority=DEPOT,
    grants=(
        *(Grant.of(f"trucks/{t}/", t) for t in TRUCKS),
        Grant.of("site/", "*"),
    ),
)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run a local demo fleet: a gRPC mesh that splits, keeps working, heals, converges",
        description="Run a demo fleet (three trucks and a depot) on a real gRPC mesh on "
        "loopback: writes and inference on every node, a partition, a heal, converged state.",
    )
    p.add_argument("--dir", help="keep the nodes' SQLite files here (default: a temp dir)")
    p.add_argument("--writes", type=int, default=100, help="writes per node per phase")
    p.add_argument("--frames", type=int, default=40, help="parts each truck inspects per phase")
    p.add_argument("--seed", type=int, default=7, help="seed of the random choices")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="run the unsigned development mode: no keys, no TLS (anyone who can sync "
        "could forge ops)",
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
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        return asyncio.run(
            demo(Path(args.dir), args.writes, args.frames, args.seed, secure=not args.insecure)
        )
    with tempfile.TemporaryDirectory(prefix="syncfw-demo-") as tmp:
        return asyncio.run(
            demo(Path(tmp), args.writes, args.frames, args.seed, secure=not args.insecure)
        )


async def _until(cond: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """Poll ``cond`` until true; returns the seconds it took (raises TimeoutError)."""
    start = time.perf_counter()
    async with asyncio.timeout(timeout_s):
        # Convergence is a property of several nodes at once: poll their digests.
        while not await cond():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return time.perf_counter() - start


async def _same(nodes: list[Node]) -> bool:
    return len({await n.state_digest() for n in nodes}) == 1


async def _writes(node: Node, rng: random.Random, n: int, phase: str) -> None:
    me = node.node_id
    tonnes = node.counter("site/ore-tonnes")
    for i in range(n):
        if me in TRUCKS:
            await node.put(
                f"trucks/{me}/position", {"lat": -22.3 + rng.random(), "lon": 118.6, "i": i}
            )
            await tonnes.add(rng.randint(20, 60))
        if rng.random() < 0.05:
            await node.set("site/alerts").add(f"{phase}:{me}:{i}")
        if rng.random() < 0.1:
            await node.put("site/shift-lead", me)
    await node.put(status_key(me), {"phase": phase, "writes": n})


async def _inspect(engine: Engine, rng: np.random.Generator, frames: int, phase: str) -> int:
    """Run the shipped model on synthetic camera frames; returns correct decisions."""
    from syncfw.inference.train import IMAGE_SIZE, render_part  # the extra, checked by run()

    correct = 0
    for i in range(frames):
        defect = bool(rng.random() < 0.5)
        frame = render_part(rng, defect).reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)
        result = await engine.infer(frame, key=f"{phase}-{i:04d}")
        correct += result.prediction.label == ("defect" if defect else "ok")
    return correct


def demo_keys(folder: Path, names: list[str]) -> tuple[Fleet, dict[str, NodeKeys]]:
    """The demo fleet's keys in ``folder/keys`` (made on first use) and the signed fleet."""
    root = folder / "keys"
    if not (root / "fleet.toml").exists():
        init_fleet(root, DEMO_FLEET.fleet_id, DEMO_FLEET.authority)
    for n in names:
        if not (root / "nodes" / n).exists():
            add_node(root, n)
    return load_fleet(root).bind(DEMO_FLEET), {n: load_node(root, n) for n in names}


async def demo(
    folder: Path, writes: int, frames: int, seed: int, *, secure: bool = True
) -> int:
    """Run the demo fleet in ``folder``; returns the exit status (0: converged).

    ``secure`` (the default): a signed fleet over mutual TLS, keys made in
    ``folder/keys``; False: the unsigned development mode, no TLS.

    Needs the inference extra (``run`` checks it first and says what to install).
    """
    import numpy as np

    from syncfw.inference import Engine
    from syncfw.inference.train import MODEL_PATH

    rng = random.Random(seed)
    names = [DEPOT, *TRUCKS]
    partition = Partition()
    proxies = {n: await EgressProxy(n, partition).start() for n in names}
    nodes: dict[str, Node] = {}
    addresses: dict[str, str] = {}
    engines: dict[str, Engine] = {}
    try:
        print(f"fleet {DEMO_FLEET.fleet_id!r}: {', '.join(names)}; SQLite files in {folder}")
        fleet, keys = demo_keys(folder, names) if secure else (DEMO_FLEET, {})
        if secure:
            print(f"  secure: signed ops, mutual TLS; keys made in {folder / 'keys'}")
        else:
            print("  INSECURE (--insecure): unsigned ops, no TLS: development mode only")
        for n in names:
            mine = keys.get(n)
            node = await Node.open(folder / f"{n}.db", node_id=n, fleet=fleet, keys=mine)
            nodes[n] = node
            tls = TlsConfig(mine.ca_pem, mine.cert_pem, mine.key_pem) if mine else None
            seeds = [] if n == DEPOT else [addresses[DEPOT]]
            mesh = await node.serve(
                "127.0.0.1:0",
                seeds,
                config=MeshConfig.test(),
                network=GrpcNetwork(
                    TransportConfig(http_proxy=proxies[n].url, connect_timeout_s=1.0, tls=tls),
                    metrics=node.metrics,
                ),
            )
            addresses[n] = mesh.address
            partition.owners[mesh.address] = n
            print(f"  {n:<6} serving gRPC on {mesh.address}")
        for t in TRUCKS:
            engines[t] = Engine(nodes[t])
            info = await engines[t].load(MODEL_PATH)
        print(
            f"  trucks run {info.name} v{info.version} (sha256 {info.sha256[:12]}) "
            f"on {info.provider}"
        )
        all_nodes = list(nodes.values())
        trucks = [nodes[t] for t in TRUCKS]
        frame_rng = np.random.default_rng(seed)

        await asyncio.gather(
            *(_writes(n, random.Random(rng.random()), writes, "connected") for n in all_nodes)
        )
        took = await _until(lambda: _same(all_nodes), 30)
        print(f"connected: {writes} writes per node, converged over gRPC in {took:.2f} s")

        print("partition: the depot loses the trucks; trucks still reach each other")
        partition.split([DEPOT], TRUCKS)
        _, correct = await asyncio.gather(
            asyncio.gather(
                *(_writes(n, random.Random(rng.random()), writes, "partitioned") for n in all_nodes)
            ),
            asyncio.gather(
                *(_inspect(engines[t], frame_rng, frames, "partitioned") for t in TRUCKS)
            ),
        )
        try:
            await nodes["t9"].put("trucks/t7/position", {"lat": 0, "lon": 0})
        except ZoneOwnershipError as exc:
            print(f"  refused: {exc}")
        took = await _until(lambda: _same(trucks), 30)
        print(
            f"  trucks agree with each other after {took:.2f} s "
            f"({sum(correct)}/{frames * len(TRUCKS)} parts judged right)"
        )
        digests = await _show(all_nodes, "during partition")
        print(
            f"  the depot {'differs' if digests[0] != digests[1] else 'matches'} "
            "(it cannot hear the trucks)"
        )

        partition.heal()
        took = await _until(lambda: _same(all_nodes), 30)
        print(f"heal: converged in {took:.2f} s")
        digests = await _show(all_nodes, "after heal")
        if len(set(digests)) != 1:
            print("NOT CONVERGED")
            return 1
        depot = nodes[DEPOT]
        results = {t: len(await depot.scan(results_prefix(t))) for t in TRUCKS}
        sample = next(iter((await depot.scan(results_prefix(TRUCKS[0]))).values()))
        print(
            "  depot holds the trucks' inference results: "
            + ", ".join(f"{t} {k}" for t, k in results.items())
        )
        print(
            f"  e.g. {sample['model']['name']} said {sample['label']!r} "
            f"(confidence {sample['confidence']:.2f}, provider {sample['provider']})"
        )
        tonnes = await depot.counter("site/ore-tonnes").value()
        print(
            f"converged: identical state on {len(all_nodes)} nodes; ore tonnes {tonnes}, "
            f"shift lead {await depot.get('site/shift-lead')!r}, "
            f"{len(await depot.set('site/alerts').items())} alerts"
        )
        return 0
    except TimeoutError:
        print("NOT CONVERGED: timed out")
        return 1
    finally:
        for engine in engines.values():
            await engine.aclose()
        for node in nodes.values():
            await node.close()
        for proxy in proxies.values():
            with contextlib.suppress(Exception):
                await proxy.aclose()


async def _show(nodes: list[Node], label: str) -> list[str]:
    digests = []
    print(f"  {label}:")
    for n in nodes:
        d = await n.state_digest()
        digests.append(d)
        vv = await n.version_vector()
        print(f"    {n.node_id:<6} state {d[:16]}  vv {dict(sorted(vv.items()))}")
    return digests
