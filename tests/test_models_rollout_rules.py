"""The staged-rollout rule table: stable stages, gates, promotion, halting."""

from __future__ import annotations

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
