"""A remote reader of the change feed: :class:`Consumer`.

``async for item in Consumer(address, since=vv, prefixes=["results/"])``
yields :class:`~syncfw.store.follow.FeedItem` (the op and its decoded
value), as :meth:`syncfw.Node.follow` does locally, from a node serving
``syncfw.v1.Feed/Subscribe`` (the aggregator).

Invariants:

1. :attr:`Consumer.position` is the vector to resume from: each item moves its
   origin to the item's seq when it is yielded, and the server's checkpoints
   move it further (ops the prefix filter passed over). Persist it with the
   effect of what you processed and pass it back as ``since``.
2. A lost link (``UNAVAILABLE``, ``ABORTED``, ``CANCELLED``, ``DEADLINE_EXCEEDED``,
   ``INTERNAL``, or the server ending the call cleanly, as when it restarts) is
   retried from :attr:`position` with backoff, so across reconnects the items
   have no gap and no duplicate; an item at or below the position (it cannot
   come from a correct server) is dropped with a WARNING, never yielded twice.
3. Every other end is raised: :class:`FeedPositionError` (the server cannot
   serve from the position), :class:`LinkError` for ``RESOURCE_EXHAUSTED``
   (past the server's lag limit), ``PERMISSION_DENIED``, ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType

from syncfw.notices import clip
from syncfw.store.follow import FeedItem
from syncfw.sync.frames import Status
from syncfw.transport.base import LinkError
from syncfw.transport.config import TlsConfig, TransportConfig
from syncfw.transport.feed import FeedCheckpoint, FeedRecord, FeedRequest, subscribe
from syncfw.transport.rpc import ChannelPool

__all__ = ["Consumer"]

log = logging.getLogger("syncfw.cloud.consumer")

_RETRIED = {
    Status.UNAVAILABLE, Status.ABORTED, Status.CANCELLED, Status.DEADLINE_EXCEEDED,
    Status.INTERNAL,
}


class Consumer:
    """Async iterator of feed items from a remote node; reconnects (see the module).

    Args:
        address: ``host:port`` of the serving node.
        since: the vector already processed (``{}``: from the start).
        prefixes: only keys under one of these (all when empty).
        include_rejected: also ops stored as rejected.
        tls: mutual TLS (a node's or a subscriber's certificate,
            ``syncfw keys``/:func:`syncfw.keyfiles.add_subscriber`).
        expect_id: under mTLS, the node id the server's certificate must name
            (None: the one its certificate shows).
        transport: transport tunables (deadlines, keepalive).
        reconnect_s: first retry delay; doubled up to ``max_reconnect_s``.
        max_reconnect_s: longest retry delay.
        max_retries: give up after this many failed attempts in a row
            (None: never), raising the last :class:`LinkError`.
    """

    def __init__(
        self,
        address: str,
        *,
        since: Mapping[str, int] | None = None,
        prefixes: Sequence[str] = (),
        include_rejected: bool = False,
        tls: TlsConfig | None = None,
        expect_id: str | None = None,
        transport: TransportConfig | None = None,
        reconnect_s: float = 0.2,
        max_reconnect_s: float = 5.0,
        max_retries: int | None = None,
    ) -> None:
        self.address = address
        self._pos: dict[str, int] = {str(o): int(s) for o, s in (since or {}).items() if s}
        self._prefixes = tuple(prefixes)
        self._include_rejected = include_rejected
        cfg = transport or TransportConfig()
        self._pool = ChannelPool(cfg if tls is None else _with_tls(cfg, tls))
        self._expect = expect_id
        self._backoff = (reconnect_s, max_reconnect_s)
        self._max_retries = max_retries
        self._gen: AsyncGenerator[FeedItem, None] | None = None
        self.connects = 0
        """Calls opened so far (1 + reconnects)."""
        self.lag_ops = 0
        """The server's figure for how far behind this consumer is (last checkpoint)."""
        self.dropped_duplicates = 0

    @property
    def position(self) -> dict[str, int]:
        """The vector of everything yielded or passed over so far (invariant 1)."""
        return dict(self._pos)

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> FeedItem:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def _run(self) -> AsyncGenerator[FeedItem, None]:
        delay, top = self._backoff
        failures = 0
        while True:
            self.connects += 1
            try:
                _, san = await self._pool.identity(self.address, expect_id=self._expect)
                channel = self._pool.channel(self.address, san)
                req = FeedRequest(dict(self._pos), self._prefixes, self._include_rejected)
                async with contextlib.aclosing(subscribe(channel, req)) as events:
                    async for event in events:
                        failures = 0
                        if isinstance(event, FeedCheckpoint):
                            self.lag_ops = event.lag_ops
                            for o, s in event.position.items():
                                if s > self._pos.get(o, 0):
                                    self._pos[o] = s
                            continue
                        item = _item(event)
                        if item.seq <= self._pos.get(item.origin, 0):
                            self.dropped_duplicates += 1
                            log.warning(
                                "feed from %s sent %s %d again (position %d): dropped",
                                self.address, clip(item.origin), item.seq,
                                self._pos.get(item.origin, 0),
                            )
                            continue
                        self._pos[item.origin] = item.seq
                        yield item
                reason = "the server ended the call"
            except LinkError as exc:
                if exc.status not in _RETRIED:
                    raise
                failures += 1
                if self._max_retries is not None and failures > self._max_retries:
                    raise
                reason = exc.reason
            wait = min(top, delay * 2 ** min(failures, 16)) * random.uniform(0.8, 1.0)
            log.info("feed from %s: %s; reconnecting in %.2fs", self.address, reason, wait)
            await asyncio.sleep(wait)

    async def aclose(self) -> None:
        """Stop reading and close the channel. Idempotent.

        A task still awaiting the next item must be cancelled (and awaited)
        first; its call is then closed here with the channel.
        """
        gen, self._gen = self._gen, None
        if gen is not None and not getattr(gen, "ag_running", False):
            await gen.aclose()
        await self._pool.aclose()

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _with_tls(cfg: TransportConfig, tls: TlsConfig) -> TransportConfig:
    import dataclasses

    return dataclasses.replace(cfg, tls=tls)


def _item(event: FeedRecord) -> FeedItem:
    return FeedItem.of(event.op, event.local, event.rejected)  # decoded when read
