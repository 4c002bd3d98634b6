"""A token bucket: the per-peer bandwidth budget, and the rate of new dials."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Lets ``rate`` bytes per second through on average, ``burst`` at once.

    A send larger than the burst is let through when the bucket is full and
    drives it negative, so large frames are delayed, never refused.

    Args:
        rate: bytes per second.
        burst: bucket size in bytes.
        clock: monotonic seconds (injected by tests).
        sleep: how to wait (injected by tests).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._at = clock()
        self.spent = 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def delay_for(self, n: int) -> float:
        """Seconds to wait before ``n`` bytes may go (0 if now)."""
        self._refill()
        need = min(n, self.burst)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self.rate

    def available(self) -> float:
        """Tokens in the bucket now (negative after a send larger than the burst)."""
        self._refill()
        return self._tokens

    def take(self, n: int = 1) -> bool:
        """Take ``n`` tokens if the bucket holds them now; never waits.

        Returns:
            True if they were taken, False (nothing taken) if the bucket holds fewer.
        """
        self._refill()
        if self._tokens < n:
            return False
        self._tokens -= n
        self.spent += n
        return True

    async def spend(self, n: int) -> None:
        """Wait until ``n`` bytes may go, then take them from the bucket."""
        wait = self.delay_for(n)
        if wait > 0:
            await self._sleep(wait)
            self._refill()
        self._tokens -= n
        self.spent += n
