"""Staged rollouts as a pure rule table: who is in a stage, when a stage advances, when
the rollout halts.

A rollout is an authority op (``sys/rollouts/<name>/<version>``) naming the release,
its stages (percentages of the fleet, increasing, ending at 100) and a gate. Each node
reports its model state under ``fleet/<node>/model`` (its own zone). The authority
(the CLI today, the cloud aggregator later) reads the reports, asks :func:`decide`, and
writes what it says as an op: a *promote* to the next stage, or a *halt*. Because the
decision is an op, a partitioned site that learns of a halt stops on its own.

Invariants:

1. Stage membership is a stable hash of the node id (:func:`bucket`: sha256, not
   Python's salted ``hash``), so every replica, in any process, puts a node in the same
   stage, and a node in stage ``k`` is in every later stage too.
2. :func:`decide` is a pure function of the plan, the current stage, the reports and
   the fleet's members, written as an ordered rule table (:data:`RULES`): the first
   rule that applies wins. The same inputs give the same decision on every replica.
3. A gate is a conjunction of bounds on reported figures (:func:`parse_gate`):
   ``accuracy`` is the change against the model the node ran before (``>= -0.02``
   allows two points of loss); ``error_rate`` and ``p99_ms`` are absolute. A report
   missing a gated figure does not pass.
4. Halting wins over advancing: once ``halt_after`` nodes rolled back, the rollout
   halts whatever the others report, and whatever the stage: a rollout already
   ``done`` still halts on a late rollback (a node that caught up after the last stage
   passed, a regression found late in a watch window), so nodes that have not run
   the release yet never start it. A halt stops new starts; it does not roll back
   nodes that committed (each node's own watch window does that). A halted rollout
   never advances again; a new version is a new rollout.
5. A stage counts the fleet's *members*, not whoever reported: ``members`` is the
   authority's list of the nodes that run the model (see
   :func:`syncfw.models.rollout_ops.members_of`: each node's enrolment op and its
   lifecycle records), and the hash places each member in or out of the stage. A
   member in the stage that has not reported holds it back (``min_reports`` lets a
   share of them be offline). Reports from nodes outside ``members`` never advance a
   stage; their rollbacks still count towards a halt. With no member known the
   rollout waits; a stage the hash leaves empty (a 5 % stage of a small fleet) passes
   with a reason that says so.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "RULES",
    "Bound",
    "Decision",
    "Plan",
    "Report",
    "Rule",
    "State",
    "Verdict",
    "bucket",
    "decide",
    "in_stage",
    "parse_gate",
]


class State(enum.Enum):
    """Where one node is with one release (what it reports)."""

    DOWNLOADING = "downloading"
    VALIDATING = "validating"
    ACTIVE = "active"  # serving, inside its watch window
    COMMITTED = "committed"  # the watch window passed
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # could not download, verify or load: still serving the old one


_BOUND_RE = re.compile(r"\s*([a-z_][a-z0-9_]*)\s*(<=|>=)\s*(-?\d+(?:\.\d+)?)\s*")
GATED = ("accuracy", "error_rate", "p99_ms")
"""The figures a gate may bound."""


@dataclass(frozen=True, slots=True)
class Bound:
    """``figure op limit``: one term of a gate."""

    figure: str
    op: str
    limit: float

    def passes(self, value: float | None) -> bool:
        """True if ``value`` is within the bound (a missing value never passes)."""
        if value is None or math.isnan(value):
            return False
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.figure}{self.op}{self.limit:g}"


def parse_gate(text: str) -> tuple[Bound, ...]:
    """Parse ``"accuracy>=-0.02,error_rate<=0.01,p99_ms<=45"``.

    Raises:
        ValueError: naming the term that is not ``figure<=number`` or
            ``figure>=number`` over a known figure, or a figure given twice.
    """
    out: list[Bound] = []
    for term in text.split(","):
        m = _BOUND_RE.fullmatch(term)
        if m is None:
            raise ValueError(
                f"gate term {term.strip()!r} is not 'figure<=number' or 'figure>=number'"
            )
        figure, op, limit = m.group(1), m.group(2), float(m.group(3))
        if figure not in GATED:
            raise ValueError(f"gate figure {figure!r} is not one of {', '.join(GATED)}")
        if any(b.figure == figure for b in out):
            raise ValueError(f"gate figure {figure!r} is bounded twice")
        out.append(Bound(figure, op, limit))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Plan:
    """One rollout: a release, its stages, its gate.

    Attributes:
        name, version: the release (a signed manifest in ``sys/models/``).
        stages: percentages of the fleet, strictly increasing, ending at 100.
        gate: the bounds every node of a stage must pass before the next one.
        halt_after: rolled-back nodes that halt the rollout.
        min_reports: of a stage's nodes, the share that must have reported before it
            may advance (1.0: all of them; offline nodes hold a stage back otherwise).
    """

    name: str
    version: int
    stages: tuple[int, ...] = (5, 25, 100)
    gate: tuple[Bound, ...] = ()
    halt_after: int = 1
    min_reports: float = 1.0

    def __post_init__(self) -> None:
        s = self.stages
        if not s or s[-1] != 100 or any(b <= a for a, b in itertools.pairwise(s)):
            raise ValueError(f"stages must increase strictly and end at 100, got {s}")
        if s[0] <= 0:
            raise ValueError("the first stage must hold some of the fleet (> 0 %)")
        if self.halt_after < 1:
            raise ValueError("halt_after must be >= 1")
        if not 0 < self.min_reports <= 1:
            raise ValueError("min_reports must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class Report:
    """What one node reports of one release (``fleet/<node>/model``)."""

    node: str
    version: int
    state: State
    accuracy_delta: float | None = None
    error_rate: float | None = None
    p99_ms: float | None = None
    reason: str = ""

    def figure(self, name: str) -> float | None:
        """The reported value of a gated figure."""
        return {
            "accuracy": self.accuracy_delta,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
        }.get(name)

    def failures(self, gate: Iterable[Bound]) -> list[str]:
        """The gate terms this report does not pass (empty: it passes)."""
        return [
            f"{b} (got {self.figure(b.figure)})"
            for b in gate
            if not b.passes(self.figure(b.figure))
        ]


def bucket(node_id: str) -> int:
    """The node's place in ``[0, 100)``: a stable hash of its id (invariant 1)."""
    return int.from_bytes(hashlib.sha256(node_id.encode("utf-8")).digest()[:8], "big") % 100


def in_stage(plan: Plan, stage: int, node_id: str) -> bool:
    """True if ``node_id`` runs the release at stage index ``stage``."""
    return bucket(node_id) < plan.stages[stage]


class Verdict(enum.Enum):
    """What the authority should write next."""

    WAIT = "wait"
    PROMOTE = "promote"
    DONE = "done"
    HALT = "halt"


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict, why, and (for ``PROMOTE``) the stage to move to."""

    verdict: Verdict
    reason: str
    next_stage: int | None = None
    blocking: tuple[str, ...] = field(default=())
    """Nodes holding the stage back (not reported, or failing the gate)."""


@dataclass(frozen=True, slots=True)
class _Facts:
    plan: Plan
    stage: int
    halted: bool
    done: bool
    members: tuple[str, ...]
    in_current: tuple[str, ...]
    reports: Mapping[str, Report]
    rolled_back: tuple[str, ...]
    missing: tuple[str, ...]
    failing: tuple[tuple[str, list[str]], ...]


Rule = tuple[str, Callable[[_Facts], Decision | None]]


def _halted(f: _Facts) -> Decision | None:
    return Decision(Verdict.HALT, "the rollout was halted") if f.halted else None


def _too_many_rollbacks(f: _Facts) -> Decision | None:
    if len(f.rolled_back) >= f.plan.halt_after:
        who = ", ".join(f.rolled_back[:8])
        return Decision(
            Verdict.HALT,
            f"{len(f.rolled_back)} node(s) rolled back (halt_after {f.plan.halt_after}): {who}",
            blocking=f.rolled_back,
        )
    return None


def _done(f: _Facts) -> Decision | None:
    return (
        Decision(Verdict.DONE, "the rollout is done (a rollback would still halt it)")
        if (f.done)
        else None
    )


def _no_members(f: _Facts) -> Decision | None:
    if f.members:
        return None
    return Decision(
        Verdict.WAIT,
        f"no node that runs {f.plan.name} is known yet: a stage "
        "advances only on its members' reports",
    )


def _not_reported(f: _Facts) -> Decision | None:
    need = math.ceil(f.plan.min_reports * len(f.in_current))
    have = len(f.in_current) - len(f.missing)
    if have < need:
        return Decision(
            Verdict.WAIT,
            f"stage {f.plan.stages[f.stage]} %: {have} of {len(f.in_current)} nodes reported "
            f"(need {need})",
            blocking=f.missing,
        )
    return None


def _gate_fails(f: _Facts) -> Decision | None:
    if f.failing:
        node, terms = f.failing[0]
        return Decision(
            Verdict.WAIT,
            f"{len(f.failing)} node(s) do not pass the gate yet, e.g. {node}: {'; '.join(terms)}",
            blocking=tuple(n for n, _ in f.failing),
        )
    return None


def _passed(f: _Facts) -> str:
    pct = f.plan.stages[f.stage]
    if not f.in_current:
        return f"stage {pct} % holds none of the {len(f.members)} known members"
    return (
        f"stage {pct} % passed the gate ({len(f.in_current) - len(f.missing)} of "
        f"{len(f.in_current)} members reported)"
    )


def _last_stage(f: _Facts) -> Decision | None:
    if f.stage == len(f.plan.stages) - 1:
        return Decision(Verdict.DONE, f"the last {_passed(f)}")
    return None


def _promote(f: _Facts) -> Decision | None:
    nxt = f.stage + 1
    return Decision(
        Verdict.PROMOTE, f"{_passed(f)}: promote to {f.plan.stages[nxt]} %", next_stage=nxt
    )


RULES: tuple[Rule, ...] = (
    ("halted", _halted),
    ("too many rollbacks", _too_many_rollbacks),
    ("done", _done),
    ("no members", _no_members),
    ("not reported", _not_reported),
    ("gate fails", _gate_fails),
    ("last stage", _last_stage),
    ("promote", _promote),
)
"""The rule table: the first rule that returns a decision wins (invariant 2)."""


def decide(
    plan: Plan,
    stage: int,
    reports: Iterable[Report],
    members: Iterable[str],
    *,
    halted: bool = False,
    done: bool = False,
) -> Decision:
    """What to do next with ``plan`` at stage index ``stage``.

    Args:
        reports: each node's latest report (of any version: others are ignored).
        members: the fleet's nodes that run the model (the authority's view: those a
            stage counts, invariant 5).
        halted: a halt op for this rollout is already in the log.
        done: a done op for this rollout is already in the log (it may still halt).
    """
    if not 0 <= stage < len(plan.stages):
        raise ValueError(f"stage {stage} outside the plan's {len(plan.stages)} stages")
    mine = {r.node: r for r in reports if r.version == plan.version}
    all_members = tuple(sorted(set(members)))
    in_current = tuple(n for n in all_members if in_stage(plan, stage, n))
    done_states = (State.ACTIVE, State.COMMITTED)
    rolled_back = tuple(
        n for n in sorted(mine) if mine[n].state in (State.ROLLED_BACK, State.FAILED)
    )
    missing = tuple(n for n in in_current if n not in mine or mine[n].state not in done_states)
    failing = tuple(
        (n, fails)
        for n in in_current
        if n in mine and mine[n].state in done_states
        for fails in [mine[n].failures(plan.gate)]
        if fails
    )
    facts = _Facts(
        plan, stage, halted, done, all_members, in_current, mine, rolled_back, missing, failing
    )
    for _, rule in RULES:
        got = rule(facts)
        if got is not None:
            return got
    raise AssertionError("the rule table ends with a rule that always applies")
