"""A thin link on loopback: a TCP proxy that shapes each direction to a byte rate.

Invariants:

1. Bytes are forwarded in order, unchanged, each direction through its own
   token bucket of ``rate_bps`` bytes per second with a burst of ``burst``
   bytes, in chunks of at most ``chunk`` bytes: a sender sees the link's
   rate through TCP backpressure, as on a real thin link.
2. ``delay_s`` is added once per chunk, before it is forwarded (a one-way
   latency; with a backlog it overlaps, as propagation delay does).
3. Plain asyncio, no third-party code; :meth:`ShapedLink.aclose` closes every
   connection. ``forwarded`` counts bytes per direction (``"up"``: towards
   the target).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

__all__ = ["ShapedLink"]


@dataclass
class _Bucket:
    rate: float
    burst: float
    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


@dataclass
class ShapedLink:
    """Listens on a loopback port; forwards to ``target`` (``host:port``) at ``rate_bps``.

    Args:
        target: where connections go.
        rate_bps: bytes per second, each direction.
        delay_s: one-way delay added per chunk.
        burst: bytes that may pass at once.
        chunk: the most bytes forwarded in one piece.
    """

    target: str
    rate_bps: float
    delay_s: float = 0.0
    burst: int = 2048
    chunk: int = 1024
    server: asyncio.Server | None = None
    forwarded: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` to dial instead of the target."""
        assert self.server is not None, "start() the link first"
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> ShapedLink:
        """Listen on a free loopback port."""
        if self.rate_bps <= 0 or self.chunk < 1 or self.burst < self.chunk:
            raise ValueError("rate_bps > 0 and burst >= chunk >= 1 are required")
        # one bucket per direction, shared by every connection: one link
        self._buckets = {d: _Bucket(self.rate_bps, self.burst) for d in ("up", "down")}
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            w.close()
            return
        self._writers += [w, uw]
        await asyncio.gather(self._pipe(r, uw, "up"), self._pipe(ur, w, "down"))

    async def _pipe(self, src: asyncio.StreamReader, out: asyncio.StreamWriter, way: str) -> None:
        bucket = self._buckets[way]
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(self.chunk):
                await bucket.take(len(data))
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                out.write(data)
                await out.drain()
                self.forwarded[way] += len(data)
        out.close()

    async def aclose(self) -> None:
        """Stop listening and close every connection."""
        if self.server is not None:
            self.server.close()
        for w in self._writers:
            w.close()
