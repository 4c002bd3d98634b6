"""A content-addressed chunk store in a folder beside the node's database.

Layout: ``<db>.chunks/objects/<2 hex>/<64 hex>`` (one file per chunk, named by
its sha256), ``<db>.chunks/tmp/`` for writes in flight. Chunks never enter the
op log: the log carries the signed manifest that names them.

Invariants:

1. A chunk is stored only under its own hash: :meth:`ChunkStore.put` hashes
   the bytes first and refuses a mismatch (:class:`ChunkError`), so a tampered
   chunk or a lying peer's bytes never land.
2. Writes are atomic: temp file, fsync, rename, fsync of the folder. A power
   cut leaves the chunk whole or absent; leftovers in ``tmp/`` are removed at
   open. A chunk held is never fetched again (a transfer resumes).
3. Reads verify too: a chunk whose bytes no longer match its name (bit rot, a
   hand edit) is a :class:`ChunkError`, and the file is removed so the next
   fetch replaces it.
4. The store is bounded by ``max_bytes``: a write that would pass it, or a
   disk that is full, is a :class:`StorageFullError` naming the figures;
   nothing already held is touched, and the temp file is removed.
5. Another process may add chunks to a folder a running node holds
   (``syncfw model publish`` beside a running authority, opened with
   ``sweep=False`` so it never removes the node's writes in flight): a chunk
   asked for and not known is looked for on disk and adopted (its bytes are
   verified on read, invariant 3).

Blocking file I/O: async callers run these methods in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

from syncfw.errors import ChunkError, StorageError, StorageFullError
from syncfw.models.manifest import ReleaseManifest

__all__ = ["ChunkStore", "chunk_folder"]


def chunk_folder(db_path: str | Path) -> Path:
    """The chunk folder beside a node's database: ``<db>.chunks``."""
    return Path(f"{db_path}.chunks")


class ChunkStore:
    """Chunks by sha256, in one folder.

    Args:
        root: the folder (created if absent).
        max_bytes: the disk budget for chunks (None: only the disk bounds it).
        durable: fsync every write (off only for tests and benchmarks).
        sweep: remove leftovers in ``tmp/`` at open (False for a second writer
            beside a running node, invariant 5).

    Raises:
        StorageError: the folder cannot be created or read.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_bytes: int | None = None,
        durable: bool = True,
        sweep: bool = True,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.durable = durable
        self._lock = threading.Lock()
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(exist_ok=True)
            for left in self._tmp.iterdir() if sweep else ():  # a power cut's (invariant 2)
                left.unlink(missing_ok=True)
            self._sizes = {
                bytes.fromhex(p.name): p.stat().st_size
                for sub in self._objects.iterdir()
                if sub.is_dir()
                for p in sub.iterdir()
                if len(p.name) == 64
            }
        except (OSError, ValueError) as exc:
            raise StorageError(f"chunk folder {self.root} cannot be used: {exc}") from None
        self.used_bytes = sum(self._sizes.values())

    @classmethod
    def beside(cls, db_path: str | Path, **kwargs: object) -> ChunkStore:
        """The store in :func:`chunk_folder` of ``db_path``."""
        return cls(chunk_folder(db_path), **kwargs)  # type: ignore[arg-type]

    def _path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self._objects / h[:2] / h

    def has(self, digest: bytes) -> bool:
        """True if the chunk is held (one another process wrote is adopted, invariant 5)."""
        return digest in self._sizes or self._adopt(digest)

    def _adopt(self, digest: bytes) -> bool:
        try:
            size = self._path(digest).stat().st_size
        except (OSError, ValueError):
            return False
        with self._lock:
            if digest not in self._sizes:
                self._sizes[digest] = size
                self.used_bytes += size
        return True

    def __len__(self) -> int:
        return len(self._sizes)

    def missing(self, manifest: ReleaseManifest) -> list[int]:
        """Indexes of the manifest's chunks not held."""
        return [i for i, h in enumerate(manifest.chunks) if not self.has(h)]

    def held(self, manifest: ReleaseManifest) -> list[int]:
        """Indexes of the manifest's chunks held."""
        return [i for i, h in enumerate(manifest.chunks) if self.has(h)]

    def put(self, digest: bytes, data: bytes) -> bool:
        """Store ``data`` as chunk ``digest``.

        Returns:
            True if it was written, False if it was already held.

        Raises:
            ChunkError: ``data`` does not hash to ``digest`` (nothing written).
            StorageFullError: over ``max_bytes``, or the disk is full (nothing
                written, nothing held lost).
            StorageError: another I/O failure (nothing written).
        """
        got = hashlib.sha256(data).digest()
        if got != digest:
            raise ChunkError(
                f"chunk {digest.hex()[:12]}…: the bytes hash to {got.hex()[:12]}… "
                f"({len(data)} bytes); refused"
            )
        with self._lock:
            if digest in self._sizes:
                return False
            if self.max_bytes is not None and self.used_bytes + len(data) > self.max_bytes:
                raise StorageFullError(
                    f"chunk store {self.root} holds {self.used_bytes} bytes; another "
                    f"{len(data)} would pass its budget of {self.max_bytes}"
                )
            self._write(digest, data)
            self._sizes[digest] = len(data)
            self.used_bytes += len(data)
        return True

    def _write(self, digest: bytes, data: bytes) -> None:
        final = self._path(digest)
        tmp = self._tmp / f"{digest.hex()}.{uuid.uuid4().hex[:8]}"
        try:
            final.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if self.durable:
                _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(
                    f"disk full writing chunk {digest.hex()[:12]}… to {self.root}: "
                    f"nothing written, {self.used_bytes} bytes held kept"
                ) from None
            raise StorageError(f"cannot write chunk to {self.root}: {exc}") from None

    def get(self, digest: bytes) -> bytes:
        """The chunk's bytes, verified (invariant 3).

        Raises:
            KeyError: not held.
            ChunkError: the file no longer matches its hash (it is removed).
        """
        if not self.has(digest):
            raise KeyError(digest.hex())
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._forget(digest)
            raise KeyError(digest.hex()) from None
        except OSError as exc:
            raise StorageError(f"cannot read chunk {path}: {exc}") from None
        if hashlib.sha256(data).digest() != digest:
            self.discard(digest)
            raise ChunkError(
                f"chunk {path} no longer matches its hash; removed, to be fetched again"
            )
        return data

    def _forget(self, digest: bytes) -> None:
        with self._lock:
            size = self._sizes.pop(digest, None)
            if size is not None:
                self.used_bytes -= size

    def discard(self, digest: bytes) -> None:
        """Remove a chunk (idempotent)."""
        self._forget(digest)
        with contextlib.suppress(FileNotFoundError):
            self._path(digest).unlink()

    def assemble(self, manifest: ReleaseManifest) -> bytes:
        """The whole artifact, every chunk and the whole hash verified.

        Raises:
            KeyError: a chunk is not held.
            ChunkError: a chunk, or the whole, does not match the manifest.
        """
        data = b"".join(self.get(h) for h in manifest.chunks)
        if len(data) != manifest.size or hashlib.sha256(data).hexdigest() != manifest.sha256:
            raise ChunkError(
                f"{manifest.name} {manifest.version}: the chunks do not make the artifact "
                f"the manifest names ({len(data)} bytes, sha256 {manifest.sha256[:12]}…)"
            )
        return data

    def keep_only(self, digests: Iterable[bytes]) -> int:
        """Remove every chunk not in ``digests``; returns the bytes freed."""
        keep = set(digests)
        freed = 0
        for d in [d for d in self._sizes if d not in keep]:
            freed += self._sizes.get(d, 0)
            self.discard(d)
        return freed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
