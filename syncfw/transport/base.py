"""What every transport offers the exchange runner: an ordered stream of frame bytes.

Invariants:

1. A :class:`FrameStream` carries whole messages of bytes (each one frame's
   wire form, :mod:`syncfw.transport.wire`), in order, reliably, or fails; it
   never delivers half a message, and it never parses what it carries: the
   exchange runner encodes and decodes frames, once.
2. Transport failures surface only as :class:`LinkError` (a
   :class:`~syncfw.errors.ProtocolError`) carrying a :class:`Status`: no grpc,
   socket or protobuf exception gets past a transport.
"""

from __future__ import annotations

from typing import Protocol

from syncfw.errors import ProtocolError
from syncfw.sync.frames import Status

__all__ = ["FrameStream", "LinkError"]


class LinkError(ProtocolError):
    """The link to a peer failed or the peer ended the exchange with an error.

    Attributes:
        status: the status the exchange ended with (``UNAVAILABLE`` when the
            peer could not be reached, ``ABORTED`` when the link was cut, or
            the status the peer sent).
        reason: human-readable detail.
    """

    def __init__(self, status: Status, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status.name}: {reason}")


class FrameStream(Protocol):
    """One exchange's bidirectional, ordered, reliable stream of frame bytes."""

    @property
    def peer_address(self) -> str:
        """Where the other end is (for logs)."""
        ...

    @property
    def peer_identity(self) -> str | None:
        """The peer's node id as authenticated by the link (mTLS), if it is."""
        ...

    async def send(self, data: bytes) -> None:
        """Send one message (one frame's bytes); waits while the link applies backpressure.

        Raises:
            LinkError: the link is gone.
        """
        ...

    async def recv(self) -> bytes | None:
        """The next message, or None once the peer has finished cleanly.

        Raises:
            LinkError: the link failed or the peer ended with an error status.
        """
        ...

    async def close(self, status: Status, reason: str) -> None:
        """End this side of the exchange with ``status``; idempotent, never raises."""
        ...
