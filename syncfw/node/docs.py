"""Live Yjs documents bound to the log: every edit becomes an op, every op reaches the doc.

Invariants:

1. One live :class:`LiveDoc` per key and node session, created with a fresh
   Yjs client id (as Yjs requires of every session).
2. The log is the truth and the live doc follows it: every committed ``ydoc``
   op (remote, local through :meth:`LiveDocs.apply_update`, or written to the
   store directly) is applied to the open doc with the observer muted
   (:attr:`LiveDocs.applying_remote`). Yjs applies an update it already holds
   as a no-op, so the doc's own edits coming back cost nothing.
3. An update given to the doc (``doc.apply_update``, which is also what
   pycrdt's sync protocol calls) is stored as the op *exactly as it came*,
   after :func:`~syncfw.crdt.ydoc.check_update` and the size check, never as
   yrs's re-encoding of the transaction: that leaves out structs still
   waiting for their dependencies (an update built on another client's edit
   not yet here), and they would never be logged. Edits made on the doc's
   types (``text.insert``) are logged as their transaction's update, which
   then holds everything: a local edit depends only on what the doc holds.
4. A doc stays on the event loop's thread: any transaction from another
   thread (an edit, a read, ``apply_update``) raises :class:`RuntimeError`
   before the doc changes. From a worker thread, marshal with
   ``asyncio.run_coroutine_threadsafe(node.apply_update(key, update), loop)``.
5. Every local edit becomes exactly one ``ydoc`` op; :meth:`LiveDocs.flush`
   returns once all edits made so far are durable and raises the first
   error met storing one.
6. The stored updates of a key are folded into its checkpoint on the
   store's writer once due (:func:`syncfw.store.ydocs.checkpoint`), checked
   every :data:`CHECK_EVERY_BYTES` of updates a key receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import pycrdt

from syncfw.crdt import YDOC
from syncfw.crdt.ydoc import check_update
from syncfw.errors import OpError, StoreClosedError, SyncfwError, ZoneOwnershipError
from syncfw.log import Op
from syncfw.store import Store, ydocs

__all__ = ["DocUpdates", "LiveDoc", "LiveDocs"]

log = logging.getLogger("syncfw.node")

CHECK_EVERY_BYTES = 64 * 1024
"""Update bytes a key receives between two checks whether its checkpoint is due."""

UPDATES_BUFFER = 1024
"""Updates a :class:`DocUpdates` holds before it falls back to one full state."""


class LiveDoc(pycrdt.Doc[Any]):
    """A :class:`pycrdt.Doc` kept in step with the log (see the module's invariants).

    Use it as any ``pycrdt.Doc``; :meth:`apply_update` stores the update as
    an op as well (invariant 3), and every transaction must run on the event
    loop's thread (invariant 4).
    """

    def __init__(self, docs: LiveDocs, key: str) -> None:
        self._live_docs = docs
        self._live_key = key
        self._live_thread = threading.get_ident()
        super().__init__()

    def _check_thread(self) -> None:
        if threading.get_ident() != self._live_thread:
            raise RuntimeError(
                f"the live document {self._live_key!r} belongs to the event loop's thread; "
                "from another thread use asyncio.run_coroutine_threadsafe("
                "node.apply_update(key, update), loop). Nothing was changed"
            )

    def transaction(self, origin: Any = None) -> Any:
        self._check_thread()
        return super().transaction(origin)

    def new_transaction(self, origin: Any = None, timeout: float | None = None) -> Any:
        self._check_thread()
        return super().new_transaction(origin, timeout)

    def apply_update(self, update: bytes) -> None:
        """Apply ``update`` and store it as an op, exactly as given.

        The op is written in the background: :meth:`syncfw.Node.flush` waits
        for it. To wait for that one op, use :meth:`syncfw.Node.apply_update`.

        Raises:
            RuntimeError: called from a thread other than the event loop's.
            DecodeError: not one well-formed Yjs v1 update (v2 is refused).
            ValueTooLargeError: over ``StoreConfig.max_value_bytes``.
            ZoneOwnershipError: the doc was opened read-only.
            StoreClosedError: the node is closed.
        In every case nothing was changed or written.
        """
        self._check_thread()
        self._live_docs.local_update(self._live_key, self, update)

    def _apply_muted(self, update: bytes) -> None:
        pycrdt.Doc.apply_update(self, update)


class DocUpdates:
    """The updates committed to one document from now on, local and remote, in commit order.

    ``async for update in node.doc_updates(key)``: each item is one Yjs v1
    update to send on to a browser. A consumer that falls
    :data:`UPDATES_BUFFER` updates behind is not dropped: its backlog is
    replaced by one update holding the whole document, read from the log
    when it next asks (Yjs applies what it already holds as a no-op). It
    ends when the node closes or on :meth:`aclose`.
    """

    def __init__(self, docs: LiveDocs, key: str) -> None:
        self._docs = docs
        self.key = key
        self._queue: list[bytes] = []
        self._resync = False
        self._wake = asyncio.Event()
        self._closed = False
        self.resyncs = 0
        """How often the backlog overflowed and was replaced by the full state."""

    def push(self, update: bytes) -> None:
        if self._closed:
            return
        if len(self._queue) >= UPDATES_BUFFER:
            self._queue.clear()
            self._resync = True
        if not self._resync:
            self._queue.append(update)
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._resync:
                self._resync = False
                self.resyncs += 1
                log.warning(
                    "a follower of document %r fell %d updates behind: sent the whole "
                    "document instead", self.key, UPDATES_BUFFER,
                )
                return await self._docs.state(self.key)
            if self._queue:
                return self._queue.pop(0)
            if self._closed or self._docs.closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    async def aclose(self) -> None:
        """Stop following (idempotent)."""
        self._closed = True
        self._docs.unsubscribe(self)
        self._wake.set()

    async def __aenter__(self) -> DocUpdates:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LiveDocs:
    """The live documents of one node, over its store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._docs: dict[str, LiveDoc] = {}
        self._opening: dict[str, asyncio.Future[LiveDoc]] = {}
        self._early: dict[str, list[bytes]] = {}  # ops committed while a doc opens
        self._zones: dict[str, tuple[str, int]] = {}  # docs whose local edits become ops
        self._writes: set[asyncio.Task[Op]] = set()
        self._errors: list[BaseException] = []
        self._followers: dict[str, set[DocUpdates]] = {}
        self._since_check: dict[str, int] = {}
        self._checks: dict[str, asyncio.Task[bool]] = {}
        self.applying_remote = False
        self.closed = False

    # ------------------------------------------------------------------ opening

    async def open(self, key: str, zone_epoch: tuple[str, int] | None) -> LiveDoc:
        """The live doc at ``key``; with ``zone_epoch`` None, local edits are not recorded.

        A doc opened read-only first and then writable is upgraded in place:
        from then on its local edits are recorded (there is one live doc per
        key, so the read-only handle sees the same document).

        Raises:
            OpError: ``key`` holds another kind than ydoc.
        """
        live = self._docs.get(key)
        if live is None:
            opening = self._opening.get(key)
            if opening is not None:
                live = await asyncio.shield(opening)
            else:
                fut: asyncio.Future[LiveDoc] = asyncio.get_running_loop().create_future()
                self._opening[key] = fut
                try:
                    live = await self._load(key)
                except BaseException as exc:
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: only waiters re-raise it
                    raise
                else:
                    fut.set_result(live)
                finally:
                    del self._opening[key]
        if zone_epoch is not None and key not in self._zones:
            self._record(key, live, zone_epoch)
        return live

    async def _load(self, key: str) -> LiveDoc:
        await self.check_kind(key)
        self._early[key] = []
        try:
            state = await ydocs.read(self._store._fetch, key)
            live = LiveDoc(self, key)
            self._apply(live, state)
            for update in self._early[key]:  # committed after the read began: in order
                self._apply(live, update)
        finally:
            del self._early[key]
        self._docs[key] = live
        return live

    async def check_kind(self, key: str) -> None:
        """Refuse a key that holds another kind (a key holds one kind).

        Raises:
            OpError: naming the kind ``key`` holds.
        """
        kind = await ydocs.other_kind(self._store._fetch, key)
        if kind is not None:
            raise OpError(f"key {key!r} holds a {kind} value, not a Yjs document; nothing was written")

    def _record(self, key: str, doc: LiveDoc, zone_epoch: tuple[str, int]) -> None:
        """Make every local edit of ``doc`` an op (invariant 5)."""

        def on_update(event: pycrdt.TransactionEvent) -> None:
            if self.applying_remote:
                return  # what the log already holds is never re-emitted
            self._write(key, bytes(event.update))

        doc.observe(on_update)
        self._zones[key] = zone_epoch

    # ------------------------------------------------------------------ writing

    def _apply(self, doc: LiveDoc, update: bytes) -> None:
        self.applying_remote = True
        try:
            doc._apply_muted(update)
        finally:
            self.applying_remote = False

    def local_update(self, key: str, doc: LiveDoc, update: bytes) -> None:
        """``doc.apply_update``: check, apply muted, store the bytes as given (invariant 3)."""
        zone_epoch = self._zones.get(key)
        if zone_epoch is None:
            raise ZoneOwnershipError(
                f"the document {key!r} was opened read-only: its edits are not recorded; "
                "nothing was changed"
            )
        if self.closed or self._store.closed:
            raise StoreClosedError("the node is closed; nothing was changed")
        check_update(update)
        update = bytes(update)
        self._store.check_size(key, update)
        self._apply(doc, update)
        self._write(key, update)

    def _write(self, key: str, update: bytes) -> None:
        zone, epoch = self._zones[key]
        task = asyncio.get_running_loop().create_task(
            self._store.write(YDOC.name, key, zone, epoch, update)
        )
        self._writes.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task[Op]) -> None:
        self._writes.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._errors.append(exc)
            log.error("a document edit could not be stored: %s", exc)

    async def apply_update(self, key: str, zone_epoch: tuple[str, int], update: bytes) -> Op:
        """Store ``update`` as one op, exactly as given; the open doc follows at commit.

        Raises:
            DecodeError, ValueTooLargeError, OpError: see :meth:`syncfw.Node.apply_update`.
        """
        if isinstance(update, bytearray | memoryview):
            update = bytes(update)
        check_update(update)
        self._store.check_size(key, update)
        await self.check_kind(key)
        return await self._store.write(YDOC.name, key, *zone_epoch, update)

    async def flush(self) -> None:
        """Wait until every local edit made so far is durable; raise the first error."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        if self._errors:
            first, self._errors = self._errors[0], []
            raise first

    async def settle(self) -> None:
        """Wait for edits and checkpoints in flight, ignoring their errors (closing)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        if self._checks:
            await asyncio.gather(*list(self._checks.values()), return_exceptions=True)
        self.closed = True
        for followers in self._followers.values():
            for f in followers:
                f._wake.set()

    # ------------------------------------------------------------------ reading

    async def state(self, key: str, state_vector: bytes | None = None) -> bytes:
        """The document at ``key`` from the log, as one v1 update (a diff for ``state_vector``).

        Raises:
            DecodeError: ``state_vector`` is not a Yjs state vector.
        """
        return ydocs.diff(await ydocs.read(self._store._fetch, key), state_vector)

    def follow(self, key: str) -> DocUpdates:
        """The updates committed to ``key`` from this call on (see :class:`DocUpdates`)."""
        feed = DocUpdates(self, key)
        self._followers.setdefault(key, set()).add(feed)
        return feed

    def unsubscribe(self, feed: DocUpdates) -> None:
        followers = self._followers.get(feed.key)
        if followers is not None:
            followers.discard(feed)
            if not followers:
                del self._followers[feed.key]

    def on_applied(self, ops: list[Op], local: bool) -> None:
        """Store listener: every committed ``ydoc`` op reaches its live doc (invariant 2)."""
        for op in ops:
            if op.kind != YDOC.name:
                continue
            key = op.key
            doc = self._docs.get(key)
            if doc is not None:
                try:
                    self._apply(doc, op.value)
                except Exception:  # checked at staging: yrs refusing it is a bug, said loudly
                    log.exception("update %s to document %r could not be applied", op.id, key)
            elif key in self._early:
                self._early[key].append(op.value)
            for f in self._followers.get(key, ()):
                f.push(op.value)
            self._tally(key, len(op.value))

    def on_snapshot(self, updates: list[tuple[str, bytes]]) -> None:
        """After a snapshot was installed: each document's merged state reaches its live
        doc and its followers, as committed ops do (merging is idempotent)."""
        for key, update in updates:
            doc = self._docs.get(key)
            if doc is not None:
                try:
                    self._apply(doc, update)
                except Exception:
                    log.exception("a snapshot's state of document %r could not be applied", key)
            elif key in self._early:
                self._early[key].append(update)
            for f in self._followers.get(key, ()):
                f.push(update)

    # ------------------------------------------------------------------ checkpoints

    def _tally(self, key: str, n: int) -> None:
        seen = self._since_check.get(key, CHECK_EVERY_BYTES) + n  # first op: check once
        if seen < CHECK_EVERY_BYTES or key in self._checks or self.closed:
            self._since_check[key] = seen
            return
        self._since_check[key] = 0
        task = asyncio.get_running_loop().create_task(self._checkpoint(key))
        self._checks[key] = task

    async def _checkpoint(self, key: str) -> bool:
        try:
            return await ydocs.checkpoint(self._store, key)
        except StoreClosedError:
            return False
        except SyncfwError as exc:
            log.error("the checkpoint of document %r failed (its updates are kept): %s", key, exc)
            return False
        finally:
            with contextlib.suppress(KeyError):
                del self._checks[key]
