"""The degradation ladder: which way a station infers, given the conditions it is in.

Invariants:

1. The mode is one of :class:`Mode`; the next mode is a pure function of the
   current mode, the :class:`Conditions` and the :class:`Limits`
   (:func:`decide`), written as an ordered rule table (:data:`RULES`): the
   first rule that applies wins. Power limits have hysteresis (leave
   ``minimal`` only once the battery or temperature is back past a recovery
   threshold), so a reading hovering at a limit does not flap.
2. :class:`Ladder` is the only I/O here: it reads the probes, asks
   :func:`decide`, and writes every transition as an op (with its reason and
   the conditions that caused it) under ``fleet/<node>/inference/mode`` before
   it switches, so the fleet sees which sites are degraded and why.
3. Probes are pluggable: a connectivity callable, an optional accelerator
   check, and a power probe that uses psutil when it is importable (psutil is
   not a dependency).

What each mode means is a :class:`ModePolicy`: ``full`` runs the primary model
and may escalate unsure cases to the cloud (asynchronously, never blocking the
local decision); ``degraded`` (offline, or the accelerator is lost) runs the
local fallback model with no escalation; ``minimal`` (battery or thermal limit)
runs the cheap trigger model on one item in ``duty_every``.
"""

from __future__ import annotations

import enum
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from syncfw.inference.sink import ResultSink
from syncfw.keys import mode_key

__all__ = [
    "POLICIES",
    "RULES",
    "Conditions",
    "Ladder",
    "Limits",
    "Mode",
    "ModePolicy",
    "PowerReading",
    "Rule",
    "Transition",
    "decide",
    "psutil_power_probe",
    "step",
]


class Mode(enum.Enum):
    """How the station infers."""

    FULL = "full"
    DEGRADED = "degraded"
    MINIMAL = "minimal"


@dataclass(frozen=True, slots=True)
class Conditions:
    """What the probes saw.

    Attributes:
        connected: the uplink to the cloud works.
        accelerator_ok: the GPU (or other accelerator) the primary model needs works.
        battery_pct: state of charge, None when there is no battery.
        on_battery: running from the battery (a plugged-in station ignores its charge).
        temperature_c: hottest sensor, None when unknown.
    """

    connected: bool = True
    accelerator_ok: bool = True
    battery_pct: float | None = None
    on_battery: bool = False
    temperature_c: float | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Power thresholds, each with a recovery threshold (hysteresis)."""

    battery_low_pct: float = 20.0
    battery_recover_pct: float = 30.0
    temp_high_c: float = 85.0
    temp_recover_c: float = 75.0

    def __post_init__(self) -> None:
        if self.battery_recover_pct < self.battery_low_pct:
            raise ValueError("battery_recover_pct must be >= battery_low_pct")
        if self.temp_recover_c > self.temp_high_c:
            raise ValueError("temp_recover_c must be <= temp_high_c")


@dataclass(frozen=True, slots=True)
class ModePolicy:
    """What a mode does.

    Attributes:
        model: the model role to run (``primary``, ``fallback``, ``trigger``).
        escalate: unsure cases may be sent to the cloud.
        duty_every: run on one item in this many (1: every item).
    """

    model: str
    escalate: bool
    duty_every: int = 1


POLICIES: Mapping[Mode, ModePolicy] = {
    Mode.FULL: ModePolicy(model="primary", escalate=True),
    Mode.DEGRADED: ModePolicy(model="fallback", escalate=False),
    Mode.MINIMAL: ModePolicy(model="trigger", escalate=False, duty_every=4),
}


def _battery_low(c: Conditions, lim: Limits, current: Mode) -> bool:
    if not c.on_battery or c.battery_pct is None:
        return False
    threshold = lim.battery_recover_pct if current is Mode.MINIMAL else lim.battery_low_pct
    return c.battery_pct < threshold


def _too_hot(c: Conditions, lim: Limits, current: Mode) -> bool:
    if c.temperature_c is None:
        return False
    threshold = lim.temp_recover_c if current is Mode.MINIMAL else lim.temp_high_c
    return c.temperature_c > threshold


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: if ``applies``, go to ``mode`` because of ``reason``."""

    mode: Mode
    reason: str
    applies: Callable[[Conditions, Limits, Mode], bool]


RULES: tuple[Rule, ...] = (
    Rule(Mode.MINIMAL, "battery low", _battery_low),
    Rule(Mode.MINIMAL, "temperature high", _too_hot),
    Rule(Mode.DEGRADED, "offline", lambda c, _lim, _cur: not c.connected),
    Rule(Mode.DEGRADED, "accelerator lost", lambda c, _lim, _cur: not c.accelerator_ok),
    Rule(Mode.FULL, "connected, accelerator ok, power ok", lambda _c, _lim, _cur: True),
)
"""First match wins: power limits outrank connectivity, which outranks the accelerator."""


def decide(current: Mode, conditions: Conditions, limits: Limits | None = None) -> tuple[Mode, str]:
    """The mode the conditions call for, and why.

    Args:
        current: the mode now (for hysteresis).
        conditions: what the probes saw.
        limits: power thresholds; defaults to :class:`Limits`.

    Returns:
        ``(mode, reason)``; ``mode`` may equal ``current``.
    """
    lim = limits if limits is not None else Limits()
    for rule in RULES:
        if rule.applies(conditions, lim, current):
            return rule.mode, rule.reason
    raise AssertionError("the last rule always applies")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of mode."""

    previous: Mode
    mode: Mode
    reason: str
    conditions: Conditions

    def as_value(self, at_ms: int) -> dict[str, Any]:
        """The op value written for this transition."""
        return {
            "mode": self.mode.value,
            "previous": self.previous.value,
            "reason": self.reason,
            "conditions": asdict(self.conditions),
            "at_ms": at_ms,
        }


def step(current: Mode, conditions: Conditions, limits: Limits | None = None) -> Transition | None:
    """The transition the conditions call for, or None to stay."""
    mode, reason = decide(current, conditions, limits)
    if mode is current:
        return None
    return Transition(current, mode, reason, conditions)


@dataclass(frozen=True, slots=True)
class PowerReading:
    """Battery and temperature, as far as they are known."""

    battery_pct: float | None = None
    on_battery: bool = False
    temperature_c: float | None = None


def psutil_power_probe() -> Callable[[], PowerReading] | None:
    """A power probe built on psutil, or None when psutil is not importable."""
    try:
        import psutil  # type: ignore[import-untyped]  # optional: never a dependency
    except ImportError:
        return None

    def probe() -> PowerReading:
        battery_pct: float | None = None
        on_battery = False
        temp: float | None = None
        sensors_battery = getattr(psutil, "sensors_battery", None)
        batt = sensors_battery() if sensors_battery is not None else None
        if batt is not None:
            battery_pct = float(batt.percent)
            on_battery = not bool(batt.power_plugged)
        sensors_temps = getattr(psutil, "sensors_temperatures", None)
        temps = sensors_temps() if sensors_temps is not None else {}
        currents = [float(t.current) for entries in temps.values() for t in entries]
        if currents:
            temp = max(currents)
        return PowerReading(battery_pct, on_battery, temp)

    return probe


_AUTO: Any = object()


async def _call(fn: Callable[[], Any]) -> Any:
    result = fn()
    if inspect.isawaitable(result):
        return await result
    return result


class Ladder:
    """The ladder's I/O shell: probes in, transition ops out.

    Args:
        sink: the node; transitions go to ``fleet/<node>/inference/mode``.
        connectivity: returns (or resolves to) True while the uplink works.
        accelerator: returns True while the accelerator works; None: always.
        power: returns a :class:`PowerReading`; by default psutil's, when importable.
        limits: power thresholds.
        policies: what each mode does.
        initial: the mode before the first poll.
        wall_ms: clock for the ``at_ms`` field (injectable).
    """

    def __init__(
        self,
        sink: ResultSink,
        *,
        connectivity: Callable[[], bool | Awaitable[bool]],
        accelerator: Callable[[], bool | Awaitable[bool]] | None = None,
        power: Callable[[], PowerReading] | None = _AUTO,
        limits: Limits | None = None,
        policies: Mapping[Mode, ModePolicy] = POLICIES,
        initial: Mode = Mode.FULL,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._sink = sink
        self._connectivity = connectivity
        self._accelerator = accelerator
        self._power = psutil_power_probe() if power is _AUTO else power
        self.limits = limits if limits is not None else Limits()
        self.policies = dict(policies)
        self._mode = initial
        self._wall_ms = wall_ms
        self.transitions: list[Transition] = []
        self.key = mode_key(sink.node_id)

    @property
    def mode(self) -> Mode:
        """The current mode."""
        return self._mode

    @property
    def policy(self) -> ModePolicy:
        """What the current mode does."""
        return self.policies[self._mode]

    def should_run(self, item_index: int) -> bool:
        """Whether item number ``item_index`` is inferred on under the current duty cycle."""
        return item_index % self.policy.duty_every == 0

    async def read_conditions(self) -> Conditions:
        """Ask every probe."""
        connected = bool(await _call(self._connectivity))
        accel_ok = True if self._accelerator is None else bool(await _call(self._accelerator))
        reading = self._power() if self._power is not None else PowerReading()
        return Conditions(
            connected=connected,
            accelerator_ok=accel_ok,
            battery_pct=reading.battery_pct,
            on_battery=reading.on_battery,
            temperature_c=reading.temperature_c,
        )

    async def poll(self, conditions: Conditions | None = None) -> Transition | None:
        """Read the probes (or take ``conditions``), and switch mode if they call for it.

        The transition op is written before the switch, so a failed write
        leaves the mode unchanged (and the next poll tries again).

        Returns:
            The transition made, or None.
        """
        c = conditions if conditions is not None else await self.read_conditions()
        t = step(self._mode, c, self.limits)
        if t is None:
            return None
        await self._sink.put(self.key, t.as_value(self._wall_ms()))
        self._mode = t.mode
        self.transitions.append(t)
        return t

    def status(self) -> dict[str, Any]:
        """Mode, policy and recent transitions (for node status)."""
        return {
            "mode": self._mode.value,
            "policy": asdict(self.policy),
            "transitions": len(self.transitions),
            "last_reason": self.transitions[-1].reason if self.transitions else None,
        }
