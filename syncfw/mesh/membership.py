"""Who is in the fleet and who is reachable: seeds, gossip, alive/suspect/dead.

Invariants:

1. Pure: every method takes ``now`` (seconds) from the caller; no clock, no I/O.
2. A member's ``heartbeat`` only grows; gossip with a higher heartbeat than the
   one held is fresher news about that member. It never flips a suspect or dead
   member alive by itself (a relayed heartbeat may predate the failure): it
   marks the member for a probe (``recheck``), and the probe decides.
3. A member is ``ALIVE`` after any successful exchange, any Hello heard from it,
   or an indirect probe that reached it (``vouched``: a cut between this node
   and it alone); ``SUSPECT`` after ``suspect_after`` consecutive failed
   contacts that no indirect probe vouched for; ``DEAD`` once it has been
   suspect for ``dead_after_s``. Dead members are still dialed every
   ``dead_retry_s`` so a healed partition is noticed; they are never forgotten.
3a. Every change of a member's state is recorded as a :class:`Transition`
   until the caller takes them (:meth:`Membership.drain`), however it happened
   (a failure, :meth:`Membership.tick`, a success), so the mesh's cleanup runs
   on every transition to dead.
4. This node never appears among its own members.
5. Bounded by :class:`~syncfw.mesh.config.GossipBounds`: the table never
   holds more than ``max_members``; one Peers frame adds at most
   ``learn_per_frame`` members and is read for at most ``read_per_frame``
   entries; a member is held only with a valid node id and address
   (:mod:`syncfw.mesh.addresses`). Seeds and members reached before are never
   evicted; learned members never reached make room for newcomers, the dead
   first, then the tried-and-failed, then the untried, oldest first.
6. This node's own peer list (:meth:`Membership.gossip`) holds at most
   ``gossip_members`` members and ``gossip_bytes`` bytes: members reached
   before first, then other alive ones, then suspect ones; each tier rotated
   from one list to the next, so a table larger than a list is gossiped in turn.
7. A choice of peers (:meth:`Membership.choose`) includes at most
   ``new_dials`` learned members never reached; the rest of the fanout goes to
   seeds and members reached before.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from syncfw.mesh.addresses import (
    FRAME_CAP,
    TABLE_FULL,
    check_address,
    check_node_id,
)
from syncfw.mesh.config import GossipBounds
from syncfw.sync.frames import PeerInfo

__all__ = ["Choice", "Learned", "Member", "MemberState", "Membership", "Saved", "Transition"]

# protobuf framing of one gossiped entry beyond its two strings: tags, lengths,
# a varint heartbeat of up to 10 bytes and the entry's own header, whatever the lengths
_ENTRY_OVERHEAD = 32
_FRAME_OVERHEAD = 16  # the Frame's and the Peers message's own tags and lengths


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
        recheck: fresher gossip came while it was suspect or dead: probe it.
        vouched: when an indirect probe last reached it (this node could not).
        heard_at: when it last answered this node itself (a Hello, a probe,
            an exchange); a member heard from is no new dial.
    """

    node_id: str
    address: str
    heartbeat: int = 0
    state: MemberState = MemberState.ALIVE
    failures: int = 0
    since: float = 0.0
    last_ok: float | None = None
    last_try: float | None = None
    recheck: bool = False
    vouched: float | None = None
    heard_at: float | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a member's state (:meth:`Membership.drain`).

    Attributes:
        member: the member (its state is ``new`` unless it changed again since).
        old: the state it left.
        new: the state it entered.
        at: the caller's clock.
    """

    member: Member
    old: MemberState
    new: MemberState
    at: float


@dataclass(frozen=True, slots=True)
class Saved:
    """A member as persisted across restarts (:mod:`syncfw.mesh.persist`).

    Attributes:
        node_id: its node id.
        address: where it listens.
        last_seen_ms: wall clock (ms since the epoch) of the last contact.
    """

    node_id: str
    address: str
    last_seen_ms: int


@dataclass(slots=True)
class Learned:
    """What one gossiped peer list did to the table (:meth:`Membership.learn`).

    Attributes:
        fresh: members added.
        refused: entries refused, by reason (:data:`~syncfw.mesh.addresses.REFUSALS`).
        examples: one refused entry per reason, as gossiped (for the log line).
        evicted: members dropped to make room, by why they could go
            (``dead``, ``failed``, ``untried``).
        evicted_ids: node ids of the evicted members (their metric series go).
    """

    fresh: list[Member] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    examples: dict[str, PeerInfo] = field(default_factory=dict)
    evicted: dict[str, int] = field(default_factory=dict)
    evicted_ids: list[str] = field(default_factory=list)

    def _refuse(self, reason: str, p: PeerInfo, n: int = 1) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + n
        self.examples.setdefault(reason, p)


@dataclass(frozen=True, slots=True)
class Choice:
    """The peers of one round (:meth:`Membership.choose`).

    Attributes:
        chosen: members to exchange with.
        new: how many of them are learned members never reached (each a new dial).
        deferred: members chosen at random that were left out for want of new dials.
    """

    chosen: list[Member]
    new: int
    deferred: int


class _Table(dict[str, Member]):
    """The member table, by address, counting changes to what it holds.

    A round orders the table by address several times (its choice, its probes,
    its peer list); :meth:`Membership._ordered` sorts it again only when the
    count moved. Members' own fields change in place and need no re-sort: the
    order is by address, the key.
    """

    __slots__ = ("version",)

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def __setitem__(self, key: str, value: Member) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.version += 1
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        self.version += 1
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Member]:
        self.version += 1
        return super().popitem()

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def setdefault(self, key: str, default: Member | None = None) -> Member:
        self.version += 1
        return super().setdefault(key, default)  # type: ignore[arg-type]

    def update(self, *args: Any, **kw: Any) -> None:
        self.version += 1
        super().update(*args, **kw)

    def __ior__(self, other: Any) -> _Table:  # type: ignore[override,misc]
        self.update(other)
        return self


class Membership:
    """The member table of one node.

    Args:
        node_id: this node's id.
        address: where this node listens (gossiped to others).
        seeds: addresses to start from.
        suspect_after: consecutive failures that make a member suspect.
        dead_after_s: time suspect before dead.
        dead_retry_s: how often a dead member is still tried.
        bounds: caps on the table, on what one peer list adds, on this node's
            own list. If None: the defaults of :class:`GossipBounds`, with
            bare names allowed as addresses (a table on its own has no
            transport to say what an address looks like; the mesh always
            passes its config's).
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
        bounds: GossipBounds | None = None,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.heartbeat = 0
        self.suspect_after = suspect_after
        self.dead_after_s = dead_after_s
        self.dead_retry_s = dead_retry_s
        self.bounds = bounds or GossipBounds(require_port=False)
        self._members = _Table()  # by address
        self._order: list[Member] = []  # the table by address, as of _order_at
        self._order_at = -1
        # the operator's own addresses: never evicted, never counted as new dials
        self.seeds: frozenset[str] = frozenset(s for s in seeds if s and s != address)
        for seed in sorted(self.seeds):
            self.members[seed] = Member("", seed)
        self._rotation = [0, 0, 0]  # where each tier's next gossiped list starts
        self._transitions: list[Transition] = []
        self._probe_order: list[str] = []  # SWIM's round-robin probe list, reshuffled per pass

    @property
    def members(self) -> dict[str, Member]:
        """The member table, by address."""
        return self._members

    @members.setter
    def members(self, table: dict[str, Member]) -> None:
        self._members = _Table()
        self._members.update(table)

    def _ordered(self) -> list[Member]:
        """Every member, by address: sorted again only after the table changed."""
        t = self._members
        if self._order_at != t.version:
            self._order = sorted(t.values(), key=_address)
            self._order_at = t.version
        return self._order

    def restore(self, saved: Iterable[Saved], now: float) -> list[Member]:
        """Add members persisted before a restart, beside the seeds (most recently seen first).

        They are held like seeds (never evicted, never counted as new dials)
        and start alive: the first rounds probe them like anyone else. Entries
        with a bad id or address, this node itself, or past ``max_members``
        are skipped.

        Returns:
            The members added.
        """
        b = self.bounds
        added: list[Member] = []
        for s in sorted(saved, key=lambda s: (-s.last_seen_ms, s.address)):
            if len(self.members) >= b.max_members:
                break
            if not s.address or s.address == self.address or s.node_id == self.node_id:
                continue
            bad = check_node_id(s.node_id) or check_address(
                s.address, require_port=b.require_port, allowed_networks=b.allowed_networks
            )
            if bad is not None:
                continue
            m = self.members.get(s.address)
            if m is None:
                m = self.members[s.address] = Member(s.node_id, s.address, since=now)
                added.append(m)
            elif not m.node_id:
                m.node_id = s.node_id
        self.seeds = self.seeds | {m.address for m in added}
        return added

    def saved(self, wall_ms: int, now: float) -> list[Saved]:
        """Members worth keeping across a restart: the named ones ever reached.

        Args:
            wall_ms: the wall clock now, in ms (``last_ok`` is on the caller's
                monotonic clock, which a restart does not keep).
            now: the caller's clock.
        """
        out = []
        for m in self.members.values():
            if m.node_id and m.last_ok is not None:
                seen = wall_ms - int((now - m.last_ok) * 1000)
                out.append(Saved(m.node_id, m.address, seen))
        return sorted(out, key=lambda s: s.address)

    def drain(self) -> list[Transition]:
        """The state changes since the last call (oldest first)."""
        out, self._transitions = self._transitions, []
        return out

    # -- news ---------------------------------------------------------------------

    def beat(self) -> int:
        """Advance this node's own heartbeat (once per gossip round)."""
        self.heartbeat += 1
        return self.heartbeat

    def merge(self, peers: Iterable[PeerInfo], now: float) -> list[Member]:
        """Fold a gossiped peer list in; returns members that were new (see :meth:`learn`)."""
        return self.learn(peers, now).fresh

    def learn(self, peers: Iterable[PeerInfo], now: float) -> Learned:
        """Fold a gossiped peer list in, within the bounds; says what it refused and evicted.

        Args:
            peers: the list as gossiped (any length: only ``read_per_frame``
                entries are looked at).
            now: the caller's clock.

        Returns:
            What was added, refused and evicted.
        """
        b = self.bounds
        out = Learned()
        read = 0
        for p in peers:
            read += 1
            if read > b.read_per_frame:
                out._refuse(FRAME_CAP, p)
                continue
            if not p.address or p.node_id == self.node_id or p.address == self.address:
                continue  # a member that only dials out, or this node itself: nothing to hold
            m = self.members.get(p.address)
            if m is not None:
                self._refresh(m, p, now)
                continue
            reason = check_node_id(p.node_id) or check_address(
                p.address, require_port=b.require_port, allowed_networks=b.allowed_networks
            )
            if reason is None and len(out.fresh) >= b.learn_per_frame:
                reason = FRAME_CAP
            if reason is None and len(self.members) >= b.max_members and not self._evict(out):
                reason = TABLE_FULL
            if reason is not None:
                out._refuse(reason, p)
                continue
            m = Member(p.node_id, p.address, p.heartbeat, since=now)
            self.members[p.address] = m
            out.fresh.append(m)
        return out

    def _refresh(self, m: Member, p: PeerInfo, now: float) -> None:
        """Fresher gossip about a member already held."""
        if not m.node_id and check_node_id(p.node_id) is None:
            m.node_id = p.node_id  # a seed, now named
        if p.heartbeat > m.heartbeat:
            m.heartbeat = p.heartbeat
            if m.state is not MemberState.ALIVE:
                m.recheck = True  # news, maybe older than the failure: a probe decides

    def _evict(self, out: Learned) -> bool:
        """Drop one learned member never reached, to make room; False if there is none."""
        best: tuple[int, float, str] | None = None
        for m in self.members.values():
            if m.address in self.seeds or m.last_ok is not None:
                continue
            if m.state is MemberState.DEAD:
                tier = 0
            elif m.last_try is not None:
                tier = 1
            else:
                tier = 2
            key = (tier, m.last_try if m.last_try is not None else m.since, m.address)
            if best is None or key < best:
                best = key
        if best is None:
            return False
        gone = self.members.pop(best[2])
        why = ("dead", "failed", "untried")[best[0]]
        out.evicted[why] = out.evicted.get(why, 0) + 1
        if gone.node_id:
            out.evicted_ids.append(gone.node_id)
        return True

    def succeeded(self, address: str, node_id: str | None, now: float) -> Learned | None:
        """An exchange with ``address`` ended well.

        Returns:
            For an address not in the table: what adding it did (it may have
            evicted a member, or been refused for a full table); else None.
        """
        m = self.members.get(address)
        if m is None:
            if not address or address == self.address:
                return None
            out = Learned()
            if len(self.members) >= self.bounds.max_members and not self._evict(out):
                out._refuse(TABLE_FULL, PeerInfo(node_id or "", address))
                return out
            m = self.members[address] = Member(node_id or "", address, since=now)
            out.fresh.append(m)
            self._reached(m, node_id, now)
            return out
        self._reached(m, node_id, now)
        return None

    def _reached(self, m: Member, node_id: str | None, now: float) -> None:
        if node_id:
            m.node_id = node_id
        m.last_ok = now
        m.last_try = now
        m.heard_at = now
        self._alive(m, now)

    def _alive(self, m: Member, now: float) -> None:
        m.failures = 0
        m.recheck = False
        if m.state is not MemberState.ALIVE:
            self._set(m, MemberState.ALIVE, now)

    def heard(self, address: str, node_id: str | None, now: float) -> None:
        """``address`` answered (its Hello, or a direct probe), though no exchange succeeded."""
        m = self.members.get(address)
        if m is None:
            return
        if node_id and not m.node_id and check_node_id(node_id) is None:
            m.node_id = node_id
        m.last_try = now
        m.heard_at = now
        self._alive(m, now)

    def vouched(self, address: str, now: float) -> None:
        """This node failed to reach ``address``, but an indirect probe did: it is alive."""
        m = self.members.get(address)
        if m is None:
            return
        m.last_try = now
        m.vouched = now
        self._alive(m, now)

    def failed(self, address: str, now: float) -> MemberState | None:
        """A contact with ``address`` failed (unreachable, cut, timed out) and nobody vouched."""
        m = self.members.get(address)
        if m is None:
            return None
        m.failures += 1
        m.last_try = now
        m.recheck = False
        if m.state is MemberState.ALIVE and m.failures >= self.suspect_after:
            self._set(m, MemberState.SUSPECT, now)
        self.tick(now)
        return m.state

    def tick(self, now: float) -> None:
        """Move members suspect for too long to dead."""
        for m in self.members.values():
            if m.state is MemberState.SUSPECT and now - m.since >= self.dead_after_s:
                self._set(m, MemberState.DEAD, now)

    def next_due(self) -> float | None:
        """When the next suspect member is due to be declared dead (None: none is suspect)."""
        due = [
            m.since + self.dead_after_s
            for m in self.members.values()
            if m.state is MemberState.SUSPECT
        ]
        return min(due) if due else None

    def _set(self, m: Member, state: MemberState, now: float) -> None:
        self._transitions.append(Transition(m, m.state, state, now))
        m.state = state
        m.since = now

    # -- probes (SWIM) ------------------------------------------------------------

    def probe_targets(
        self,
        exclude: set[str],
        rng: random.Random,
        avoid: Collection[str] = (),
    ) -> list[Member]:
        """Members to probe this round (never those in ``exclude``).

        Every suspect member (to confirm or refute it) and every member with
        fresher gossip pending (``recheck``), then one more alive member in
        SWIM's round-robin order (a shuffled pass over the table, reshuffled
        with ``rng`` when done), so each member is probed at least once per
        pass even when the fanout never picks it. The round-robin one is
        outside ``avoid`` (the round's exchanges) when any such member is left,
        so probes and exchanges together cover as many members as they can.
        Learned members never reached (:meth:`is_new`) are never probed: a
        probe is a dial, and new dials are the rounds' own, rate-limited.
        """
        out = [
            m
            for m in self._ordered()
            if m.address not in exclude
            and (m.state is MemberState.SUSPECT or m.recheck)
            and not self.is_new(m)
        ]
        taken = exclude | {m.address for m in out}
        fallback: Member | None = None
        for _ in range(2):  # the rest of this pass, then a fresh one
            while self._probe_order:
                m = self.members.get(self._probe_order.pop())
                if (
                    m is None
                    or m.state is not MemberState.ALIVE
                    or m.address in taken
                    or self.is_new(m)  # a learned address never reached: dialed only by rounds
                ):
                    continue
                if m.address not in avoid:
                    return [*out, m]
                if fallback is None:
                    fallback = m
            self._probe_order = [m.address for m in self._ordered()]
            rng.shuffle(self._probe_order)
        return [*out, fallback] if fallback is not None else out

    def helpers(self, target: str, k: int, rng: random.Random) -> list[Member]:
        """Up to ``k`` alive members to ask for an indirect probe of ``target``.

        Members reached before are preferred (they are known to answer);
        seeds fill in. Learned members never reached are never asked (asking
        is a dial, which only rounds make, within the new-dial rate).
        """
        alive = [m for m in self._ordered() if m.state is MemberState.ALIVE and m.address != target]
        reached = [m for m in alive if m.last_ok is not None]
        rest = [m for m in alive if m.last_ok is None and m.address in self.seeds]
        out = rng.sample(reached, min(k, len(reached)))
        if len(out) < k:
            out += rng.sample(rest, min(k - len(out), len(rest)))
        return out

    # -- choices ------------------------------------------------------------------

    def live(self) -> list[Member]:
        """Members not declared dead."""
        return [m for m in self.members.values() if m.state is not MemberState.DEAD]

    def is_new(self, m: Member) -> bool:
        """Whether dialing ``m`` is a new dial: a learned member never reached or heard.

        A member that answered this node itself (its Hello on an exchange that
        then failed, a direct probe) is a verified address: it is probed and
        retried like any other, so one whose exchanges keep failing (a crawl
        cut by deadlines, a peer restarting) is not left to the new-dial rate.
        """
        return m.last_ok is None and m.heard_at is None and m.address not in self.seeds

    def pick(self, fanout: int, rng: random.Random, now: float) -> list[Member]:
        """Up to ``fanout`` random live members, plus one dead member due a retry."""
        return self.choose(fanout, rng, now).chosen

    def choose(
        self,
        fanout: int,
        rng: random.Random,
        now: float,
        new_dials: int | None = None,
        skip: Collection[str] = (),
    ) -> Choice:
        """The peers of one round: ``fanout`` random live members, plus one dead one due a retry.

        Args:
            fanout: live members to choose.
            rng: the mesh's seeded randomness.
            now: the caller's clock.
            new_dials: at most this many of the chosen may be new dials
                (:meth:`is_new`); None for no limit. Members left out for it
                are replaced by seeds or members reached before, where any
                are left.
            skip: addresses not to choose (peers already in an exchange), so
                the fanout goes to others and no new dial is counted for them.

        Returns:
            The choice, with how many new dials it holds and how many it deferred.
        """
        live: list[Member] = []
        due: list[Member] = []
        dead = MemberState.DEAD
        for m in self._ordered():
            if m.address in skip:
                continue
            if m.state is not dead:
                live.append(m)
            elif m.last_try is None or now - m.last_try >= self.dead_retry_s:
                due.append(m)
        chosen = rng.sample(live, min(fanout, len(live)))
        if due:
            chosen.append(rng.choice(due))
        if new_dials is None:
            return Choice(chosen, sum(1 for m in chosen if self.is_new(m)), 0)
        kept: list[Member] = []
        deferred = 0
        for m in chosen:
            if not self.is_new(m):
                kept.append(m)
            elif new_dials > 0:
                new_dials -= 1
                kept.append(m)
            else:
                deferred += 1
        if deferred:
            taken = {m.address for m in kept}
            known = [m for m in live if not self.is_new(m) and m.address not in taken]
            kept.extend(rng.sample(known, min(deferred, len(known))))
        return Choice(kept, sum(1 for m in kept if self.is_new(m)), deferred)

    def gossip(self) -> tuple[PeerInfo, ...]:
        """The peer list to gossip: this node first, then members within the bounds.

        At most ``gossip_members`` members and ``gossip_bytes`` bytes in all:
        members reached before first, then other alive ones, then suspect
        ones (the dead and the unnamed are never gossiped), each tier rotated
        by the lists sent before, so every member gets its turn.
        """
        b = self.bounds
        own = PeerInfo(self.node_id, self.address, self.heartbeat)
        room = b.gossip_bytes - _FRAME_OVERHEAD - _entry_bytes(own)
        tiers: tuple[list[Member], ...] = ([], [], [])
        for m in self._ordered():
            if not m.node_id or m.state is MemberState.DEAD:
                continue
            if m.state is MemberState.SUSPECT:
                tiers[2].append(m)
            else:
                tiers[0 if m.last_ok is not None else 1].append(m)
        out = [own]
        for i, tier in enumerate(tiers):
            if not tier:
                continue
            k = self._rotation[i] % len(tier)
            taken = 0
            for m in tier[k:] + tier[:k]:
                entry = PeerInfo(m.node_id, m.address, m.heartbeat)
                cost = _entry_bytes(entry)
                if len(out) - 1 >= b.gossip_members or cost > room:
                    break
                room -= cost
                out.append(entry)
                taken += 1
            # the next list starts where this one stopped, tier by tier
            self._rotation[i] = (k + taken) % len(tier)
        return tuple(out)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Member states for status pages."""
        return {
            m.address: {"node_id": m.node_id, "state": m.state.value, "failures": m.failures}
            for m in self.members.values()
        }


def _address(m: Member) -> str:
    return m.address


def _entry_bytes(p: PeerInfo) -> int:
    """An upper bound on the wire bytes of one gossiped entry."""
    return len(p.node_id.encode()) + len(p.address.encode()) + _ENTRY_OVERHEAD
