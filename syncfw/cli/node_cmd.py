"""``syncfw node serve``: run a node in the mesh until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from syncfw.errors import SyncfwError
from syncfw.mesh import Mesh, MeshConfig
from syncfw.transport.network import GrpcNetwork
from syncfw.transport.rpc import TlsConfig, TransportConfig
from syncfw.zones import Fleet, Grant

log = logging.getLogger("syncfw.cli.node")

PRESETS = {"lan": MeshConfig.lan, "metered": MeshConfig.metered_link, "test": MeshConfig.test}


def register(sub: Any) -> None:
    """Add the ``node`` verb to the ``syncfw`` command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "node",
        help="run a node: serve its store to the mesh and gossip with peers",
        description="Run a syncfw node in the mesh.",
    )
    verbs = p.add_subparsers(dest="node_command", metavar="VERB", required=True)
    s: argparse.ArgumentParser = verbs.add_parser(
        "serve",
        aliases=["run"],
        help="open the store, listen, gossip with seeds until SIGINT/SIGTERM",
        description="Open the node's store, serve sync over gRPC and gossip with peers.",
    )
    s.add_argument("db", help="path of the node's SQLite file (created if absent)")
    s.add_argument("--id", required=True, dest="node_id", help="this node's id")
    s.add_argument("--fleet", default="default", help="fleet id (peers of another are refused)")
    s.add_argument("--authority", default="cloud", help="node id of the fleet authority")
    s.add_argument(
        "--shared",
        action="append",
        default=[],
        metavar="PREFIX",
        help="a zone every node may write (repeatable), e.g. site/",
    )
    s.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve on (0: any port)")
    s.add_argument("--advertise", default=None, help="address gossiped to peers, if not --listen")
    s.add_argument("--seed", action="append", default=[], help="a peer address (repeatable)")
    s.add_argument("--preset", choices=sorted(PRESETS), default="lan", help="mesh tunables")
    s.add_argument("--proxy", default=None, help="dial peers via this HTTP CONNECT proxy")
    s.add_argument(
        "--peer-bytes-per-s", type=float, default=None, help="per-peer send budget in bytes/s"
    )
    s.add_argument("--ca", default=None, help="fleet CA certificate (PEM); enables mutual TLS")
    s.add_argument("--cert", default=None, help="this node's certificate (PEM, CN = node id)")
    s.add_argument("--key", default=None, help="this node's private key (PEM)")
    s.add_argument(
        "--status-file",
        default=None,
        help="write status JSON here every --status-every seconds (atomically)",
    )
    s.add_argument("--status-every", type=float, default=1.0, help="seconds between status writes")
    s.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port)",
    )
    s.set_defaults(func=run)


def fleet_of(args: argparse.Namespace) -> Fleet:
    """The fleet bootstrap the arguments describe."""
    return Fleet(
        fleet_id=args.fleet,
        authority=args.authority,
        grants=tuple(Grant.of(p, "*") for p in args.shared),
    )


async def write_status(
    path: Path, node: Any, mesh: Mesh, extra: dict[str, Any] | None = None
) -> None:
    """Write the node's and mesh's status to ``path`` atomically."""
    status = await node.status()
    status["mesh"] = mesh.status()
    status["state_digest"] = await node.state_digest()
    status.update(extra or {})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(status, default=str, sort_keys=True))
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> int:
    """Open the node, join the mesh, run until a signal."""
    from syncfw.node import Node  # the composition root; imported only when serving

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    config = PRESETS[args.preset]()
    if args.peer_bytes_per_s:
        config = config.with_(peer_bytes_per_s=args.peer_bytes_per_s)
    tls = None
    if args.ca or args.cert or args.key:
        if not (args.ca and args.cert and args.key):
            print("syncfw node: --ca, --cert and --key go together")
            return 2
        try:
            tls = TlsConfig.from_files(args.ca, args.cert, args.key)
        except OSError as exc:  # a missing or unreadable PEM file: say which, no traceback
            print(f"syncfw node: cannot read TLS file {exc.filename!r}: {exc.strerror}")
            return 2
    async with Node.open(args.db, node_id=args.node_id, fleet=fleet_of(args)) as node:
        network = GrpcNetwork(
            TransportConfig(
                http_proxy=args.proxy, tls=tls, connect_timeout_s=config.connect_timeout_s
            ),
            metrics=node.metrics,
        )
        mesh = await node.serve(
            args.listen, args.seed, config=config, advertise=args.advertise, network=network
        )
        print(f"listening {mesh.listener.address if mesh.listener else '-'}", flush=True)
        if args.metrics:
            print(f"metrics http://{node.serve_metrics(args.metrics).address}/metrics", flush=True)
        while not stop.is_set():
            if args.status_file:
                await write_status(Path(args.status_file), node, mesh)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.status_every):
                    await stop.wait()
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``syncfw node serve``."""
    try:
        return asyncio.run(serve(args))
    except (SyncfwError, ValueError) as exc:  # ValueError: an invalid node id
        print(f"syncfw node: {exc}")
        return 2
