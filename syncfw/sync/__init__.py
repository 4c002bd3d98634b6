"""The anti-entropy protocol as a sans-IO state machine: frames in, effects out.

Owns the frame types (``frames``), the effect types (``effects``), the :class:`Session` state
machine (``session``) and :class:`SessionPair`, which drives two sessions in
tests without an event loop (``pair``). Nothing here opens a socket, awaits,
reads a clock or touches SQLite: whoever owns the I/O (the transport runner, the
simulator) performs the effects and feeds the results back.

May import: errors, log, codec, crdt (the snapshot's state checks). Must not import: store, node, transport, mesh,
grpc, asyncio.
"""

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
    MAX_ADDRESS_CHARS,
    MAX_FEATURE_CHARS,
    MAX_FEATURES,
    MAX_FLEET_ID_CHARS,
    MAX_NODE_ID_CHARS,
    MAX_REASON_CHARS,
    PEER_TEXT_CHARS,
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
from syncfw.sync.links import BatchSizer, ClockEstimate, ClockFilter, PeerBook, PeerLink
from syncfw.sync.session import (
    Session,
    SessionClocks,
    SessionConfig,
    SessionState,
)
from syncfw.sync.snapshot import Snapshot, decode_snapshot, encode_snapshot

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
    "Acknowledge",
    "BatchSizer",
    "ClockEstimate",
    "ClockFilter",
    "ApplyOps",
    "Close",
    "DecodeOps",
    "Digest",
    "Effect",
    "End",
    "FetchOps",
    "FetchSnapshot",
    "Frame",
    "Hello",
    "InstallSnapshot",
    "LearnPeers",
    "LoadPeerAck",
    "Ops",
    "PeerBook",
    "PeerInfo",
    "PeerLink",
    "Peers",
    "Send",
    "Session",
    "SessionClocks",
    "SessionConfig",
    "SessionState",
    "Snapshot",
    "SnapshotPart",
    "Status",
    "Summary",
    "clip",
    "decode_snapshot",
    "encode_snapshot",
]
