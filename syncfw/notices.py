"""Rate-limited, truncated warnings about what peers sent: the one place for both.

Every layer that logs something a peer caused (the codec and session, the
gRPC server's admission, the mesh's gossip guard, the store's pending alarm)
clips peer-chosen text with :func:`clip` / :func:`clip_text` and rate-limits
its lines with :class:`Notices`.

Invariants:

1. At most one line per key (a reason, or a reason and a peer) every
   ``every_s`` seconds; what was suppressed in between is counted and the next
   line says how many there were, so a flood costs a few lines, never one per
   event, and nothing is refused unseen.
2. Text a peer chose is shown through :func:`clip` only: repr-quoted (no
   control characters reach the log) and at most ``limit`` characters.
3. The set of keys is bounded (``max_keys``); past it, new keys share one
   overflow key, so a peer inventing keys cannot grow it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["PEER_TEXT_CHARS", "Notices", "clip", "clip_text"]

PEER_TEXT_CHARS = 120
"""What of a peer-supplied string (id, fleet, reason) goes into an error, a log line or a reason."""

_OVERFLOW = "(other)"


def clip_text(text: str, limit: int = PEER_TEXT_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with ``…`` when it was longer (at most ``limit + 1``)."""
    return text if len(text) <= limit else text[:limit] + "…"


def clip(text: str, limit: int = 64) -> str:
    """``text`` as a quoted, escaped literal, cut to ``limit`` characters of it (escapes counted)."""
    shown = repr(text)
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}…({len(text)} chars)"


class Notices:
    """Warnings about one node's peers, each key at most once per ``every_s``.

    Args:
        logger: where the lines go.
        every_s: the least time between two lines of one key.
        max_keys: distinct keys tracked at most.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(
        self,
        logger: logging.Logger,
        every_s: float,
        *,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.every_s = every_s
        self.max_keys = max_keys
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self.lines = 0

    def warn(self, key: str, count: int, message: str, *args: object) -> bool:
        """Log ``message % args`` (a WARNING) with ``count`` events, unless ``key`` spoke lately.

        Args:
            key: what the line is about; lines of one key are rate-limited together.
            count: events this call stands for (added to the next line if held).
            message: a %-format string; peer-chosen text must go through :func:`clip`.
            args: its arguments.

        Returns:
            True if a line was written.
        """
        now = self._clock()
        if key not in self._last and len(self._last) >= self.max_keys:
            self._prune(now)
            if len(self._last) >= self.max_keys:
                key = _OVERFLOW
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] = self._held.get(key, 0) + count
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        suffix = f" [{count + held} since the last such line]" if held else f" [{count}]"
        self._log.warning(message + suffix, *args)
        self.lines += 1
        return True

    def _prune(self, now: float) -> None:
        # Only keys with nothing held back: a held count is reported, never dropped.
        for key in [
            k for k, t in self._last.items() if now - t >= self.every_s and k not in self._held
        ]:
            del self._last[key]
