"""Tuning of the SQLite store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MAX_KEY_BYTES", "MAX_VALUE_BYTES", "StoreConfig"]

MAX_VALUE_BYTES = 1024 * 1024 - 64 * 1024
"""Default payload limit: the 1 MiB batch cap less 64 KiB for the op's other fields."""

MAX_KEY_BYTES = 1024
"""Default key limit (UTF-8 bytes)."""


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Tuning of the SQLite store.

    Attributes:
        synchronous: SQLite durability. ``"FULL"`` (the default) fsyncs every
            commit, so a write acknowledged by ``put`` survives power loss.
            ``"NORMAL"`` is an opt-in for speed: with WAL it may lose the last
            commits on power loss (never on a process crash).
        max_bytes: size cap of the database file; a write that would exceed
            it raises :class:`StorageFullError` and writes nothing.
        local_reserve_bytes: of ``max_bytes``, the last this many bytes are kept for
            this node's own writes: remote batches (others' ops, rejected ones
            included) are refused with :class:`StorageFullError` once the file is
            within them, so peers can never fill the space a node's own writes need.
            None: 1/8 of ``max_bytes``. Only with ``max_bytes``.
        max_batch: most local writes grouped into one transaction.
        max_remote_group_ops: remote batches waiting for the writer together
            (several peers' exchanges landing at once) are planned and committed
            as one transaction while their ops add up to at most this many; a
            group that fails is applied batch by batch, so each peer's batch is
            still applied whole or not at all, and only the failing one fails.
            1 applies every batch alone. Larger groups cost fewer commits a
            second but land more ops at once, which a live feed then delivers
            as one burst: 512 kept the change feed's p99 where single batches
            had it, where 4,096 doubled it (``bench/aggregator.py``).
        pipeline_remote: plan the next remote group while the one before it
            commits (the writer's invariant 4b); False plans each only after the
            one before has committed.
        max_offset_ms: how far ahead of local time a remote op may be.
        max_pending: most ops held back at once (the farthest ahead are
            dropped beyond it; they are resent by the next exchange).
        max_pending_bytes: most bytes of held-back ops at once (values, keys
            and about 128 bytes of overhead each; the same rule past it):
            what a peer can make this node hold for it, apart from the
            node's own data.
        max_rejected_bytes: most bytes of rejected ops stored (an op rejected by its
            zone verdict or its key is kept, since it is part of its origin's chain
            and relayed). Past it, an origin whose next op would be rejected waits
            (pending ``rejected_budget``, a WARNING, status and metric) instead of
            growing the file; compaction frees the budget.
        changes_buffer: per-subscriber buffer of the change feed.
        max_value_bytes: largest op payload a local write may produce; larger
            ones raise :class:`~syncfw.errors.ValueTooLargeError` and write
            nothing. The default leaves room for an op's key, hashes and
            signature under the sync protocol's 1 MiB batch cap, so every op
            fits in one batch. (A link configured with smaller batches, such
            as ``MeshConfig.metered_link``'s 256 KiB, needs a smaller limit.)
        max_key_bytes: longest key (UTF-8 bytes) a local write may use.
        pending_warn_ops: held-back ops of one reason that make a WARNING.
        pending_warn_age_s: ...or how long some have been held without a break.
        pending_warn_every_s: at most one such WARNING per reason this often.
        open_check_s: time bound of the ``PRAGMA quick_check`` run at open (it
            reads every page: about 1 s per GB on an SSD). A damaged file is
            refused with :class:`~syncfw.errors.CorruptDatabaseError`; a check
            that runs out of time is abandoned with a WARNING (run
            ``syncfw inspect --check`` for the full one). 0 skips it.
    """

    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    max_bytes: int | None = None
    local_reserve_bytes: int | None = None
    max_batch: int = 2048
    max_remote_group_ops: int = 512
    pipeline_remote: bool = True
    max_offset_ms: int = 500
    max_pending: int = 100_000
    max_pending_bytes: int = 32 << 20
    max_rejected_bytes: int = 64 << 20
    changes_buffer: int = 10_000
    max_value_bytes: int = MAX_VALUE_BYTES
    max_key_bytes: int = MAX_KEY_BYTES
    pending_warn_ops: int = 1_000
    pending_warn_age_s: float = 60.0
    pending_warn_every_s: float = 60.0
    open_check_s: float = 5.0
