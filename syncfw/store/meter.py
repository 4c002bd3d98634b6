"""The store's figures in the node's metric registry, recorded after each COMMIT.

Label children are looked up once here, so recording a commit costs a few
counter increments, not a label lookup per op.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from syncfw.metrics import NodeMetrics

__all__ = ["StoreMeter"]

PENDING_BUCKETS = ("gap", "epoch", "clock_skew")


class StoreMeter:
    """Records commits, verdicts, pending ops and the file size.

    Args:
        metrics: the node's registry of metric families.
        size_every_s: the file size is read after a commit at most this often.
    """

    def __init__(self, metrics: NodeMetrics, *, size_every_s: float = 1.0) -> None:
        n = metrics.node_id
        self.metrics = metrics
        self._applied_local = metrics.ops_applied.labels(n, "local")
        self._applied_remote = metrics.ops_applied.labels(n, "remote")
        self._rejected = metrics.ops_rejected.labels(n)
        self._duplicate = metrics.ops_duplicate.labels(n)
        self._pending = {b: metrics.ops_pending.labels(n, b) for b in PENDING_BUCKETS}
        self._batch_local = metrics.commit_batch_ops.labels(n, "local")
        self._batch_remote = metrics.commit_batch_ops.labels(n, "remote")
        self._storage = metrics.storage_bytes.labels(n)
        self._size_every_s = size_every_s
        self._size_due = 0.0

    def size_due(self) -> bool:
        """True if the next commit should read the file size."""
        return time.monotonic() >= self._size_due

    def set_size(self, size: int | None) -> None:
        """Record the file size (None: not measured this time)."""
        if size is not None:
            self._storage.set(size)
            self._size_due = time.monotonic() + self._size_every_s

    def local(self, ops: int) -> None:
        """A group of local writes committed."""
        self._applied_local.inc(ops)
        self._batch_local.observe(ops)

    def remote(self, applied: int, rejected: int, committed: bool) -> None:
        """A remote batch committed (``committed``: it ran a transaction)."""
        if applied:
            self._applied_remote.inc(applied)
        if rejected:
            self._rejected.inc(rejected)
        if committed:
            self._batch_remote.observe(applied + rejected)

    def duplicates(self, n: int) -> None:
        """Remote ops found already held."""
        if n:
            self._duplicate.inc(n)

    def pending(self, counts: Mapping[str, int]) -> None:
        """Set the pending gauge, by bucket."""
        for bucket, gauge in self._pending.items():
            gauge.set(counts.get(bucket, 0))
