"""Token buckets: the per-peer bandwidth budget that sync and chunk transfer share.

A node's uplink to a peer is one resource, whatever rides on it: anti-entropy
frames (state, alerts) and model chunks are charged to the same bucket, so a
metered link's rate holds for both together. What goes first is decided here:

Invariants:

1. One bucket per link direction; every byte a node sends on it is charged
   once, by whoever sends it (the exchange runner per frame, the artifact
   server per chunk piece).
2. :attr:`Priority.STATE` spends (sync frames) never wait behind bulk ones:
   a :attr:`Priority.BULK` spend (a chunk piece) waits while any state spend
   is waiting, and takes tokens only when the bucket holds them, so state waits
   at most for the one piece already on its way (pieces are small: the
   artifact stream slices chunks into ``MAX_PIECE_BYTES``).
3. A spend larger than the burst is let through when the bucket is full and
   drives it negative, so large frames are delayed, never refused.

The mesh re-exports :class:`TokenBucket` from :mod:`syncfw.mesh.budget` (its
dial rate limiter is one too).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable

__all__ = ["BULK_POLL_S", "Priority", "TokenBucket"]

BULK_POLL_S = 0.05
"""How often a waiting bulk spend looks again while state spends are ahead of it."""


class Priority(enum.IntEnum):
    """Who goes first on a shared budget (lower first)."""

    STATE = 0
    """Sync frames: state and alerts."""
    BULK = 1
    """Artifact chunks."""


class TokenBucket:
    """Lets ``rate`` bytes per second through on average, ``burst`` at once.

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
        self._state_waiting = 0
        self.spent = 0
        self.spent_by: dict[Priority, int] = {p: 0 for p in Priority}

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

    @property
    def state_waiting(self) -> int:
        """State spends waiting now (bulk spends hold back while any do)."""
        return self._state_waiting

    def take(self, n: int = 1) -> bool:
        """Take ``n`` tokens if the bucket holds them now; never waits.

        Returns:
            True if they were taken, False (nothing taken) if the bucket holds fewer.
        """
        self._refill()
        if self._tokens < n:
            return False
        self._charge(n, Priority.STATE)
        return True

    def _charge(self, n: int, priority: Priority) -> None:
        self._tokens -= n
        self.spent += n
        self.spent_by[priority] += n

    async def spend(self, n: int, priority: Priority = Priority.STATE) -> None:
        """Wait until ``n`` bytes may go, then take them from the bucket.

        Args:
            n: bytes about to be sent.
            priority: :attr:`Priority.BULK` waits behind every waiting state
                spend (invariant 2).
        """
        if priority is Priority.BULK:
            await self._spend_bulk(n)
            return
        wait = self.delay_for(n)
        if wait > 0:
            self._state_waiting += 1
            try:
                await self._sleep(wait)
            finally:
                self._state_waiting -= 1
            self._refill()
        self._charge(n, priority)

    async def _spend_bulk(self, n: int) -> None:
        while True:
            if self._state_waiting:
                await self._sleep(BULK_POLL_S)
                continue
            wait = self.delay_for(n)
            if wait <= 0:
                self._charge(n, Priority.BULK)
                return
            # wake early enough to see a state spend that arrived meanwhile
            await self._sleep(min(wait, BULK_POLL_S))
