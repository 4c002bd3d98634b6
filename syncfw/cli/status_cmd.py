"""``syncfw status DB|ADDR``: a node's peers, lag, pending and rejected ops, clock offsets.

From a running node's admin endpoint (ADDR, or the address its node wrote
beside DB), or else read-only from the file (no lock taken; peer states and
clock offsets need the running node and show as unknown).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from syncfw.cli.common import fail
from syncfw.cli.target import AdminClient, TargetError, parse_target, read_admin_address
from syncfw.errors import SyncfwError
from syncfw.node.admin import file_status, to_json


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status",
        help="a node's peers (state, last contact, lag in ops and seconds), pending, rejected, clocks",
        description="Show a node's status: from its admin endpoint when it runs, else read-only "
        "from its file.",
    )
    p.add_argument(
        "target",
        metavar="DB|ADDR",
        help="the node's SQLite file, or its admin endpoint host:port",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def collect(text: str) -> tuple[dict[str, Any], str | None]:
    """The snapshot for ``text`` and a note for stderr (why the file was read instead).

    Raises:
        TargetError, SyncfwError: neither the endpoint nor the file can be read.
    """
    target = parse_target(text)
    if target.address is not None:
        return AdminClient(target.address).call("GET", "/v1/status"), None
    db = str(target.db)
    address = read_admin_address(db)
    note = None
    if address is not None:
        try:
            live = AdminClient(address, timeout_s=5.0).call("GET", "/v1/status")
        except TargetError as exc:
            note = f"the node's admin endpoint did not answer ({exc}): read from the file instead"
        else:
            return live, None
    return asyncio.run(file_status(db)), note


def run(args: argparse.Namespace) -> int:
    try:
        snap, note = collect(args.target)
    except (TargetError, SyncfwError) as exc:
        return fail("status", str(exc), stream=sys.stderr)
    if note:
        print(f"syncfw status: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_json(snap), indent=2, sort_keys=True, default=str))
        return 0
    print(render(snap))
    return 0


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _or(value: Any, fmt: str = "{}") -> str:
    return "?" if value is None else fmt.format(value)


def render(snap: dict[str, Any]) -> str:
    """The snapshot as text."""
    where = "the running node" if snap["source"] == "node" else "its file (read-only)"
    lines = [
        f"node      {snap['node_id']}  fleet {snap['fleet_id']}"
        + (f"  at {snap['address']}" if snap.get("address") else ""),
        f"as of     {snap['time_iso']}, from {where}",
        f"log       {snap['ops']} ops, {snap['keys']} keys, "
        + ", ".join(f"{o}:{s}" for o, s in sorted(snap["version_vector"].items())),
    ]
    reasons = snap.get("pending_by_reason") or {}
    held = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()) if n)
    lines.append(
        f"pending   {snap['pending']}"
        + (f" ({held})" if held else "")
        + f"   rejected {snap['rejected']}"
    )
    clocks = snap.get("clock_offset_ms") or {}
    if clocks:
        lines.append(
            "clock     " + ", ".join(f"{s} {ms:+.0f} ms" for s, ms in sorted(clocks.items()))
        )
    peers = snap.get("peers") or []
    if not peers:
        lines.append("peers     none known")
        return "\n".join(lines)
    lines.append("peers")
    head = ("NODE", "ADDRESS", "STATE", "LAST CONTACT", "LAG OPS", "LAG S", "CLOCK MS")
    rows = [
        (
            _or(p.get("node_id")),
            _or(p.get("address"), "{}") if p.get("address") else "-",
            _or(p.get("state")),
            _ago(p.get("last_contact_ago_s")) if snap["source"] == "node" else "?",
            _or(p.get("lag_ops")),
            _or(p.get("lag_s"), "{:.1f}"),
            _or(p.get("clock_offset_ms"), "{:+.0f}"),
        )
        for p in peers
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)
