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
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from syncfw.errors import ChangeFeedLagged
from syncfw.log import Op

__all__ = ["Change", "ChangeFeed", "ChangeFeedLagged", "Notifier"]

log = logging.getLogger("syncfw.store")

Listener = Callable[[list[Op], bool], None]
CommitRows = Sequence[tuple[Op, int]]
"""The ``ops`` rows one commit inserted, in order, each as ``(op, status)``: the op as
stored (its ``sig`` as stored too) and the row's status (1: rejected). ``follow()``
reads the same from SQLite."""
CommitListener = Callable[[CommitRows | None], None]


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


class _Subscription:
    """One live subscriber's pending changes: whole commits appended, read one by one."""

    __slots__ = ("ended", "items", "keys", "prefixes", "waiter")

    def __init__(
        self, keys: Callable[[str], bool] | None = None, prefixes: tuple[str, ...] = ()
    ) -> None:
        self.items: collections.deque[Change] = collections.deque()
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None
        self.keys = keys  # only changes to keys this accepts (None: all)
        self.prefixes = prefixes  # and under one of these (checked first; empty: any)

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class ChangeFeed:
    """An async iterator over applied changes; ``aclose()`` unsubscribes.

    Lossy by design (see the module): for a resumable stream with values, use
    :meth:`syncfw.Node.follow`.

    The store ends the feed because it closed (``closed()`` is then true), or
    because the subscriber fell a whole buffer behind (:class:`ChangeFeedLagged`),
    once the subscriber has read what came before.
    """

    def __init__(
        self,
        sub: _Subscription,
        *,
        unsubscribe: Callable[[], None],
        closed: Callable[[], bool],
        buffer: int,
    ) -> None:
        self._sub = sub
        self._unsubscribe = unsubscribe
        self._closed = closed
        self._buffer = buffer

    def __aiter__(self) -> ChangeFeed:
        return self

    async def __anext__(self) -> Change:
        sub = self._sub
        while not sub.items:
            if sub.ended:
                self._unsubscribe()
                if self._closed():
                    raise StopAsyncIteration
                raise ChangeFeedLagged(f"change subscriber fell {self._buffer} changes behind")
            sub.waiter = asyncio.get_running_loop().create_future()
            try:
                await sub.waiter
            finally:
                sub.waiter = None
        return sub.items.popleft()

    async def aclose(self) -> None:
        """Stop receiving changes."""
        self._unsubscribe()


class Notifier:
    """Who hears of a store's commits, told synchronously after COMMIT.

    - listeners: ``fn(ops, local)`` after every commit that applied ops (the
      node's live documents, the mesh's eager push);
    - commit listeners: ``fn(rows)`` after every commit that wrote ops (applied,
      rejected or held back) with the ``ops`` rows it inserted (maybe none), and
      ``fn(None)`` after a commit whose rows are not at hand (a snapshot
      installed) and once at close (``follow()`` wakes on it);
    - live change subscribers (:meth:`changes`), each bounded by ``buffer``.

    A listener's exception is logged and never reaches the writer.
    """

    def __init__(self, buffer: int, closed: Callable[[], bool]) -> None:
        self._buffer = buffer
        self._closed = closed
        self._listeners: list[Listener] = []
        self._commit_listeners: list[CommitListener] = []
        self._subscribers: set[_Subscription] = set()

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def add_commit_listener(self, fn: CommitListener) -> None:
        self._commit_listeners.append(fn)

    def remove_commit_listener(self, fn: CommitListener) -> None:
        with contextlib.suppress(ValueError):
            self._commit_listeners.remove(fn)

    def committed(self, rows: CommitRows | None) -> None:
        """A commit wrote ops, inserting ``rows`` into ``ops``; None: rows unknown (or the store closed)."""
        for fn in list(self._commit_listeners):
            try:
                fn(rows)
            except Exception:  # a listener's bug must not break the writer
                log.exception("store commit listener failed")

    def applied(self, ops: list[Op], *, local: bool) -> None:
        """A commit applied ``ops``."""
        if not ops:
            return
        for fn in self._listeners:
            try:
                fn(ops, local)
            except Exception:  # a listener's bug must not break the writer
                log.exception("store listener failed")
        if not self._subscribers:
            return
        every: list[Change] | None = None
        for sub in list(self._subscribers):
            keys, prefixes = sub.keys, sub.prefixes
            if keys is None and not prefixes:
                if every is None:
                    every = [Change(op.key, op.kind, op.origin, op.seq, op.hlc, local) for op in ops]
                changes = every
            else:  # filtered here: no Change built, queued or iterated for other keys
                wanted = [op for op in ops if op.key.startswith(prefixes)] if prefixes else ops
                if keys is not None and wanted:
                    wanted = [op for op in wanted if keys(op.key)]
                if not wanted:
                    continue
                changes = [Change(op.key, op.kind, op.origin, op.seq, op.hlc, local) for op in wanted]
            if len(sub.items) + len(changes) > self._buffer:
                # Too far behind: end this subscription rather than grow without bound.
                self._subscribers.discard(sub)
                sub.ended = True
            else:
                sub.items.extend(changes)  # one commit's changes at once, not op by op
            sub.wake()

    def changes(
        self, keys: Callable[[str], bool] | None = None, prefixes: Sequence[str] = ()
    ) -> ChangeFeed:
        """A new live subscription (see :meth:`Store.changes`)."""
        sub = _Subscription(keys, tuple(prefixes))
        self._subscribers.add(sub)
        return ChangeFeed(
            sub,
            unsubscribe=lambda: self._subscribers.discard(sub),
            closed=self._closed,
            buffer=self._buffer,
        )

    def close(self) -> None:
        """End every live subscription (the store closed)."""
        for sub in self._subscribers:
            sub.ended = True
            sub.wake()
