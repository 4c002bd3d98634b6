"""Hybrid logical clocks (Kulkarni et al., 2014) and an NTP offset check.

Invariants:

1. A timestamp is one 64-bit int: 48 bits of physical milliseconds, 16 bits of
   logical counter. Comparing ints compares timestamps.
2. ``now()`` and ``observe()`` are strictly monotonic, even when the wall clock
   steps back. Because the logical part is the low 16 bits, "increment the
   counter, carrying into the physical part on overflow" is just ``+ 1``.
3. The clock never issues a timestamp at or below its high-water mark, which the
   store restores at open, so a reboot with an RTC set in the past cannot move
   time backwards.
4. A remote timestamp whose physical part is more than ``max_offset_ms`` ahead
   of local physical time is refused with :class:`ClockSkewError`; the clock is
   left unchanged.

5. The clock check (:class:`ClockWatch`) compares the high-water mark with
   NTP-checked time, never with the local wall clock alone (which may be the
   very clock that ran ahead), and only reports: nothing here ever moves a
   timestamp backwards. The way out of a mark far ahead is :data:`WAY_OUT`.

This module knows nothing of storage or the network (NTP aside, which is a
measurement, not a dependency of the clock).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from syncfw.errors import ClockError, ClockSkewError

__all__ = [
    "HLC",
    "LOGICAL_BITS",
    "MAX_PHYSICAL_MS",
    "WAY_OUT",
    "ClockReport",
    "ClockState",
    "ClockWatch",
    "NtpResult",
    "check_ntp",
    "hlc_ahead_ms",
    "hlc_logical",
    "hlc_pack",
    "hlc_physical",
    "wall_ms",
]

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
MAX_PHYSICAL_MS = (1 << 48) - 1
MAX_TIMESTAMP = (1 << 64) - 1
DEFAULT_MAX_OFFSET_MS = 500


def wall_ms() -> int:
    """The system wall clock in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def hlc_pack(physical_ms: int, logical: int = 0) -> int:
    """Pack a physical time and a logical counter into one 64-bit timestamp."""
    if not 0 <= physical_ms <= MAX_PHYSICAL_MS:
        raise ValueError(f"physical time {physical_ms} ms does not fit in 48 bits")
    if not 0 <= logical <= LOGICAL_MASK:
        raise ValueError(f"logical counter {logical} does not fit in 16 bits")
    return (physical_ms << LOGICAL_BITS) | logical


def hlc_physical(ts: int) -> int:
    """The physical milliseconds of a timestamp."""
    return ts >> LOGICAL_BITS


def hlc_logical(ts: int) -> int:
    """The logical counter of a timestamp."""
    return ts & LOGICAL_MASK


class HLC:
    """A hybrid logical clock.

    Args:
        wall: returns physical time in milliseconds; injected so tests and the
            simulator control time. Defaults to the system clock.
        max_offset_ms: how far ahead of local physical time a remote timestamp
            may be before :meth:`observe` refuses it.
        high_water: the highest timestamp already issued or seen (restored from
            storage at open); the clock never goes at or below it.
    """

    __slots__ = ("_last", "_wall", "max_offset_ms")

    def __init__(
        self,
        wall: Callable[[], int] = wall_ms,
        *,
        max_offset_ms: int = DEFAULT_MAX_OFFSET_MS,
        high_water: int = 0,
    ) -> None:
        if max_offset_ms < 0:
            raise ValueError("max_offset_ms must be >= 0")
        self._wall = wall
        self._last = high_water
        self.max_offset_ms = max_offset_ms

    def wall(self) -> int:
        """The injected wall clock's current reading, in milliseconds."""
        return self._wall()

    @property
    def last(self) -> int:
        """The highest timestamp issued or observed so far (the high-water mark)."""
        return self._last

    def now(self) -> int:
        """A new timestamp for a local event (the HLC send rule)."""
        pt = self._wall() << LOGICAL_BITS
        last = self._last + 1
        ts = pt if pt > last else last
        if ts > MAX_TIMESTAMP:
            raise ClockError("the hybrid clock is exhausted (past 2**64 - 1)")
        self._last = ts
        return ts

    def check(self, remote: int) -> None:
        """Raise :class:`ClockSkewError` if ``remote`` is too far ahead of local time."""
        local_ms = self._wall()
        remote_ms = remote >> LOGICAL_BITS
        if remote_ms - local_ms > self.max_offset_ms:
            raise ClockSkewError(remote_ms, local_ms, self.max_offset_ms)

    def observe(self, remote: int) -> int:
        """Merge a remote timestamp (the HLC receive rule) and return the new local one.

        Raises:
            ClockSkewError: ``remote`` is more than ``max_offset_ms`` ahead; the
                clock is unchanged.
        """
        self.check(remote)
        pt = self._wall() << LOGICAL_BITS
        ts = max(self._last + 1, remote + 1, pt)
        if ts > MAX_TIMESTAMP:
            raise ClockError("the hybrid clock is exhausted (past 2**64 - 1)")
        self._last = ts
        return ts

    def advance_to(self, ts: int) -> None:
        """Raise the high-water mark to at least ``ts`` (no skew check: used at restore)."""
        if ts > self._last:
            self._last = ts


@dataclass(frozen=True, slots=True)
class NtpResult:
    """One NTP measurement.

    Attributes:
        server: the server that answered.
        offset_s: local clock offset against the server, in seconds
            (positive: the server is ahead of us).
        delay_s: round-trip delay, in seconds.
    """

    server: str
    offset_s: float
    delay_s: float


def check_ntp(
    servers: Sequence[str] = ("pool.ntp.org",),
    *,
    port: int = 123,
    timeout_s: float = 2.0,
    version: int = 3,
) -> NtpResult:
    """Measure the local clock offset with NTP, trying each server in turn.

    Blocking (it does network I/O): call it in a thread from async code.

    Args:
        servers: host names or addresses, tried in order until one answers.
        port: UDP port of the servers.
        timeout_s: per-server timeout.
        version: NTP protocol version to speak.

    Returns:
        The first successful measurement.

    Raises:
        ClockError: no server answered.
    """
    import ntplib  # imported here: only this measurement needs it

    client = ntplib.NTPClient()
    failures: list[str] = []
    for server in servers:
        try:
            stats = client.request(server, version=version, port=port, timeout=timeout_s)
        except (ntplib.NTPException, OSError) as exc:
            failures.append(f"{server}: {exc}")
            continue
        return NtpResult(server=server, offset_s=float(stats.offset), delay_s=float(stats.delay))
    raise ClockError("no NTP server answered: " + "; ".join(failures or ["no servers given"]))


# -- the periodic clock check (invariant 5) ------------------------------------------

WAY_OUT = (
    "timestamps never move back: wait until true time passes the mark (writes flow "
    "again then), or retire this node id and have the authority grant its zones to a "
    "fresh one"
)
"""What an operator does about a high-water mark far ahead (README, Operations)."""


class ClockState(enum.Enum):
    """What the last clock check concluded."""

    UNCHECKED = "unchecked"
    OK = "ok"
    AHEAD = "ahead"
    """The high-water mark is more than the allowed offset ahead of NTP-checked time."""
    UNREACHABLE = "unreachable"
    """The last check found no NTP server (the last measurement is kept)."""


@dataclass(frozen=True, slots=True)
class ClockReport:
    """The state of this node's clock as of the last check.

    Attributes:
        state: the verdict.
        ahead_ms: how far the high-water mark was ahead of NTP-checked time at
            the last measurement (0 when behind or level).
        offset_ms: the last NTP offset (positive: the server is ahead of us),
            None before any measurement.
        server: the server that answered last.
        checked_ms: NTP-checked time of the last measurement, None before any.
        failures: checks in a row that found no server.
        reason: one sentence for status and logs.
    """

    state: ClockState
    ahead_ms: float = 0.0
    offset_ms: float | None = None
    server: str = ""
    checked_ms: int | None = None
    failures: int = 0
    reason: str = "not checked yet"


def hlc_ahead_ms(high_water: int, local_wall_ms: float, offset_s: float) -> float:
    """How far a high-water mark is ahead of NTP-checked time, in ms (0 if not ahead).

    Args:
        high_water: the clock's highest timestamp (:attr:`HLC.last`).
        local_wall_ms: the local wall clock when the offset was measured.
        offset_s: the NTP offset (positive: the server is ahead of us).
    """
    return max(0.0, hlc_physical(high_water) - (local_wall_ms + offset_s * 1000.0))


class ClockWatch:
    """The verdict of the periodic clock check. Pure bookkeeping: the node runs the checks.

    Args:
        max_ahead_ms: a mark further ahead than this is :attr:`ClockState.AHEAD`
            (the node's ``max_offset_ms``: peers hold writes further ahead as skew).
    """

    def __init__(self, max_ahead_ms: float) -> None:
        self.max_ahead_ms = max_ahead_ms
        self.report = ClockReport(ClockState.UNCHECKED)

    def measured(self, result: NtpResult, high_water: int, local_wall_ms: float) -> ClockReport:
        """Record a measurement taken when the local wall clock read ``local_wall_ms``."""
        ahead = hlc_ahead_ms(high_water, local_wall_ms, result.offset_s)
        state = ClockState.AHEAD if ahead > self.max_ahead_ms else ClockState.OK
        if state is ClockState.AHEAD:
            reason = (
                f"the hybrid clock is {ahead:.0f} ms ahead of NTP-checked time ({result.server}): "
                "its high-water mark comes from a clock that ran ahead; peers hold this node's "
                f"writes as clock skew until true time catches up ({WAY_OUT})"
            )
        else:
            reason = f"within {self.max_ahead_ms:.0f} ms of NTP-checked time ({result.server})"
        self.report = ClockReport(
            state,
            ahead_ms=ahead,
            offset_ms=result.offset_s * 1000.0,
            server=result.server,
            checked_ms=int(local_wall_ms + result.offset_s * 1000.0),
            reason=reason,
        )
        return self.report

    def failed(self, error: str) -> ClockReport:
        """Record a check that found no server; the last measurement is kept."""
        last = self.report
        self.report = ClockReport(
            ClockState.UNREACHABLE,
            ahead_ms=last.ahead_ms,
            offset_ms=last.offset_ms,
            server=last.server,
            checked_ms=last.checked_ms,
            failures=last.failures + 1,
            reason=f"clock not checked: {error}",
        )
        return self.report

    def status(self) -> dict[str, Any]:
        """The report as plain data (the node's ``status()["clock"]``)."""
        r = self.report
        return {
            "state": r.state.value,
            "ahead_ms": r.ahead_ms,
            "offset_ms": r.offset_ms,
            "server": r.server,
            "checked_ms": r.checked_ms,
            "failures": r.failures,
            "reason": r.reason,
        }
