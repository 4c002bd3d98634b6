"""One process per database file: an exclusive ``flock`` on ``<db>.lock``.

Invariants:

1. A store holds the lock from before it reads the file until after it
   closed it; a second open, from this process or another, fails at once
   with :class:`DatabaseLockedError` naming the holder (pid and node id, as
   the holder wrote them into the lock file).
2. The lock is the kernel's (``flock`` on an open file description): the OS
   releases it when the holder exits, even by SIGKILL, so a crash never
   leaves a file locked. The lock file itself is never deleted (deleting it
   would let a third opener lock a fresh inode while the second holds the
   old one).
3. In-memory databases (``:memory:``) take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from syncfw.errors import DatabaseLockedError, StorageError

__all__ = ["FileLock", "lock_path"]


def lock_path(db_path: str) -> str:
    """The lock file of a database file."""
    return db_path + ".lock"


class FileLock:
    """An acquired lock on one database file; :meth:`release` it once."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, db_path: str, node_id: str) -> FileLock:
        """Lock ``db_path`` for this process.

        Raises:
            DatabaseLockedError: another open store holds the file.
            StorageError: the lock file cannot be created.
        """
        if db_path == ":memory:" or db_path.startswith("file::memory:"):
            return cls(None)
        path = lock_path(db_path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create the lock file {path!r}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DatabaseLockedError(
                f"{db_path!r} is open in another store ({holder}); one process per database file",
                holder=holder,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot lock {path!r}: {exc}") from None
        # Who holds it, for the error a second opener sees.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} node {node_id}\n".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        """Unlock (idempotent). The file stays (invariant 2)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
