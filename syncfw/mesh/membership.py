"""Who is in the fleet and who is reachable: seeds, gossip, alive/suspect/dead.

Invariants:

1. Pure: every method takes ``now`` (seconds) from the caller; no clock, no I/O.
2. A member's ``heartbeat`` only grows; gossip with a higher heartbeat than the
   one held is fresher news about that member and revives it (the member itself
   was heard from, indirectly).
3. A member is ``ALIVE`` after any successful exchange or fresher gossip;
   ``SUSPECT`` after ``suspect_after`` consecutive failures; ``DEAD`` once it has
   been suspect for ``dead_after_s``. Dead members are still dialed every
   ``dead_retry_s`` so a healed partition is noticed; they are never forgotten.
4. This node never appears among its own members.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass

from syncfw.sync.frames import PeerInfo

__all__ = ["Member", "MemberState", "Membership"]


class MemberState(enum.Enum):
    """What this node believes of a member."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(slots=True)
class Member:
    """One known member.

    Attributes:
        node_id: its node id ("" for a seed not yet heard from).
        address: where it listens.
        heartbeat: the freshest heartbeat heard of it.
        state: alive, suspect or dead.
        failures: consecutive failed exchanges.
        since: when it entered ``state``.
        last_ok: when an exchange with it last succeeded.
        last_try: when it was last dialed.
    """

    node_id: str
    address: str
    heartbeat: int = 0
    state: MemberState = MemberState.ALIVE
    failures: int = 0
    since: float = 0.0
    last_ok: float | None = None
    last_try: float | None = None


class Membership:
    """The member table of one node.

    Args:
        node_id: this node's id.
        address: where this node listens (gossiped to others).
        seeds: addresses to start from.
        suspect_after: consecutive failures that make a member suspect.
        dead_after_s: time suspect before dead.
        dead_retry_s: how often a dead member is still tried.
    """

    def __init__(
        self,
        node_id: str,
        address: str,
        seeds: Iterable[str] = (),
        *,
        suspect_after: int = 2,
        dead_after_s: float = 10.0,
        dead_retry_s: float = 5.0,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.heartbeat = 0
        self.suspect_after = suspect_after
        self.dead_after_s = dead_after_s
        self.dead_retry_s = dead_retry_s
        self.members: dict[str, Member] = {}  # by address
        for seed in seeds:
            if seed and seed != address:
                self.members[seed] = Member("", seed)

    # -- news ---------------------------------------------------------------------

    def beat(self) -> int:
        """Advance this node's own heartbeat (once per gossip round)."""
        self.heartbeat += 1
        return self.heartbeat

    def merge(self, peers: Iterable[PeerInfo], now: float) -> list[Member]:
        """Fold a gossiped peer list in; returns members that were new."""
        fresh: list[Member] = []
        for p in peers:
            if not p.address or p.node_id == self.node_id or p.address == self.address:
                continue
            m = self.members.get(p.address)
            if m is None:
                m = Member(p.node_id, p.address, p.heartbeat, since=now)
                self.members[p.address] = m
                fresh.append(m)
                continue
            if not m.node_id:
                m.node_id = p.node_id
            if p.heartbeat > m.heartbeat:
                m.heartbeat = p.heartbeat
                if m.state is not MemberState.ALIVE:
                    self._set(m, MemberState.ALIVE, now)
                    m.failures = 0
        return fresh

    def succeeded(self, address: str, node_id: str | None, now: float) -> None:
        """An exchange with ``address`` ended well."""
        m = self.members.get(address)
        if m is None:
            if not address or address == self.address:
                return
            m = self.members[address] = Member(node_id or "", address, since=now)
        if node_id:
            m.node_id = node_id
        m.failures = 0
        m.last_ok = now
        m.last_try = now
        if m.state is not MemberState.ALIVE:
            self._set(m, MemberState.ALIVE, now)

    def failed(self, address: str, now: float) -> MemberState | None:
        """An exchange with ``address`` failed (unreachable, cut, timed out)."""
        m = self.members.get(address)
        if m is None:
            return None
        m.failures += 1
        m.last_try = now
        if m.state is MemberState.ALIVE and m.failures >= self.suspect_after:
            self._set(m, MemberState.SUSPECT, now)
        self.tick(now)
        return m.state

    def tick(self, now: float) -> None:
        """Move members suspect for too long to dead."""
        for m in self.members.values():
            if m.state is MemberState.SUSPECT and now - m.since >= self.dead_after_s:
                self._set(m, MemberState.DEAD, now)

    @staticmethod
    def _set(m: Member, state: MemberState, now: float) -> None:
        m.state = state
        m.since = now

    # -- choices ------------------------------------------------------------------

    def live(self) -> list[Member]:
        """Members not declared dead."""
        return [m for m in self.members.values() if m.state is not MemberState.DEAD]

    def pick(self, fanout: int, rng: random.Random, now: float) -> list[Member]:
        """Up to ``fanout`` random live members, plus one dead member due a retry."""
        live = sorted(self.live(), key=lambda m: m.address)
        chosen = rng.sample(live, min(fanout, len(live)))
        due = sorted(
            (
                m
                for m in self.members.values()
                if m.state is MemberState.DEAD
                and (m.last_try is None or now - m.last_try >= self.dead_retry_s)
            ),
            key=lambda m: m.address,
        )
        if due:
            chosen.append(rng.choice(due))
        return chosen

    def gossip(self) -> tuple[PeerInfo, ...]:
        """The peer list to gossip: this node first, then every member with an id."""
        own = PeerInfo(self.node_id, self.address, self.heartbeat)
        others = tuple(
            PeerInfo(m.node_id, m.address, m.heartbeat)
            for m in sorted(self.members.values(), key=lambda m: m.address)
            if m.node_id and m.state is not MemberState.DEAD
        )
        return (own, *others)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Member states for status pages."""
        return {
            m.address: {"node_id": m.node_id, "state": m.state.value, "failures": m.failures}
            for m in self.members.values()
        }
