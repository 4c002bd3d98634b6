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

from syncfw.errors import DecodeError, SyncfwError
from syncfw.log import Replica
from syncfw.sync import (
    Acknowledge,
    ApplyOps,
    Effect,
    End,
    FetchOps,
    LearnPeers,
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


class SendBudget(Protocol_ := object):  # noqa: N801 - placeholder replaced below
    pass


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

    @property
    def ok(self) -> bool:
        """True if the exchange ended in sync."""
        return self.status is Status.OK
