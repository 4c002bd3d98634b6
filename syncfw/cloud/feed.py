"""Serving the change feed: ``Subscribe`` backed by :meth:`syncfw.Node.follow`.

:class:`FeedServer` is the :data:`~syncfw.transport.feed.FeedHandler` of any
node that enables the feed (the aggregator always does). The gRPC half is
:mod:`syncfw.transport.feed`.

Invariants:

1. No gap, no duplicate. Ops go out in ``follow()``'s order (each origin's in
   seq order); a :class:`~syncfw.transport.feed.FeedCheckpoint` carries
   ``follow.position`` only at a point where every op it covers was sent or
   passed over, so a subscriber resuming from the vector of what it received
   (or the last checkpoint, whichever is further) misses and repeats nothing,
   across reconnects and restarts of the server (the log is in SQLite).
2. Bounded memory per subscriber: the follower holds at most one page
   (:meth:`FeedServer.page_ops`, at most ``FeedConfig.max_page_ops`` ops), the
   call at most one message (flow control); a slow subscriber is paged from SQLite.
3. A stated lag. Once a subscriber has caught up (reached the head once), it
   may fall at most ``max_lag_ops`` behind the log; past that its call ends
   ``RESOURCE_EXHAUSTED`` naming its lag and the limit (it may resume from
   its position). A catch-up from an old vector is paging, not lag.
4. A position the node cannot serve ends the call ``OUT_OF_RANGE`` naming the
   missing seqs (:class:`FeedPositionError`, from ``follow()``).
5. Every subscription's lag is ``syncfw_subscriber_lag_ops{subscriber}``; at
   most ``max_subscribers`` at once (``RESOURCE_EXHAUSTED`` beyond).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from syncfw.cloud.metrics import FleetMetrics
from syncfw.store.follow import FeedItem
from syncfw.sync.frames import Status
from syncfw.transport.base import LinkError
from syncfw.transport.feed import (
    FeedBatch,
    FeedCheckpoint,
    FeedRecord,
    FeedRequest,
    feed_service,
)

if TYPE_CHECKING:
    from syncfw.node import Node

__all__ = ["FeedConfig", "FeedServer"]

log = logging.getLogger("syncfw.cloud.feed")

_LAG_CHECK_EVERY = 256  # ops sent between two lag checks
_BATCH_BYTES = 512 << 10  # a batch message stays far under the max message size


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """Tunables of the served change feed.

    Attributes:
        page_ops: ops a subscriber's follower reads from SQLite at once (and
            holds at most), at least.
        per_origin_ops: ... grown to this many per origin the node holds,
        max_page_ops: ... up to this bound (see :meth:`FeedServer.page_ops`).
        max_lag_ops: how far behind the log a caught-up subscriber may fall.
        checkpoint_s: a position is sent after this long with nothing to send.
        checkpoint_every: ... and at least every this many ops.
        batch_ops: ops sent in one message at most (those read and ready at once).
        stall_s: a subscriber that reads nothing this long is cut.
        max_subscribers: subscriptions served at once.
    """

    page_ops: int = 1000
    per_origin_ops: int = 100
    max_page_ops: int = 20_000
    max_lag_ops: int = 100_000
    checkpoint_s: float = 1.0
    checkpoint_every: int = 1000
    batch_ops: int = 256
    stall_s: float = 30.0
    max_subscribers: int = 64

    @classmethod
    def test(cls) -> FeedConfig:
        """Tests: small pages, quick checkpoints and a short stall limit."""
        return cls(page_ops=100, per_origin_ops=10, max_lag_ops=10_000, checkpoint_s=0.2,
                   stall_s=5.0)


class FeedServer:
    """Serves ``Subscribe`` calls from ``node``'s log (see the module).

    Args:
        node: the node whose log is served.
        config: feed tunables.
        metrics: where subscriber series go (a fresh :class:`FleetMetrics` on
            the node's registry by default).
    """

    def __init__(
        self, node: Node, config: FeedConfig | None = None, metrics: FleetMetrics | None = None
    ) -> None:
        self.node = node
        self.config = config or FeedConfig()
        self.metrics = metrics if metrics is not None else FleetMetrics(node.metrics)
        self._ids = itertools.count(1)
        self.subscribers: dict[str, dict[str, Any]] = {}
        """Open subscriptions: name -> ``{"identity", "prefixes", "lag_ops", "sent"}``."""
        self.max_held_seen: collections.deque[int] = collections.deque(maxlen=64)
        """The most ops each ended subscription's follower held at once (invariant 2)."""

    def service(self) -> Any:
        """The gRPC service to pass to :class:`~syncfw.transport.network.GrpcNetwork`."""
        return feed_service(self.handle, stall_s=self.config.stall_s, metrics=self.node.metrics)

    def page_ops(self) -> int:
        """The follower's page: ``page_ops``, grown to ``per_origin_ops`` per origin
        the node holds, at most ``max_page_ops`` (invariant 2's bound).

        A page carries whatever is ready across all origins (``follow()``
        reads more of an origin its merge runs dry); a larger page with many
        origins means fewer reads of SQLite per op.
        """
        cfg = self.config
        n = len(self.node.store.version_vector)
        return min(cfg.max_page_ops, max(cfg.page_ops, cfg.per_origin_ops * n))

    def _note_lag(self, name: str, info: dict[str, Any], position: dict[str, int]) -> int:
        vv = self.node.store.version_vector
        lag = sum(max(0, s - position.get(o, 0)) for o, s in vv.items())
        info["lag_ops"] = lag
        self.metrics.set_subscriber_lag(name, lag)
        return lag

    async def handle(
        self, request: FeedRequest, identity: str | None
    ) -> AsyncGenerator[FeedBatch | FeedCheckpoint, None]:
        """One subscription: the :data:`~syncfw.transport.feed.FeedHandler`."""
        cfg = self.config
        if len(self.subscribers) >= cfg.max_subscribers:
            raise LinkError(
                Status.RESOURCE_EXHAUSTED,
                f"the feed serves at most {cfg.max_subscribers} subscribers at once",
            )
        follow = self.node.follow(
            request.since, request.prefixes,
            include_rejected=request.include_rejected, page_ops=self.page_ops(),
        )
        name = f"{identity or 'anonymous'}#{next(self._ids)}"
        info: dict[str, Any] = {
            "identity": identity, "prefixes": list(request.prefixes), "lag_ops": 0, "sent": 0,
        }
        self.subscribers[name] = info
        self.metrics.subscriber_opened()
        pending: asyncio.Future[FeedItem] | None = None
        caught_up = False
        since_check = since_ckpt = 0
        last: dict[str, int] | None = None
        batch: list[FeedRecord] = []
        size = 0
        try:
            async with follow:
                while True:
                    item: FeedItem | None = None
                    if pending is None:
                        # what the follower already read comes without a task or a wait
                        ready = follow.take_ready(1)
                        if ready:
                            item = ready[0]
                        elif batch:  # the next op needs a read or a wait: send first
                            info["sent"] += len(batch)
                            yield FeedBatch(tuple(batch))
                            batch, size = [], 0
                            if since_ckpt >= cfg.checkpoint_every:
                                # every op the position covers was just sent
                                last, since_ckpt = follow.position, 0
                                yield FeedCheckpoint(last, info["lag_ops"])
                            continue
                        else:
                            pending = asyncio.ensure_future(follow.__anext__())
                    if item is None:
                        assert pending is not None
                        done, _ = await asyncio.wait({pending}, timeout=cfg.checkpoint_s)
                        if not done:  # nothing came within checkpoint_s
                            pos = follow.position
                            lag = self._note_lag(name, info, pos)
                            # At the head only if the log agrees: a page read that was
                            # merely slow (a loaded disk) mid-backlog is not "caught up".
                            caught_up = caught_up or lag <= cfg.page_ops
                            if pos != last:
                                last, since_ckpt = pos, 0
                                yield FeedCheckpoint(pos, lag)
                            continue
                        fut, pending = pending, None
                        try:
                            item = fut.result()
                        except StopAsyncIteration:  # the node closed
                            if batch:
                                yield FeedBatch(tuple(batch))
                            return
                    batch.append(FeedRecord(item.op, item.rejected, item.local))
                    size += len(item.op.value) + len(item.op.key) + 96
                    since_check += 1
                    since_ckpt += 1
                    if since_check >= _LAG_CHECK_EVERY:
                        since_check = 0
                        lag = self._note_lag(name, info, follow.position)
                        if caught_up and lag > cfg.max_lag_ops:
                            log.warning(
                                "feed subscriber %s is %d ops behind (limit %d): call ended",
                                name, lag, cfg.max_lag_ops,
                            )
                            # what was read is sent first: the position the
                            # subscriber resumes from is then exact
                            if batch:
                                yield FeedBatch(tuple(batch))
                            raise LinkError(
                                Status.RESOURCE_EXHAUSTED,
                                f"subscriber lags {lag} ops behind the log (limit "
                                f"{cfg.max_lag_ops}): resume from your last position",
                            )
                    if len(batch) >= cfg.batch_ops or size >= _BATCH_BYTES:
                        info["sent"] += len(batch)
                        yield FeedBatch(tuple(batch))
                        batch, size = [], 0
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            self.max_held_seen.append(follow.max_held)
            del self.subscribers[name]
            self.metrics.subscriber_closed(name)
