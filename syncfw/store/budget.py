"""Budgets for what peers make a store keep: the ``peers`` table of acknowledgements.

Every peer that completes an exchange acknowledges a vector, and the store
records it in ``peers`` (it drives compaction and spares resends after a
restart). In an unsigned fleet any peer id is recorded, so a peer inventing
ids would grow the table, the mirror in memory and the compaction check
without end, and every invented id that acknowledges little holds
compaction back.

Invariants:

1. The table holds at most ``max_peers`` entries (:data:`MAX_PEERS`). A new
   peer past the bound evicts, in the same transaction, the entries that
   acknowledged least recently, among those that are *not protected*.
2. Protected are the ids the node has reason to trust: owners named by the
   fleet's zone grants, and, in a signed fleet, every recorded id (there an
   ack is recorded only from the peer its mTLS certificate authenticated).
   Protected entries are never evicted; if nothing is evictable the new
   entry is still recorded (a fleet larger than the bound is the operator's
   choice, and its WARNING says so).
3. Each eviction counts in ``syncfw_peers_evicted`` and logs a WARNING at most
   once per ``every_s`` (:class:`~syncfw.notices.Notices`), naming how many.
   An evicted peer is forgotten as a replica (as ``forget_peer`` does): it no
   longer holds back compaction, and its next exchange starts from a whole
   summary.

Pure: the store applies the decisions (``store.py``'s ``acknowledge``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from syncfw.notices import Notices

__all__ = ["MAX_PEERS", "PeerBound"]

MAX_PEERS = 1024
"""Entries of the ``peers`` table kept at most (invariant 1)."""

log = logging.getLogger("syncfw.store")


class PeerBound:
    """Decides which acknowledged peers make room for a new one (invariants 1-3).

    Args:
        max_peers: the bound.
        every_s: the least time between two eviction WARNINGs.
    """

    def __init__(self, max_peers: int = MAX_PEERS, *, every_s: float = 60.0) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be at least 1")
        self.max_peers = max_peers
        self.notices = Notices(log, every_s, max_keys=4)
        self.evicted = 0

    def evictions(
        self, acks: Mapping[str, object], new: str, protected: Collection[str]
    ) -> list[str]:
        """The entries to delete so that ``new`` fits (empty if it does, or is known).

        Args:
            acks: the recorded peers, least recently acknowledged first.
            new: the peer about to be recorded.
            protected: ids never evicted (invariant 2).
        """
        if new in acks or len(acks) < self.max_peers:
            return []
        over = len(acks) + 1 - self.max_peers
        out: list[str] = []
        for peer in acks:
            if len(out) >= over:
                break
            if peer not in protected:
                out.append(peer)
        return out

    def note(self, node_id: str, evicted: list[str], size: int) -> None:
        """Count and warn about ``evicted`` (invariant 3); ``size`` is the table's size after."""
        if evicted:
            self.evicted += len(evicted)
            self.notices.warn(
                "evicted",
                len(evicted),
                "%s: the peers table is full (%d entries): forgot the acknowledgements of "
                "%d least recently heard peer id(s) that no zone grant names (many invented "
                "peer ids, or a fleet larger than the bound)",
                node_id,
                self.max_peers,
                len(evicted),
            )
        elif size > self.max_peers:
            self.notices.warn(
                "over",
                1,
                "%s: the peers table holds %d entries, over its bound of %d, all of them "
                "protected (zone owners, or authenticated in a signed fleet)",
                node_id,
                size,
                self.max_peers,
            )
