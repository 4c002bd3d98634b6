"""Rollouts as ops: the authority's plan, promote and halt, and the node's side of them.

Keys (the ``sys/`` zone: only the authority writes there):

* ``sys/rollouts/<name>/<version>``: the plan (stages, gate, halt_after, min_reports);
* ``sys/rollouts/<name>/<version>/stage``: the current stage index (a promote op);
* ``sys/rollouts/<name>/<version>/halt``: the halt op, with its reason.

And in each node's own zone: ``fleet/<node>/runs/<name>``, its enrolment (it runs the
model, so a stage the hash puts it in waits for it), and ``fleet/<node>/model/<name>``,
its lifecycle record (the report).

The authority's loop (:func:`advance`) reads the members (:func:`members_of`) and every
node's lifecycle record (:func:`~syncfw.models.lifecycle.read_records`), asks the pure rule table
(:func:`~syncfw.models.rollout.decide`) and writes what it says. A node (:func:`follow`)
runs a release only while its rollout is not halted and the node is in the current stage
(:func:`~syncfw.models.rollout.in_stage`): a halt that reaches a partitioned site stops it
on its own, whoever carried the op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from syncfw.errors import ChangeFeedLagged
from syncfw.models.lifecycle import Lifecycle, Record, members_in, records_of
from syncfw.models.manifest import check_name
from syncfw.models.rollout import Decision, Plan, Verdict, decide, in_stage, parse_gate
from syncfw.node import Node
from syncfw.zones import SYS_PREFIX

__all__ = [
    "ROLLOUT_PREFIX",
    "Rollout",
    "advance",
    "authority_loop",
    "follow",
    "members_of",
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
        return {
            "name": p.name,
            "version": p.version,
            "stages": list(p.stages),
            "gate": self.gate_text,
            "stage": self.stage,
            "stage_pct": p.stages[self.stage],
            "halted": self.halted,
            "halt_reason": self.halt_reason,
            "done": self.done,
        }


def plan_value(plan: Plan, gate: str) -> dict[str, Any]:
    """The op value of a rollout plan at :func:`rollout_key` (what :func:`start_rollout` writes)."""
    return _plan_value(plan, gate)


def _plan_value(plan: Plan, gate: str) -> dict[str, Any]:
    return {
        "name": plan.name,
        "version": plan.version,
        "stages": list(plan.stages),
        "gate": gate,
        "halt_after": plan.halt_after,
        "min_reports": plan.min_reports,
    }


async def start_rollout(
    node: Node,
    name: str,
    version: int,
    *,
    stages: tuple[int, ...] = (5, 25, 100),
    gate: str = "accuracy>=-0.02",
    halt_after: int = 1,
    min_reports: float = 1.0,
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
        plan = Plan(
            str(value["name"]),
            int(value["version"]),
            tuple(int(s) for s in value["stages"]),
            parse_gate(gate),
            int(value.get("halt_after", 1)),
            float(value.get("min_reports", 1.0)),
        )
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
        parts = key[len(ROLLOUT_PREFIX) :].split("/")
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        r = _parse(
            value, state.get(f"{key}/stage"), state.get(f"{key}/halt"), state.get(f"{key}/done")
        )
        if r is not None and (r.plan.name, r.plan.version) == (parts[0], int(parts[1])):
            out[(r.plan.name, r.plan.version)] = r
    return dict(sorted(out.items()))


async def read_rollout(node: Node, name: str, version: int | None = None) -> Rollout | None:
    """The rollout of ``name`` at ``version`` (default: the highest version), or None."""
    got = await read_rollouts(node, name)
    if version is not None:
        return got.get((name, version))
    return got[max(got)] if got else None


async def members_of(node: Node, name: str) -> set[str]:
    """The nodes the authority counts in the stages of ``name``'s rollouts.

    A node is a member once its enrolment op (``fleet/<id>/runs/<name>``, written by
    :meth:`Lifecycle.enrol <syncfw.models.lifecycle.Lifecycle.enrol>` the first time
    the node looks at its rollouts, before it runs anything) or any lifecycle record
    of ``name`` reached the authority; it stops being one when it writes that it left.
    The authority never counts itself. A node that never ran the lifecycle of
    ``name`` (a relay, the cloud) is no member: it cannot hold a stage back.
    """
    authority = node.fleet.authority
    return {n for n in members_in(await node.scan("fleet/"), name) if n != authority}


async def advance(node: Node) -> dict[tuple[str, int], Decision]:
    """One pass of the authority's loop: decide every rollout and write promote, halt
    and done ops. A rollout that is done is still decided (a late rollback halts it);
    a halted one is reported and left alone."""
    out: dict[tuple[str, int], Decision] = {}
    fleet_state = await node.scan("fleet/")
    authority = node.fleet.authority
    for (name, version), r in (await read_rollouts(node)).items():
        if r.halted:
            out[(name, version)] = Decision(
                Verdict.HALT, f"the rollout was halted: {r.halt_reason}"
            )
            continue
        members = {n for n in members_in(fleet_state, name) if n != authority}
        reports = [rec.report(n) for n, rec in records_of(fleet_state, name).items()]
        d = decide(r.plan, r.stage, reports, members, halted=r.halted, done=r.done)
        out[(name, version)] = d
        key = rollout_key(name, version)
        if d.verdict is Verdict.PROMOTE and d.next_stage is not None:
            await node.put(f"{key}/stage", {"stage": d.next_stage, "reason": d.reason})
        elif d.verdict is Verdict.HALT:
            await node.put(f"{key}/halt", {"reason": d.reason})
            log.warning(
                "rollout %s %d halted%s: %s",
                name,
                version,
                " after it was done" if r.done else "",
                d.reason,
            )
        elif d.verdict is Verdict.DONE and not r.done:
            await node.put(f"{key}/done", {"reason": d.reason})
    return out


async def _wake_on(
    node: Node,
    prefixes: tuple[str, ...],
    wake: asyncio.Event,
    wanted: Callable[[str], bool] | None = None,
) -> None:
    """Set ``wake`` on every change to a key under ``prefixes`` that ``wanted`` (if
    given) accepts, and once a lagging subscription is renewed, as changes may have
    been missed; returns when the node closes."""
    while True:
        changes = node.changes(keys=wanted, prefixes=prefixes)
        try:
            async for _ in changes:
                wake.set()
        except ChangeFeedLagged:
            wake.set()
            continue
        finally:
            await changes.aclose()
        return


async def authority_loop(
    node: Node,
    *,
    every_s: float = 2.0,
    on_decisions: Callable[[dict[tuple[str, int], Decision]], None] | None = None,
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """The authority's loop: :func:`advance` as soon as a node's lifecycle record or a
    rollout op arrives (a canary's rollback is halted at once, not at the next poll),
    and every ``every_s`` besides. Runs until cancelled.

    Args:
        node: the fleet authority.
        every_s: the poll with no record arriving.
        on_decisions: called with each pass's decisions.
        on_error: called with a pass's error (logged and retried either way).
    """
    wake = asyncio.Event()
    task = asyncio.create_task(
        _wake_on(
            node,
            (ROLLOUT_PREFIX, "fleet/"),
            wake,
            lambda key: key.startswith(ROLLOUT_PREFIX) or "/model/" in key,
        )
    )
    try:
        while True:
            wake.clear()
            try:
                got = await advance(node)
                if on_decisions is not None:
                    on_decisions(got)
            except Exception as exc:  # logged and retried: the node keeps serving
                log.warning("%s: deciding rollouts failed: %s (retrying)", node.node_id, exc)
                if on_error is not None:
                    on_error(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), every_s)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def step(lc: Lifecycle) -> Record | None:
    """The node's side, once: run the current rollout's release if this node is in its stage."""
    await lc.enrol()
    r = await read_rollout(lc.node, lc.name)
    if r is None or not r.runs(lc.node.node_id):
        return lc.record
    rec = lc.record
    if (
        rec is not None
        and rec.version >= r.plan.version
        and rec.step in ("committed", "rolled_back", "failed")
    ):
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
    task = asyncio.create_task(_wake_on(lc.node, (SYS_PREFIX,), wake))
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
