"""The effects a sync session asks its performer for, and what each answer is.

Invariants:

1. An effect is a plain frozen value; performing it is the performer's job
   (:mod:`syncfw.exchange.performer`). Effects that need an answer name the
   :class:`~syncfw.sync.session.Session` method to feed it back through.
2. :class:`End` is always the last effect of a session.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from syncfw.codec import BatchLimits
from syncfw.log import Op
from syncfw.sync.frames import Frame, PeerInfo, Status

__all__ = [
    "Acknowledge",
    "ApplyOps",
    "DecodeOps",
    "Effect",
    "End",
    "FetchOps",
    "FetchSnapshot",
    "InstallSnapshot",
    "LearnPeers",
    "LoadPeerAck",
    "Send",
]


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``frame`` to the peer."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class FetchOps:
    """Read ops beyond ``vv`` (``Replica.ops_since``); answer with :meth:`Session.ops_fetched`."""

    vv: Mapping[str, int]
    limit: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class DecodeOps:
    """Decode a peer's batch (:func:`syncfw.codec.decode_batch` with these arguments), then
    answer with :meth:`Session.ops_decoded` or, for a ``DecodeError`` or ``ChainError``,
    :meth:`Session.decode_failed`.

    Pure CPU work, bounded by ``limits``: a performer may do it in a worker
    thread so a large batch does not hold up the event loop.

    Attributes:
        batch: the encoded batch, already within the size cap.
        limits: the codec caps.
        after: the receiver's vector at this batch (gaps are refused unbuilt).
    """

    batch: bytes
    limits: BatchLimits
    after: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class ApplyOps:
    """Apply a batch atomically (``Replica.apply_remote``), then answer with
    :meth:`Session.ops_applied` (the new version vector) or :meth:`Session.apply_failed`."""

    ops: tuple[Op, ...]


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """Durably record that ``peer`` holds ``vv`` (``Replica.acknowledge``)."""

    peer: str
    vv: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class LoadPeerAck:
    """Read the vector last recorded for ``peer`` (``Replica.peer_ack``); answer with
    :meth:`Session.peer_ack_loaded`."""

    peer: str


@dataclass(frozen=True, slots=True)
class LearnPeers:
    """The peer gossiped its member list."""

    peers: tuple[PeerInfo, ...]


@dataclass(frozen=True, slots=True)
class FetchSnapshot:
    """Build this replica's state snapshot (``encode_snapshot(await replica.snapshot())``)
    for a peer below its compaction point, then answer with :meth:`Session.snapshot_fetched`
    (the encoded bytes and the vector they stand for) or :meth:`Session.snapshot_unavailable`.

    Attributes:
        below: the origins the peer lacks compacted ops of (origin -> compacted seq).
    """

    below: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """Check and install the peer's snapshot (``replica.install_snapshot``), then answer with
    :meth:`Session.snapshot_installed` (the new version vector) or
    :meth:`Session.snapshot_failed`; nothing changes when it fails.

    Attributes:
        data: the encoded snapshot, every piece joined, within ``max_snapshot_bytes``.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """The exchange is over; ``status`` says how. Always the last effect."""

    status: Status
    reason: str


Effect = (
    Send
    | FetchOps
    | DecodeOps
    | ApplyOps
    | Acknowledge
    | LoadPeerAck
    | LearnPeers
    | FetchSnapshot
    | InstallSnapshot
    | End
)
"""Everything a session may ask for."""
