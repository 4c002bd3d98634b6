"""What a replica's sessions know of each peer link across exchanges, as plain state.

Invariants:

1. Nothing here performs I/O or reads a clock: times come from the session,
   which has them injected (:class:`~syncfw.sync.session.SessionClocks`).
2. Batch sizes adapt per link (:class:`BatchSizer`): the first batch is small;
   the size doubles while acks come back within ``fast_s`` of the one before,
   halves when one takes longer than ``slow_s`` and drops to the floor on a
   timeout. Between the two, the size is stepped up (by at most 2x, and so
   that the step stays within ``slow_s``) while a larger batch moves bytes
   markedly faster than the one before it (a cost per batch, not the link's
   rate, bounds it: a loaded receiver, a round trip), so a link shrunk to the
   floor by a cut grows again under load; a step that does not pay goes back.
   The measured rate caps a batch to about ``2 * fast_s`` of the link, but
   never below a size acked within ``slow_s / 2``. What a link learned is kept
   for its next exchange.
3. Clock offsets are NTP-style intervals (:class:`ClockEstimate`): an
   initiator's Hello round trip bounds a peer's offset on both sides, a
   responder's one-way Hello from below only. :class:`ClockFilter` intersects
   the recent intervals of one peer (the tightest estimate consistent with all
   of them) and starts afresh when they contradict (a clock stepped).
4. No two live exchanges with one peer send it the same origin's ops at once:
   an origin with ops sent and not acknowledged by one exchange is left out of
   the others' fetches (:meth:`PeerLink.leased_by_others`), and what any
   exchange had acknowledged is skipped by the rest (:attr:`PeerLink.acked`).
   What a replica holds, as its sessions last learned it (:attr:`PeerBook.held`),
   lets a receiver accept a sender that skipped ahead over ops it already holds.
5. Everything is bounded: at most ``max_peers`` links per book (the least
   recently used goes), ``window`` samples per clock filter.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchSizer", "ClockEstimate", "ClockFilter", "PeerBook", "PeerLink"]


@dataclass(frozen=True, slots=True)
class ClockEstimate:
    """A peer's wall clock minus ours, known to lie in ``[low_ms, high_ms]``.

    ``high_ms`` is ``inf`` for a one-way sample (a responder's: the peer's
    Hello can only have been sent before it arrived).
    """

    low_ms: float
    high_ms: float = math.inf

    @classmethod
    def round_trip(cls, t0: float, t1: float, t2: float, t3: float) -> ClockEstimate:
        """The NTP estimate: ``t0`` our send, ``t1`` peer's receive, ``t2`` peer's send, ``t3`` our receive.

        The midpoint is ``((t1 - t0) + (t2 - t3)) / 2``, the half-width the
        round trip less the peer's turnaround, halved.
        """
        return cls(min(t2 - t3, t1 - t0), max(t2 - t3, t1 - t0))

    @property
    def bounded(self) -> bool:
        """True when the interval is finite on both sides."""
        return math.isfinite(self.high_ms)

    @property
    def offset_ms(self) -> float:
        """The midpoint (the lower bound of a one-way estimate)."""
        return (self.low_ms + self.high_ms) / 2 if self.bounded else self.low_ms

    @property
    def uncertainty_ms(self) -> float:
        """Half the interval's width (``inf`` for a one-way estimate)."""
        return (self.high_ms - self.low_ms) / 2

    def exceeds(self, limit_ms: float) -> bool:
        """True only when every offset the samples allow is beyond ``±limit_ms``.

        For a bounded estimate that is ``|offset| > limit + uncertainty``.
        """
        return self.low_ms > limit_ms or self.high_ms < -limit_ms

    def intersect(self, other: ClockEstimate) -> ClockEstimate | None:
        """Offsets both allow; None if they contradict."""
        low, high = max(self.low_ms, other.low_ms), min(self.high_ms, other.high_ms)
        return ClockEstimate(low, high) if low <= high else None


@dataclass(slots=True)
class ClockFilter:
    """The recent clock samples of one peer, combined (invariant 3)."""

    window: int = 8
    samples: deque[ClockEstimate] = field(default_factory=deque)

    def add(self, sample: ClockEstimate) -> ClockEstimate:
        """Take a sample; return the combined estimate."""
        self.samples.append(sample)
        while len(self.samples) > self.window:
            self.samples.popleft()
        best: ClockEstimate | None = sample
        for older in reversed(list(self.samples)[:-1]):
            assert best is not None
            merged = best.intersect(older)
            if merged is None:  # the clock stepped: older samples no longer hold
                self.samples = deque([sample])
                return sample
            best = merged
        assert best is not None
        return best


_SETTLE_ACKS = 16  # acks a link's size stays put after a step up that did not pay


@dataclass(slots=True)
class BatchSizer:
    """The adaptive batch size of one link (invariant 2).

    Attributes:
        size: the target encoded size of the next batch, in bytes.
        floor: the smallest target.
        cap: the largest target (the peer's cap, less headroom).
        fast_s: an ack within this long of the one before grows the size.
        slow_s: an ack later than this shrinks it.
        rate_bps: the measured delivery rate (bytes acked per second), if any.
    """

    size: int = 8 * 1024
    floor: int = 2 * 1024
    cap: int = 768 * 1024
    fast_s: float = 0.5
    slow_s: float = 2.0
    rate_bps: float | None = None
    probe: tuple[float, float, float] | None = None
    """A step up under test: the wire bytes and delivery rate of the acks before it,
    and the step's factor."""
    settled: int = 0
    """Middle-band acks left before the size is probed upwards again."""
    sent: int = 0
    """The last size :meth:`target` gave (what the acks now coming are of, about)."""
    ok: int = 0
    """A size sent when an ack came within ``slow_s / 2``: the rate cap keeps it."""
    recent: float = 0.0
    """The largest batch lately acked, in wire bytes (decaying)."""

    def acked(self, nbytes: int, service_s: float | None) -> None:
        """A batch of ``nbytes`` was acknowledged ``service_s`` after the previous ack
        (or its own send); None: no clock, count it as fast."""
        rate = None
        self.recent = max(float(nbytes), 0.8 * self.recent)
        if service_s is not None and service_s > 0:
            rate = nbytes / service_s
            self.rate_bps = rate if self.rate_bps is None else 0.7 * self.rate_bps + 0.3 * rate
        if service_s is None or service_s <= self.slow_s / 2:
            self.ok = self.sent
        if service_s is None or service_s <= self.fast_s:
            self.size = min(self.cap, self.size * 2)
        elif service_s > self.slow_s:
            self.size = max(self.floor, self.size // 2)
            self.probe = None
        elif rate is not None and service_s is not None:
            self._probe_up(nbytes, rate, service_s)

    def _probe_up(self, nbytes: int, rate: float, service_s: float) -> None:
        """An ack between ``fast_s`` and ``slow_s``: try a larger batch, keep it if it pays.

        A cost per batch (a loaded receiver's commit, a round trip) makes every
        ack slow, whatever the size, and the doubling rule alone would then keep
        the size where a cut or a timeout left it. The step is ``f = min(2,
        slow_s / service_s)``, so the larger batch stays within ``slow_s`` even
        where the link's rate bounds it. Where a cost per batch bounds it, the
        rate grows by about ``f``; where the link does, not at all: a step whose
        rate grew by at least half of ``f - 1`` is kept and stepped again, one
        that did not goes back and stays for ``_SETTLE_ACKS`` acks.
        """
        probe = self.probe
        if probe is not None:
            base, before, f = probe
            if nbytes < base * (1 + f) / 2:
                return  # an ack of a batch sent before the step
            self.probe = None
            if rate < before * (1 + (f - 1) / 2):
                self.size = max(self.floor, int(self.sent / f))
                self.ok = min(self.ok, self.size)
                self.settled = _SETTLE_ACKS
                return
        elif self.settled > 0:
            self.settled -= 1
            return
        f = min(2.0, self.slow_s / service_s)
        if f >= 1.25 and self.sent < self.cap:
            self.probe = (max(float(nbytes), self.recent), rate, f)
            self.size = min(self.cap, int(f * max(self.sent, self.floor)))

    def timed_out(self) -> None:
        """No ack came in time: start again from the floor."""
        self.size = self.floor
        self.probe = None
        self.ok = 0

    def target(self, cap: int) -> int:
        """The next batch's size, within ``cap``, and never more than the link carries in
        about ``2 * fast_s`` at its measured rate (so no one batch outlasts a peer's idle
        deadline on a thin link, however fast its acks came before), unless a batch
        that size was acked within ``slow_s / 2`` (:attr:`ok`) or it is a probe."""
        size = min(self.size, cap, self.cap)
        if self.rate_bps is not None and self.probe is None:
            # The rate counts wire bytes (zstd makes them fewer than the bytes asked
            # for) and any cost per batch, so a cap of it alone shrinks the batches,
            # whose acks then show a lower rate, down to the floor: a size acked in
            # good time stays allowed.
            size = min(size, max(self.floor, self.ok, int(self.rate_bps * 2 * self.fast_s)))
        self.sent = max(64, size)
        return self.sent


class PeerLink:
    """One peer as seen by one replica's sessions (invariants 2-4)."""

    __slots__ = ("acked", "clock", "leases", "sizer")

    def __init__(self, sizer: BatchSizer | None = None) -> None:
        self.sizer = sizer or BatchSizer()
        self.clock = ClockFilter()
        self.acked: dict[str, int] = {}  # what the peer acknowledged to any exchange
        self.leases: dict[str, Any] = {}  # origin -> the session sending it unacknowledged

    def fold_ack(self, vv: dict[str, int] | Any) -> None:
        """Entries the peer acknowledged (only ever moving forward)."""
        acked = self.acked
        for origin, seq in vv.items():
            if seq > acked.get(origin, 0):
                acked[origin] = seq

    def leased_by_others(self, session: object) -> set[str]:
        """Origins another live exchange has ops of in flight to this peer."""
        return {o for o, s in self.leases.items() if s is not session}

    def lease(self, session: object, origins: set[str]) -> None:
        """``session`` now has ops of ``origins`` in flight."""
        for o in origins:
            self.leases.setdefault(o, session)

    def release(self, session: object, origins: set[str] | None = None) -> None:
        """``session`` has nothing of ``origins`` (None: of anything) in flight any more."""
        for o in list(self.leases) if origins is None else origins:
            if self.leases.get(o) is session:
                del self.leases[o]


class PeerBook:
    """A replica's :class:`PeerLink` per peer id, bounded, and what it holds (invariant 4-5).

    Args:
        max_peers: links kept at most; the least recently used goes.
        sizer: a template for new links' batch sizing.
    """

    def __init__(self, max_peers: int = 4096, sizer: BatchSizer | None = None) -> None:
        self.max_peers = max_peers
        self._sizer = sizer or BatchSizer()
        self._links: OrderedDict[str, PeerLink] = OrderedDict()
        self.held: dict[str, int] = {}

    def link(self, peer: str) -> PeerLink:
        """The link to ``peer`` (made on first use)."""
        got = self._links.get(peer)
        if got is None:
            s = self._sizer
            got = PeerLink(BatchSizer(s.size, s.floor, s.cap, s.fast_s, s.slow_s))
            self._links[peer] = got
            while len(self._links) > self.max_peers:
                self._links.popitem(last=False)
        else:
            self._links.move_to_end(peer)
        return got

    def __len__(self) -> int:
        return len(self._links)

    def note_held(self, vv: dict[str, int] | Any, origins: set[str]) -> None:
        """The replica holds ``vv[o]`` of each origin in ``origins`` (fresh from an apply)."""
        held = self.held
        for o in origins:
            seq = vv.get(o, 0)
            if seq > held.get(o, 0):
                held[o] = seq
