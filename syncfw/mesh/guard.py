"""The mesh's side of bounded gossip: the new-dial rate, and saying what was refused.

Invariants:

1. Every refusal and eviction of :class:`~syncfw.mesh.membership.Learned` is
   counted in the node's metrics (``syncfw_gossip_refused{reason}``,
   ``syncfw_gossip_evicted{reason}``) and logged as a rate-limited WARNING
   with its count and one example, peer-chosen text clipped
   (:mod:`syncfw.notices`).
2. New dials (learned members never reached) take a token each from one
   bucket of ``dials_per_s`` / ``dial_burst``; a round never makes more new
   dials than the bucket holds, and what it left out is counted
   (``syncfw_gossip_dials{outcome="deferred"}``) and logged.
3. Knows no sockets and no clock of its own beyond the bucket's (injected in
   tests).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from typing import Any

from syncfw.mesh.budget import TokenBucket
from syncfw.mesh.config import GossipBounds
from syncfw.mesh.membership import Choice, Learned, Membership
from syncfw.metrics import NodeMetrics
from syncfw.notices import Notices, clip

__all__ = ["GossipGuard"]

log = logging.getLogger("syncfw.mesh")

_DEFERRED = "dial_rate"


class GossipGuard:
    """Holds the new-dial bucket and reports what bounded gossip refused.

    Args:
        node_id: this node's id (for log lines).
        bounds: the caps in force.
        metrics: the node's registry.
        dials: the new-dial bucket; one of ``bounds`` by default.
    """

    def __init__(
        self,
        node_id: str,
        bounds: GossipBounds,
        metrics: NodeMetrics,
        dials: TokenBucket | None = None,
    ) -> None:
        self.node_id = node_id
        self.bounds = bounds
        self.metrics = metrics
        self.dials = dials or TokenBucket(bounds.dials_per_s, bounds.dial_burst)
        self.notices = Notices(log, bounds.warn_every_s)

    def choose(
        self,
        membership: Membership,
        fanout: int,
        rng: random.Random,
        now: float,
        skip: Collection[str] = (),
    ) -> Choice:
        """A round's peers, with no more new dials than the bucket holds (tokens taken).

        Args:
            membership: the member table.
            fanout: live members to choose.
            rng: the mesh's seeded randomness.
            now: the caller's clock.
            skip: addresses the round will not dial (already in an exchange):
                never chosen, so never paid or counted as new dials.

        Returns:
            The choice; its new dials have been paid for.
        """
        choice = membership.choose(
            fanout, rng, now, new_dials=max(0, int(self.dials.available())), skip=skip
        )
        if choice.new:
            self.dials.take(choice.new)
            self.metrics.gossip_dial("new", choice.new)
        if choice.deferred:
            self.metrics.gossip_dial("deferred", choice.deferred)
            self.notices.warn(
                _DEFERRED,
                choice.deferred,
                "%s: new-address dials over the limit of %s/s (burst %d) were deferred",
                self.node_id,
                self.bounds.dials_per_s,
                self.bounds.dial_burst,
            )
        return choice

    def learned(self, got: Learned, source: str, table: int) -> None:
        """Record and report what one peer list did to the table.

        Args:
            got: the table's answer.
            source: where the list came from (an address, or "" when unknown).
            table: the table's size afterwards.
        """
        self.metrics.set_members(table)
        if got.fresh:
            first = got.fresh[0]
            log.info(
                "%s learned %d member(s) from %s (first: %s at %s)",
                self.node_id,
                len(got.fresh),
                clip(source) if source else "a peer",
                clip(first.node_id),
                clip(first.address),
            )
        for reason, n in sorted(got.refused.items()):
            self.metrics.gossip_refusal(reason, n)
            ex = got.examples[reason]
            self.notices.warn(
                "refused:" + reason,
                n,
                "%s refused gossiped members (%s) from %s, e.g. node %s at %s",
                self.node_id,
                reason,
                clip(source) if source else "a peer",
                clip(ex.node_id),
                clip(ex.address),
            )
        for reason, n in sorted(got.evicted.items()):
            self.metrics.gossip_eviction(reason, n)
            self.notices.warn(
                "evicted:" + reason,
                n,
                "%s evicted learned members never reached (%s) to make room: the table "
                "holds at most %d",
                self.node_id,
                reason,
                self.bounds.max_members,
            )

    def status(self) -> dict[str, Any]:
        """The gossip bounds' figures, read back from the registry (what ``/metrics`` shows)."""
        m = self.metrics

        def by(name: str, label: str) -> dict[str, int]:
            return {k: int(v) for k, v in sorted(m.by_label(name, label).items()) if v}

        return {
            "members": int(m.value("syncfw_members")),
            "max_members": self.bounds.max_members,
            "refused": by("syncfw_gossip_refused_total", "reason"),
            "evicted": by("syncfw_gossip_evicted_total", "reason"),
            "dials": by("syncfw_gossip_dials_total", "outcome"),
            "dial_tokens": round(self.dials.available(), 3),
        }
