"""The apply planner's per-batch warnings, logged after COMMIT: clipped and rate-limited.

A remote batch's plan (:mod:`syncfw.store.planner`) lists what it rejected,
dropped, stripped or discarded, one line per event: a peer's batch of 50,000
ops that are all rejected makes 50,000 of them. The store logs them through
here.

Invariants:

1. Lines are rate-limited per reason (:func:`reason_of`: the kind of event,
   and for a rejected op the zone verdict's reason) with
   :class:`~syncfw.notices.Notices`: at most one line per reason every
   ``every_s`` seconds, and the next line counts the ones held back. So a
   flooding peer costs a few lines per reason, and nothing goes unseen.
2. A line is cut to ``max_chars`` characters (the planner's text quotes
   peer-chosen keys and origins, up to 1 KiB each).
3. The reasons are a fixed set of words the planner writes, never peer text,
   so the table of keys stays small (and :class:`Notices` bounds it anyway).

Pure apart from logging: no SQLite, no asyncio.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from syncfw.notices import Notices, clip_text

__all__ = ["PLAN_WARN_EVERY_S", "PlanLog", "reason_of"]

PLAN_WARN_EVERY_S = 10.0
"""A reason logs at most once per this many seconds (the rest are counted in its next line)."""

_MAX_CHARS = 300

# the planner's line shapes, first match wins (syncfw/store/planner.py)
_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("rejected", re.compile(r"^rejected op \(")),
    ("dropped_pending", re.compile(r"^dropping pending op \(")),
    ("stripped_sig", re.compile(r"^stripped \d+ signature")),
    ("unsigned_fork", re.compile(r"^discarded op \(")),
    ("fork_pending", re.compile(r"^fork evidence: discarded pending op")),
    ("max_pending", re.compile(r"^held-back ops over max_pending")),
    ("rejected_budget", re.compile(r"^holding ops of .* rejected-op budget")),
)
# a rejected op's verdict (syncfw/zones.py ZoneTable.judge), by the words it ends with
_VERDICTS: tuple[tuple[str, str], ...] = (
    ("did not own zone", "not_owner"),
    ("was never granted", "not_granted"),
    ("has no epoch 0", "not_granted"),
    ("is outside the zone", "outside_zone"),
    ("not the less specific", "less_specific_zone"),
    ("is not a valid node id", "bad_origin"),
    (" values (fleet bootstrap)", "kind"),
)


def reason_of(line: str) -> str:
    """The rate-limit key of one planner line: a fixed word, never the peer's text.

    (A peer may craft a key that reads like another verdict: it then only
    picks which of these fixed buckets its line is counted in.)
    """
    for reason, pattern in _REASONS:
        if pattern.match(line):
            if reason == "rejected":
                for words, verdict in _VERDICTS:
                    if words in line:
                        return f"rejected:{verdict}"
            return reason
    return "other"


class PlanLog:
    """Logs a plan's warnings per invariants 1-3.

    Args:
        logger: where the lines go.
        node_id: prefixed to every line (one process may hold several nodes).
        every_s: the least time between two lines of one reason.
        max_chars: what of a line is kept.
    """

    def __init__(
        self,
        logger: logging.Logger,
        node_id: str,
        *,
        every_s: float = PLAN_WARN_EVERY_S,
        max_chars: int = _MAX_CHARS,
    ) -> None:
        self.node_id = node_id
        self.max_chars = max_chars
        self.notices = Notices(logger, every_s, max_keys=64)
        self.events = 0

    def emit(self, lines: Iterable[str]) -> int:
        """Log ``lines`` (one batch's warnings); returns how many lines were written.

        Within one batch, the first line of each reason stands for all of that
        reason (its count says how many).
        """
        first: dict[str, str] = {}
        count: dict[str, int] = {}
        for line in lines:
            reason = reason_of(line)
            first.setdefault(reason, line)
            count[reason] = count.get(reason, 0) + 1
        written = 0
        for reason, line in first.items():
            self.events += count[reason]
            more = f" (and {count[reason] - 1} more like it in this batch)" if count[reason] > 1 else ""
            written += self.notices.warn(
                reason, count[reason], "%s: %s%s", self.node_id, clip_text(line, self.max_chars), more
            )
        return written
