"""The per-peer bandwidth budget and the rate of new dials: re-exported from
:mod:`syncfw.transport.budget`, where sync and artifact chunk transfer share it."""

from __future__ import annotations

from syncfw.transport.budget import Priority, TokenBucket

__all__ = ["Priority", "TokenBucket"]
