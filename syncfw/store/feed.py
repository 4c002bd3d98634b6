"""The live change feed: every op applied, local or remote, to whoever subscribed.

This is the *lossy live view*: a :class:`Change` names the op but carries no
value (reading the key back gives its current value, not the one written), it
starts at the moment of subscribing, and a subscriber that falls
``changes_buffer`` changes behind is ended with :class:`ChangeFeedLagged`.
It suits wake-ups (the mesh pushes fresh writes with it). To consume the log as
a stream (values as written, a resumable position, backlog paged from SQLite,
never dropped) use :meth:`syncfw.Node.follow` (:mod:`syncfw.store.follow`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from syncfw.errors import ChangeFeedLagged

__all__ = ["Change", "ChangeFeed", "ChangeFeedLagged"]


@dataclass(frozen=True, slots=True)
class Change:
    """An op as it was applied to state, for :meth:`Store.changes`.

    Attributes:
        key: the key changed.
        kind: its CRDT type.
        origin, seq, hlc: the op that changed it.
        local: True for this node's own writes.
    """

    key: str
    kind: str
    origin: str
    seq: int
    hlc: int
    local: bool


class ChangeFeed:
    """An async iterator over applied changes; ``aclose()`` unsubscribes.

    Lossy by design (see the module): for a resumable stream with values, use
    :meth:`syncfw.Node.follow`.

    The store puts ``None`` in the queue to end the feed: because it closed
    (``closed()`` is then true), or because the subscriber fell a whole buffer
    behind (:class:`ChangeFeedLagged`).
    """

    def __init__(
        self,
        queue: asyncio.Queue[Change | None],
        *,
        unsubscribe: Callable[[], None],
        closed: Callable[[], bool],
        buffer: int,
    ) -> None:
        self._queue = queue
        self._unsubscribe = unsubscribe
        self._closed = closed
        self._buffer = buffer

    def __aiter__(self) -> ChangeFeed:
        return self

    async def __anext__(self) -> Change:
        ch = await self._queue.get()
        if ch is None:
            self._unsubscribe()
            if self._closed():
                raise StopAsyncIteration
            raise ChangeFeedLagged(f"change subscriber fell {self._buffer} changes behind")
        return ch

    async def aclose(self) -> None:
        """Stop receiving changes."""
        self._unsubscribe()
