"""The frames of sync protocol version 1, as plain values.

The wire form (protobuf, ``protos/syncfw/v1/sync.proto``) is the transport's
business; these dataclasses mirror it one to one. The field limits below are
checked where the wire form is decoded (:mod:`syncfw.transport.wire`), so no
frame that reaches a session carries an unbounded string; :func:`clip` bounds
what of a peer's strings goes into a log line or a ``Close`` reason.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from syncfw.codec import PEER_TEXT_CHARS, clip_text
from syncfw.log import MAX_ORIGIN_CHARS

__all__ = [
    "MAX_ADDRESS_CHARS",
    "MAX_FEATURES",
    "MAX_FEATURE_CHARS",
    "MAX_FLEET_ID_CHARS",
    "MAX_NODE_ID_CHARS",
    "MAX_REASON_CHARS",
    "PEER_TEXT_CHARS",
    "PROTOCOL_VERSION",
    "Ack",
    "Close",
    "Digest",
    "Frame",
    "Hello",
    "Ops",
    "PeerInfo",
    "Peers",
    "SnapshotPart",
    "Status",
    "Summary",
    "clip",
]

PROTOCOL_VERSION = 1
"""The sync protocol version this code speaks; ``Hello.protocol`` must equal it."""

MAX_NODE_ID_CHARS = MAX_ORIGIN_CHARS
"""Longest node id a peer may send (``Hello.node_id``, a gossiped member), as ops' origins."""
MAX_FLEET_ID_CHARS = 256
"""Longest ``Hello.fleet_id``."""
MAX_FEATURES = 16
"""Most entries in ``Hello.features``."""
MAX_FEATURE_CHARS = 32
"""Longest single entry of ``Hello.features``."""
MAX_ADDRESS_CHARS = 256
"""Longest gossiped ``host:port``."""
MAX_REASON_CHARS = 1000
"""A peer's ``Close.reason`` is cut to this many characters on decoding."""
clip = clip_text
"""A peer-supplied string cut for a log line or a reason (:func:`syncfw.codec.clip_text`)."""


class Status(enum.IntEnum):
    """Why an exchange ended. Values are the gRPC status codes they map to."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3  # malformed frame or batch, frame out of order, gap
    DEADLINE_EXCEEDED = 4
    PERMISSION_DENIED = 7  # a snapshot from a peer this side may not take one from
    RESOURCE_EXHAUSTED = 8  # batch over the size caps
    FAILED_PRECONDITION = 9  # protocol version, another fleet
    ABORTED = 10  # the link was cut
    OUT_OF_RANGE = 11  # the peer needs ops this side compacted, and no snapshot can go
    INTERNAL = 13  # local storage failed
    UNAVAILABLE = 14  # the peer cannot be reached
    DATA_LOSS = 15  # forged or forked chain


@dataclass(frozen=True, slots=True)
class Hello:
    """Opens an exchange.

    Attributes:
        protocol: protocol version spoken by the sender.
        fleet_id: the sender's fleet.
        node_id: the sender's node id.
        hlc: the sender's hybrid clock when it said hello; informational (no
            receiver reads it) and 0, unsent, from syncfw's own sessions.
        features: capabilities, e.g. ``("zstd",)``.
        max_batch_bytes: largest ``Ops.batch`` the sender accepts.
        fleet_digest: 16-byte digest of the sender's fleet bootstrap
            (``Fleet.bootstrap_digest``); empty: unknown (an older sender).
        wall_ms: the sender's wall clock at hello, in ms since the epoch; 0:
            unknown. Clock offsets are measured from it, never from ``hlc``
            (hybrid clocks observe each other, so they hide a peer's drift).
    """

    protocol: int
    fleet_id: str
    node_id: str
    hlc: int = 0
    features: tuple[str, ...] = ()
    max_batch_bytes: int = 1 << 20
    fleet_digest: bytes = b""
    wall_ms: int = 0


@dataclass(frozen=True, slots=True)
class Digest:
    """A 16-byte digest of the sender's version vector (:func:`syncfw.log.vv_digest`)."""

    digest: bytes


@dataclass(frozen=True, slots=True)
class Summary:
    """The sender's version vector, whole or as a delta.

    Attributes:
        vv: the vector, or (with ``base_digest``) the entries that differ from
            the base; seq 0 removes an origin.
        base_digest: digest of the base the delta applies to, the vector the
            sender last recorded for the receiver; empty for a whole vector.
        want_full: a request for the receiver's whole vector (the delta it
            sent could not be used); ``vv`` is then empty.
        columns: ``vv`` goes on the wire in columns (``vv_origins`` and packed
            ``vv_seqs``), which only a peer that advertised ``vv_cols``
            reads; decoding sets it from what arrived (False for an empty
            vector). How the vector travels, not what it is: frames that
            differ only in it are equal.
    """

    vv: Mapping[str, int] = field(default_factory=dict)
    base_digest: bytes = b""
    want_full: bool = False
    columns: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Ops:
    """A batch of ops the receiver lacks (:mod:`syncfw.codec` bytes).

    Attributes:
        batch: the encoded batch.
        last: the sender has nothing more to send in this exchange.
    """

    batch: bytes
    last: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotPart:
    """A piece of a state snapshot (:mod:`syncfw.sync.snapshot` bytes, cut to fit the
    peer's batch cap), sent before any ``Ops`` to a peer below this side's compaction point.

    Attributes:
        data: the next bytes of the encoded snapshot.
        last: the snapshot's final piece.
    """

    data: bytes
    last: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver's version vector after applying a batch.

    Attributes:
        vv: the entries (the origins the batch moved).
        columns: ``vv`` goes on the wire in columns, as :attr:`Summary.columns`.
    """

    vv: Mapping[str, int] = field(default_factory=dict)
    columns: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One member of the fleet as gossiped.

    Attributes:
        node_id: the member's node id.
        address: where it listens (``host:port``), empty if it does not.
        heartbeat: the member's own heartbeat counter; higher is fresher.
    """

    node_id: str
    address: str = ""
    heartbeat: int = 0


@dataclass(frozen=True, slots=True)
class Peers:
    """A gossiped peer list."""

    peers: tuple[PeerInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class Close:
    """Ends the exchange early, with a reason the other side logs."""

    code: Status
    reason: str = ""


Frame = Hello | Digest | Summary | Ops | SnapshotPart | Ack | Peers | Close
