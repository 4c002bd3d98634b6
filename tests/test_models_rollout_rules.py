"""The staged-rollout rule table: stable stages, gates, promotion, halting."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncfw.models.rollout import (
    Plan,
    Report,
    State,
    Verdict,
    bucket,
    decide,
    in_stage,
    parse_gate,
)

GATE = parse_gate("accuracy>=-0.02,error_rate<=0.01,p99_ms<=45")
NODES = [f"t{i}" for i in range(200)]


def good(node: str, version: int = 7) -> Report:
    return Report(node, version, State.ACTIVE, accuracy_delta=0.0, error_rate=0.001, p99_ms=20)


def test_gate_parsing_and_refusals() -> None:
    assert [str(b) for b in GATE] == ["accuracy>=-0.02", "error_rate<=0.01", "p99_ms<=45"]
    for bad in ("accuracy>-0.02", "speed<=1", "p99_ms<=45,p99_ms<=50", "accuracy>=x", ""):
        with pytest.raises(ValueError):
            parse_gate(bad)


def test_plans_are_checked() -> None:
    for stages in ((5, 25), (25, 5, 100), (0, 100), ()):
        with pytest.raises(ValueError):
            Plan("inspection", 7, stages=stages)


@given(st.text(min_size=1, max_size=40))
def test_stage_membership_is_stable_and_monotonic(node: str) -> None:
    plan = Plan("inspection", 7, stages=(5, 25, 100))
    assert 0 <= bucket(node) < 100 and bucket(node) == bucket(node)
    seen = [in_stage(plan, k, node) for k in range(3)]
    assert seen == sorted(seen)  # once in, in every later stage
    assert seen[-1] is True


def test_a_stage_advances_only_when_its_nodes_pass_the_gate() -> None:
    plan = Plan("inspection", 7, gate=GATE)
    stage0 = [n for n in NODES if in_stage(plan, 0, n)]
    assert 0 < len(stage0) < len(NODES) // 5
    d = decide(plan, 0, [], NODES)
    assert d.verdict is Verdict.WAIT and set(d.blocking) == set(stage0)
    slow = Report(stage0[0], 7, State.ACTIVE, accuracy_delta=0.0, error_rate=0.0, p99_ms=80)
    reports = [slow, *(good(n) for n in stage0[1:])]
    d = decide(plan, 0, reports, NODES)
    assert d.verdict is Verdict.WAIT and d.blocking == (stage0[0],) and "p99_ms<=45" in d.reason
    d = decide(plan, 0, [good(n) for n in stage0], NODES)
    assert d.verdict is Verdict.PROMOTE and d.next_stage == 1
    everyone = [good(n) for n in NODES]
    assert decide(plan, 2, everyone, NODES).verdict is Verdict.DONE


def test_reports_of_other_versions_do_not_count() -> None:
    plan = Plan("inspection", 7, gate=GATE)
    stage0 = [n for n in NODES if in_stage(plan, 0, n)]
    d = decide(plan, 0, [good(n, version=6) for n in stage0], NODES)
    assert d.verdict is Verdict.WAIT


def test_rollbacks_halt_and_halting_wins() -> None:
    plan = Plan("inspection", 7, gate=GATE, halt_after=2)
    stage0 = [n for n in NODES if in_stage(plan, 0, n)]
    reports = [good(n) for n in stage0]
    reports[0] = Report(stage0[0], 7, State.ROLLED_BACK, reason="canary accuracy -0.21")
    assert decide(plan, 0, reports, NODES).verdict is Verdict.WAIT
    reports[1] = Report(stage0[1], 7, State.ROLLED_BACK, reason="canary accuracy -0.19")
    d = decide(plan, 0, reports, NODES)
    assert d.verdict is Verdict.HALT and set(d.blocking) == set(stage0[:2])
    assert decide(plan, 0, [good(n) for n in stage0], NODES, halted=True).verdict is Verdict.HALT


def test_a_partial_report_quorum_may_advance_past_offline_nodes() -> None:
    plan = Plan("inspection", 7, gate=GATE, min_reports=0.5)
    stage0 = [n for n in NODES if in_stage(plan, 0, n)]
    half = stage0[: (len(stage0) + 1) // 2]
    assert decide(plan, 0, [good(n) for n in half], NODES).verdict is Verdict.PROMOTE


# ---------------------------------------------------------------- members, not reporters

STATES = list(State)
ids = st.sampled_from([f"n{i}" for i in range(40)])


@st.composite
def fleets(draw: st.DrawFn) -> tuple[Plan, int, list[str], list[Report]]:
    stages = draw(st.sampled_from([(5, 25, 100), (10, 100), (50, 100), (100,), (1, 2, 100)]))
    plan = Plan(
        "inspection",
        7,
        stages=stages,
        gate=GATE,
        halt_after=draw(st.integers(1, 3)),
        min_reports=draw(st.sampled_from([1.0, 0.5, 0.25])),
    )
    stage = draw(st.integers(0, len(stages) - 1))
    members = draw(st.lists(ids, max_size=30, unique=True))
    reporters = draw(st.lists(ids, max_size=30, unique=True))
    reports = []
    for n in reporters:
        state = draw(st.sampled_from(STATES))
        if draw(st.booleans()):
            reports.append(
                Report(
                    n,
                    draw(st.sampled_from([6, 7, 7, 7])),
                    state,
                    accuracy_delta=0.0,
                    error_rate=0.001,
                    p99_ms=20,
                )
            )
        else:
            reports.append(Report(n, 7, state, accuracy_delta=-0.1, error_rate=0.5, p99_ms=99))
    return plan, stage, members, reports


def _passing(plan: Plan, r: Report) -> bool:
    return (
        r.version == plan.version
        and r.state in (State.ACTIVE, State.COMMITTED)
        and not r.failures(plan.gate)
    )


@given(fleets())
def test_a_stage_advances_only_on_its_members_reports(
    f: tuple[Plan, int, list[str], list[Report]],
) -> None:
    plan, stage, members, reports = f
    d = decide(plan, stage, reports, members)
    if d.verdict not in (Verdict.PROMOTE, Verdict.DONE):
        return
    assert members, "advanced with no member known"
    by_node = {r.node: r for r in reports}
    in_stage_members = [n for n in members if in_stage(plan, stage, n)]
    passed = [n for n in in_stage_members if n in by_node and _passing(plan, by_node[n])]
    assert len(passed) >= math.ceil(plan.min_reports * len(in_stage_members))
    # no member of the stage that reported a served version fails the gate
    for n in in_stage_members:
        r = by_node.get(n)
        if (
            r is not None
            and r.version == plan.version
            and r.state in (State.ACTIVE, State.COMMITTED)
        ):
            assert not r.failures(plan.gate)
    rolled = [
        r
        for r in reports
        if r.version == plan.version and r.state in (State.ROLLED_BACK, State.FAILED)
    ]
    assert len(rolled) < plan.halt_after


@given(fleets(), st.lists(ids, max_size=20, unique=True))
def test_reports_from_non_members_never_advance_a_stage(
    f: tuple[Plan, int, list[str], list[Report]],
    strangers: list[str],
) -> None:
    plan, stage, members, reports = f
    mine = [r for r in reports if r.node in members]
    extra = [good(n) for n in strangers if n not in members]
    before = decide(plan, stage, mine, members)
    after = decide(plan, stage, mine + extra, members)
    assert after.verdict is before.verdict and after.next_stage == before.next_stage


@given(fleets())
def test_members_that_have_not_reported_hold_their_stage(
    f: tuple[Plan, int, list[str], list[Report]],
) -> None:
    plan, stage, members, _ = f
    plan = Plan(plan.name, plan.version, plan.stages, plan.gate, plan.halt_after, 1.0)
    in_stage_members = [n for n in members if in_stage(plan, stage, n)]
    # everyone else in the stage reports well; the first one never reports
    reports = [good(n) for n in in_stage_members[1:]]
    d = decide(plan, stage, reports, members)
    if in_stage_members:
        assert d.verdict is Verdict.WAIT and d.blocking == (in_stage_members[0],)
    elif members:
        assert d.verdict in (Verdict.PROMOTE, Verdict.DONE) and "holds none" in d.reason
    else:
        assert d.verdict is Verdict.WAIT and "no node" in d.reason


@given(fleets(), st.booleans())
def test_enough_rollbacks_halt_at_any_stage_even_when_done(
    f: tuple[Plan, int, list[str], list[Report]],
    done: bool,
) -> None:
    plan, stage, members, reports = f
    rolled = [
        Report(f"r{i}", 7, State.ROLLED_BACK, reason="canary") for i in range(plan.halt_after)
    ]
    d = decide(plan, stage, reports + rolled, members, done=done)
    assert d.verdict is Verdict.HALT
    assert decide(plan, stage, reports, members, halted=True, done=done).verdict is Verdict.HALT


def test_a_done_rollout_stays_done_until_a_rollback() -> None:
    plan = Plan("inspection", 7, gate=GATE)
    everyone = [good(n) for n in NODES]
    assert decide(plan, 2, everyone, NODES, done=True).verdict is Verdict.DONE
    late = [*everyone[1:], Report(NODES[0], 7, State.ROLLED_BACK, reason="window: p99")]
    d = decide(plan, 2, late, NODES, done=True)
    assert d.verdict is Verdict.HALT and NODES[0] in d.reason


def test_no_members_known_waits_even_with_reports() -> None:
    plan = Plan("inspection", 7, gate=GATE)
    d = decide(plan, 0, [good(n) for n in NODES], [])
    assert d.verdict is Verdict.WAIT and "no node" in d.reason
