"""The store's figures in the node's metric registry, recorded after each COMMIT.

Label children are looked up once here, so recording a commit costs a few
counter increments, not a label lookup per op.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from syncfw.metrics import NodeMetrics

__all__ = ["PendingAlarm", "StoreMeter"]

PENDING_BUCKETS = ("gap", "epoch", "clock_skew", "unsigned", "fork")


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
        self.size = 0
        """The file's size when last measured."""
        self.discarded: dict[str, int] = {}
        """Held-back or rejected data dropped since open, by why (see :meth:`discard`)."""

    def size_due(self) -> bool:
        """True if the next commit should read the file size."""
        return time.monotonic() >= self._size_due

    def set_size(self, size: int | None) -> None:
        """Record the file size (None: not measured this time)."""
        if size is not None:
            self.size = size
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

    def discard(self, counts: Mapping[str, int]) -> None:
        """Count held-back ops (or rejected ops' values) dropped, by why."""
        for why, n in counts.items():
            self.discarded[why] = self.discarded.get(why, 0) + n
            self.metrics.ops_discarded.labels(self.metrics.node_id, why).inc(n)


class PendingAlarm:
    """Says, rate-limited, when held-back ops pile up or wait too long.

    A bucket (``gap``, ``epoch``, ``clock_skew``) is alarming when it holds at
    least ``max_ops`` ops, or has held some without a break for ``max_age_ms``
    (a missing grant or a stuck gap holds a handful of ops forever). Each
    bucket warns at most once per ``every_ms``.
    """

    def __init__(self, max_ops: int, max_age_ms: int, every_ms: int) -> None:
        self._max_ops, self._max_age_ms, self._every_ms = max_ops, max_age_ms, every_ms
        self._since: dict[str, int] = {}
        self._warned: dict[str, int] = {}

    def observe(self, counts: Mapping[str, int], now_ms: int) -> list[str]:
        """Record the pending counts as of now; return the warnings due."""
        out: list[str] = []
        for bucket in PENDING_BUCKETS:
            n = counts.get(bucket, 0)
            if n <= 0:
                self._since.pop(bucket, None)
                continue
            since = self._since.setdefault(bucket, now_ms)
            age = now_ms - since
            if n < self._max_ops and age < self._max_age_ms:
                continue
            if now_ms - self._warned.get(bucket, -(1 << 62)) < self._every_ms:
                continue
            self._warned[bucket] = now_ms
            out.append(
                f"{n} remote ops held back ({bucket}) for {age // 1000} s; "
                + _PENDING_HINTS[bucket]
            )
        return out


_PENDING_HINTS = {
    "gap": "earlier ops of their origins have not arrived",
    "epoch": "they name a zone epoch this node has no grant for (a missing grant or "
    "a different fleet bootstrap?)",
    "clock_skew": "their timestamps are ahead of local time by more than max_offset_ms "
    "(a peer's clock, or this one's)",
    "unsigned": "no chain head signed by their origin's registered key covers them yet "
    "(forged, or their head and registration have not arrived)",
    "fork": "their origin signed two histories (fork evidence): held until the authority "
    "revokes its key or keeps a branch",
}
