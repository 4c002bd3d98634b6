"""Live Yjs documents bound to the log: local edits become ops, remote ops reach the doc.

Invariants:

1. One live :class:`pycrdt.Doc` per key and node session, created with a fresh
   Yjs client id (as Yjs requires of every session).
2. A remote update is applied to the live doc without being written back: the
   doc's observer ignores updates made while :attr:`LiveDocs.applying_remote`.
3. Every local edit becomes exactly one ``ydoc`` op; :meth:`LiveDocs.flush`
   returns once all edits made so far are durable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pycrdt

from syncfw.crdt import YDOC
from syncfw.log import Op
from syncfw.store import Store

__all__ = ["LiveDocs"]

log = logging.getLogger("syncfw.node")


class LiveDocs:
    """The live documents of one node, over its store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._docs: dict[str, pycrdt.Doc[Any]] = {}
        self._recorded: set[str] = set()  # docs whose local edits become ops
        self._writes: set[asyncio.Task[Op]] = set()
        self.applying_remote = False

    async def open(self, key: str, zone_epoch: tuple[str, int] | None) -> pycrdt.Doc[Any]:
        """The live doc at ``key``; with ``zone_epoch`` None, local edits are not recorded.

        A doc opened read-only first and then writable is upgraded in place:
        from then on its local edits are recorded (there is one live doc per
        key, so the read-only handle sees the same document).
        """
        live = self._docs.get(key)
        if live is None:
            state = await self._store.read_state(YDOC.name, key)
            live = self._docs.get(key)  # another caller may have opened it meanwhile
        if live is None:
            live = pycrdt.Doc()
            self.applying_remote = True
            try:
                live.apply_update(state)
            finally:
                self.applying_remote = False
            self._docs[key] = live
        if zone_epoch is not None and key not in self._recorded:
            self._record(key, live, *zone_epoch)
        return live

    def _record(self, key: str, doc: pycrdt.Doc[Any], zone: str, epoch: int) -> None:
        """Make every local edit of ``doc`` an op (invariant 3)."""

        def on_update(event: pycrdt.TransactionEvent) -> None:
            if self.applying_remote:
                return  # remote applies are never re-emitted
            task = asyncio.get_running_loop().create_task(
                self._store.write(YDOC.name, key, zone, epoch, bytes(event.update))
            )
            self._writes.add(task)
            task.add_done_callback(self._write_done)

        doc.observe(on_update)
        self._recorded.add(key)

    def _write_done(self, task: asyncio.Task[Op]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a document edit could not be stored: %s", task.exception())

    async def flush(self) -> None:
        """Wait until every local edit made so far is durable; raise the first error."""
        while self._writes:
            await asyncio.gather(*list(self._writes))

    async def settle(self) -> None:
        """Wait for edits in flight, ignoring their errors (closing)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def on_applied(self, ops: list[Op], local: bool) -> None:
        """Store listener: apply remote ``ydoc`` ops to the live docs they touch."""
        if local or not self._docs:
            return
        for op in ops:
            doc = self._docs.get(op.key) if op.kind == YDOC.name else None
            if doc is None:
                continue
            self.applying_remote = True
            try:
                doc.apply_update(op.value)
            except Exception:
                log.exception("remote update to document %r could not be applied", op.key)
            finally:
                self.applying_remote = False
