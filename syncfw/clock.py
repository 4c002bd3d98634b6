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

This module knows nothing of storage or the network (NTP aside, which is a
measurement, not a dependency of the clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from syncfw.errors import ClockError, ClockSkewError

__all__ = [
    "HLC",
    "LOGICAL_BITS",
    "MAX_PHYSICAL_MS",
    "NtpResult",
    "check_ntp",
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
