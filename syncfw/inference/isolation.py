"""A session in a worker process, for calls that must be killable.

A thread stuck in native code (a runaway ``Loop``, a driver that never
returns) cannot be stopped: the thread engine abandons it and it keeps its CPU
until the process exits. With ``Engine(isolation="process")`` the session lives
in a child process instead; the watchdog kills the child, which also releases
the parent thread waiting on the pipe, and a fresh child is started with the
same model. A child that crashes (a segfault in a provider) is reported the
same way and replaced.

The price, measured by ``bench/inference.py`` (``process_*`` keys): every call
pickles its inputs and outputs through a pipe, and a restart costs a Python
start, the onnxruntime import and a session load.

The child is started with ``spawn`` (forking a process that already runs ONNX
Runtime threads is unsafe), so a script using process isolation needs the
usual ``if __name__ == "__main__":`` guard.

:class:`ProcessSession` quacks like an ``onnxruntime.InferenceSession`` for what
the engine needs (``run``, ``get_providers``), so the engine's worker code is
the same for both isolations.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from syncfw.inference.errors import InferenceRunError, ModelLoadError, WorkerDied

__all__ = ["ProcessSession", "WorkerDied"]

# spawn, not fork: forking a process that already runs ONNX Runtime threads is unsafe.
_CTX = multiprocessing.get_context("spawn")


def _child(
    conn: multiprocessing.connection.Connection,
    model: bytes,
    providers: list[tuple[str, dict[str, str]]],
    intra_op_threads: int | None,
    session_config: dict[str, str],
) -> None:  # pragma: no cover - runs in the child process
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if intra_op_threads is not None:
            opts.intra_op_num_threads = intra_op_threads
        for k, v in session_config.items():
            opts.add_session_config_entry(k, v)
        session = ort.InferenceSession(model, sess_options=opts, providers=providers)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", list(session.get_providers())))
    while True:
        try:
            feeds = conn.recv()
        except EOFError:
            return
        if feeds is None:
            return
        try:
            conn.send(("ok", session.run(None, feeds)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessSession:
    """An ONNX Runtime session in a child process.

    Args:
        model: the model bytes.
        providers: the ``providers=`` argument for the child's session.
        intra_op_threads: ONNX Runtime intra-op threads in the child.
        session_config: ONNX Runtime session config entries for the child's session.
        start_timeout_s: how long the child may take to load the model.

    Raises:
        ModelLoadError: the child could not load the model or did not answer in time.
    """

    def __init__(
        self,
        model: bytes,
        providers: list[tuple[str, dict[str, str]]],
        *,
        intra_op_threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self._args = (model, providers, intra_op_threads, dict(session_config or {}))
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # one call at a time on the pipe
        self._providers: list[str] = []
        self.restarts = 0
        # Set as soon as the child is known dead (killed, or its pipe broke): is_alive()
        # can still say True for a moment after SIGKILL, before the child is reaped.
        self._dead = False
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._start()

    def _start(self) -> None:
        parent, child = _CTX.Pipe()
        proc = _CTX.Process(
            target=_child, args=(child, *self._args), daemon=True, name="syncfw-infer-worker"
        )
        proc.start()
        child.close()
        if not parent.poll(self._start_timeout_s):
            proc.kill()
            proc.join()
            raise ModelLoadError(
                f"the worker process did not load the model in {self._start_timeout_s:g} s"
            )
        try:
            status, detail = parent.recv()
        except EOFError:
            proc.join()
            raise ModelLoadError(
                f"the worker process died while loading (exit code {proc.exitcode})"
            ) from None
        if status != "ready":
            proc.join()
            raise ModelLoadError(f"the worker process cannot load the model: {detail}")
        self._providers = list(detail)
        self._proc, self._conn = proc, parent
        self._dead = False

    @property
    def pid(self) -> int | None:
        """The child's process id (None while it is being replaced)."""
        return self._proc.pid if self._proc is not None else None

    def get_providers(self) -> list[str]:
        """The providers the child's session reports."""
        return list(self._providers)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]) -> list[Any]:
        """Run in the child; blocks the calling thread until the child answers or dies.

        Raises:
            WorkerDied: the child exited or was killed (by :meth:`kill`) meanwhile.
            InferenceRunError: the child's ``session.run`` raised.
        """
        del output_names  # the child always returns every output, in declared order
        with self._lock:
            conn = self._conn
            if conn is None:
                raise WorkerDied("the worker process is being replaced")
            try:
                conn.send(dict(feeds))
                status, payload = conn.recv()
            except (EOFError, OSError):
                self._dead = True
                raise WorkerDied("the worker process died during the call") from None
        if status != "ok":
            raise InferenceRunError(f"session.run in the worker process failed: {payload}")
        out: list[Any] = payload
        return out

    def kill(self) -> None:
        """Kill the child now; a thread blocked in :meth:`run` gets :class:`WorkerDied`.

        Only the process is killed here: its pipe is closed by :meth:`restart`
        or :meth:`close` once no thread is reading it.
        """
        self._dead = True
        proc = self._proc
        if proc is not None:
            proc.kill()

    def restart(self) -> None:
        """Replace the child with a fresh one loading the same model (blocking).

        Raises:
            ModelLoadError: the new child could not load the model.
        """
        self.kill()
        with self._lock:  # waits for a thread still in run() to see the child gone
            self._reap()
            self._start()
            self.restarts += 1

    def _reap(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join()

    def alive(self) -> bool:
        """Whether the child is running."""
        return not self._dead and self._proc is not None and bool(self._proc.is_alive())

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not."""
        with self._lock:
            proc, conn = self._proc, self._conn
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(None)
            if proc is not None:
                proc.join(timeout=2.0)
                if proc.is_alive():
                    proc.kill()
            self._reap()
