"""An in-memory transport carrying the very same frame bytes as gRPC.

Invariants:

1. Messages cross as the bytes they were sent as, unparsed: the exchange
   runner encodes and decodes frames on both sides, so the handshake and the
   bytes are those of the real mesh.
2. Each direction is a bounded queue: a sender waits while ``window`` messages
   are unread (backpressure, like HTTP/2 flow control).
3. Closing with a non-OK status makes the other side's next :meth:`recv`
   raise :class:`LinkError` with that status, as a gRPC status would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from syncfw.sync.frames import Status
from syncfw.transport.base import FrameStream, LinkError

__all__ = ["MemoryNetwork", "MemoryStream", "memory_pipe"]


@dataclass(frozen=True, slots=True)
class _End:
    status: Status
    reason: str


class MemoryStream:
    """One end of an in-memory pipe (implements :class:`FrameStream`)."""

    def __init__(
        self,
        inbox: asyncio.Queue[bytes | _End],
        outbox: asyncio.Queue[bytes | _End],
        peer_address: str,
    ) -> None:
        self._in = inbox
        self._out = outbox
        self._peer = peer_address
        self._closed = False
        self._remote_end: _End | None = None
        self.peer_identity: str | None = None
        self.bytes_sent = 0
        self.frames_sent = 0

    @property
    def peer_address(self) -> str:
        """The other end's name."""
        return self._peer

    async def send(self, data: bytes) -> None:
        """Send one message; waits while the peer's inbox is full.

        Raises:
            LinkError: ``ABORTED``: this side or the peer closed the stream.
        """
        if self._closed:
            raise LinkError(Status.ABORTED, "stream closed")
        if self._remote_end is not None:
            raise LinkError(Status.ABORTED, "peer closed the stream")
        await self._out.put(bytes(data))
        self.bytes_sent += len(data)
        self.frames_sent += 1

    async def recv(self) -> bytes | None:
        """The next message; None when the peer finished with OK.

        Raises:
            LinkError: the peer closed with an error status.
        """
        if self._remote_end is not None:
            return self._ended(self._remote_end)
        item = await self._in.get()
        if isinstance(item, _End):
            self._remote_end = item
            return self._ended(item)
        return item

    @staticmethod
    def _ended(end: _End) -> None:
        if end.status is Status.OK:
            return None
        raise LinkError(end.status, end.reason)

    async def close(self, status: Status, reason: str) -> None:
        """Tell the other end this side is done (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._out.put_nowait(_End(status, reason))  # the one item that never waits


def memory_pipe(
    a_name: str = "a", b_name: str = "b", *, window: int = 16
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected stream ends; ``window`` messages may be unread in each direction.

    The queue holds one slot more than ``window`` so that a close always fits.
    """
    ab: asyncio.Queue[bytes | _End] = asyncio.Queue(window + 1)
    ba: asyncio.Queue[bytes | _End] = asyncio.Queue(window + 1)
    return MemoryStream(ba, ab, b_name), MemoryStream(ab, ba, a_name)


Handler = Callable[[FrameStream], Coroutine[Any, Any, object]]


class MemoryNetwork:
    """Named in-memory listeners; :meth:`connect` opens a pipe to one.

    The fake network is public so that applications test their mesh too.
    """

    def __init__(self, *, window: int = 16) -> None:
        self._listeners: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._window = window
        self._ids = itertools.count(1)
        self.blocked: set[frozenset[str]] = set()

    def listen(self, address: str, handler: Handler) -> None:
        """Serve ``address``: each incoming stream is handed to ``handler`` in a task."""
        if address in self._listeners:
            raise ValueError(f"{address} is already listening")
        self._listeners[address] = handler

    def unlisten(self, address: str) -> None:
        """Stop serving ``address``."""
        self._listeners.pop(address, None)

    def listening(self, address: str) -> bool:
        """True if something serves ``address``."""
        return address in self._listeners

    def partition(self, a: str, b: str) -> None:
        """Make connections between ``a`` and ``b`` fail."""
        self.blocked.add(frozenset((a, b)))

    def heal(self) -> None:
        """Remove every partition."""
        self.blocked.clear()

    async def connect(self, address: str, *, source: str = "client") -> MemoryStream:
        """Open a stream to ``address``.

        Raises:
            LinkError: ``UNAVAILABLE``: nothing listens there, or a partition.
        """
        handler = self._listeners.get(address)
        if handler is None or frozenset((source, address)) in self.blocked:
            raise LinkError(Status.UNAVAILABLE, f"{address} is unreachable")
        client, server = memory_pipe(source, address, window=self._window)
        task = asyncio.create_task(handler(server), name=f"memory-serve-{next(self._ids)}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client

    async def aclose(self) -> None:
        """Cancel every serving task."""
        self._listeners.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
