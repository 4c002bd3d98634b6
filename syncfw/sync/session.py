"""One anti-entropy exchange between this replica and one peer, as a state machine.

Invariants (everything that affects the state machine lives in this file):

1. The session performs no I/O. Its inputs are :meth:`Session.start`,
   :meth:`Session.receive` (a frame from the peer) and the answers to the
   effects it asked for (:meth:`ops_fetched`, :meth:`ops_decoded`,
   :meth:`decode_failed`, :meth:`ops_applied`, :meth:`apply_failed`); its
   outputs are lists of effects (:mod:`syncfw.sync.effects`), to be performed
   in order. At most one :class:`FetchOps`, one :class:`DecodeOps` or
   :class:`ApplyOps`, and one :class:`LoadPeerAck` are outstanding at a time;
   frames arriving meanwhile are queued, so a performer may answer late (the
   runner decodes large batches in a worker thread; the simulator and
   :class:`SessionPair` answer at once, so they stay deterministic). Batches
   under ``decode_effect_bytes`` are decoded inline, with the same checks.
2. Both sides run the same machine. Each sends ``Hello`` and ``Digest`` at once;
   equal digests end the exchange after one round trip. Otherwise each sends a
   ``Summary`` and streams, in batches, what the other's summary lacks, then an
   empty ``Ops(last=True)``. A summary is a delta against the vector this side
   last recorded for the peer when that is smaller; the peer rebuilds it from
   its own record of this side, which is the same vector whenever their last
   exchange ended in sync (checked by digest), and asks for the whole vector
   (``Summary(want_full=True)``) otherwise. The receiver applies each batch whole
   (:class:`ApplyOps`) and answers it with an ``Ack`` carrying its new version
   vector, which the sender persists (:class:`Acknowledge`).
2a. Between peers that both advertise ``reply_delta``, a side with no delta of
   its own to send whose node id is the larger waits for the peer's Summary
   and answers it with a delta against it (base digest: the peer's Digest), so
   a pair that never met sends one whole vector, not two; a side reads a delta
   whose base digest is that of the vector it summarized against that vector.
   To a peer that advertises ``implied_ack``, an Ack names only the origins
   where this side now holds other than the batch's last op (more from
   elsewhere, or less: held pending); that peer reads the rest from the batch.
   The vectors a session is handed may be immutable
   :class:`~syncfw.sync.vectors.Vector` s: held without copying, digest cached.
2b. A session sends its Summaries and Acks with ``columns`` set (the vector
   as origins and packed seqs on the wire) only to a peer whose Hello
   advertised ``vv_cols``, and only when its own config speaks it: an
   older peer reads only the rows and would take an empty vector. Either
   form is read from any peer.
3. At most ``window`` batches are un-acknowledged at once, so a slow receiver
   bounds the sender's memory (backpressure end to end).
4. A batch is applied whole or not at all: anything wrong with it (malformed,
   over the caps, a gap in an origin's seq, a forged ``prev``, a fork) ends the
   exchange with :class:`End` before or instead of :class:`ApplyOps`. Because
   every applied batch is durable and every ack is a version vector, a cut at
   any frame leaves both replicas consistent, and the next exchange resumes
   from their version vectors.
4a. An op larger than any batch the peer takes (stored before the value limit,
   or a peer with a smaller cap) is not sent, nor are the later ops of its
   origin (the peer would find a gap); every other origin, and the peer's
   stream, go on. Once both streams are done the exchange ends
   ``RESOURCE_EXHAUSTED`` naming the op (:attr:`Session.unsendable`), never
   ``OK``, and the next exchange tries it again.
5. The session ends exactly once, with one :class:`End` effect as the last
   effect it ever emits; after that every input returns no effects.
6. ``OK`` means the vectors were compared: equal digests, or summaries
   exchanged and both streams completed. A peer's ``Close(OK)`` arriving
   before that ends the exchange ``ABORTED``, never ``OK``.
7. Peers whose ``Hello`` names another fleet, another protocol version or
   another fleet bootstrap (``fleet_digest``, when both sent one) are refused
   ``FAILED_PRECONDITION``. A peer's strings enter reasons clipped
   (:func:`~syncfw.sync.frames.clip`).
8. Batches are sized per link (:class:`~syncfw.sync.links.BatchSizer`): small
   at first, doubling while acks come back fast, halving when they are slow,
   so a thin link gets batches it delivers in about a second and each is
   applied (and acknowledged) as it arrives. The session reads time only
   through injected clocks (:class:`SessionClocks`); without them every ack
   counts as fast.
9. With a :class:`~syncfw.sync.links.PeerBook` shared by a replica's sessions,
   no two live exchanges with one peer send it the same origin at once, and
   none re-sends what another had acknowledged (links invariant 4).
11. Below a compaction point, a snapshot. A side started with a ``floor``
   (where its log of each origin begins: the compaction points) that finds the
   peer's Summary below it asks for a snapshot (:class:`FetchSnapshot`) before
   it fetches any ops, sends it as ``SnapshotPart`` frames cut to the peer's
   cap, and then streams the ops after the vector the snapshot stands for. The
   receiver joins the parts in order with the batches (``max_snapshot_bytes``
   at most, else ``RESOURCE_EXHAUSTED``), installs them whole
   (:class:`InstallSnapshot`) before the next batch, and reads what follows
   against the vector it then holds. At most one snapshot each way per
   exchange. A peer that does not speak ``snapshot`` gets none: the exchange
   ends ``OUT_OF_RANGE``, naming the origins, never ``OK``.
10. Clock offsets are measured from wall clocks, never hybrid ones: the
   initiator's Hello and the responder's answering Hello make one NTP round
   trip (``t1 = t2`` = the responder's Hello stamp, which it sends only once
   the initiator's first frame arrived), bounding the offset on both sides;
   the responder gets a one-way lower bound (:attr:`Session.peer_clock`).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from syncfw.codec import BatchLimits, decode_batch, encode_batch, packed_size
from syncfw.errors import ChainError, DecodeError, ForkError, SyncfwError
from syncfw.log import Op, VersionVector
from syncfw.sync.effects import (
    Acknowledge,
    ApplyOps,
    DecodeOps,
    Effect,
    End,
    FetchOps,
    FetchSnapshot,
    InstallSnapshot,
    LearnPeers,
    LoadPeerAck,
    Send,
)
from syncfw.sync.frames import (
    PROTOCOL_VERSION,
    Ack,
    Close,
    Digest,
    Frame,
    Hello,
    Ops,
    PeerInfo,
    Peers,
    SnapshotPart,
    Status,
    Summary,
    clip,
)
from syncfw.sync.links import BatchSizer, ClockEstimate, PeerBook, PeerLink
from syncfw.sync.snapshot import DEFAULT_MAX_SNAPSHOT_BYTES
from syncfw.sync.vectors import Vector, digest_of

__all__ = [
    "Session",
    "SessionClocks",
    "SessionConfig",
    "SessionState",
]

_SKIP = 1 << 62  # a fetch's vector entry that leaves an origin out
ZSTD = "zstd"
CHAIN = "chain"  # reads batch format 2 (prev hashes implied by the op before are left out)
REPLY_DELTA = "reply_delta"  # takes a Summary given as a delta against its own (invariant 2a)
IMPLIED_ACK = "implied_ack"  # reads an Ack as the batch's own entries, unless it names others
SNAPSHOT = "snapshot"  # takes a state snapshot below the sender's compaction point (invariant 11)
VV_COLUMNS = "vv_cols"  # reads a Summary's or Ack's vector in columns (invariant 2b)


# -- configuration and state ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Tunables of one exchange.

    Attributes:
        max_batch_bytes: largest encoded batch this side accepts, and sends.
        batch_ops: most ops fetched per batch.
        window: most un-acknowledged batches in flight.
        zstd: this side speaks zstd (advertised in ``Hello``).
        vv_columns: this side reads vectors in columns (advertised in
            ``Hello``), and sends them so to a peer that advertised it too.
        delta_summary: send summaries as deltas against the last recorded vector.
        limits: codec caps; ``max_compressed`` is raised to ``max_batch_bytes``.
        decode_effect_bytes: a received batch this large or larger is decoded
            through a :class:`DecodeOps` effect (the runner does it on a
            worker thread); a smaller one is decoded inline.
        first_batch_bytes: the size of a link's first batch (invariant 8).
        min_batch_bytes: the smallest batch size it shrinks to.
        ack_fast_s: an ack this soon after the previous one grows the batch size.
        ack_slow_s: an ack later than this shrinks it.
        min_rate_bps: the slowest delivery rate waited for (:meth:`Session.patience_s`).
        max_snapshot_bytes: the largest snapshot this side takes (invariant 11).
    """

    max_batch_bytes: int = 1 << 20
    batch_ops: int = 2_000
    window: int = 4
    zstd: bool = True
    vv_columns: bool = True
    delta_summary: bool = True
    limits: BatchLimits = field(default_factory=BatchLimits)
    decode_effect_bytes: int = 4096
    first_batch_bytes: int = 8 * 1024
    min_batch_bytes: int = 2 * 1024
    ack_fast_s: float = 0.5
    ack_slow_s: float = 2.0
    min_rate_bps: float = 1024.0
    max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES

    def sizer(self) -> BatchSizer:
        """A fresh link's batch sizing under these tunables."""
        cap = max(64, self.max_batch_bytes * 3 // 4)
        return BatchSizer(
            size=min(self.first_batch_bytes, cap),
            floor=min(self.min_batch_bytes, cap),
            cap=cap,
            fast_s=self.ack_fast_s,
            slow_s=self.ack_slow_s,
        )

    def batch_limits(self) -> BatchLimits:
        """Codec caps matching ``max_batch_bytes``."""
        lim = self.limits
        return BatchLimits(
            max_compressed=self.max_batch_bytes,
            max_decompressed=max(lim.max_decompressed, self.max_batch_bytes),
            max_ops=max(lim.max_ops, self.batch_ops),
            compress_threshold=lim.compress_threshold,
            zstd_level=lim.zstd_level,
        )


@dataclass(frozen=True, slots=True)
class SessionClocks:
    """The clocks a session reads (injected: the runner's real ones, the simulator's virtual ones).

    Attributes:
        monotonic: seconds, for ack timing and rates.
        wall_ms: the replica's wall clock in ms since the epoch, for clock offsets.
    """

    monotonic: Callable[[], float]
    wall_ms: Callable[[], int]


class SessionState(enum.Enum):
    """Where an exchange stands."""

    IDLE = "idle"  # not started
    HELLO = "hello"  # sent Hello+Digest, awaiting the peer's Hello
    DIGEST = "digest"  # awaiting the peer's Digest
    SUMMARY = "summary"  # digests differ, awaiting the peer's Summary
    STREAMING = "streaming"  # ops flowing both ways
    DONE = "done"  # ended in sync (End(OK))
    FAILED = "failed"  # ended otherwise


# which frames each state accepts (Peers and Close are accepted in every live state).
# Ops may arrive while this side still waits for a usable Summary (the peer had
# ours); a Summary in STREAMING is only ever a want_full request.
_ACCEPTS: dict[SessionState, tuple[type, ...]] = {
    SessionState.HELLO: (Hello,),
    SessionState.DIGEST: (Digest,),
    SessionState.SUMMARY: (Summary, Ops, SnapshotPart),
    SessionState.STREAMING: (Ops, SnapshotPart, Ack, Summary),
}
_LIVE = frozenset(_ACCEPTS)


def _well_formed(vv: Mapping[str, int]) -> bool:
    """Non-empty string origins and int seqs >= 0, checked in C-level passes (a
    1,000-node Summary has 1,000 entries; a bool is not a seq)."""
    if not vv:
        return True
    return (
        set(map(type, vv)) == {str}
        and "" not in vv
        and set(map(type, vv.values())) == {int}
        and min(vv.values()) >= 0
    )


@dataclass(frozen=True, slots=True)
class _TooLarge:
    """An op whose batch alone exceeds the peer's cap, and that batch's size."""

    op: Op
    size: int


class _After(Mapping[str, int]):
    """What the receiving side holds or has been sent, per origin, read lazily.

    The start vector, overlaid with what this exchange's batches moved, and
    raised to what the replica's other exchanges brought (the book's ``held``):
    a batch's origins are looked up, never the whole vector copied.
    """

    __slots__ = ("_base", "_held", "_over")

    def __init__(
        self, base: Mapping[str, int], over: Mapping[str, int], held: Mapping[str, int]
    ) -> None:
        self._base, self._over, self._held = base, over, held

    def get(self, origin: str, default: int = 0) -> int:  # type: ignore[override]
        got = self._over.get(origin)
        if got is None:
            got = self._base.get(origin, default)
        return max(got, self._held.get(origin, default))

    def __getitem__(self, origin: str) -> int:
        if origin in self._over or origin in self._base or origin in self._held:
            return self.get(origin)
        raise KeyError(origin)

    def __iter__(self) -> Iterator[str]:
        return iter({**self._base, **self._over, **self._held})

    def __len__(self) -> int:
        return len({**self._base, **self._over, **self._held})


class Session:
    """One exchange with one peer; see the module docstring for the protocol.

    Args:
        node_id: this replica's id.
        fleet_id: this replica's fleet; a peer of another fleet is refused.
        hlc: this replica's clock reading, sent in ``Hello``; informational, no
            receiver reads it (offsets come from wall clocks), so the runner, the
            pair and the simulators leave it 0, which costs no bytes on the wire.
        config: tunables.
        peers: a member list to gossip to the peer (after ``Hello``), if any.
        expect_peer: when set, a peer that says hello under another id is refused.
        wall_ms: this replica's wall clock in ms, sent in ``Hello`` (0: unknown).
        fleet_digest: this replica's ``Fleet.bootstrap_digest`` (empty: unknown);
            a peer that sends another one is refused.
        clocks: where the session reads time (invariant 8, 10); None: it does not.
        book: the replica's peer links, shared by its sessions (invariant 9).
        initiator: this side opened the exchange (its Hello went first).
    """

    def __init__(
        self,
        node_id: str,
        fleet_id: str,
        *,
        hlc: int = 0,
        config: SessionConfig | None = None,
        peers: Sequence[PeerInfo] = (),
        expect_peer: str | None = None,
        wall_ms: int = 0,
        fleet_digest: bytes = b"",
        clocks: SessionClocks | None = None,
        book: PeerBook | None = None,
        initiator: bool = False,
    ) -> None:
        self.node_id = node_id
        self._clocks = clocks
        self._book = book
        self.initiator = initiator
        self.link: PeerLink | None = None
        self.peer_clock: ClockEstimate | None = None
        self.fleet_digest = fleet_digest
        self._wall_ms = wall_ms
        self.fleet_id = fleet_id
        self.config = config or SessionConfig()
        self._limits = self.config.batch_limits()
        self._hlc = hlc
        self._gossip = tuple(peers)
        self._expect_peer = expect_peer
        self.state = SessionState.IDLE
        self.peer: Hello | None = None
        self.status: Status | None = None
        self.reason = ""
        self._vv: Mapping[str, int] = {}  # never changed in place (may be a shared Vector)
        self._start_vv: Mapping[str, int] = {}  # the vector this side's Digest and Summary named
        self._peer_vv: VersionVector | None = None
        self._peer_digest = b""
        self._columns = False  # send vectors in columns (invariant 2b)
        self._replying = False  # waiting for the peer's Summary to answer it as a delta
        # delta summaries
        self._record: VersionVector | None = None  # what this side last recorded of the peer
        self._loading = False
        self._held: Summary | None = None  # a delta summary that came while loading
        self._asked_full = False
        self._answered_full = False
        self.summary_entries_sent = 0
        # send side
        self._cursor: VersionVector = {}
        self._fetching = False
        self._fetch_from: VersionVector = {}
        # per batch in flight: ops, bytes, when sent, each origin's last seq in it
        self._flights: deque[tuple[int, int, float | None, dict[str, int]]] = deque()
        self._last_ack_at: float | None = None
        self._sizer = self.config.sizer()
        self._inflight = 0
        self._sent_last = False
        self.unsendable: dict[str, tuple[int, int]] = {}
        """Origins held back by an op larger than the peer's batch cap: origin -> (that
        op's seq, its encoded size) (invariant 4a)."""
        self._floor: Mapping[str, int] = {}  # where this side's log of each origin begins
        self._snapshotting = False  # a FetchSnapshot is outstanding
        self._snapshot_sent = False
        # receive side
        self._recv_base: Mapping[str, int] = {}  # the start vector, and on it
        self._recv_cursor: VersionVector = {}  # the entries batches moved since
        self._applying: tuple[Op, ...] | None = None
        self._decoding: Ops | None = None
        self._rx: deque[Ops | SnapshotPart] = deque()
        self._recv_last = False
        self._snap_parts: list[bytes] = []
        self._snap_bytes = 0
        self._installing = False  # an InstallSnapshot is outstanding
        self._snapshot_taken = False
        # counters, for tests and metrics
        self.ops_acked = 0
        self.bytes_unacked = 0
        self.ops_sent = 0
        self.ops_received = 0
        self.batches_sent = 0
        self.snapshot_bytes_sent = 0
        self.snapshot_bytes_received = 0

    # -- properties ------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """True once :class:`End` was emitted."""
        return self.state in (SessionState.DONE, SessionState.FAILED)

    @property
    def peer_id(self) -> str | None:
        """The peer's node id, once it said hello."""
        return self.peer.node_id if self.peer else None

    @property
    def peer_clock_offset_ms(self) -> int | None:
        """How far the peer's wall clock is ahead of ours (ms; negative: behind).

        The midpoint of :attr:`peer_clock` (invariant 10); for a one-way
        estimate, its lower bound. Read from wall clocks, not hybrid ones: those
        observe each other, so after one exchange a clock a day behind would
        read as a few ms. A health signal, never used to order anything. None
        when either side did not send its wall clock.
        """
        est = self.peer_clock
        return None if est is None else round(est.offset_ms)

    @property
    def peer_vv(self) -> VersionVector | None:
        """The version vector the peer summarized, if it did."""
        return self._peer_vv

    # -- inputs ----------------------------------------------------------------

    def start(self, vv: Mapping[str, int], floor: Mapping[str, int] | None = None) -> list[Effect]:
        """Begin the exchange from this replica's current version vector ``vv``.

        Args:
            vv: the replica's version vector.
            floor: each compacted origin's compaction point (its log holds only
                the ops after it); a peer below it gets a snapshot (invariant 11).
        """
        if self.state is not SessionState.IDLE:
            raise RuntimeError("a session starts once")
        self._floor = {o: c for o, c in (floor or {}).items() if c > 0}
        if self._clocks is not None:
            self._wall_ms = self._clocks.wall_ms()
        # a Vector never changes, so it is held as it is: no copy, its digest cached
        self._vv = vv if isinstance(vv, Vector) else Vector(vv)
        self._start_vv = self._recv_base = self._vv
        self.state = SessionState.HELLO
        hello = Hello(
            protocol=PROTOCOL_VERSION,
            fleet_id=self.fleet_id,
            node_id=self.node_id,
            hlc=self._hlc,
            features=self._features(),
            max_batch_bytes=self.config.max_batch_bytes,
            fleet_digest=self.fleet_digest,
            wall_ms=self._wall_ms,
        )
        out: list[Effect] = [Send(hello)]
        if self._gossip:
            out.append(Send(Peers(self._gossip)))
        out.append(Send(Digest(digest_of(self._vv))))
        return out

    def _features(self) -> tuple[str, ...]:
        base = (
            (ZSTD, CHAIN, IMPLIED_ACK, SNAPSHOT)
            if self.config.zstd
            else (CHAIN, IMPLIED_ACK, SNAPSHOT)
        )
        if self.config.vv_columns:
            base = (*base, VV_COLUMNS)
        return (*base, REPLY_DELTA) if self.config.delta_summary else base

    def receive(self, frame: Frame) -> list[Effect]:
        """Feed one frame from the peer."""
        if self.ended:
            return []
        if self.state is SessionState.IDLE:
            raise RuntimeError("start() the session before feeding it frames")
        if isinstance(frame, Close):
            if frame.code is Status.OK:  # only this side can tell it compared (invariant 6)
                return self._end(
                    Status.ABORTED,
                    f"peer ended before comparing vectors (in state {self.state.value}): "
                    f"{clip(frame.reason)}",
                    tell=False,
                )
            return self._end(frame.code, f"peer closed: {clip(frame.reason)}", tell=False)
        if isinstance(frame, Peers):
            if self.peer is None:
                return self._fail(Status.INVALID_ARGUMENT, "Peers before Hello")
            return [LearnPeers(frame.peers)]
        if not isinstance(frame, _ACCEPTS[self.state]):
            return self._fail(
                Status.INVALID_ARGUMENT,
                f"unexpected {type(frame).__name__} frame in state {self.state.value}",
            )
        if isinstance(frame, Hello):
            return self._on_hello(frame)
        if isinstance(frame, Digest):
            return self._on_digest(frame)
        if isinstance(frame, Summary):
            return self._on_summary(frame)
        if isinstance(frame, Ops | SnapshotPart):
            return self._on_ops(frame)
        assert isinstance(frame, Ack)
        return self._on_ack(frame)

    def ops_fetched(self, ops: Sequence[Op]) -> list[Effect]:
        """Answer a :class:`FetchOps`: the ops beyond the vector it named."""
        if self.ended:
            return []
        if not self._fetching:
            raise RuntimeError("ops_fetched without a FetchOps outstanding")
        self._fetching = False
        cursor, start = self._cursor, self._fetch_from
        # only ops that continue where the fetch began count: a replica answering
        # with ops the peer already has must not make the session resend them forever
        fresh: list[Op] = []
        for op in ops:
            if op.seq == start.get(op.origin, 0) + 1:
                start[op.origin] = op.seq
                cursor[op.origin] = op.seq
                fresh.append(op)
        ops = fresh
        if not ops:
            self._sent_last = True
            out: list[Effect] = [Send(Ops(encode_batch([], limits=self._limits), last=True))]
            return out + self._maybe_done()
        out = []
        now = self._now()
        parts = self._parts(list(ops))
        if not parts:  # nothing but ops held back by one too large (invariant 4a)
            return self._pump()
        for batch, n, tops in parts:
            out.append(Send(Ops(batch)))
            self._flights.append((n, len(batch), now, tops))
            self.bytes_unacked += len(batch)
            if self.link is not None:
                self.link.lease(self, set(tops))
            self._inflight += 1
            self.batches_sent += 1
            self.ops_sent += n
        return out + self._pump()

    def snapshot_fetched(self, data: bytes, vv: Mapping[str, int]) -> list[Effect]:
        """Answer a :class:`FetchSnapshot`: the encoded snapshot and the vector it stands for."""
        if self.ended:
            return []
        if not self._snapshotting:
            raise RuntimeError("snapshot_fetched without a FetchSnapshot outstanding")
        self._snapshotting = False
        self._snapshot_sent = True
        piece = max(64, self._peer_cap() * 3 // 4)
        out: list[Effect] = []
        for at in range(0, max(len(data), 1), piece):
            out.append(Send(SnapshotPart(data[at : at + piece], last=at + piece >= len(data))))
        self.snapshot_bytes_sent += len(data)
        cursor = self._cursor
        for origin, seq in vv.items():  # the peer holds all of it once installed
            if seq > cursor.get(origin, 0):
                cursor[origin] = seq
        return out + self._pump()

    def snapshot_unavailable(self, reason: str) -> list[Effect]:
        """Answer a :class:`FetchSnapshot` this replica could not build."""
        if self.ended:
            return []
        self._snapshotting = False
        return self._fail(Status.OUT_OF_RANGE, f"the peer needs a snapshot: {reason}")

    def snapshot_installed(self, vv: Mapping[str, int]) -> list[Effect]:
        """Answer an :class:`InstallSnapshot`: it is durable; ``vv`` is the new vector."""
        if self.ended:
            return []
        if not self._installing:
            raise RuntimeError("snapshot_installed without an InstallSnapshot outstanding")
        self._installing = False
        self._vv = vv if isinstance(vv, Vector) else dict(vv)
        have_of = _After(self._recv_base, self._recv_cursor, {}).get
        for origin, seq in vv.items():
            if seq > have_of(origin, 0):
                self._recv_cursor[origin] = seq
        return self._drain()

    def snapshot_failed(self, status: Status, reason: str) -> list[Effect]:
        """Answer an :class:`InstallSnapshot` that was refused; nothing of it was installed."""
        if self.ended:
            return []
        self._installing = False
        return self._fail(status, f"refused the peer's snapshot: {reason}")

    def peer_ack_loaded(self, vv: Mapping[str, int]) -> list[Effect]:
        """Answer a :class:`LoadPeerAck`: the vector last recorded for the peer."""
        if self.ended:
            return []
        if not self._loading:
            raise RuntimeError("peer_ack_loaded without a LoadPeerAck outstanding")
        self._loading = False
        record = dict(vv)
        if record and min(record.values()) <= 0:
            record = {o: s for o, s in record.items() if s > 0}
        self._record = record
        held, self._held = self._held, None
        return self._on_summary(held) if held is not None else []

    def ops_decoded(self, ops: Sequence[Op]) -> list[Effect]:
        """Answer a :class:`DecodeOps`: the batch's ops."""
        if self.ended:
            return []
        frame, self._decoding = self._decoding, None
        if frame is None:
            raise RuntimeError("ops_decoded without a DecodeOps outstanding")
        problem = self._check_contiguous(ops)
        if problem:
            return self._fail(Status.INVALID_ARGUMENT, problem)
        if frame.last:
            self._recv_last = True
            if self._rx:
                return self._fail(Status.INVALID_ARGUMENT, "Ops after the last batch")
        if ops:
            self._applying = tuple(ops)
            return [ApplyOps(self._applying)]
        if not frame.last:
            return self._fail(Status.INVALID_ARGUMENT, "empty batch not marked last")
        return self._drain()

    def decode_failed(self, error: BaseException) -> list[Effect]:
        """Answer a :class:`DecodeOps` that raised (``DecodeError``, ``ChainError``)."""
        if self.ended:
            return []
        self._decoding = None
        if isinstance(error, ChainError):
            return self._fail(Status.DATA_LOSS, f"refused a batch: {error}")
        return self._fail(Status.INVALID_ARGUMENT, f"malformed batch: {error}")

    def ops_applied(self, vv: Mapping[str, int]) -> list[Effect]:
        """Answer an :class:`ApplyOps`: the batch is durable; ``vv`` is the new vector."""
        if self.ended:
            return []
        if self._applying is None:
            raise RuntimeError("ops_applied without an ApplyOps outstanding")
        self.ops_received += len(self._applying)
        # the Ack names only the origins this batch moved: the peer folds it into
        # the vector it already has of this side (its Summary), so acks stay small;
        # to a peer that reads acks as implied, only where this side now holds
        # other than the batch's last op (more, from elsewhere; less, held pending)
        tops = {op.origin: op.seq for op in self._applying}  # each origin's in seq order
        self._applying = None
        self._vv = vv if isinstance(vv, Vector) else dict(vv)
        if self._book is not None:
            self._book.note_held(vv, set(tops))
        assert self.peer is not None
        if IMPLIED_ACK in self.peer.features:
            entries = {o: vv.get(o, 0) for o in sorted(tops) if vv.get(o, 0) != tops[o]}
        else:
            entries = {o: vv[o] for o in sorted(tops) if vv.get(o, 0) > 0}
        out: list[Effect] = [Send(Ack(entries, self._columns))]
        return out + self._drain()

    def apply_failed(self, error: BaseException) -> list[Effect]:
        """Answer an :class:`ApplyOps` that raised; nothing of the batch was applied."""
        if self.ended:
            return []
        self._applying = None
        if isinstance(error, ChainError | ForkError):
            return self._fail(Status.DATA_LOSS, f"refused a batch: {error}")
        if isinstance(error, SyncfwError):
            return self._fail(Status.INTERNAL, f"could not apply a batch: {error}")
        return self._fail(Status.INTERNAL, f"could not apply a batch: {error!r}")

    def abort(self, status: Status, reason: str) -> list[Effect]:
        """End the exchange from outside (link cut, deadline, shutdown); tells the peer."""
        if self.ended:
            return []
        return self._end(status, reason, tell=True)

    # -- transitions -------------------------------------------------------------

    def _on_hello(self, hello: Hello) -> list[Effect]:
        if hello.protocol != PROTOCOL_VERSION:
            return self._fail(
                Status.FAILED_PRECONDITION,
                f"peer speaks sync protocol {hello.protocol}, this node speaks {PROTOCOL_VERSION}",
            )
        peer = clip(hello.node_id)
        if hello.fleet_id != self.fleet_id:
            return self._fail(
                Status.FAILED_PRECONDITION,
                f"peer {peer!r} belongs to fleet {clip(hello.fleet_id)!r}, not {self.fleet_id!r}",
            )
        mine, theirs = self.fleet_digest, hello.fleet_digest
        if mine and theirs and mine != theirs:
            return self._fail(
                Status.FAILED_PRECONDITION,
                f"peer {peer!r} was given another fleet bootstrap (digest {theirs.hex()}, "
                f"this node's {mine.hex()}): grants, node zones, telemetry or priorities "
                "differ, so the two would judge ops differently",
            )
        if not hello.node_id or hello.node_id == self.node_id:
            return self._fail(Status.FAILED_PRECONDITION, f"peer claims node id {peer!r}")
        if self._expect_peer is not None and hello.node_id != self._expect_peer:
            return self._fail(
                Status.FAILED_PRECONDITION,
                f"expected peer {self._expect_peer!r}, it says it is {peer!r}",
            )
        if hello.max_batch_bytes < 64:
            return self._fail(Status.INVALID_ARGUMENT, "peer batch cap is below 64 bytes")
        self.peer = hello
        self.state = SessionState.DIGEST
        self._columns = self.config.vv_columns and VV_COLUMNS in hello.features
        self._measure_clock(hello)
        if self._book is not None:
            self.link = self._book.link(hello.node_id)
            self._sizer = self.link.sizer
            self._sizer.cap = max(64, self._peer_cap() * 3 // 4)
        if self.config.delta_summary:
            self._loading = True
            return [LoadPeerAck(hello.node_id)]
        return []

    def _on_digest(self, digest: Digest) -> list[Effect]:
        assert self.peer is not None
        if digest.digest == digest_of(self._vv):
            # held as it is (no copy per in-sync exchange): a Vector never changes
            self._peer_vv = self._vv if isinstance(self._vv, Vector) else dict(self._vv)
            return [
                Acknowledge(self.peer.node_id, self._vv),
                *self._end(Status.OK, "in sync", tell=False),
            ]
        self.state = SessionState.SUMMARY
        self._peer_digest = digest.digest
        return self._send_summary()

    def _send_summary(self) -> list[Effect]:
        """This side's Summary, once the digests differ and the peer's record is read.

        Where both sides take delta replies and this side has no delta of its
        own to send, the side with the larger node id waits for the peer's
        Summary and answers it as a delta against it (invariant 2a).
        """
        assert self.peer is not None
        summary = self._summary()
        if (
            not summary.base_digest
            and self.config.delta_summary
            and REPLY_DELTA in self.peer.features
            and self.node_id > self.peer.node_id
        ):
            self._replying = True
            return []
        self.summary_entries_sent += len(summary.vv)
        return [Send(summary)]

    def _summary(self) -> Summary:
        """This side's vector, as a delta against the peer's recorded one when smaller."""
        vv, base = self._vv, self._record
        if base and self.config.delta_summary:
            delta = {o: s for o, s in vv.items() if base.get(o, 0) != s}
            delta.update({o: 0 for o in base if o not in vv})
            if len(delta) + 1 < len(vv):  # the digest costs about one entry
                return Summary(delta, digest_of(base), columns=self._columns)
        return Summary(vv, columns=self._columns)

    def _on_summary(self, summary: Summary) -> list[Effect]:
        assert self.peer is not None
        if summary.want_full:
            if self._answered_full:
                return self._fail(
                    Status.INVALID_ARGUMENT, "the peer asked for the whole vector twice"
                )
            self._answered_full = True
            self.summary_entries_sent += len(self._vv)
            return [Send(Summary(self._vv, columns=self._columns))]
        if self.state is not SessionState.SUMMARY:
            return self._fail(Status.INVALID_ARGUMENT, "a second Summary")
        if not _well_formed(summary.vv):
            return self._fail(Status.INVALID_ARGUMENT, "malformed version vector in Summary")
        entries: VersionVector = dict(summary.vv)
        if summary.base_digest == digest_of(self._start_vv):
            # a delta against the vector this side summarized (the peer replied to it)
            entries = {**self._start_vv, **entries}
        elif summary.base_digest:
            if self._loading:  # our record of the peer is still being read
                self._held = summary
                return []
            base = self._record or {}
            if not base or digest_of(base) != summary.base_digest:
                if self._asked_full:
                    return self._fail(Status.INVALID_ARGUMENT, "a delta Summary after want_full")
                self._asked_full = True
                return [Send(Summary(want_full=True))]
            entries = {**base, **entries}
        vv = {o: s for o, s in entries.items() if s} if 0 in entries.values() else entries
        self._peer_vv = vv
        self._cursor = dict(vv)
        self.state = SessionState.STREAMING
        out: list[Effect] = self._reply(vv) if self._replying else []
        out.append(Acknowledge(self.peer.node_id, vv))
        below = {o: c for o, c in self._floor.items() if vv.get(o, 0) < c}
        if below:  # invariant 11
            if SNAPSHOT not in self.peer.features:
                named = ", ".join(f"{clip(o)} up to {c}" for o, c in sorted(below.items())[:5])
                return out + self._fail(
                    Status.OUT_OF_RANGE,
                    f"the peer lacks ops compacted here ({named}) and takes no snapshot",
                )
            self._snapshotting = True
            return [*out, FetchSnapshot(below)]
        return [*out, *self._pump()]

    def _reply(self, theirs: Mapping[str, int]) -> list[Effect]:
        """This side's Summary as a delta against the peer's (invariant 2a)."""
        self._replying = False
        mine = self._vv
        delta = {o: s for o, s in mine.items() if theirs.get(o, 0) != s}
        if len(theirs) + len(delta) > len(mine):  # origins only the peer holds: seq 0
            delta.update({o: 0 for o in theirs if o not in mine})
        small = len(delta) + 1 < len(mine)  # the base digest costs about one entry
        summary = (
            Summary(delta, self._peer_digest, columns=self._columns)
            if small
            else Summary(mine, columns=self._columns)
        )
        self.summary_entries_sent += len(summary.vv)
        return [Send(summary)]

    def _on_ops(self, frame: Ops | SnapshotPart) -> list[Effect]:
        if self._recv_last:
            return self._fail(Status.INVALID_ARGUMENT, "Ops after the peer's last batch")
        if isinstance(frame, SnapshotPart):
            if self._snapshot_taken:
                return self._fail(Status.INVALID_ARGUMENT, "a second snapshot in one exchange")
            self._snap_bytes += len(frame.data)
            if self._snap_bytes > self.config.max_snapshot_bytes:
                return self._fail(
                    Status.RESOURCE_EXHAUSTED,
                    f"snapshot over {self._snap_bytes} bytes exceeds the cap of "
                    f"{self.config.max_snapshot_bytes} (SessionConfig.max_snapshot_bytes)",
                )
            if frame.last:
                self._snapshot_taken = True
        self._rx.append(frame)
        return self._drain()

    def _on_ack(self, ack: Ack) -> list[Effect]:
        assert self.peer is not None
        if self._inflight <= 0:
            return self._fail(Status.INVALID_ARGUMENT, "Ack with no batch in flight")
        if not _well_formed(ack.vv):
            return self._fail(Status.INVALID_ARGUMENT, "malformed version vector in Ack")
        n, size, sent_at, tops = self._flights.popleft()
        # a peer that reads acks as implied names only where it differs from the batch
        named = {**tops, **ack.vv} if IMPLIED_ACK in self.peer.features else ack.vv
        view = dict(self._peer_vv or {})
        moved: VersionVector = {}
        for origin, seq in named.items():
            if seq > view.get(origin, 0):
                view[origin] = moved[origin] = seq
        self._peer_vv = view
        self._inflight -= 1
        self.ops_acked += n
        self.bytes_unacked -= size
        now = self._now()
        service = None
        if now is not None and sent_at is not None:
            service = now - max(sent_at, self._last_ack_at or sent_at)
            self._last_ack_at = now
        self._sizer.acked(size, service)
        if self.link is not None:
            self.link.fold_ack(named)
            if not any(tops.keys() & f[3].keys() for f in self._flights):
                self.link.release(self, set(tops))
        # the record only moves forward: the entries this ack moved are all it lacks
        out: list[Effect] = [Acknowledge(self.peer.node_id, moved)] if moved else []
        return [*out, *self._pump()]

    # -- helpers -------------------------------------------------------------------

    def _drain(self) -> list[Effect]:
        """Take the next queued batch, if none is being applied."""
        while (
            self._applying is None
            and self._decoding is None
            and not self._installing
            and self._rx
            and isinstance(self._rx[0], SnapshotPart)
        ):
            part = self._rx.popleft()
            assert isinstance(part, SnapshotPart)
            self._snap_parts.append(part.data)
            if part.last:
                data, self._snap_parts = b"".join(self._snap_parts), []
                self.snapshot_bytes_received += len(data)
                self._installing = True
                return [InstallSnapshot(data)]
        if self._applying is None and self._decoding is None and not self._installing and self._rx:
            frame = self._rx.popleft()
            assert isinstance(frame, Ops)
            if self._snap_parts:
                return self._fail(Status.INVALID_ARGUMENT, "Ops inside a snapshot's parts")
            # the size cap before any decoding (codec invariant 4: cheap checks first)
            if len(frame.batch) > self.config.max_batch_bytes:
                return self._fail(
                    Status.RESOURCE_EXHAUSTED,
                    f"batch of {len(frame.batch)} bytes exceeds the cap of "
                    f"{self.config.max_batch_bytes}",
                )
            self._decoding = frame
            # another exchange may have brought ops the sender now skips (invariant 9)
            held = self._book.held if self._book is not None else {}
            if len(frame.batch) >= self.config.decode_effect_bytes:
                # decoded elsewhere (a worker thread): a view of copies, nothing shared
                frozen = _After(self._recv_base, dict(self._recv_cursor), dict(held))
                return [DecodeOps(frame.batch, self._limits, frozen)]
            after = _After(self._recv_base, self._recv_cursor, held)
            try:  # small: cheaper here than a hop to a worker thread
                ops = decode_batch(frame.batch, limits=self._limits, after=after)
            except (DecodeError, ChainError) as exc:
                return self.decode_failed(exc)
            return self.ops_decoded(ops)
        return self._maybe_done()

    def _check_contiguous(self, ops: Sequence[Op]) -> str:
        """Each origin's ops must continue what this side holds (or has been sent)."""
        cursor = self._recv_cursor
        have_of = _After(self._recv_base, cursor, self._book.held if self._book else {}).get
        for op in ops:
            have = have_of(op.origin, 0)
            if op.seq > have + 1:
                return f"gap in origin {op.origin!r}: op {op.seq} after {have}; nothing applied"
            if op.seq == have + 1:
                cursor[op.origin] = op.seq
        return ""

    def _pump(self) -> list[Effect]:
        """Ask for more ops to send, within the window."""
        if self._sent_last or self._fetching or self._snapshotting or self.ended:
            return self._maybe_done()
        if self._inflight >= self.config.window:
            return []
        self._fetching = True
        max_bytes = self._sizer.target(max(64, self._peer_cap() * 3 // 4))
        start = dict(self._cursor)
        link = self.link
        if link is not None:
            # what the peer acknowledged to any exchange is not sent again, and an
            # origin another exchange has in flight is left to it (invariant 9)
            for origin, seq in link.acked.items():
                if seq > start.get(origin, 0):
                    start[origin] = seq
            for origin in link.leased_by_others(self):
                start[origin] = _SKIP
        for origin in self.unsendable:  # invariant 4a
            start[origin] = _SKIP
        self._fetch_from = start
        return [FetchOps(dict(start), self.config.batch_ops, max_bytes)]

    def _now(self) -> float | None:
        return self._clocks.monotonic() if self._clocks is not None else None

    def _measure_clock(self, hello: Hello) -> None:
        """The peer's clock offset from the Hellos (invariant 10)."""
        if not hello.wall_ms or not self._wall_ms:
            return
        if self._clocks is None:  # no clock to stamp the arrival: our start stands in
            self.peer_clock = ClockEstimate(hello.wall_ms - self._wall_ms)
            return
        arrived = self._clocks.wall_ms()
        if self.initiator:
            t = hello.wall_ms
            sample = ClockEstimate.round_trip(self._wall_ms, t, t, arrived)
        else:
            sample = ClockEstimate(hello.wall_ms - arrived)
        self.peer_clock = sample
        if self._book is not None:
            self.peer_clock = self._book.link(hello.node_id).clock.add(sample)

    def patience_s(self, base_s: float) -> float:
        """How long to wait for the peer's next frame: ``base_s`` plus the bytes in
        flight at the link's measured rate (at least ``min_rate_bps``)."""
        rate = max(self._sizer.rate_bps or 0.0, self.config.min_rate_bps)
        return base_s + self.bytes_unacked / rate

    def timed_out(self) -> None:
        """The peer's next frame did not come within :meth:`patience_s`: smaller batches next."""
        self._sizer.timed_out()

    def _peer_cap(self) -> int:
        cap = self.peer.max_batch_bytes if self.peer else self.config.max_batch_bytes
        return min(cap, self.config.max_batch_bytes)

    def _parts(self, ops: list[Op]) -> list[tuple[bytes, int, dict[str, int]]]:
        """``ops`` as batches under the peer's cap, less any op too large for one and
        the later ops of its origin (invariant 4a: recorded in :attr:`unsendable`)."""
        while True:
            parts = self._split(ops)
            big = [p for p in parts if isinstance(p, _TooLarge)]
            if not big:
                return [p for p in parts if not isinstance(p, _TooLarge)]
            for p in big:
                had = self.unsendable.get(p.op.origin)
                if had is None or p.op.seq < had[0]:
                    self.unsendable[p.op.origin] = (p.op.seq, p.size)
            cut = self.unsendable
            ops = [op for op in ops if op.seq < cut.get(op.origin, (_SKIP, 0))[0]]
            for origin, (seq, _) in cut.items():
                if self._cursor.get(origin, 0) >= seq:
                    self._cursor[origin] = seq - 1
            if not ops:
                return []

    def _split(self, ops: list[Op]) -> list[tuple[bytes, int, dict[str, int]] | _TooLarge]:
        """Encode ``ops`` into batches under the peer's cap (:class:`_TooLarge`: one op is)."""
        zstd = self.config.zstd and self.peer is not None and ZSTD in self.peer.features
        cap = self._peer_cap()
        limits = BatchLimits(
            max_compressed=1 << 62,
            max_decompressed=1 << 62,
            max_ops=max(len(ops), 1),
            compress_threshold=self._limits.compress_threshold,
            zstd_level=self._limits.zstd_level,
        )
        chain = self.peer is not None and CHAIN in self.peer.features
        data = encode_batch(ops, zstd=zstd, elide_prev=chain, limits=limits)
        if len(data) <= cap:
            return [(data, len(ops), {op.origin: op.seq for op in ops})]
        if len(ops) == 1:
            return [_TooLarge(ops[0], len(data))]
        # estimate a split point from packed sizes rather than halving blindly
        half = len(ops) // 2
        if not zstd:
            total, half = 2, 0
            for i, op in enumerate(ops):
                total += packed_size(op) + 5
                if total > cap:
                    break
                half = i + 1
            half = max(1, min(half, len(ops) - 1))
        return self._split(ops[:half]) + self._split(ops[half:])

    def _maybe_done(self) -> list[Effect]:
        if (
            self.state is SessionState.STREAMING
            and self._sent_last
            and self._inflight == 0
            and self._recv_last
            and self._applying is None
            and self._decoding is None
            and not self._installing
            and not self._snapshotting
            and not self._rx
        ):
            if self.unsendable:  # invariant 4a: everything else was exchanged
                named = ", ".join(
                    f"op ({clip(o)}, {seq}) of {size} bytes"
                    for o, (seq, size) in sorted(self.unsendable.items())[:5]
                )
                return self._fail(
                    Status.RESOURCE_EXHAUSTED,
                    f"{named} is larger than the peer's batch cap of {self._peer_cap()} "
                    "bytes: its origin's ops from that one on were not sent (everything "
                    "else was); raise SessionConfig.max_batch_bytes on both sides to carry it",
                )
            return self._end(Status.OK, "synced", tell=False)
        return []

    def _fail(self, status: Status, reason: str) -> list[Effect]:
        return self._end(status, reason, tell=True)

    def _end(self, status: Status, reason: str, *, tell: bool) -> list[Effect]:
        self.state = SessionState.DONE if status is Status.OK else SessionState.FAILED
        if self.link is not None:
            self.link.release(self)
        self.status = status
        self.reason = reason
        self._rx.clear()
        out: list[Effect] = []
        if tell:
            out.append(Send(Close(status, reason)))
        out.append(End(status, reason))
        return out
