"""The frames of sync protocol version 1, as plain values.

The wire form (protobuf, ``protos/syncfw/v1/sync.proto``) is the transport's
business; these dataclasses mirror it one to one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Close",
    "Digest",
    "Frame",
    "Hello",
    "Ops",
    "PeerInfo",
    "Peers",
    "Status",
    "Summary",
]

PROTOCOL_VERSION = 1
"""The sync protocol version this code speaks; ``Hello.protocol`` must equal it."""


class Status(enum.IntEnum):
    """Why an exchange ended. Values are the gRPC status codes they map to."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3  # malformed frame or batch, frame out of order, gap
    DEADLINE_EXCEEDED = 4
    RESOURCE_EXHAUSTED = 8  # batch over the size caps
    FAILED_PRECONDITION = 9  # protocol version, another fleet
    ABORTED = 10  # the link was cut
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
        hlc: the sender's hybrid clock when it said hello.
        features: capabilities, e.g. ``("zstd",)``.
        max_batch_bytes: largest ``Ops.batch`` the sender accepts.
    """

    protocol: int
    fleet_id: str
    node_id: str
    hlc: int = 0
    features: tuple[str, ...] = ()
    max_batch_bytes: int = 1 << 20


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
    """

    vv: Mapping[str, int] = field(default_factory=dict)
    base_digest: bytes = b""
    want_full: bool = False


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
class Ack:
    """The receiver's version vector after applying a batch."""

    vv: Mapping[str, int] = field(default_factory=dict)


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


Frame = Hello | Digest | Summary | Ops | Ack | Peers | Close
