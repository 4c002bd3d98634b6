"""Who may open an exchange on this server now: quotas per connection, peer and identity.

Invariants:

1. At most ``max_concurrent_exchanges`` exchanges are served at once, at most
   ``per_peer`` of them for one peer address (the host, whatever its ports),
   ``per_identity`` for one authenticated node id (mTLS) and ``per_connection``
   on one HTTP/2 connection. Each quota is well below the global cap, so one
   address or identity holding its quota leaves room for everyone else.
2. A refusal is decided at once (never queued) and names its
   :class:`Refusal` reason; the caller ends the call ``RESOURCE_EXHAUSTED``.
   A refusal the peer brought on itself (its own quotas or CPU budget, never
   the global cap) is answered only after ``refusal_hold_s`` while
   :meth:`Admission.hold` allows (at most ``held_per_peer`` such calls per
   host, ``max_held`` in all; beyond them, at once): the held call keeps one
   of the connection's HTTP/2 streams, so a peer that reopens what is refused
   at once meets a bounded refusal rate (about its stream limit per
   ``refusal_hold_s`` per connection) instead of costing the node a refusal
   per round trip. A held call costs no CPU and reads nothing.
3. A call whose write was left blocked on flow control when it ended
   (a *stalled* call: grpc cannot finish it until the connection goes) keeps
   counting against its peer's and identity's quotas until ``stall_hold_s``
   has passed (the connection age limit plus its grace, by which grpc has
   closed the connection and freed the call), but not against the global cap,
   so a stalling peer locks out only itself.
4. Every table is bounded by the calls being served and stalled: an entry
   goes when its count drops to zero.
5. The CPU spent on one peer's frames is bounded (:class:`CpuBudget`): each
   peer (its mTLS identity, else its host) has a bucket of CPU seconds that
   refills at ``rate`` seconds per second up to ``burst``; the work done on its
   frames is charged to it afterwards. A peer in debt is refused
   (:attr:`Refusal.CPU_BUDGET`) until the debt is repaid, so over any window
   ``T`` it costs the node at most ``burst + rate * T`` plus the one frame
   that ran it into debt. The table is bounded (``max_peers``): a full bucket
   is the same as no bucket, so the fullest are dropped first.

Pure bookkeeping: no grpc, no I/O; time comes from an injected clock.
"""

from __future__ import annotations

import enum
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Admission", "CpuBudget", "CpuShare", "Quotas", "Refusal", "Ticket", "budget_key", "cpu_budget_of", "peer_host"]


class Refusal(enum.Enum):
    """Why the transport refused or cut a stream (the ``reason`` label of ``syncfw_refused_streams``)."""

    GLOBAL_CAP = "global_cap"
    PEER_QUOTA = "peer_quota"
    IDENTITY_QUOTA = "identity_quota"
    CONNECTION_QUOTA = "connection_quota"
    NO_HELLO = "no_hello"
    STALLED = "stalled"
    CPU_BUDGET = "cpu_budget"


@dataclass(frozen=True, slots=True)
class Quotas:
    """The limits :class:`Admission` enforces (from ``TransportConfig``).

    Attributes:
        max_concurrent_exchanges: exchanges served at once, all peers together.
        per_peer: exchanges at once from one peer address (host).
        per_identity: exchanges at once from one authenticated node id.
        per_connection: exchanges at once on one HTTP/2 connection.
        stall_hold_s: how long a stalled call keeps counting against its
            peer's quotas (invariant 3).
        refusal_hold_s: how long a refusal the peer brought on itself waits
            before it is answered (invariant 2); 0 answers at once.
        held_per_peer: refused calls held at once for one host.
        max_held: refused calls held at once, all hosts together.
    """

    max_concurrent_exchanges: int
    per_peer: int
    per_identity: int
    per_connection: int
    stall_hold_s: float
    refusal_hold_s: float = 1.0
    held_per_peer: int = 16
    max_held: int = 256


def peer_host(peer: str) -> str:
    """The host part of a grpc peer string (``ipv4:1.2.3.4:567`` -> ``ipv4:1.2.3.4``).

    The port is left out so that one host's connections share one quota.
    """
    if peer.startswith("ipv6:[") and "]" in peer:
        return peer[: peer.index("]") + 1]
    head, sep, _port = peer.rpartition(":")
    return head if sep and head else peer


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted call; hand it back to :meth:`Admission.release` exactly once."""

    connection: str
    host: str
    identity: str | None


class Admission:
    """Counts the calls being served and decides whether one more may start.

    Args:
        quotas: the limits.
        clock: monotonic seconds (tests inject their own).
        cpu: the node's per-peer CPU budget; a peer in debt is refused
            :attr:`Refusal.CPU_BUDGET` before anything of its call is read.
    """

    def __init__(
        self,
        quotas: Quotas,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu: CpuBudget | None = None,
    ) -> None:
        self.quotas = quotas
        self.cpu = cpu
        self._clock = clock
        self.active = 0
        self._by_conn: dict[str, int] = {}
        self._by_host: dict[str, int] = {}
        self._by_identity: dict[str, int] = {}
        self._stalled: deque[tuple[float, Ticket]] = deque()
        self.held = 0
        """Refused calls being held before their answer (invariant 2)."""
        self._held_by_host: dict[str, int] = {}

    def admit(self, connection: str, identity: str | None) -> Ticket | Refusal:
        """A ticket for a new call from ``connection`` (grpc's peer string), or why not.

        Args:
            connection: the peer as grpc names it (address and port: one connection).
            identity: the node id the link authenticated (mTLS), if any.

        Returns:
            A :class:`Ticket` (the call counts until released) or the :class:`Refusal`.
        """
        self._expire()
        q, host = self.quotas, peer_host(connection)
        if self.cpu is not None and not self.cpu.allows(budget_key(identity, connection)):
            self.cpu.refused += 1
            return Refusal.CPU_BUDGET
        if self._by_conn.get(connection, 0) >= q.per_connection:
            return Refusal.CONNECTION_QUOTA
        if self._by_host.get(host, 0) >= q.per_peer:
            return Refusal.PEER_QUOTA
        if identity is not None and self._by_identity.get(identity, 0) >= q.per_identity:
            return Refusal.IDENTITY_QUOTA
        if self.active >= q.max_concurrent_exchanges:
            return Refusal.GLOBAL_CAP
        ticket = Ticket(connection, host, identity)
        self.active += 1
        _inc(self._by_conn, connection, 1)
        _inc(self._by_host, host, 1)
        if identity is not None:
            _inc(self._by_identity, identity, 1)
        return ticket

    def release(self, ticket: Ticket, *, stalled: bool = False) -> None:
        """The call ended; a ``stalled`` one keeps its peer quotas for ``stall_hold_s``."""
        self.active -= 1
        _inc(self._by_conn, ticket.connection, -1)
        if stalled:
            self._stalled.append((self._clock() + self.quotas.stall_hold_s, ticket))
            return
        self._drop_peer(ticket)

    def hold(self, connection: str) -> bool:
        """Whether a refused call from ``connection`` may be held before its answer.

        True counts the call until :meth:`unhold`; False (holding is off, or
        the host or the whole table is at its bound): answer it at once.
        """
        q, host = self.quotas, peer_host(connection)
        if q.refusal_hold_s <= 0 or self.held >= q.max_held:
            return False
        if self._held_by_host.get(host, 0) >= q.held_per_peer:
            return False
        self.held += 1
        _inc(self._held_by_host, host, 1)
        return True

    def unhold(self, connection: str) -> None:
        """A held refusal was answered (or its call ended); hand back what :meth:`hold` took."""
        self.held -= 1
        _inc(self._held_by_host, peer_host(connection), -1)

    @property
    def stalled(self) -> int:
        """Stalled calls still counted against their peers."""
        self._expire()
        return len(self._stalled)

    def held_by(self, connection: str) -> int:
        """Calls (served and stalled) counted against the host of ``connection``."""
        self._expire()
        return self._by_host.get(peer_host(connection), 0)

    def _drop_peer(self, ticket: Ticket) -> None:
        _inc(self._by_host, ticket.host, -1)
        if ticket.identity is not None:
            _inc(self._by_identity, ticket.identity, -1)

    def _expire(self) -> None:
        now = self._clock()
        while self._stalled and self._stalled[0][0] <= now:
            self._drop_peer(self._stalled.popleft()[1])


def _inc(table: dict[str, int], key: str, by: int) -> None:
    n = table.get(key, 0) + by
    if n > 0:
        table[key] = n
    else:
        table.pop(key, None)


# -- the CPU spent on each peer's frames (invariant 5) ----------------------------------


@dataclass(frozen=True, slots=True)
class CpuShare:
    """How much CPU one peer's frames may cost (:class:`CpuBudget`).

    Attributes:
        rate: CPU seconds per second a peer's frames may use in the long run
            (0.1: a tenth of one core).
        burst: CPU seconds a peer may use at once after a quiet spell.
        max_wait_s: a peer in debt mid-exchange is slowed (its next frame
            waits for the debt to be repaid) when that takes at most this
            long, and refused beyond it.
        max_peers: buckets kept at most.
        refused_batch_s: what a batch the codec refuses (malformed, or a chain
            broken inside it) costs its peer on top of the CPU it took: honest
            peers never send one, so a peer that does is in debt for about
            ``refused_batch_s / rate`` seconds and refused before its next call
            is read, instead of making the node decode one per burst.
    """

    rate: float = 0.1
    burst: float = 0.5
    max_wait_s: float = 1.0
    max_peers: int = 4096
    refused_batch_s: float = 1.0

    def __post_init__(self) -> None:
        if (
            self.rate <= 0 or self.burst <= 0 or self.max_wait_s < 0 or self.max_peers < 1
            or self.refused_batch_s < 0
        ):
            raise ValueError(f"a CpuShare needs rate, burst and max_peers > 0: {self}")


def budget_key(identity: str | None, address: str) -> str:
    """Whom a frame's CPU is charged to: the authenticated id, else the peer's host.

    A Hello's node id is not used: an unauthenticated peer could name a new
    one for every exchange.
    """
    return f"id:{identity}" if identity is not None else f"host:{peer_host(address)}"


class CpuBudget:
    """Per-peer buckets of CPU seconds (invariant 5). Pure bookkeeping.

    Args:
        share: the rate, burst and table bound.
        clock: monotonic seconds (tests inject their own).
    """

    def __init__(
        self, share: CpuShare | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.share = share if share is not None else CpuShare()
        self._clock = clock
        self._level: dict[str, tuple[float, float]] = {}  # key -> (balance, at)
        self.charged_s = 0.0
        self.refused = 0
        self.penalized = 0

    def balance(self, key: str) -> float:
        """CPU seconds ``key`` may still spend (negative: its debt)."""
        got = self._level.get(key)
        if got is None:
            return self.share.burst
        level, at = got
        return min(self.share.burst, level + (self._clock() - at) * self.share.rate)

    def wait_s(self, key: str) -> float:
        """Seconds until ``key`` is out of debt (0 when it may be served now)."""
        level = self.balance(key)
        return 0.0 if level > 0 else (-level) / self.share.rate + 1e-3

    def allows(self, key: str) -> bool:
        """True if ``key`` may be served now."""
        return self.balance(key) > 0

    def charge(self, key: str, cpu_s: float) -> None:
        """Count ``cpu_s`` seconds of work done on ``key``'s frames."""
        if cpu_s <= 0:
            return
        level = self.balance(key) - cpu_s
        self.charged_s += cpu_s
        if key not in self._level and len(self._level) >= self.share.max_peers:
            self._evict()
        self._level[key] = (level, self._clock())

    def penalize(self, key: str, cpu_s: float) -> None:
        """Put ``key`` ``cpu_s`` seconds further in debt for what it sent, not for work done
        (``CpuShare.refused_batch_s``); not counted in :attr:`charged_s`."""
        if cpu_s <= 0:
            return
        if key not in self._level and len(self._level) >= self.share.max_peers:
            self._evict()
        self._level[key] = (self.balance(key) - cpu_s, self._clock())
        self.penalized += 1

    def __len__(self) -> int:
        return len(self._level)

    def _evict(self) -> None:
        # a full bucket is the same as none; else drop the fullest (the least in debt)
        full = [k for k in self._level if self.balance(k) >= self.share.burst]
        for k in full:
            del self._level[k]
        if len(self._level) >= self.share.max_peers:
            del self._level[max(self._level, key=self.balance)]


_node_budgets: weakref.WeakKeyDictionary[object, CpuBudget] = weakref.WeakKeyDictionary()


def cpu_budget_of(owner: object) -> CpuBudget:
    """The one :class:`CpuBudget` of ``owner`` (a node's metrics registry), made on first use.

    The server's admission and the exchange runner find the node's budget
    through the registry both are given, so what a peer's batches cost the
    runner is what the server refuses it for.
    """
    got = _node_budgets.get(owner)
    if got is None:
        got = _node_budgets[owner] = CpuBudget()
    return got
