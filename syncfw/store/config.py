"""Tuning of the SQLite store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["StoreConfig"]


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Tuning of the SQLite store.

    Attributes:
        synchronous: SQLite durability. ``"FULL"`` fsyncs every commit;
            ``"NORMAL"`` (WAL) may lose the last commits on power loss, never
            on a process crash.
        max_bytes: size cap of the database file; a write that would exceed
            it raises :class:`StorageFullError` and writes nothing.
        max_batch: most local writes grouped into one transaction.
        max_offset_ms: how far ahead of local time a remote op may be.
        max_pending: most ops held back at once (the farthest ahead are
            dropped beyond it; they are resent by the next exchange).
        changes_buffer: per-subscriber buffer of the change feed.
    """

    synchronous: Literal["FULL", "NORMAL"] = "NORMAL"
    max_bytes: int | None = None
    max_batch: int = 2048
    max_offset_ms: int = 500
    max_pending: int = 100_000
    changes_buffer: int = 10_000
