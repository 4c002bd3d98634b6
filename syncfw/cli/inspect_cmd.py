"""``syncfw inspect DB``: what a store file holds, without changing it."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from syncfw.errors import SyncfwError
from syncfw.store.inspect import inspect_store


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "inspect",
        help="show a node's store: node id, HLC, version vector, zones, rejected ops, sizes",
        description="Describe a syncfw store file (read-only).",
    )
    p.add_argument("db", help="path of the node's SQLite file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if Path(args.db).is_dir():
        # SQLite itself only says "disk I/O error" when asked to open a directory.
        print(f"syncfw inspect: {args.db!r} is a directory, not a syncfw database")
        return 2
    try:
        info = asyncio.run(inspect_store(args.db))
    except SyncfwError as exc:
        print(f"syncfw inspect: {exc}")
        return 2
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    hlc = info["hlc"]
    print(f"file            {info['path']} (schema v{info['schema_version']})")
    print(f"node            {info['node_id']}  fleet {info['fleet_id']}")
    print(f"hlc             {hlc['value']}  ({hlc['physical_ms']} ms + {hlc['logical']})")
    vv = ", ".join(f"{o}:{s}" for o, s in info["version_vector"].items()) or "(empty)"
    print(f"version vector  {vv}")
    sizes, counts = info["sizes"], info["counts"]
    print(
        f"sizes           db {sizes['db_bytes']} B, wal {sizes['wal_bytes']} B; "
        f"{counts['ops']} ops, {counts['state']} keys, {counts['pending']} pending, "
        f"{counts['rejected']} rejected"
    )
    print("zones")
    for z in info["zones"]:
        print(f"  {z['prefix']:<24} epoch {z['epoch']:<4} owners {', '.join(z['owners'])}")
    if info["peers"]:
        print("peers (acknowledged)")
        for peer, vv_ in info["peers"].items():
            print(f"  {peer:<16} " + ", ".join(f"{o}:{s}" for o, s in sorted(vv_.items())))
    if info["rejected"]:
        print("rejected ops")
        for r in info["rejected"]:
            print(f"  ({r['origin']}, {r['seq']}) {r['key']}: {r['reason']}")
    if info["pending"]:
        print("pending ops")
        for r in info["pending"]:
            print(f"  ({r['origin']}, {r['seq']}): {r['reason']}")
    return 0
