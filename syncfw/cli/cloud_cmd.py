"""``syncfw cloud run`` and ``syncfw cloud tail``: the aggregator and the change feed's reader.

``cloud run`` opens an :class:`~syncfw.cloud.Aggregator` (the fleet authority,
or with ``--node`` another aggregator beside it; either keeps the whole log in
its own SQLite file), joins the mesh and serves the change feed on the same
port until SIGINT/SIGTERM. ``cloud tail`` reads the
feed of a running aggregator (or any node serving it) and prints one JSON
object per op; its last line on stderr is the vector to resume from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from syncfw.cli.common import fail
from syncfw.errors import FeedPositionError, SyncfwError
from syncfw.mesh import MeshConfig
from syncfw.zones import Fleet, Grant

__all__ = ["parse_vector", "register"]

PRESETS = {"lan": MeshConfig.lan, "metered": MeshConfig.metered_link, "test": MeshConfig.test}


def register(sub: Any) -> None:
    """Add the ``cloud`` verb to the ``syncfw`` command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "cloud",
        help="run the cloud aggregator, or tail its change feed",
        description="The cloud aggregator (fleet view, change feed) and the feed's reader.",
    )
    verbs = p.add_subparsers(dest="cloud_command", metavar="VERB", required=True)
    r: argparse.ArgumentParser = verbs.add_parser(
        "run",
        help="run the aggregator: the fleet authority, the whole log, the change feed",
        description="Open the aggregator's SQLite file, join the mesh, serve the change feed "
        "(syncfw.v1.Feed/Subscribe) on the mesh port and keep the fleet view, until "
        "SIGINT/SIGTERM.",
    )
    r.add_argument("--db", required=True, help="the aggregator's SQLite file")
    r.add_argument("--keys", help="fleet key directory holding the authority's keys "
                   "(syncfw keys init-fleet / add-node AUTHORITY); none: an unsigned fleet")
    r.add_argument("--fleet", default="default", help="fleet id (unsigned fleets; --keys names it)")
    r.add_argument("--authority", default="cloud", help="the authority's node id (unsigned fleets)")
    r.add_argument("--node", metavar="NODE",
                   help="run as this node id, an aggregator beside the authority's (its keys: "
                   "syncfw keys add-node DIR NODE); it builds the view, serves the feed and "
                   "shares export duty, but writes nothing only the authority may "
                   "(default: the authority)")
    r.add_argument("--shared", action="append", default=[], metavar="PREFIX",
                   help="a prefix every node may write (as node serve --shared)")
    r.add_argument("--listen", default="127.0.0.1:7000", help="host:port for the mesh and feed")
    r.add_argument("--advertise", help="the address edges dial, if not --listen")
    r.add_argument("--seed", action="append", default=[], metavar="ADDR", help="a peer to dial")
    r.add_argument("--preset", default="lan", choices=sorted(PRESETS), help="mesh tunables")
    r.add_argument("--metrics", metavar="HOST:PORT", help="serve /metrics (node and fleet series)")
    r.add_argument("--view-file", metavar="FILE",
                   help="write the fleet view (JSON) here every --view-every seconds")
    r.add_argument("--view-every", type=float, default=5.0, help="seconds between view writes")
    r.add_argument("--http", metavar="HOST:PORT",
                   help="serve the web dashboard and its JSON API here (the cloud extra)")
    r.add_argument("--nats", metavar="URL[,URL]",
                   help="export every op to NATS JetStream at these servers (the cloud extra)")
    r.add_argument("--nats-stream", default="SYNCFW", help="the JetStream stream (with --nats)")
    r.add_argument("--nats-replicas", type=int, default=1,
                   help="the stream's replicas when created (3 on a 3-server cluster)")
    r.add_argument("--exporter", action="append", default=[], metavar="NODE",
                   help="node ids sharing export duty with this one (split by a hash of the "
                   "origin; liveness from the mesh)")
    r.set_defaults(func=run)
    t: argparse.ArgumentParser = verbs.add_parser(
        "tail",
        help="print the change feed of a node serving it, one JSON object per op",
        description="Read syncfw.v1.Feed/Subscribe from ADDRESS and print each op as a JSON "
        "line (origin, seq, hlc, key, kind, value, deleted, rejected). On exit (SIGINT, "
        "--limit) the vector to resume from is printed on stderr as 'position {...}'.",
    )
    t.add_argument("address", help="host:port of the aggregator (or a node serving the feed)")
    t.add_argument("--from", dest="since", default="{}", metavar="VV",
                   help="the vector already processed: JSON {\"t1\": 5} or t1=5,t2=3")
    t.add_argument("--prefix", action="append", default=[], help="only keys under this prefix")
    t.add_argument("--include-rejected", action="store_true", help="also ops stored as rejected")
    t.add_argument("--limit", type=int, default=0, help="stop after this many ops (0: never)")
    t.add_argument("--keys", help="fleet key directory (mutual TLS)")
    t.add_argument("--as", dest="identity", metavar="NAME",
                   help="with --keys: a subscriber (subscribers/NAME, from "
                   "syncfw.keyfiles.add_subscriber) or node (nodes/NAME) certificate")
    t.set_defaults(func=tail)


def parse_vector(text: str) -> dict[str, int]:
    """A version vector from ``{"t1": 5}`` or ``t1=5,t2=3``.

    Raises:
        ValueError: neither form, or a seq that is not a non-negative integer.
    """
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a vector is a JSON object")
        items: list[tuple[Any, Any]] = list(raw.items())
    else:
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        if any(len(i) != 2 for i in pairs):
            raise ValueError("a vector is ORIGIN=SEQ,ORIGIN=SEQ")
        items = [(o, s) for o, s in pairs]
    out: dict[str, int] = {}
    for origin, seq in items:
        text_seq = str(seq).strip()
        if isinstance(seq, bool) or not text_seq.isdigit() or not str(origin).strip():
            raise ValueError(f"seq of {str(origin)[:64]!r} is not a non-negative integer: "
                             f"{text_seq[:64]!r}")
        out[str(origin).strip()] = int(text_seq)
    return out


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _run(args: argparse.Namespace) -> int:
    from syncfw.cloud import Aggregator, AggregatorConfig
    from syncfw.keyfiles import load_fleet, load_node

    keys = None
    try:
        grants = tuple(Grant.of(p, "*") for p in args.shared)
        if args.keys:
            trust = load_fleet(args.keys)
            keys = load_node(args.keys, args.node or trust.authority)
            fleet = trust.bind(Fleet(fleet_id=trust.fleet_id, authority=trust.authority,
                                     grants=grants))
        else:
            fleet = Fleet(fleet_id=args.fleet, authority=args.authority, grants=grants)
    except (SyncfwError, ValueError) as exc:
        return fail("cloud", str(exc))
    config = AggregatorConfig(mesh=PRESETS[args.preset]())
    stop = _stop_event()
    try:
        agg = await Aggregator.open(args.db, keys, fleet=fleet, config=config,
                                    node_id=args.node)
    except (SyncfwError, ValueError) as exc:
        return fail("cloud", str(exc))
    dashboard: Any = None
    exporter: Any = None
    try:
        try:
            mesh = await agg.serve(args.listen, args.seed, advertise=args.advertise,
                                   metrics=args.metrics)
        except (SyncfwError, OSError) as exc:
            return fail("cloud", f"cannot serve: {exc}")
        print(f"listening {mesh.address}", flush=True)
        print(f"feed {mesh.address} (syncfw.v1.Feed/Subscribe)", flush=True)
        for server in agg.node.metrics_servers:
            print(f"metrics http://{server.address}/metrics", flush=True)
        dashboard = await _dashboard(agg, args.http) if args.http else None
        if dashboard is False:
            return 2
        exporter = await _exporter(agg, args) if args.nats else None
        if exporter is False:
            return 2
        if keys is None:
            print("WARNING: unsigned fleet (no --keys): any peer can forge any node's ops",
                  flush=True)
        while not stop.is_set():
            if args.view_file:
                _write_view(Path(args.view_file), agg.view())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.view_every):
                    await stop.wait()
    finally:
        if exporter:
            await exporter.aclose()
        if dashboard:
            await dashboard.aclose()
        await agg.aclose()
    return 0


async def _dashboard(agg: Any, listen: str) -> Any:
    """The web dashboard on ``listen``, or False (said why) when it cannot be served."""
    try:
        from syncfw.cloud.web import Dashboard
    except ImportError as exc:
        fail("cloud", f"--http needs the cloud extra (pip install 'syncfw[cloud]'): {exc}")
        return False
    try:
        dash = await Dashboard.start(agg, listen)
    except (ValueError, OSError) as exc:
        fail("cloud", f"cannot serve the dashboard on {listen}: {exc}")
        return False
    print(f"dashboard {dash.url}", flush=True)
    return dash


async def _exporter(agg: Any, args: argparse.Namespace) -> Any:
    """The JetStream exporter (``--nats``), started, or False (said why)."""
    try:
        from syncfw.cloud.export import ExportConfig, Exporter
    except ImportError as exc:
        fail("cloud", f"--nats needs the cloud extra (pip install 'syncfw[cloud]'): {exc}")
        return False
    try:
        cfg = ExportConfig(
            servers=tuple(u.strip() for u in args.nats.split(",") if u.strip()),
            stream=args.nats_stream,
            replicas=args.nats_replicas,
            exporters=tuple(dict.fromkeys([agg.node.node_id, *args.exporter]))
            if args.exporter else (),
        )
    except ValueError as exc:
        fail("cloud", str(exc))
        return False
    exporter = await Exporter.for_aggregator(agg, cfg).start()
    print(f"export nats {','.join(cfg.servers)} stream {cfg.stream} "
          "(state in status()['export'])", flush=True)
    return exporter


def _write_view(path: Path, view: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(view, sort_keys=True, default=str))
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    """``syncfw cloud run``."""
    return asyncio.run(_run(args))


def _tail_tls(args: argparse.Namespace) -> Any:
    from syncfw.transport.rpc import TlsConfig

    if not args.keys:
        if args.identity:
            raise ValueError("--as needs --keys")
        return None
    if not args.identity:
        raise ValueError("--keys needs --as NAME (a subscriber or node of the fleet)")
    root = Path(args.keys)
    for folder in (root / "subscribers" / args.identity, root / "nodes" / args.identity):
        if (folder / "node.crt").is_file():
            return TlsConfig.from_files(root / "ca.crt", folder / "node.crt", folder / "node.key")
    raise ValueError(f"no subscriber or node {args.identity!r} in {root}")


async def _tail(args: argparse.Namespace) -> int:
    from syncfw.cloud import Consumer
    from syncfw.node.admin import to_json
    from syncfw.transport.base import LinkError

    try:
        since = parse_vector(args.since)
        tls = _tail_tls(args)
    except (ValueError, OSError) as exc:
        return fail("cloud tail", str(exc), stream=sys.stderr)
    stop = _stop_event()
    consumer = Consumer(args.address, since=since, prefixes=args.prefix,
                        include_rejected=args.include_rejected, tls=tls)
    n = 0
    code = 0
    try:
        reader = asyncio.ensure_future(consumer.__anext__())
        waiter = asyncio.ensure_future(stop.wait())
        while True:
            done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                reader.cancel()
                break
            item = reader.result()
            print(json.dumps({
                "origin": item.origin, "seq": item.seq, "hlc": item.hlc, "key": item.key,
                "kind": item.kind, "value": to_json(item.value), "deleted": item.deleted,
                "rejected": item.rejected,
            }), flush=True)
            n += 1
            if args.limit and n >= args.limit:
                waiter.cancel()
                break
            reader = asyncio.ensure_future(consumer.__anext__())
    except FeedPositionError as exc:
        code = fail("cloud tail", f"{exc} (missing {exc.missing})", stream=sys.stderr)
    except LinkError as exc:
        code = fail("cloud tail", str(exc), stream=sys.stderr)
    finally:
        print(f"position {json.dumps(consumer.position, sort_keys=True)}", file=sys.stderr,
              flush=True)
        with contextlib.suppress(Exception):
            await consumer.aclose()
    return code


def tail(args: argparse.Namespace) -> int:
    """``syncfw cloud tail``."""
    return asyncio.run(_tail(args))
