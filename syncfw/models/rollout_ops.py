"""Rollouts as ops: the authority's plan, promote and halt, and the node's side of them.

Keys (the ``sys/`` zone: only the authority writes there):

* ``sys/rollouts/<name>/<version>``: the plan (stages, gate, halt_after, min_reports);
* ``sys/rollouts/<name>/<version>/stage``: the current stage index (a promote op);
* ``sys/rollouts/<name>/<version>/halt``: the halt op, with its reason.

The authority's loop (:func:`advance`) reads every node's lifecycle record
(:func:`~syncfw.models.lifecycle.read_records`), asks the pure rule table
(:func:`~syncfw.models.rollout.decide`) and writes what it says. A node (:func:`follow`)
runs a release only while its rollout is not halted and the node is in the current stage
(:func:`~syncfw.models.rollout.in_stage`): a halt that reaches a partitioned site stops it
on its own, whoever carried the op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from syncfw.errors import ChangeFeedLagged
from syncfw.models.lifecycle import Lifecycle, Record, read_records
from syncfw.models.manifest import check_name
from syncfw.models.rollout import Decision, Plan, Verdict, decide, in_stage, parse_gate
from syncfw.node import Node
from syncfw.zones import SYS_PREFIX

__all__ = [
    "ROLLOUT_PREFIX",
    "Rollout",
    "advance",
    "follow",
    "plan_value",
    "read_rollout",
    "read_rollouts",
    "rollout_key",
    "rollouts_of",
    "start_rollout",
    "step",
]

log = logging.getLogger("syncfw.models.rollout")

ROLLOUT_PREFIX = f"{SYS_PREFIX}rollouts/"


def rollout_key(name: str, version: int) -> str:
    """``sys/rollouts/<name>/<version>``: the plan's key."""
    return f"{ROLLOUT_PREFIX}{check_name(name)}/{int(version)}"


@dataclass(frozen=True, slots=True)
class Rollout:
    """A plan as the log holds it, with its current stage and whether it halted."""

    plan: Plan
    gate_text: str
    stage: int = 0
    halted: bool = False
    halt_reason: str = ""
    done: bool = False

    def runs(self, node_id: str) -> bool:
        """True if ``node_id`` should run this release now."""
        return not self.halted and in_stage(self.plan, self.stage, node_id)

    def describe(self) -> dict[str, Any]:
        """Plain data (status, the CLI)."""
        p = self.plan
        return {"name": p.name, "version": p.version, "stages": list(p.stages),
                "gate": self.gate_text, "stage": self.stage, "stage_pct": p.stages[self.stage],
                "halted": self.halted, "halt_reason": self.halt_reason, "done": self.done}


def plan_value(plan: Plan, gate: str) -> dict[str, Any]:
    """The op value of a rollout plan at :func:`rollout_key` (what :func:`start_rollout` writes)."""
    return _plan_value(plan, gate)


def _plan_value(plan: Plan, gate: str) -> dict[str, Any]:
    return {"name": plan.name, "version": plan.version, "stages": list(plan.stages),
            "gate": gate, "halt_after": plan.halt_after, "min_reports": plan.min_reports}


async def start_rollout(
    node: Node, name: str, version: int, *, stages: tuple[int, ...] = (5, 25, 100),
    gate: str = "accuracy>=-0.02", halt_after: int = 1, min_reports: float = 1.0,
) -> Rollout:
    """Write a rollout plan (the authority only; the ``sys/`` zone refuses anyone else).

    Raises:
        ValueError: bad stages or gate (nothing written).
        ValueError: a rollout of this release already exists.
        ZoneOwnershipError, NotAuthorityError: this node is not the authority.
    """
    plan = Plan(name, version, tuple(stages), parse_gate(gate), halt_after, min_reports)
    key = rollout_key(name, version)
    if await node.get(key) is not None:
        raise ValueError(f"a rollout of {name} {version} already exists ({key})")
    await node.put(key, _plan_value(plan, gate))
    return Rollout(plan, gate)


def _parse(value: Any, stage: Any, halt: Any, done: Any) -> Rollout | None:
    try:
        gate = str(value["gate"])
        plan = Plan(str(value["name"]), int(value["version"]), tuple(int(s) for s in value["stages"]),
                    parse_gate(gate), int(value.get("halt_after", 1)),
                    float(value.get("min_reports", 1.0)))
    except (KeyError, TypeError, ValueError):
        return None
    idx = 0
    if isinstance(stage, dict) and isinstance(stage.get("stage"), int):
        idx = max(0, min(stage["stage"], len(plan.stages) - 1))
    reason = str(halt.get("reason", "")) if isinstance(halt, dict) else ""
    return Rollout(plan, gate, idx, halt is not None, reason, done is not None)


async def read_rollouts(node: Node, name: str | None = None) -> dict[tuple[str, int], Rollout]:
    """Every rollout ``node`` knows (of ``name``, or all)."""
    return rollouts_of(
        await node.scan(ROLLOUT_PREFIX if name is None else f"{ROLLOUT_PREFIX}{name}/")
    )


def rollouts_of(state: Mapping[str, Any]) -> dict[tuple[str, int], Rollout]:
    """Every rollout in a ``scan("sys/rollouts/...")`` result (pure)."""
    out: dict[tuple[str, int], Rollout] = {}
    for key, value in state.items():
        parts = key[len(ROLLOUT_PREFIX):].split("/")
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        r = _parse(value, state.get(f"{key}/stage"), state.get(f"{key}/halt"),
                   state.get(f"{key}/done"))
        if r is not None and (r.plan.name, r.plan.version) == (parts[0], int(parts[1])):
            out[(r.plan.name, r.plan.version)] = r
    return dict(sorted(out.items()))


async def read_rollout(node: Node, name: str, version: int | None = None) -> Rollout | None:
    """The rollout of ``name`` at ``version`` (default: the highest version), or None."""
    got = await read_rollouts(node, name)
    if version is not None:
        return got.get((name, version))
    return got[max(got)] if got else None


async def members_of(node: Node) -> set[str]:
    """The nodes the authority counts: those reporting anything under ``fleet/<id>/model``."""
    out: set[str] = set()
    for key in await node.scan("fleet/"):
        parts = key.split("/")
        if len(parts) >= 3 and parts[2] == "model" and parts[1] != node.fleet.authority:
            out.add(parts[1])
    return out


async def advance(node: Node) -> dict[tuple[str, int], Decision]:
    """One pass of the authority's loop: decide every open rollout and write promote/halt ops."""
    out: dict[tuple[str, int], Decision] = {}
    members = await members_of(node)
    for (name, version), r in (await read_rollouts(node)).items():
        if r.done:
            continue
        reports = [rec.report(n) for n, rec in (await read_records(node, name)).items()]
        d = decide(r.plan, r.stage, reports, members, halted=r.halted)
        out[(name, version)] = d
        key = rollout_key(name, version)
        if d.verdict is Verdict.PROMOTE and d.next_stage is not None:
            await node.put(f"{key}/stage", {"stage": d.next_stage, "reason": d.reason})
        elif d.verdict is Verdict.HALT and not r.halted:
            await node.put(f"{key}/halt", {"reason": d.reason})
            log.warning("rollout %s %d halted: %s", name, version, d.reason)
        elif d.verdict is Verdict.DONE:
            await node.put(f"{key}/done", {"reason": d.reason})
    return out


async def step(lc: Lifecycle) -> Record | None:
    """The node's side, once: run the current rollout's release if this node is in its stage."""
    r = await read_rollout(lc.node, lc.name)
    if r is None or not r.runs(lc.node.node_id):
        return lc.record
    rec = lc.record
    if rec is not None and rec.version >= r.plan.version and rec.step in ("committed",
                                                                          "rolled_back", "failed"):
        return rec
    m = await lc.artifacts.release(lc.name, r.plan.version)
    if m is None:
        return rec
    if lc.artifacts.fetcher is None and not lc.artifacts.held(m):
        return rec
    lc.config = replace(lc.config, gate=r.plan.gate)
    return await lc.update(m)


async def follow(lc: Lifecycle, *, every_s: float = 2.0) -> None:
    """Run :func:`step` whenever rollout, release or chunk ops arrive (and every ``every_s``)."""
    wake = asyncio.Event()

    async def feed() -> None:
        while True:
            changes = lc.node.changes()
            try:
                async for ch in changes:
                    if ch.key.startswith(SYS_PREFIX):
                        wake.set()
            except ChangeFeedLagged:
                wake.set()
                continue
            finally:
                await changes.aclose()
            return

    task = asyncio.create_task(feed())
    try:
        while True:
            try:
                await step(lc)
            except Exception as exc:  # a failed step is logged and retried; the model keeps serving
                log.warning("%s: rollout step for %s failed: %s", lc.node.node_id, lc.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), every_s)
            wake.clear()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
