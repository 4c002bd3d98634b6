"""Runs one exchange over a transport's byte stream: the performer, a reader, a deadline.

Invariants:

1. Frames are encoded and decoded here, once (:mod:`syncfw.transport.wire`);
   the stream carries bytes only. A peer's bytes that are not a frame end the
   exchange ``INVALID_ARGUMENT``.
2. A separate task reads the stream into a bounded, typed queue
   (:data:`Incoming`: a frame, a link failure, or the end of the stream), so
   two peers both sending never deadlock on flow control. The session's window
   bounds what an honest peer has outstanding; the queue holds twice that plus
   the control frames, and beyond it the reader waits, which is the
   transport's backpressure on the peer.
3. Effects are performed by the one :class:`~syncfw.exchange.performer.Performer`
   in the order the session emitted them, each answer fed back before the next
   frame is. Large batches are decoded on one shared worker thread
   (:data:`DECODER`), so the CPU of a peer's batches never blocks the event
   loop for long, and however many peers send at once only one decode competes
   with the loop for the interpreter.
4. Every exchange ends with exactly one :class:`ExchangeOutcome`, one log line
   and, with ``metrics``, one record in the node's registry; failures of the
   peer, the link or the batch never raise out of :func:`run_exchange` (only
   cancellation does), so a node keeps serving its other peers. Ops count as
   sent once the peer acknowledged them; the rest are "queued". An exchange
   that ended ``OK`` closes its side first and reads on until the peer ends the
   call (``_SEND_FAILED_WAIT_S`` at most): a gRPC client that stops reading
   cancels the call, and a peer still persisting the last ack would record its
   exchange ``CANCELLED``.
5. Deadlines scale with the bytes in flight: the exchange ends
   ``DEADLINE_EXCEEDED`` only when no frame came from the peer for
   ``timeout_s`` plus the unacknowledged bytes at the link's measured rate
   (:meth:`~syncfw.sync.Session.patience_s`), so a thin link that keeps
   acknowledging keeps its exchange.
6. One :class:`~syncfw.sync.links.PeerBook` per replica (:func:`peer_book`) is
   shared by all its runners: batch sizes learned on a link carry to its next
   exchange, and live exchanges with one peer never send it the same origin.
7. The CPU spent decoding a peer's batches is charged to that peer (its mTLS
   identity, else its host) in one :class:`~syncfw.transport.admission.CpuBudget`
   per node (the one its gRPC server's admission refuses by, found through the
   node's metrics registry; :func:`cpu_budget` for a replica without one),
   measured as the worker thread's CPU time. A peer in debt is refused
   ``RESOURCE_EXHAUSTED`` before its call is read (by the server's admission)
   or its exchange starts (by the runner); mid-exchange its next batch waits for the debt to be repaid, up to
   ``CpuShare.max_wait_s``, and is refused beyond it. Each refusal counts in
   ``syncfw_refused_streams{reason="cpu_budget"}`` and warns at most once per
   ``FAILED_EXCHANGE_WARN_EVERY_S`` per peer, so a peer sending expensive bad
   batches costs the node a bounded share of one core while the others are served.
   A batch the codec refuses (malformed, a chain broken inside it) costs its peer
   ``CpuShare.refused_batch_s`` more: honest peers never send one, so a peer
   that does is refused for a while instead of having one decoded per burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from syncfw.clock import wall_ms as system_wall_ms
from syncfw.errors import ChainError, DecodeError
from syncfw.exchange.performer import OnPeers, Performer
from syncfw.log import Op, Replica
from syncfw.metrics import NodeMetrics
from syncfw.notices import Notices
from syncfw.sync import (
    Close,
    Effect,
    Frame,
    Ops,
    PeerInfo,
    Session,
    SessionConfig,
    Status,
    clip,
)
from syncfw.sync.links import ClockEstimate, PeerBook
from syncfw.sync.session import SessionClocks
from syncfw.transport.admission import CpuBudget, budget_key, cpu_budget_of, peer_host
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.wire import decode_frame, encode_frame

__all__ = [
    "DECODER",
    "ExchangeOutcome",
    "ExchangeRunner",
    "FrameIn",
    "Incoming",
    "LinkFailed",
    "SendBudget",
    "StreamEnded",
    "WallClock",
    "cpu_budget",
    "peer_book",
    "replica_wall_ms",
    "run_exchange",
]

log = logging.getLogger("syncfw.sync")

_CONTROL_FRAMES = 8  # Hello, Peers, Digest, up to two Summaries, the last Ops, Close, slack
_SEND_FAILED_WAIT_S = 1.0  # after a failed write the read side ends soon: wait that long for it


DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncfw-decode")
"""Where runners decode large batches: one thread, so hostile senders queue behind each other."""


def _timed(work: Callable[[], list[Op]]) -> tuple[list[Op] | None, BaseException | None, float]:
    """Run ``work`` (on the worker thread): its result or error, and the CPU it took there."""
    t0 = time.thread_time()
    try:
        return work(), None, time.thread_time() - t0
    except Exception as exc:  # handed back to the performer, which judges it
        return None, exc, time.thread_time() - t0


@runtime_checkable
class WallClock(Protocol):
    """A replica whose wall clock is injected (tests, the simulator) says so with this."""

    def wall_ms(self) -> int:
        """The replica's wall clock, in ms since the epoch."""
        ...


def replica_wall_ms(replica: Replica) -> int:
    """The wall clock a replica's ``Hello`` reports: its own if it has one, else the system's.

    Whether it is a :class:`WallClock` is looked up as an attribute: the protocol's
    own ``isinstance`` walks the protocol's members on every call, and this runs on
    every Hello and every clock reading of an exchange.
    """
    wall = getattr(replica, "wall_ms", None)
    return int(wall()) if callable(wall) else system_wall_ms()


_books: weakref.WeakKeyDictionary[Replica, PeerBook] = weakref.WeakKeyDictionary()


def peer_book(replica: Replica) -> PeerBook | None:
    """The replica's shared :class:`PeerBook` (invariant 6); None if it cannot be weakly referenced."""
    try:
        got = _books.get(replica)
        if got is None:
            got = _books[replica] = PeerBook()
        return got
    except TypeError:
        return None


_budgets: weakref.WeakKeyDictionary[Replica, CpuBudget] = weakref.WeakKeyDictionary()


def cpu_budget(replica: Replica) -> CpuBudget | None:
    """The replica's shared :class:`CpuBudget` (invariant 7); None if it cannot be weakly referenced."""
    try:
        got = _budgets.get(replica)
        if got is None:
            got = _budgets[replica] = CpuBudget()
        return got
    except TypeError:
        return None


def _budget_for(replica: Replica, metrics: NodeMetrics | None) -> CpuBudget | None:
    return cpu_budget_of(metrics) if metrics is not None else cpu_budget(replica)


class SendBudget(Protocol):
    """A per-peer bandwidth budget: :meth:`spend` waits until ``n`` bytes may go."""

    async def spend(self, n: int) -> None:
        """Wait until ``n`` more bytes may be sent to this peer, then count them."""
        ...


# -- the receive queue's items ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameIn:
    """A frame the peer sent."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class LinkFailed:
    """The link failed, the peer ended with an error status, or sent bytes that are no frame."""

    status: Status
    reason: str


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer finished its side cleanly."""


Incoming = FrameIn | LinkFailed | StreamEnded
"""What the reader hands the runner, in arrival order."""


@dataclass(slots=True)
class ExchangeOutcome:
    """How one exchange ended.

    Attributes:
        status: the end status (``OK`` when both sides are in sync).
        reason: why it ended.
        peer_id: the peer's node id, if it said hello.
        ops_sent: ops this side sent that the peer acknowledged (applied and durable).
        ops_queued: ops this side sent, acknowledged or not.
        ops_received: ops this side applied from the peer.
        bytes_sent: wire bytes this side sent.
        frames_sent: frames this side sent.
        bytes_received: wire bytes this side read from the peer.
        frames_received: frames this side read from the peer.
        duration_s: wall time of the exchange.
        learned: peer lists the peer gossiped.
        peer_clock_offset_ms: how far the peer's clock is ahead of ours
            (see :attr:`Session.peer_clock_offset_ms`).
        peer_clock: the interval the peer's offset lies in, over recent
            exchanges (:class:`~syncfw.sync.links.ClockEstimate`); warn only
            when :meth:`~syncfw.sync.links.ClockEstimate.exceeds` the limit.
    """

    status: Status
    reason: str
    peer_id: str | None = None
    ops_sent: int = 0
    ops_received: int = 0
    bytes_sent: int = 0
    frames_sent: int = 0
    bytes_received: int = 0
    frames_received: int = 0
    duration_s: float = 0.0
    learned: list[tuple[PeerInfo, ...]] = field(default_factory=list)
    peer_clock_offset_ms: int | None = None
    peer_clock: ClockEstimate | None = None
    ops_queued: int = 0

    @property
    def ok(self) -> bool:
        """True if the exchange ended in sync."""
        return self.status is Status.OK


class _StreamLink:
    """The performer's link: encode, write, charge the budget."""

    __slots__ = ("budget", "stream")

    def __init__(self, stream: FrameStream, budget: SendBudget | None) -> None:
        self.stream = stream
        self.budget = budget

    async def send(self, frame: Frame) -> int:
        data = encode_frame(frame)
        await self.stream.send(data)
        if self.budget is not None:
            await self.budget.spend(len(data))
        return len(data)


class ExchangeRunner:
    """One exchange of ``session`` over ``stream``; :meth:`run` it once.

    Args:
        replica: the local replica whose ops are sent and into which the
            peer's are applied.
        stream: an open byte stream to the peer (either side of it).
        session: the (not yet started) session to run.
        budget: per-peer bandwidth budget charged for every frame sent.
        on_peers: called with each member list the peer gossips.
        cpu: the per-peer CPU budget charged for decoding the peer's batches
            (invariant 7); None charges nothing.

    Attributes:
        cpu_s: CPU seconds spent decoding this peer's batches off the loop.
        cpu_refused: the exchange was refused or cut for the peer's CPU budget.
    """

    def __init__(
        self,
        replica: Replica,
        stream: FrameStream,
        session: Session,
        *,
        budget: SendBudget | None = None,
        on_peers: OnPeers | None = None,
        cpu: CpuBudget | None = None,
    ) -> None:
        self.replica = replica
        self.stream = stream
        self.session = session
        self.performer = Performer(
            session,
            replica,
            _StreamLink(stream, budget),
            on_peers=on_peers,
            on_send_error=self._send_failed,
            offload=self._offload,
        )
        self.cpu = cpu
        self.cpu_key = budget_key(stream.peer_identity, stream.peer_address)
        self.cpu_s = 0.0
        self.cpu_refused = False
        size = 2 * session.config.window + _CONTROL_FRAMES
        self.queue: asyncio.Queue[Incoming] = asyncio.Queue(maxsize=size)
        self.bytes_received = 0
        self.frames_received = 0
        self._reader: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    async def run(self, *, timeout_s: float | None = None) -> ExchangeOutcome:
        """Run the exchange to its end.

        Args:
            timeout_s: how long the peer may stay silent with nothing in
                flight; unacknowledged bytes extend it (invariant 5). Past it
                the exchange ends ``DEADLINE_EXCEEDED`` (what was applied stays
                applied).

        Returns:
            How the exchange ended. Never raises for a peer's, the link's or a
            batch's failure; cancellation ends it ``CANCELLED`` and propagates.
        """
        if self._reader is not None:
            raise RuntimeError("an ExchangeRunner runs once")
        self._started = time.monotonic()
        session, performer = self.session, self.performer
        self._reader = asyncio.create_task(
            self._read(), name=f"syncfw-recv-{self.stream.peer_address}"
        )
        status: Status | None = None
        reason = ""
        loop = asyncio.get_running_loop()
        patience = 0.0
        try:
            async with asyncio.timeout(None) as deadline:

                def progressed() -> None:  # a frame came: the deadline moves (invariant 5)
                    nonlocal patience
                    if timeout_s is not None:
                        patience = session.patience_s(timeout_s)
                        deadline.reschedule(loop.time() + patience)

                progressed()
                refusal = self._cpu_refusal()
                if refusal:  # in debt: refused before any work (invariant 7)
                    await performer.abort(Status.RESOURCE_EXHAUSTED, refusal)
                else:
                    await performer.start()
                while not session.ended:
                    item = await self.queue.get()
                    progressed()
                    if isinstance(item, FrameIn):
                        if isinstance(item.frame, Ops) and not await self._cpu_wait():
                            await performer.abort(Status.RESOURCE_EXHAUSTED, self._cpu_refusal())
                            break
                        await performer.receive(item.frame)
                    elif isinstance(item, LinkFailed):
                        await performer.abort(item.status, item.reason)
                    else:
                        await performer.abort(Status.ABORTED, "peer hung up mid-exchange")
        except TimeoutError:
            session.timed_out()
            reason = (
                f"no progress for {patience:.1f}s ({session.bytes_unacked} bytes unacknowledged)"
            )
            # telling the peer must not hang on a peer that stopped reading
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SEND_FAILED_WAIT_S):
                    await performer.abort(Status.DEADLINE_EXCEEDED, reason)
            status = Status.DEADLINE_EXCEEDED
        finally:
            if status is None:
                if session.status is None:  # cancelled from outside
                    session.abort(Status.CANCELLED, "exchange cancelled")
                status = session.status if session.status is not None else Status.CANCELLED
                reason = session.reason
            task = asyncio.current_task()
            try:
                if status is Status.OK and not (task is not None and task.cancelling()):
                    # In sync, but the peer may still be finishing (persisting the last
                    # ack): say this side is done and let the peer end the call (invariant 4).
                    await self.stream.close(status, reason)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_SEND_FAILED_WAIT_S):
                            await asyncio.shield(self._reader)
            finally:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
                await self.stream.close(status, reason)
        return self._outcome(status, reason)

    def _outcome(self, status: Status, reason: str) -> ExchangeOutcome:
        session, performer = self.session, self.performer
        return ExchangeOutcome(
            status,
            reason,
            peer_id=session.peer_id,
            ops_sent=session.ops_acked,
            ops_queued=session.ops_sent,
            ops_received=session.ops_received,
            bytes_sent=performer.bytes_sent,
            frames_sent=performer.frames_sent,
            bytes_received=self.bytes_received,
            frames_received=self.frames_received,
            duration_s=time.monotonic() - self._started,
            learned=performer.learned,
            peer_clock_offset_ms=session.peer_clock_offset_ms,
            peer_clock=session.peer_clock,
        )

    async def _offload(self, work: Callable[[], list[Op]]) -> list[Op]:
        """Decode on the worker thread and charge its CPU time to the peer (invariant 7)."""
        loop = asyncio.get_running_loop()
        ops, exc, cpu_s = await loop.run_in_executor(DECODER, _timed, work)
        self.cpu_s += cpu_s
        if self.cpu is not None:
            self.cpu.charge(self.cpu_key, cpu_s)
            if isinstance(exc, DecodeError | ChainError):  # only a peer's bytes do that
                self.cpu.penalize(self.cpu_key, self.cpu.share.refused_batch_s)
        if exc is not None:
            raise exc
        return ops if ops is not None else []

    def _cpu_refusal(self) -> str:
        """Why the peer is refused for its CPU budget now, or "" if it is not."""
        cpu = self.cpu
        if cpu is None or cpu.allows(self.cpu_key):
            return ""
        self.cpu_refused = True
        share = cpu.share
        return (
            f"CPU budget: decoding this peer's batches took more than its share "
            f"({share.rate:g} CPU-s per s, burst {share.burst:g} s); "
            f"retry in {cpu.wait_s(self.cpu_key):.1f} s"
        )

    async def _cpu_wait(self) -> bool:
        """Slow a peer in debt until it is repaid; False if that would take too long."""
        cpu = self.cpu
        if cpu is None:
            return True
        wait = cpu.wait_s(self.cpu_key)
        if wait <= 0:
            return True
        if wait > cpu.share.max_wait_s:
            return False
        await asyncio.sleep(wait)  # the reader's bounded queue holds the peer back meanwhile
        return True

    async def _read(self) -> None:
        """Move the peer's frames into the queue until the stream ends or fails."""
        stream, queue = self.stream, self.queue
        try:
            while True:
                data = await stream.recv()
                if data is None:
                    await queue.put(StreamEnded())
                    return
                self.frames_received += 1
                self.bytes_received += len(data)
                try:
                    frame = decode_frame(data)
                except DecodeError as exc:
                    await queue.put(LinkFailed(Status.INVALID_ARGUMENT, f"malformed frame: {exc}"))
                    return
                await queue.put(FrameIn(frame))
        except LinkError as exc:
            await queue.put(LinkFailed(exc.status, exc.reason))
        except Exception as exc:  # a transport bug must end the exchange, not hang it
            log.exception("receiving from %s failed", stream.peer_address)
            await queue.put(LinkFailed(Status.INTERNAL, f"receive failed: {exc!r}"))

    async def _send_failed(self, exc: LinkError) -> list[Effect]:
        """A write failed: the peer has likely ended the call; prefer its reason."""
        reader = self._reader
        if reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SEND_FAILED_WAIT_S):
                    await asyncio.shield(reader)
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, FrameIn) and isinstance(item.frame, Close):
                return self.session.receive(item.frame)
            if isinstance(item, LinkFailed):
                return self.session.abort(item.status, item.reason)
        return self.session.abort(exc.status, f"send failed: {exc.reason}")


def _record(metrics: NodeMetrics, out: ExchangeOutcome) -> None:
    """One exchange's figures, in the node's registry (invariant 4)."""
    node = metrics.node_id
    metrics.exchanges.labels(node, out.status.name).inc()
    metrics.exchange_seconds.labels(node).observe(out.duration_s)
    metrics.wire_bytes.labels(node, "in").inc(out.bytes_received)
    metrics.wire_bytes.labels(node, "out").inc(out.bytes_sent)
    metrics.exchange_ops.labels(node, "sent").inc(out.ops_sent)
    metrics.exchange_ops.labels(node, "received").inc(out.ops_received)


FAILED_EXCHANGE_WARN_EVERY_S = 10.0
"""A failed exchange logs a WARNING at most this often per (peer host, status) and
node; the ones in between are counted in the next line and logged at DEBUG."""

_notices: weakref.WeakKeyDictionary[Replica, Notices] = weakref.WeakKeyDictionary()


def _notices_of(replica: Replica) -> Notices | None:
    try:
        got = _notices.get(replica)
        if got is None:
            got = _notices[replica] = Notices(log, FAILED_EXCHANGE_WARN_EVERY_S)
        return got
    except TypeError:  # a replica that cannot be weakly referenced: no rate limit
        return None


def _log_outcome(
    replica: Replica, stream: FrameStream, out: ExchangeOutcome, cause: str = ""
) -> None:
    args = (
        replica.node_id,
        clip(out.peer_id or "?"),
        clip(stream.peer_address),
        out.status.name,
        clip(out.reason, 400),
        out.ops_sent,
        out.ops_queued - out.ops_sent,
        out.ops_received,
    )
    message = (
        "exchange %s <-> %s (%s) ended %s: %s; "
        "delivered %d ops (acknowledged), %d more unacknowledged, applied %d"
    )
    if out.ok or out.status is Status.CANCELLED:
        log.log(logging.DEBUG if out.ok else logging.INFO, message, *args)
        return
    # One flooding peer must not flood the log: rate-limited per host and status.
    notices = _notices_of(replica)
    key = f"{peer_host(stream.peer_address)}|{out.status.name}|{cause}"
    if notices is None or not notices.warn(key, 1, message, *args):
        if notices is None:
            log.warning(message, *args)
        else:
            log.debug(message, *args)


async def run_exchange(
    replica: Replica,
    stream: FrameStream,
    *,
    config: SessionConfig | None = None,
    peers: Sequence[PeerInfo] = (),
    expect_peer: str | None = None,
    budget: SendBudget | None = None,
    on_peers: OnPeers | None = None,
    timeout_s: float | None = None,
    metrics: NodeMetrics | None = None,
    initiator: bool = False,
    cpu: CpuBudget | None = None,
) -> ExchangeOutcome:
    """Run one exchange over ``stream`` to its end.

    Args:
        replica: the local replica whose ops are sent and into which the
            peer's are applied.
        stream: an open byte stream to the peer (either side of it).
        config: session tunables.
        peers: a member list to gossip to the peer.
        expect_peer: refuse a peer that says hello under another node id
            (defaults to the id the link authenticated, under mTLS).
        budget: per-peer bandwidth budget charged for every frame sent.
        on_peers: called with each member list the peer gossips.
        timeout_s: how long the peer may stay silent with nothing in flight;
            unacknowledged bytes extend it (invariant 5).
        metrics: the node's registry; the exchange's outcome, duration, wire
            bytes and ops are recorded there when it ends.
        initiator: this side dialed (its Hello goes first; clock offsets are
            then bounded on both sides).
        cpu: the per-peer CPU budget to charge (invariant 7); by default the
            node's (:func:`~syncfw.transport.admission.cpu_budget_of` its
            ``metrics``, the one its gRPC server refuses by), else the
            replica's own (:func:`cpu_budget`).

    Returns:
        How the exchange ended. Never raises for a peer's, the link's or a
        batch's failure (only cancellation propagates, after recording).
    """
    session = Session(
        replica.node_id,
        replica.fleet_id,
        config=config,
        peers=peers,
        expect_peer=expect_peer if expect_peer is not None else stream.peer_identity,
        wall_ms=replica_wall_ms(replica),
        fleet_digest=replica.fleet_digest,
        clocks=SessionClocks(time.monotonic, lambda: replica_wall_ms(replica)),
        book=peer_book(replica),
        initiator=initiator,
    )
    runner = ExchangeRunner(
        replica,
        stream,
        session,
        budget=budget,
        on_peers=on_peers,
        cpu=_budget_for(replica, metrics) if cpu is None else cpu,
    )
    runner.performer.authenticate(stream.peer_identity, metrics)  # acks only from it (trust)
    try:
        out = await runner.run(timeout_s=timeout_s)
    except asyncio.CancelledError:
        out = runner._outcome(Status.CANCELLED, "exchange cancelled")
        _finish(replica, stream, out, metrics, runner)
        raise
    _finish(replica, stream, out, metrics, runner)
    return out


def _finish(
    replica: Replica,
    stream: FrameStream,
    out: ExchangeOutcome,
    metrics: NodeMetrics | None,
    runner: ExchangeRunner,
) -> None:
    refused = runner.cpu_refused and out.status is Status.RESOURCE_EXHAUSTED
    _log_outcome(replica, stream, out, "cpu_budget" if refused else "")
    if metrics is not None:
        _record(metrics, out)
        if refused:
            metrics.refused_streams.labels(metrics.node_id, "cpu_budget").inc()
