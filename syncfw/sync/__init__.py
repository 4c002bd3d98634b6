"""The anti-entropy protocol as a sans-IO state machine: frames in, effects out.

Owns the frame and effect types (``frames``), the :class:`Session` state
machine (``session``) and :class:`SessionPair`, which drives two sessions in
tests without an event loop (``pair``). Nothing here opens a socket, awaits,
reads a clock or touches SQLite: whoever owns the I/O (the transport runner, the
simulator) performs the effects and feeds the results back.

May import: errors, log, codec. Must not import: store, node, transport, mesh,
grpc, asyncio.
"""

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
    Status,
    Summary,
)
from syncfw.sync.session import (
    Acknowledge,
    ApplyOps,
    Effect,
    End,
    FetchOps,
    LearnPeers,
    LoadPeerAck,
    Send,
    Session,
    SessionConfig,
    SessionState,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Acknowledge",
    "ApplyOps",
    "Close",
    "Digest",
    "Effect",
    "End",
    "FetchOps",
    "Frame",
    "Hello",
    "LearnPeers",
    "LoadPeerAck",
    "Ops",
    "PeerInfo",
    "Peers",
    "Send",
    "Session",
    "SessionConfig",
    "SessionState",
    "Status",
    "Summary",
]
