"""Waiting for a condition without fixed sleeps, and a clock tests move by hand."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

__all__ = ["FakeClock", "wait_until"]


async def wait_until(
    cond: Callable[[], Awaitable[bool] | bool],
    *,
    timeout_s: float = 10.0,
    what: str = "condition",
    interval_s: float = 0.01,
) -> None:
    """Check ``cond`` until it is true; fail loudly at the deadline.

    ``cond`` may be a plain or an async callable. The deadline bounds a test
    that would otherwise hang; it never decides the test's outcome by itself:
    the wait ends as soon as the condition holds.

    Raises:
        AssertionError: ``cond`` was still false after ``timeout_s``, naming ``what``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        res = cond()
        if inspect.isawaitable(res):
            res = await res
        if res:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


class FakeClock:
    """A wall clock in milliseconds that moves only when told.

    Pass it wherever syncfw takes a ``clock``/``wall`` callable
    (``Node.open(..., clock=FakeClock())``, :class:`~syncfw.clock.HLC`).

    Args:
        start_ms: the reading before any :meth:`advance`.
    """

    __slots__ = ("ms",)

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int) -> int:
        """Move forward (or, with a negative ``ms``, back: a stepped RTC); returns the new reading."""
        self.ms += ms
        return self.ms

    def set(self, ms: int) -> None:
        """Jump to ``ms``."""
        self.ms = ms
