"""Folding a transaction's ops into state rows, before they are written.

:class:`Stage` applies accepted ops to in-memory CRDT states (the lww rule
pre-folded per key with :func:`syncfw.crdt.lww.lww_wins`, ydoc updates checked
and kept as rows of their own (:mod:`.ydocs`: an edit never reads or rewrites
its document), other kinds through :mod:`syncfw.crdt`) and yields the
statements that write them; :func:`stage_grant` applies an authority grant to a
staged copy of the zone table.
"""

from __future__ import annotations

from typing import Any

import msgpack

from syncfw.crdt import KINDS, YDOC, OpView, lww_wins
from syncfw.crdt.ydoc import check_update
from syncfw.errors import DecodeError
from syncfw.log import Op, decode_value
from syncfw.store.sql import UPSERT_LWW, UPSERT_STATE, Step
from syncfw.store.ydocs import INSERT_UPDATE
from syncfw.zones import GRANT_KEY_PREFIX, Grant, ZoneTable


def lww_ok(payload: bytes) -> bool:
    """An lww payload is a tombstone or one well-formed msgpack value."""
    if not payload:
        return True
    try:
        decode_value(payload)
    except DecodeError:
        return False
    return True


class Stage:
    """State changes of one transaction, folded in memory before they are written."""

    __slots__ = ("grants", "lww", "touched", "ydoc")

    def __init__(self) -> None:
        self.lww: dict[str, tuple[int, str, bytes]] = {}
        self.touched: dict[tuple[str, str], int] = {}
        self.grants: list[Grant] = []
        self.ydoc: list[tuple[str, str, int, int, bytes]] = []

    def apply(self, op: Op, states: dict[tuple[str, str], Any]) -> None:
        if op.kind == "lww":
            cand = (op.hlc, op.origin, op.value)
            if lww_wins(cand, self.lww.get(op.key)):
                self.lww[op.key] = cand
            return
        if op.kind == YDOC.name:
            # Checked whole (v1, nothing left over) and stored as it came; the
            # document's state is neither read nor rewritten (.ydocs, invariant 1).
            check_update(op.value)
            self.ydoc.append((op.key, op.origin, op.seq, op.hlc, op.value))
            return
        crdt = KINDS.get(op.kind)
        if crdt is None:
            raise DecodeError(f"unknown op kind {op.kind!r}")
        k = (op.kind, op.key)
        states[k] = crdt.apply(states[k], OpView(op.origin, op.seq, op.hlc, op.value))
        self.touched[k] = max(self.touched.get(k, 0), op.hlc)

    def steps(self, states: dict[tuple[str, str], Any]) -> list[Step]:
        """The statements that write this stage."""
        return [
            (UPSERT_LWW, [(k, h, o, p) for k, (h, o, p) in self.lww.items()]),
            (
                UPSERT_STATE,
                [
                    (kind, key, hlc, KINDS[kind].encode(states[(kind, key)]))
                    for (kind, key), hlc in self.touched.items()
                ],
            ),
            (
                "INSERT OR IGNORE INTO grants (prefix, epoch, owners) VALUES (?, ?, ?)",
                [(g.prefix, g.epoch, msgpack.packb(sorted(g.owners))) for g in self.grants],
            ),
            (INSERT_UPDATE, self.ydoc),
        ]


def stage_grant(zones: ZoneTable, op: Op, stage: Stage) -> str | None:
    """Apply a grant op to ``zones`` (a staged copy); return why it is invalid, if it is."""
    try:
        raw = decode_value(op.value)
        grant = Grant(str(raw["prefix"]), frozenset(str(o) for o in raw["owners"]), int(raw["epoch"]))
    except (DecodeError, KeyError, TypeError, ValueError) as exc:
        return f"malformed grant: {exc}"
    if op.key != GRANT_KEY_PREFIX + grant.prefix:
        return f"grant of {grant.prefix!r} written under the wrong key {op.key!r}"
    reason = zones.check_grant(op.origin, grant)
    if reason is not None:
        return reason
    zones.add_grant(grant)
    stage.grants.append(grant)
    return None
