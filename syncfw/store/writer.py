"""The store's single writer: one task, a queue with named priorities, group commit.

Invariants:

1. Every mutation of the store runs on this one task, one job at a time
   (a job is a group of local writes or a call), so the store's in-memory
   mirrors are always those of the last committed transaction.
2. Jobs are taken by priority (:class:`Priority`: local writes, then remote
   batches and acknowledgements, then maintenance), first in first out within
   one priority. So a put is not stuck behind a 50k-op remote batch that was
   queued before it. A lower-priority job is passed over at most
   ``max_skips`` times in a row, so a stream of local writes cannot starve
   sync or compaction.
3. Group commit: local writes waiting in the queue when the writer gets to
   them (after one loop turn, no timer) are planned and committed in one
   transaction, at most ``max_batch`` of them; each caller's ``await``
   returns only after that COMMIT.
4. Pipelining: a group is planned while the one before it commits on the
   database thread; a call waits for the group in flight to land first.
4a. Remote groups: remote batches (:class:`RemoteJob`) queued one behind the
   other at the head of the remote queue are handed to the store together,
   while their ops add up to at most ``max_remote_ops`` (a batch larger than
   that goes alone). Many peers' exchanges landing at once then cost one plan
   and one transaction, not one each; the store answers each caller with its
   own batch's result (:data:`StartGroupFn`).
4b. Remote groups are pipelined too: the next remote group is planned while the
   one before it commits (the store plans it against the mirrors as that one
   will leave them, and answers nobody before its COMMIT). A local group or a
   call waits for the remote group in flight to land first, and a remote group
   for the local group in flight. A group that failed to commit voids the one
   planned on top of it, which is queued again at the front (:meth:`requeue_remote`).
5. On close, every queued job runs; jobs queued again behind the close (a
   re-planned group) fail with :class:`StoreClosedError`, never silently.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from syncfw.errors import StoreClosedError
from syncfw.log import Op
from syncfw.store.planner import PayloadFn

__all__ = ["CallJob", "Priority", "RemoteJob", "WriteJob", "WriterQueue"]

T = TypeVar("T")


class Priority(enum.IntEnum):
    """Which queue a writer job waits in; lower values run first."""

    LOCAL = 0
    REMOTE = 1
    MAINTENANCE = 2


@dataclass(slots=True)
class WriteJob:
    """One local write (``payload`` as in :meth:`Store.write`) and its caller's future."""

    kind: str
    key: str
    zone: str
    epoch: int
    payload: bytes | PayloadFn
    future: asyncio.Future[Op]


@dataclass(slots=True)
class CallJob:
    """A function run on the writer between group commits, and its caller's future."""

    fn: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class RemoteJob:
    """One remote batch to apply, and its caller's future (see invariant 4a)."""

    ops: list[Op]
    future: asyncio.Future[Any]


Job = WriteJob | CallJob | RemoteJob
StartGroupFn = Callable[
    [list[RemoteJob]], Awaitable[tuple["asyncio.Future[None] | None", bool]]
]
"""Plans a group of remote batches and starts its transaction. Returns what lands
it (settling each job's future with that batch's own result or error; None when
it is already settled) and whether the next group must wait for it to land."""
CommitFn = Callable[[list[WriteJob]], Awaitable[tuple["asyncio.Future[bool] | None", bool]]]
"""Plans a group of writes and starts its transaction. Returns what finishes
it (None when nothing was started) and whether later groups must wait for it
(it changed the zone table they are planned against)."""


class WriterQueue:
    """The writer task and its queues.

    Args:
        commit: plans and starts one group of local writes (see :data:`CommitFn`).
        max_batch: most local writes in one group.
        max_skips: how many times in a row a lower-priority job may be passed over.
        start_group: plans and starts a group of remote batches (see
            :data:`StartGroupFn`); needed only if :class:`RemoteJob` s are queued.
        max_remote_ops: most ops of one remote group (invariant 4a).
        on_busy: told ``(work, seconds)`` after each job: the wall time the writer
            spent on it (``"call"``; ``"local"`` and ``"remote"``: a group's plan and
            the start of its commit, which then runs beside the next group's plan).
            A writer busy nearly all the time is what bounds the node's ingest.
    """

    def __init__(
        self,
        commit: CommitFn,
        *,
        max_batch: int,
        max_skips: int = 16,
        start_group: StartGroupFn | None = None,
        max_remote_ops: int = 512,
        on_busy: Callable[[str, float], None] | None = None,
    ) -> None:
        self._commit = commit
        self._on_busy = on_busy
        self._start_group = start_group
        self._max_remote_ops = max_remote_ops
        self._max_batch = max_batch
        self._max_skips = max_skips
        self._queues: tuple[collections.deque[Job], ...] = tuple(
            collections.deque() for _ in Priority
        )
        self._skips = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self, name: str) -> None:
        """Start the writer task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def close(self) -> None:
        """Run every queued job, then stop the task. Idempotent."""
        self._closing = True
        self._wake()
        if self._task is not None:
            await self._task

    # ------------------------------------------------------------------ submitting

    def put(self, job: Job, priority: Priority = Priority.LOCAL) -> None:
        """Queue ``job`` behind the others of its priority."""
        self._queues[priority].append(job)
        wakeup = self._wakeup  # _wake() inlined: this runs once per put
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def put_writes(self, jobs: Sequence[WriteJob]) -> None:
        """Queue several local writes in order, waking the writer once."""
        self._queues[Priority.LOCAL].extend(jobs)
        self._wake()

    def requeue(self, jobs: Sequence[WriteJob]) -> None:
        """Put writes back at the front of the local queue (a group to plan again)."""
        self._queues[Priority.LOCAL].extendleft(reversed(jobs))
        self._wake()

    def requeue_remote(self, jobs: Sequence[RemoteJob]) -> None:
        """Put remote batches back at the front of the remote queue (a group to plan again)."""
        self._queues[Priority.REMOTE].extendleft(reversed(jobs))
        self._wake()

    async def call(self, fn: Callable[[], Awaitable[T]], priority: Priority) -> T:
        """Run ``fn`` on the writer task and return its result."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.put(CallJob(fn, fut), priority)
        return await fut

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    # ------------------------------------------------------------------ the task

    def _pop(self) -> Job | None:
        """The next job by priority (invariant 2), or None if every queue is empty."""
        ready = [q for q in self._queues if q]
        if not ready:
            return None
        q = ready[0]
        if len(ready) > 1:
            self._skips += 1
            if self._skips > self._max_skips:  # let the next priority in once
                q = ready[1]
                self._skips = 0
        else:
            self._skips = 0
        return q.popleft()

    async def _wait(self, inflight: asyncio.Future[bool] | None) -> None:
        """Wait for a new job, or for the group in flight to land."""
        wakeup = self._wakeup = asyncio.get_running_loop().create_future()
        try:
            if inflight is None:
                await wakeup
            else:
                await asyncio.wait((inflight, wakeup), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wakeup = None

    async def _run(self) -> None:
        # The group in flight (local or remote: invariants 4 and 4b) and which kind.
        inflight: asyncio.Future[Any] | None = None
        remote_inflight = False
        local = self._queues[Priority.LOCAL]
        try:
            while True:
                job = self._pop()
                if job is None:
                    if self._closing:
                        if inflight is None:
                            return
                        await inflight  # it may queue its writes again
                        inflight = None
                        continue
                    await self._wait(inflight)
                    if inflight is not None and inflight.done():
                        inflight = None
                    continue
                if isinstance(job, CallJob):  # after the group in flight
                    if inflight is not None:
                        await inflight
                        inflight = None
                    t = time.perf_counter()
                    await self._run_call(job)
                    if self._on_busy is not None:
                        self._on_busy("call", time.perf_counter() - t)
                    continue
                if inflight is not None and remote_inflight != isinstance(job, RemoteJob):
                    await inflight  # a group of the other kind: let it land first
                    inflight = None
                if isinstance(job, RemoteJob):
                    t = time.perf_counter()
                    nxt_remote = await self._run_remote(self._remote_group(job))
                    if self._on_busy is not None:
                        self._on_busy("remote", time.perf_counter() - t)
                    if inflight is not None:
                        await inflight
                    inflight, remote_inflight = nxt_remote, True
                    continue
                batch = [job]
                # Group commit: let every writer that is ready to run enqueue its
                # write before the group is planned (one loop turn, no timer).
                await asyncio.sleep(0)
                while local and len(batch) < self._max_batch and isinstance(local[0], WriteJob):
                    batch.append(local.popleft())  # type: ignore[arg-type]
                t = time.perf_counter()
                nxt, drain = await self._commit(batch)
                if self._on_busy is not None:
                    self._on_busy("local", time.perf_counter() - t)
                if inflight is not None:
                    await inflight
                inflight, remote_inflight = nxt, False
                if inflight is not None and drain:
                    # A grant changes the zone table later groups are planned
                    # against: let it land first.
                    await inflight
                    inflight = None
        finally:
            if inflight is not None:
                await inflight
            for q in self._queues:
                while q:  # queued again behind the close: refuse clearly
                    left = q.popleft()
                    if not left.future.done():
                        left.future.set_exception(StoreClosedError("the store was closed"))

    def _remote_group(self, first: RemoteJob) -> list[RemoteJob]:
        """``first`` and the remote batches queued right behind it, within the op cap."""
        group = [first]
        total = len(first.ops)
        remote = self._queues[Priority.REMOTE]
        cap = self._max_remote_ops
        while remote and total < cap:
            nxt = remote[0]
            if not isinstance(nxt, RemoteJob) or total + len(nxt.ops) > cap:
                break
            group.append(remote.popleft())  # type: ignore[arg-type]
            total += len(nxt.ops)
        return group

    async def _run_remote(self, group: list[RemoteJob]) -> asyncio.Future[None] | None:
        """Start ``group``; what lands it, unless it must land before the next is planned."""
        assert self._start_group is not None, "RemoteJob queued without start_group"
        try:
            landing, drain = await self._start_group(group)
        except BaseException as exc:  # delivered to the callers, never kills the writer
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return None
        if landing is not None and drain:
            await landing
            return None
        return landing

    @staticmethod
    async def _run_call(job: CallJob) -> None:
        try:
            result = await job.fn()
        except BaseException as exc:  # delivered to the caller, never kills the writer
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)
