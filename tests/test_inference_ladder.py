"""The degradation ladder: a pure transition table, and transitions written as ops."""

from __future__ import annotations

import pytest
from conftest_inference import node

from syncfw import Node
from syncfw.errors import StoreClosedError
from syncfw.inference import POLICIES, Conditions, Ladder, Limits, Mode, PowerReading, decide, step
from syncfw.inference.ladder import RULES, psutil_power_probe

__all__ = ["node"]

OK = Conditions(connected=True, accelerator_ok=True)


@pytest.mark.parametrize(
    ("current", "conditions", "expected"),
    [
        (Mode.FULL, OK, (Mode.FULL, "connected, accelerator ok, power ok")),
        (Mode.FULL, Conditions(connected=False), (Mode.DEGRADED, "offline")),
        (Mode.FULL, Conditions(accelerator_ok=False), (Mode.DEGRADED, "accelerator lost")),
        (Mode.DEGRADED, OK, (Mode.FULL, "connected, accelerator ok, power ok")),
        (Mode.FULL, Conditions(on_battery=True, battery_pct=15), (Mode.MINIMAL, "battery low")),
        (
            Mode.FULL,
            Conditions(on_battery=False, battery_pct=5),
            (Mode.FULL, "connected, accelerator ok, power ok"),
        ),
        (Mode.FULL, Conditions(temperature_c=90), (Mode.MINIMAL, "temperature high")),
        # Power limits outrank connectivity: offline and hot is minimal.
        (
            Mode.FULL,
            Conditions(connected=False, temperature_c=90),
            (Mode.MINIMAL, "temperature high"),
        ),
        (Mode.MINIMAL, Conditions(connected=False), (Mode.DEGRADED, "offline")),
    ],
)
def test_decide_table(current: Mode, conditions: Conditions, expected: tuple[Mode, str]) -> None:
    assert decide(current, conditions) == expected


def test_power_limits_have_hysteresis() -> None:
    lim = Limits(battery_low_pct=20, battery_recover_pct=30, temp_high_c=85, temp_recover_c=75)
    at = lambda pct: Conditions(on_battery=True, battery_pct=pct)  # noqa: E731
    assert decide(Mode.FULL, at(25), lim)[0] is Mode.FULL  # above the low mark: stay
    assert decide(Mode.FULL, at(19), lim)[0] is Mode.MINIMAL
    assert decide(Mode.MINIMAL, at(25), lim)[0] is Mode.MINIMAL  # not yet recovered
    assert decide(Mode.MINIMAL, at(31), lim)[0] is Mode.FULL
    hot = lambda c: Conditions(temperature_c=c)  # noqa: E731
    assert decide(Mode.FULL, hot(80), lim)[0] is Mode.FULL
    assert decide(Mode.FULL, hot(86), lim)[0] is Mode.MINIMAL
    assert decide(Mode.MINIMAL, hot(80), lim)[0] is Mode.MINIMAL
    assert decide(Mode.MINIMAL, hot(74), lim)[0] is Mode.FULL


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="battery_recover_pct"):
        Limits(battery_low_pct=30, battery_recover_pct=20)
    with pytest.raises(ValueError, match="temp_recover_c"):
        Limits(temp_high_c=70, temp_recover_c=80)


def test_step_only_reports_changes() -> None:
    assert step(Mode.FULL, OK) is None
    t = step(Mode.FULL, Conditions(connected=False))
    assert t is not None
    assert (t.previous, t.mode, t.reason) == (Mode.FULL, Mode.DEGRADED, "offline")
    value = t.as_value(123)
    assert value["mode"] == "degraded"
    assert value["previous"] == "full"
    assert value["conditions"]["connected"] is False
    assert value["at_ms"] == 123


def test_every_mode_is_reachable_and_has_a_policy() -> None:
    assert {r.mode for r in RULES} == set(Mode)
    assert set(POLICIES) == set(Mode)
    assert POLICIES[Mode.FULL].escalate
    assert not POLICIES[Mode.DEGRADED].escalate
    assert POLICIES[Mode.MINIMAL].duty_every > 1


async def test_link_drop_and_recovery_are_logged_as_ops(node: Node) -> None:
    link = {"up": True}
    ladder = Ladder(node, connectivity=lambda: link["up"], power=None, wall_ms=lambda: 42)
    assert await ladder.poll() is None
    assert await node.get(ladder.key) is None
    link["up"] = False
    t = await ladder.poll()
    assert t is not None
    assert ladder.mode is Mode.DEGRADED
    assert not ladder.policy.escalate
    logged = await node.get("fleet/t7/inference/mode")
    assert logged["mode"] == "degraded"
    assert logged["reason"] == "offline"
    assert logged["at_ms"] == 42
    assert await ladder.poll() is None  # no change, no op
    link["up"] = True
    await ladder.poll()
    assert ladder.mode is Mode.FULL
    assert (await node.get(ladder.key))["previous"] == "degraded"
    assert [t.mode for t in ladder.transitions] == [Mode.DEGRADED, Mode.FULL]
    assert ladder.status()["transitions"] == 2


async def test_async_probes_power_and_duty_cycle(node: Node) -> None:
    async def connected() -> bool:
        return True

    power = PowerReading(battery_pct=10, on_battery=True, temperature_c=40)
    ladder = Ladder(node, connectivity=connected, accelerator=lambda: True, power=lambda: power)
    t = await ladder.poll()
    assert t is not None
    assert t.mode is Mode.MINIMAL
    assert t.conditions.battery_pct == 10
    every = ladder.policy.duty_every
    assert [ladder.should_run(i) for i in range(2 * every)].count(True) == 2


async def test_a_failed_transition_write_leaves_the_mode_unchanged(node: Node) -> None:
    ladder = Ladder(node, connectivity=lambda: False, power=None)
    await node.close()  # the write will fail: the node is closed
    with pytest.raises(StoreClosedError):
        await ladder.poll()
    assert ladder.mode is Mode.FULL
    assert ladder.transitions == []


def test_psutil_probe_is_optional() -> None:
    probe = psutil_power_probe()
    try:
        import psutil  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        assert probe is None
    else:
        assert probe is not None
        assert isinstance(probe(), PowerReading)
