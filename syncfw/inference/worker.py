"""The call queue, micro-batching and the per-call watchdog.

Invariants:

1. Inference never runs on the event loop. Calls are queued; one job at a
   time runs on one worker thread, started by the call itself when the worker
   is idle or by the end of the previous job. While the worker is busy, calls
   pile up and the next job takes them all at once (micro-batching, when the
   model's first dimension is dynamic), so a lone caller pays no batching
   delay and many callers share ``session.run`` calls.
2. Each job runs under a watchdog. A thread cannot be killed, so on timeout
   the job's calls fail with :class:`~syncfw.errors.InferenceTimeoutError`,
   the stuck thread is abandoned (counted until it returns) and a fresh worker
   thread takes the queue, so the engine keeps serving. Past
   ``max_stuck_workers`` abandoned threads the engine refuses calls rather
   than leak more threads. With process isolation the session lives in a
   child process instead, which the watchdog kills and replaces.
3. A job's outcome is delivered once: by its completion or by the watchdog,
   whichever comes first, on the event loop; the other is ignored.
4. Every method but the done-callback runs on the event loop, so the queue
   and the job slot need no lock.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from syncfw.inference.config import EngineConfig
from syncfw.inference.errors import (
    EngineStateError,
    InferenceError,
    InferenceRunError,
    InferenceTimeoutError,
    ModelLoadError,
)
from syncfw.inference.isolation import ProcessSession
from syncfw.inference.latency import Histogram
from syncfw.inference.pipeline import Loaded, Outcome, Pipeline

__all__ = ["Call", "Worker"]


@dataclass(slots=True)
class Call:
    """One queued call; ``loaded`` is the model its job ran on (None until it is taken)."""

    inputs: Any
    future: asyncio.Future[Outcome]
    enqueued: float
    loaded: Loaded | None = None


@dataclass(slots=True)
class _Job:
    """One batch of calls on the worker, under the watchdog."""

    batch: list[Call]
    loaded: Loaded
    future: concurrent.futures.Future[list[Outcome | InferenceError]]
    timer: asyncio.TimerHandle | None = None
    finished: bool = False


def _new_executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncfw-infer")


class Worker:
    """Runs queued calls on one worker thread, a batch per job, under the watchdog.

    Args:
        pipeline: what a job does with its calls.
        current: the model serving now (read when a job starts).
        config: ``timeout_s``, ``max_batch`` and ``max_stuck_workers``.
    """

    def __init__(
        self, pipeline: Pipeline, current: Callable[[], Loaded | None], config: EngineConfig
    ) -> None:
        self._pipeline = pipeline
        self._current = current
        self.timeout_s = config.timeout_s
        self.max_batch = config.max_batch
        self._max_stuck = config.max_stuck_workers
        self._queue: collections.deque[Call] = collections.deque()
        self._job: _Job | None = None
        self._reviving: asyncio.Task[None] | None = None
        self._executor = _new_executor()
        self._stuck: set[concurrent.futures.Future[Any]] = set()
        self._closed = False
        self.batches = 0
        self.max_batch_seen = 0
        self.restarts = 0
        self.restart_failures = 0
        self.restart_s = Histogram()

    @property
    def stuck(self) -> int:
        """Abandoned worker threads still stuck in a hung call."""
        return len(self._stuck)

    @property
    def queued(self) -> int:
        """Calls waiting for the worker."""
        return len(self._queue)

    def submit(self, inputs: Any) -> Call:
        """Queue one call (the caller awaits ``call.future``).

        Raises:
            EngineStateError: too many worker threads are stuck in hung calls.
        """
        if len(self._stuck) >= self._max_stuck:
            raise EngineStateError(
                f"{len(self._stuck)} worker threads are stuck in hung calls; refusing new calls"
            )
        call = Call(inputs, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(call)
        self._kick()
        return call

    def retire(self, old: Loaded) -> None:
        """A model was swapped out: close its worker process once no call runs on it."""
        if isinstance(old.session, ProcessSession):
            # Queued behind any call still running on it, on the one worker thread.
            self._executor.submit(old.session.close)

    async def close(self) -> None:
        """Fail the running and queued calls with :class:`EngineStateError`; stop reviving."""
        self._closed = True
        job, self._job = self._job, None
        if job is not None:
            # Nobody will deliver these calls' outcomes now.
            job.finished = True
            if job.timer is not None:
                job.timer.cancel()
            self._fail(job.batch, EngineStateError("the engine was closed"))
        if self._reviving is not None:
            self._reviving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reviving
        self._fail(list(self._queue), EngineStateError("the engine was closed"))
        self._queue.clear()

    def shutdown(self) -> None:
        """Let the worker thread go (a stuck one cannot be joined; it dies with the process)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _fail(calls: list[Call], err: InferenceError) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(err)

    # -- jobs ----------------------------------------------------------------

    def _kick(self) -> None:
        """Start a job on the worker if none is running and calls are waiting.

        Runs on the event loop only (from :meth:`submit` and from job completion),
        so there is no dispatcher task to wake: a lone call goes straight to the
        worker, and calls that arrive while it is busy are taken together next.
        """
        if self._job is not None or self._reviving is not None or self._closed or not self._queue:
            return
        loaded = self._current()
        assert loaded is not None  # calls are only queued once a model is loaded
        n = self.max_batch if loaded.info.batchable else 1
        batch = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        for call in batch:
            call.loaded = loaded
        self.batches += 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        loop = asyncio.get_running_loop()
        requests = [(c.inputs, c.enqueued) for c in batch]
        job = _Job(batch, loaded, self._executor.submit(self._pipeline.work, loaded, requests))
        self._job = job
        job.timer = loop.call_later(self.timeout_s, self._on_timeout, job)

        def done(_: concurrent.futures.Future[Any]) -> None:  # in the worker thread
            # The loop may be gone if the application exited mid-call; then nobody waits.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_done, job)

        job.future.add_done_callback(done)

    def _on_done(self, job: _Job) -> None:
        """Deliver a finished job's outcomes (event loop)."""
        if job.finished:  # the watchdog already failed it, or the engine closed
            return
        job.finished = True
        if job.timer is not None:
            job.timer.cancel()
        self._job = None
        try:
            outcomes: list[Outcome | InferenceError] = job.future.result()
        except Exception as exc:  # a bug in the pipeline itself: fail the batch, keep serving
            err = InferenceRunError(f"worker failed: {type(exc).__name__}: {exc}")
            outcomes = [err] * len(job.batch)
        for call, outcome in zip(job.batch, outcomes, strict=True):
            if call.future.done():  # the caller was cancelled
                continue
            if isinstance(outcome, BaseException):
                call.future.set_exception(outcome)
            else:
                call.future.set_result(outcome)
        self._next(job.loaded)

    def _on_timeout(self, job: _Job) -> None:
        """The watchdog: fail the job's calls and get a fresh worker (event loop)."""
        if job.finished:
            return
        job.finished = True
        self._job = None
        loaded = job.loaded
        if isinstance(loaded.session, ProcessSession):
            loaded.session.kill()  # the worker thread sees the child die and returns
            what = "its worker process was killed and replaced"
        else:
            self._abandon(job.future)
            what = "its worker thread was abandoned"
        self._fail(
            job.batch,
            InferenceTimeoutError(
                f"call to {loaded.info.name!r} ran past the {self.timeout_s:g} s watchdog "
                f"(batch of {len(job.batch)}); {what}"
            ),
        )
        self._next(loaded)

    def _next(self, loaded: Loaded) -> None:
        """After a job: replace a dead worker process first if need be, then start the next job."""
        session = loaded.session
        if (
            isinstance(session, ProcessSession)
            and not session.alive()
            and loaded is self._current()
            and not self._closed
        ):
            self._reviving = asyncio.get_running_loop().create_task(
                self._revive(session), name="syncfw-inference-revive"
            )
            return
        self._kick()

    async def _revive(self, session: ProcessSession) -> None:
        """Replace a dead worker process (killed by the watchdog, or crashed)."""
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(session.restart)
        except ModelLoadError:
            # Calls fail with WorkerDied until a load succeeds; status shows it.
            self.restart_failures += 1
        else:
            self.restarts += 1
            self.restart_s.record(time.perf_counter() - t0)
        finally:
            self._reviving = None
        self._kick()

    def _abandon(self, fut: concurrent.futures.Future[Any]) -> None:
        """Give up on a hung job: a fresh worker takes the queue; the old thread is counted until it returns."""
        self._stuck.add(fut)
        fut.add_done_callback(self._stuck_done)
        old = self._executor
        self._executor = _new_executor()
        old.shutdown(wait=False, cancel_futures=True)

    def _stuck_done(self, fut: concurrent.futures.Future[Any]) -> None:
        # Runs in the stuck thread when it finally returns; set.discard is atomic under the GIL.
        self._stuck.discard(fut)
