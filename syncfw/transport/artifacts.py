"""The artifact stream kind: content-addressed chunks between peers, as bytes.

A node asks a peer for chunks by their sha256 (``syncfw.v1.Artifacts/Fetch`` on
gRPC, a direct call on the in-memory network); the peer streams each one it
holds in pieces, or says it does not hold it. What a chunk *is*, whether its
bytes match, which peer to ask and how much the serving side may send all
belong to :mod:`syncfw.models`; the transport only carries the pieces.

Invariants:

1. A request names at most :data:`MAX_HASHES_PER_FETCH` hashes of exactly
   :data:`HASH_BYTES` bytes (:func:`check_hashes`); anything else is refused
   ``INVALID_ARGUMENT`` before the handler runs, on every transport.
2. A piece carries at most :data:`MAX_PIECE_BYTES`, so a shared bandwidth
   budget (:mod:`syncfw.transport.budget`) lets sync frames go between pieces.
3. The transport never checks a chunk's bytes: the receiver hashes every chunk
   on arrival. A peer that serves wrong bytes costs one chunk, never trust.
4. Under mTLS the caller is the node its certificate names; the ``node_id`` a
   request carries is used only on a link with no identity.
5. A node that serves no artifacts (no handler in its :class:`ArtifactSlot`)
   answers ``UNIMPLEMENTED`` on gRPC; the caller sees ``FAILED_PRECONDITION``
   ("serves no artifacts") on every transport.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from syncfw.sync.frames import Status
from syncfw.transport.base import LinkError
from syncfw.transport.memory import MemoryNetwork

__all__ = [
    "FETCH",
    "HASH_BYTES",
    "MAX_HASHES_PER_FETCH",
    "MAX_PIECE_BYTES",
    "ArtifactHandler",
    "ArtifactNetwork",
    "ArtifactSlot",
    "ChunkPiece",
    "ChunkRequest",
    "check_hashes",
    "check_piece",
    "memory_fetch",
    "memory_listen",
    "memory_unlisten",
]

FETCH = "/syncfw.v1.Artifacts/Fetch"
HASH_BYTES = 32
"""A chunk is named by its sha256."""
MAX_HASHES_PER_FETCH = 64
"""Chunks one request may name."""
MAX_PIECE_BYTES = 64 << 10
"""Bytes one piece carries at most."""


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """One fetch, as the serving side sees it.

    Attributes:
        hashes: the chunks asked for (each :data:`HASH_BYTES`), in order.
        node_id: the caller: its certificate's id under mTLS, else what it claims.
        peer_address: where the call came from (for logs).
        authenticated: True if ``node_id`` comes from the link's mTLS identity.
    """

    hashes: tuple[bytes, ...]
    node_id: str
    peer_address: str = ""
    authenticated: bool = False


@dataclass(frozen=True, slots=True)
class ChunkPiece:
    """One piece of one chunk, or word that the chunk is not held.

    Attributes:
        digest: the chunk's sha256 (one of the request's).
        offset: where in the chunk ``data`` starts.
        data: at most :data:`MAX_PIECE_BYTES`.
        last: the chunk's final piece.
        missing: the server does not hold the chunk (``data`` is empty).
    """

    digest: bytes
    offset: int = 0
    data: bytes = b""
    last: bool = False
    missing: bool = False


ArtifactHandler = Callable[[ChunkRequest], AsyncIterator[ChunkPiece]]
"""Serves one fetch: yields the pieces of each chunk asked for, in order."""


class ArtifactSlot:
    """Where a listener finds its artifact handler; set any time, before or after serving.

    A transport's server is started by the mesh before the node's chunk store is
    attached, so the server holds this slot and looks the handler up per call.
    """

    def __init__(self) -> None:
        self.handler: ArtifactHandler | None = None

    def serve_with(self, handler: ArtifactHandler | None) -> None:
        """Serve fetches with ``handler`` from now on (None: serve none)."""
        self.handler = handler


def check_hashes(hashes: Sequence[bytes]) -> tuple[bytes, ...]:
    """The hashes of a request, checked (invariant 1).

    Raises:
        LinkError: ``INVALID_ARGUMENT``: none, more than :data:`MAX_HASHES_PER_FETCH`,
            or one that is not :data:`HASH_BYTES` bytes.
    """
    if not hashes:
        raise LinkError(Status.INVALID_ARGUMENT, "a fetch names no chunk")
    if len(hashes) > MAX_HASHES_PER_FETCH:
        raise LinkError(
            Status.INVALID_ARGUMENT,
            f"a fetch names {len(hashes)} chunks, over {MAX_HASHES_PER_FETCH}",
        )
    for h in hashes:
        if len(h) != HASH_BYTES:
            raise LinkError(
                Status.INVALID_ARGUMENT, f"a chunk hash of {len(h)} bytes, not {HASH_BYTES}"
            )
    return tuple(bytes(h) for h in hashes)


def check_piece(piece: ChunkPiece) -> ChunkPiece:
    """A piece a peer sent, bounded (invariant 2).

    Raises:
        LinkError: ``INVALID_ARGUMENT``: a piece over :data:`MAX_PIECE_BYTES`
            or a hash that is not :data:`HASH_BYTES` bytes.
    """
    if len(piece.data) > MAX_PIECE_BYTES:
        raise LinkError(
            Status.INVALID_ARGUMENT, f"a piece of {len(piece.data)} bytes, over {MAX_PIECE_BYTES}"
        )
    if len(piece.digest) != HASH_BYTES:
        raise LinkError(Status.INVALID_ARGUMENT, "a piece names a malformed chunk hash")
    return piece


@runtime_checkable
class ArtifactNetwork(Protocol):
    """A transport that carries the artifact stream kind (gRPC and in-memory both do)."""

    @property
    def artifacts(self) -> ArtifactSlot:
        """The slot this transport's listeners serve fetches from."""
        ...

    def fetch(
        self,
        address: str,
        hashes: Sequence[bytes],
        *,
        source: str,
        node_id: str,
        timeout_s: float,
    ) -> AsyncIterator[ChunkPiece]:
        """The pieces ``address`` streams for ``hashes``.

        Raises:
            LinkError: the peer is unreachable, refuses (``FAILED_PRECONDITION``
                if it serves no artifacts), or the call failed midway.
        """
        ...


# the artifact slots of in-memory listeners, per shared network
_MEMORY_SLOTS: weakref.WeakKeyDictionary[MemoryNetwork, dict[str, ArtifactSlot]] = (
    weakref.WeakKeyDictionary()
)


def memory_listen(net: MemoryNetwork, address: str, slot: ArtifactSlot) -> None:
    """Serve fetches to ``address`` on the shared in-memory network from ``slot``."""
    _MEMORY_SLOTS.setdefault(net, {})[address] = slot


def memory_unlisten(net: MemoryNetwork, address: str) -> None:
    """Stop serving fetches at ``address``."""
    _MEMORY_SLOTS.get(net, {}).pop(address, None)


async def memory_fetch(
    net: MemoryNetwork, address: str, hashes: Sequence[bytes], *, source: str, node_id: str
) -> AsyncIterator[ChunkPiece]:
    """A fetch over the in-memory network: the same checks as gRPC, pieces as copies.

    Raises:
        LinkError: ``UNAVAILABLE`` (nothing listens, or a partition),
            ``FAILED_PRECONDITION`` (no handler), ``INVALID_ARGUMENT`` (a bad request
            or piece), ``INTERNAL`` (the handler failed).
    """
    wanted = check_hashes(hashes)
    slot = _MEMORY_SLOTS.get(net, {}).get(address)
    if slot is None or not net.listening(address) or frozenset((source, address)) in net.blocked:
        raise LinkError(Status.UNAVAILABLE, f"{address} is unreachable")
    handler = slot.handler
    if handler is None:
        raise LinkError(Status.FAILED_PRECONDITION, f"{address} serves no artifacts")
    request = ChunkRequest(wanted, node_id, source)
    try:
        async for piece in handler(request):
            if frozenset((source, address)) in net.blocked:
                raise LinkError(Status.UNAVAILABLE, f"{address}: link cut during a fetch")
            yield check_piece(
                ChunkPiece(piece.digest, piece.offset, bytes(piece.data), piece.last, piece.missing)
            )
    except LinkError:
        raise
    except Exception as exc:
        raise LinkError(Status.INTERNAL, f"{address}: artifact handler failed: {exc!r}") from None
