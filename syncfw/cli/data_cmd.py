"""``syncfw put/get/scan DB|ADDR``: read and write a node's keys, for operators and scripts.

stdout carries only data (JSON: one value for ``get``, one object for ``put``,
one ``{"key": ..., "value": ...}`` line per key for ``scan``); refusals go to
stderr with exit status 2, and ``get`` of an absent key exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from syncfw.cli.common import fail
from syncfw.cli.target import (
    AdminClient,
    Target,
    TargetError,
    fleet_of_file,
    parse_target,
    read_admin_address,
)
from syncfw.errors import DatabaseLockedError, SyncfwError
from syncfw.node.admin import SCAN_LIMIT, to_json

TARGET_HELP = "a node's SQLite file (opened as that node; not while it runs) or ADDR, its admin endpoint host:port"


def register(sub: Any) -> None:
    """Add ``put``, ``get`` and ``scan``."""
    p: argparse.ArgumentParser = sub.add_parser(
        "put",
        help="write one key on a node (its file, or a running node's admin endpoint)",
        description="Write KEY = VALUE as the node would (zone rules apply). VALUE is JSON "
        "unless --string.",
    )
    p.add_argument("target", metavar="DB|ADDR", help=TARGET_HELP)
    p.add_argument("key", help="the key, e.g. trucks/t7/mode")
    p.add_argument("value", help='the value as JSON (42, "night", {"a": 1}), or text with --string')
    p.add_argument("--string", action="store_true", help="store VALUE as a string, not JSON")
    p.set_defaults(func=run_put)

    g: argparse.ArgumentParser = sub.add_parser(
        "get",
        help="print one key's value as JSON (exit 1 if absent)",
        description="Print KEY's current value as JSON; exit 1 if it is absent or deleted.",
    )
    g.add_argument("target", metavar="DB|ADDR", help=TARGET_HELP)
    g.add_argument("key", help="the key")
    g.set_defaults(func=run_get)

    s: argparse.ArgumentParser = sub.add_parser(
        "scan",
        help="print every key under a prefix, one JSON line each",
        description='Print {"key": ..., "value": ...} for each present key under PREFIX, in key order.',
    )
    s.add_argument("target", metavar="DB|ADDR", help=TARGET_HELP)
    s.add_argument("prefix", nargs="?", default="", help="key prefix (all keys when omitted)")
    s.add_argument("--limit", type=int, default=SCAN_LIMIT, help="print at most this many keys")
    s.set_defaults(func=run_scan)


async def _on_file(verb: str, db: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``fn(node)`` on the node the file belongs to (invariant 2 of :mod:`syncfw.cli.target`)."""
    from syncfw.node import Node  # the composition root; imported only when needed

    node_id, fleet = fleet_of_file(db)
    try:
        async with Node.open(db, node_id=node_id, fleet=fleet) as node:
            return await fn(node)
    except DatabaseLockedError as exc:
        address = read_admin_address(db)
        hint = (
            f"; ask the running node instead: syncfw {verb} {address} ..."
            if address
            else "; ask the running node through its admin endpoint (syncfw "
            f"{verb} HOST:PORT ..., the address it printed as 'admin')"
        )
        raise TargetError(f"{exc}{hint}") from None


def _target(verb: str, text: str) -> Target | int:
    try:
        return parse_target(text)
    except TargetError as exc:
        return fail(verb, str(exc), stream=sys.stderr)


def _emit(value: Any) -> None:
    print(json.dumps(to_json(value), sort_keys=True, default=str), flush=True)


def run_put(args: argparse.Namespace) -> int:
    target = _target("put", args.target)
    if isinstance(target, int):
        return target
    if args.string:
        value: Any = args.value
    else:
        try:
            value = json.loads(args.value)
        except ValueError:
            return fail(
                "put",
                f"VALUE {args.value!r} is not JSON (quote a string as JSON, "
                f"'\"{args.value}\"', or pass --string)",
                stream=sys.stderr,
            )

    async def put(node: Any) -> dict[str, Any]:
        op = await node.put(args.key, value)
        return {"key": op.key, "origin": op.origin, "seq": op.seq, "hlc": op.hlc}

    try:
        if target.db is not None:
            answer = asyncio.run(_on_file("put", target.db, put))
        else:
            answer = AdminClient(str(target.address)).call(
                "POST", "/v1/put", body={"key": args.key, "value": value}
            )
    except (TargetError, SyncfwError, ValueError) as exc:
        return fail("put", str(exc), stream=sys.stderr)
    _emit(answer)
    return 0


def run_get(args: argparse.Namespace) -> int:
    target = _target("get", args.target)
    if isinstance(target, int):
        return target
    missing = object()

    async def get(node: Any) -> dict[str, Any]:
        value = await node.get(args.key, missing)
        return {"found": value is not missing, "value": None if value is missing else value}

    try:
        if target.db is not None:
            answer = asyncio.run(_on_file("get", target.db, get))
        else:
            answer = AdminClient(str(target.address)).call("GET", "/v1/get", {"key": args.key})
    except (TargetError, SyncfwError, ValueError) as exc:
        return fail("get", str(exc), stream=sys.stderr)
    if not answer.get("found"):
        print(f"syncfw get: no key {args.key!r}", file=sys.stderr)
        return 1
    _emit(answer.get("value"))
    return 0


def run_scan(args: argparse.Namespace) -> int:
    target = _target("scan", args.target)
    if isinstance(target, int):
        return target
    if args.limit < 1:
        return fail("scan", f"--limit must be >= 1, not {args.limit}", stream=sys.stderr)

    async def scan(node: Any) -> dict[str, Any]:
        items = sorted((await node.scan(args.prefix)).items())
        return {"items": [list(kv) for kv in items[: args.limit]], "more": len(items) > args.limit}

    try:
        if target.db is not None:
            answer = asyncio.run(_on_file("scan", target.db, scan))
        else:
            answer = AdminClient(str(target.address)).call(
                "GET", "/v1/scan", {"prefix": args.prefix, "limit": args.limit}
            )
    except (TargetError, SyncfwError, ValueError) as exc:
        return fail("scan", str(exc), stream=sys.stderr)
    for key, value in answer.get("items", []):
        _emit({"key": key, "value": value})
    if answer.get("more"):
        print(f"syncfw scan: more keys under {args.prefix!r}; raise --limit", file=sys.stderr)
    return 0
