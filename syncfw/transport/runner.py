"""Performs a sans-IO :class:`~syncfw.sync.Session`'s effects against a replica and a stream.

This is the only place the protocol's effects are awaited (the simulator has
its own, deterministic, performer). Invariants:

1. Effects are performed strictly in the order the session emitted them, and
   each answer is fed back before the next frame is, so the session sees the
   same sequence of inputs it would in :class:`~syncfw.sync.pair.SessionPair`.
2. Frames are read by a separate task into a queue so that two peers both
   sending never deadlock on flow control; the session's window bounds that queue.
3. Every exchange ends with exactly one :class:`ExchangeOutcome` and a log
   line; failures of the peer, the link or the batch never raise out of
   :func:`run_exchange` (only cancellation does), so a node keeps serving its
   other peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from syncfw.errors import DecodeError, SyncfwError
from syncfw.log import Replica
from syncfw.sync import (
    Acknowledge,
    ApplyOps,
    Close,
    Effect,
    End,
    FetchOps,
    LearnPeers,
    LoadPeerAck,
    PeerInfo,
    Send,
    Session,
    SessionConfig,
    Status,
)
from syncfw.transport.base import FrameStream, LinkError

__all__ = ["ExchangeOutcome", "SendBudget", "run_exchange"]

log = logging.getLogger("syncfw.sync")

_EOF = object()


class SendBudget(Protocol):
    """A per-peer bandwidth budget: :meth:`spend` waits until ``n`` bytes may go."""

    async def spend(self, n: int) -> None:
        """Wait until ``n`` more bytes may be sent to this peer, then count them."""
        ...


@dataclass(slots=True)
class ExchangeOutcome:
    """How one exchange ended.

    Attributes:
        status: the end status (``OK`` when both sides are in sync).
        reason: why it ended.
        peer_id: the peer's node id, if it said hello.
        ops_sent: ops this side sent.
        ops_received: ops this side applied from the peer.
        bytes_sent: wire bytes this side sent.
        frames_sent: frames this side sent.
        duration_s: wall time of the exchange.
        learned: peer lists the peer gossiped.
        peer_clock_offset_ms: how far the peer's clock was ahead of ours at
            hello (see :attr:`Session.peer_clock_offset_ms`).
    """

    status: Status
    reason: str
    peer_id: str | None = None
    ops_sent: int = 0
    ops_received: int = 0
    bytes_sent: int = 0
    frames_sent: int = 0
    duration_s: float = 0.0
    learned: list[tuple[PeerInfo, ...]] = field(default_factory=list)
    peer_clock_offset_ms: int | None = None

    @property
    def ok(self) -> bool:
        """True if the exchange ended in sync."""
        return self.status is Status.OK


def _log_unexpected(exc: BaseException, doing: str) -> None:
    """Replica errors of syncfw's own tree are expected; anything else is a bug worth a traceback."""
    if not isinstance(exc, SyncfwError):
        log.error("%s failed unexpectedly", doing, exc_info=exc)


async def run_exchange(
    replica: Replica,
    stream: FrameStream,
    *,
    config: SessionConfig | None = None,
    peers: Sequence[PeerInfo] = (),
    expect_peer: str | None = None,
    budget: SendBudget | None = None,
    on_peers: Callable[[tuple[PeerInfo, ...]], Awaitable[None] | None] | None = None,
    timeout_s: float | None = None,
) -> ExchangeOutcome:
    """Run one exchange over ``stream`` to its end.

    Args:
        replica: the local replica whose ops are sent and into which the
            peer's are applied.
        stream: an open frame stream to the peer (either side of it).
        config: session tunables.
        peers: a member list to gossip to the peer.
        expect_peer: refuse a peer that says hello under another node id
            (defaults to the id the link authenticated, under mTLS).
        budget: per-peer bandwidth budget charged for every frame sent.
        on_peers: called with each member list the peer gossips.
        timeout_s: the whole exchange's deadline; past it the exchange ends
            with ``DEADLINE_EXCEEDED`` (what was applied stays applied).

    Returns:
        How the exchange ended. Never raises for a peer's, the link's or a
        batch's failure.
    """
    started = time.monotonic()
    session = Session(
        replica.node_id,
        replica.fleet_id,
        hlc=replica.hlc_now(),
        config=config,
        peers=peers,
        expect_peer=expect_peer if expect_peer is not None else stream.peer_identity,
    )
    out = ExchangeOutcome(Status.INTERNAL, "not started")
    rxq: asyncio.Queue[object] = asyncio.Queue()
    tasks: list[asyncio.Task[None]] = []

    async def reader() -> None:
        try:
            while True:
                frame = await stream.recv()
                if frame is None:
                    await rxq.put(_EOF)
                    return
                await rxq.put(frame)
        except (LinkError, DecodeError) as exc:
            await rxq.put(exc)
        except Exception as exc:  # a transport bug must end the exchange, not hang it
            log.exception("receiving from %s failed", stream.peer_address)
            await rxq.put(LinkError(Status.INTERNAL, f"receive failed: {exc!r}"))

    async def send_failed(exc: LinkError) -> list[Effect]:
        """A write failed: the peer has likely ended the call; prefer its reason."""
        reading = tasks[0] if tasks else None
        if reading is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # the link is gone: the read side ends soon
                    await asyncio.shield(reading)
        while not rxq.empty():
            item = rxq.get_nowait()
            if isinstance(item, Close):
                return session.receive(item)
            if isinstance(item, LinkError):
                return session.abort(item.status, item.reason)
        return session.abort(exc.status, f"send failed: {exc.reason}")

    async def perform(effects: list[Effect]) -> None:
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if isinstance(effect, Send):
                try:
                    size = await stream.send(effect.frame)
                    out.frames_sent += 1
                    out.bytes_sent += size
                    if budget is not None:
                        await budget.spend(size)
                except LinkError as exc:
                    queue.extend(await send_failed(exc))
            elif isinstance(effect, FetchOps):
                try:
                    ops = await replica.ops_since(
                        effect.vv, limit=effect.limit, max_bytes=effect.max_bytes
                    )
                except Exception as exc:
                    _log_unexpected(exc, "reading ops")
                    queue.extend(session.abort(Status.INTERNAL, f"could not read ops: {exc}"))
                else:
                    queue.extend(session.ops_fetched(ops))
            elif isinstance(effect, ApplyOps):
                try:
                    await replica.apply_remote(list(effect.ops))
                    vv = await replica.version_vector()
                except Exception as exc:  # the session decides what each failure means
                    _log_unexpected(exc, "applying a batch")
                    queue.extend(session.apply_failed(exc))
                else:
                    queue.extend(session.ops_applied(vv))
            elif isinstance(effect, Acknowledge):
                try:
                    await replica.acknowledge(effect.peer, effect.vv)
                except Exception as exc:
                    _log_unexpected(exc, "recording an ack")
                    queue.extend(session.abort(Status.INTERNAL, f"could not record ack: {exc}"))
            elif isinstance(effect, LoadPeerAck):
                try:
                    record = await replica.peer_ack(effect.peer)
                except Exception as exc:  # without the record, summaries go whole
                    _log_unexpected(exc, "reading a peer's ack")
                    record = {}
                queue.extend(session.peer_ack_loaded(record))
            elif isinstance(effect, LearnPeers):
                out.learned.append(effect.peers)
                if on_peers is not None:
                    try:
                        res = on_peers(effect.peers)
                        if res is not None:
                            await res
                    except Exception:  # membership bookkeeping must not end the exchange
                        log.exception("handling peers gossiped by %s failed", session.peer_id)
            elif isinstance(effect, End):
                out.status, out.reason = effect.status, effect.reason

    task = asyncio.create_task(reader(), name=f"syncfw-recv-{stream.peer_address}")
    tasks.append(task)
    try:
        async with asyncio.timeout(timeout_s):
            try:
                vv = await replica.version_vector()
            except Exception as exc:
                _log_unexpected(exc, "reading the version vector")
                await perform(session.abort(Status.INTERNAL, f"could not read vector: {exc}"))
            else:
                await perform(session.start(vv))
            while not session.ended:
                item = await rxq.get()
                if item is _EOF:
                    effects = session.abort(Status.ABORTED, "peer hung up mid-exchange")
                elif isinstance(item, LinkError):
                    effects = session.abort(item.status, item.reason)
                elif isinstance(item, DecodeError):
                    effects = session.abort(Status.INVALID_ARGUMENT, f"malformed frame: {item}")
                else:
                    effects = session.receive(item)  # type: ignore[arg-type]
                await perform(effects)
    except TimeoutError:
        # telling the peer must not hang on a peer that stopped reading
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await perform(
                    session.abort(Status.DEADLINE_EXCEEDED, f"exchange took over {timeout_s}s")
                )
        if not session.ended or out.status is not Status.DEADLINE_EXCEEDED:
            out.status, out.reason = Status.DEADLINE_EXCEEDED, f"exchange took over {timeout_s}s"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not session.ended:  # cancelled from outside
            session.abort(Status.CANCELLED, "exchange cancelled")
            out.status, out.reason = Status.CANCELLED, "exchange cancelled"
        await stream.close(out.status, out.reason)
    out.peer_id = session.peer_id
    out.peer_clock_offset_ms = session.peer_clock_offset_ms
    out.ops_sent = session.ops_sent
    out.ops_received = session.ops_received
    out.duration_s = time.monotonic() - started
    quiet = out.ok or out.status is Status.CANCELLED
    level = logging.DEBUG if out.ok else logging.INFO if quiet else logging.WARNING
    log.log(
        level,
        "exchange %s <-> %s (%s) ended %s: %s; sent %d ops, applied %d",
        replica.node_id,
        out.peer_id or "?",
        stream.peer_address,
        out.status.name,
        out.reason,
        out.ops_sent,
        out.ops_received,
    )
    return out
