"""``syncfw inspect DB``: what a store file holds, without changing it."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from syncfw.errors import SyncfwError
from syncfw.store.inspect import check_store, inspect_store
from syncfw.store.lease import read_lease, write_lease
from syncfw.store.lock import FileLock


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "inspect",
        help="show a node's store: node id, HLC, version vector, zones, rejected ops, sizes",
        description="Describe a syncfw store file (read-only).",
    )
    p.add_argument("db", help="path of the node's SQLite file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--check",
        action="store_true",
        help="check the file instead (PRAGMA quick_check and every origin's hash chain); "
        "exit 1 with the findings if it is damaged",
    )
    p.add_argument(
        "--accept-lost-ops",
        action="store_true",
        help="the file lost ops of its own node's chain (a lost WAL, an older backup) and no "
        "peer can hold them: let the node issue those seqs again (rewrites only <db>.head; "
        "the node must be stopped)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if Path(args.db).is_dir():
        # SQLite itself only says "disk I/O error" when asked to open a directory.
        print(f"syncfw inspect: {args.db!r} is a directory, not a syncfw database")
        return 2
    if args.check:
        return _check(args.db)
    if args.accept_lost_ops:
        return _accept_lost_ops(args.db)
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


def _accept_lost_ops(db: str) -> int:
    try:
        lock = FileLock.acquire(db, "syncfw inspect")
    except SyncfwError as exc:
        print(f"syncfw inspect: {exc}; stop the node first")
        return 2
    try:
        info = asyncio.run(inspect_store(db))
        node = str(info["node_id"])
        have = int(info["version_vector"].get(node, 0))
        leased = read_lease(db, node)
        if leased <= have:
            print(f"syncfw inspect: {node}'s chain is whole in {db} (seq {have}); nothing to accept")
            return 0
        write_lease(db, node, have)
        print(
            f"syncfw inspect: accepted the loss of {node}'s ops {have + 1}..{leased}; the node "
            f"will issue them again from seq {have + 1}"
        )
        return 0
    except SyncfwError as exc:
        print(f"syncfw inspect: {exc}")
        return 2
    finally:
        lock.release()


def _check(db: str) -> int:
    try:
        found = asyncio.run(check_store(db))
    except SyncfwError as exc:
        print(f"syncfw inspect: {exc}")
        return 2
    if not found:
        print(f"{db}: ok (quick_check and every origin's hash chain)")
        return 0
    print(f"{db}: DAMAGED ({len(found)} finding(s))")
    for line in found:
        print(f"  {line}")
    return 1
