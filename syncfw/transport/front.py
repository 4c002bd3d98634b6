"""The front door: a TCP relay before the gRPC port that bounds what each source may send.

grpc reads whatever a connection's socket delivers, and grpc-python gives a
server no per-connection byte limit and no way to close one connection. A
peer that ignores HTTP/2 flow control can therefore make grpc's threads read
gigabytes a second of DATA for streams already refused. The front door owns
the listening socket instead and relays each accepted connection to the gRPC
server on a loopback port of its own, reading a source only as fast as its
quota allows: past it, the source's socket is simply not read, so the
kernel's TCP window pushes back on the sender and the excess costs this node
nothing.

Invariants:

1. Every byte a source host sends passes one token bucket per host (all its
   connections together): at most ``rate`` bytes a second after a burst of
   ``burst``. A host in debt is not read until the debt is repaid, so over any
   window ``T`` the relay reads at most ``burst + rate * T`` bytes from it,
   plus one socket read (at most 256 KiB) per connection that was mid-read.
   A connection of a host in debt is not read at all, so its close too is
   seen only once the debt is repaid.
2. At most ``per_source`` connections from one host at once, ``max_connections``
   in all; a connection beyond either is closed at once (after an HTTP/2
   GOAWAY, ``ENHANCE_YOUR_CALM``, whose debug text names the limit, and
   0.2 s for the client to read it; at most 256 wait so), counted
   (``syncfw_refused_connections{reason}``) and warned about, at most once per
   ``log_interval_s`` per host and reason.
3. Bounded buffers both ways: a side whose outgoing buffer passes
   ``high_water`` bytes stops the other side being read until it drains
   (asyncio's write flow control), so a peer that never reads what it asked
   for holds at most ``high_water`` bytes here (plus the kernel's socket
   buffers).
4. The source a relayed connection stands for is known while it lives:
   :func:`source_of` maps the peer string grpc reports for the loopback leg
   (``ipv4:127.0.0.1:<port>``) back to the real peer, so admission keeps its
   per-address quotas and log lines name the real host. The loopback leg binds
   its own port before connecting, so the port is unique in this host while
   the connection lives. Entries go when their connection closes.
5. Bytes are relayed unchanged (TLS included: grpc terminates it).
6. The host tables are bounded: a host's entry goes once it has no connection
   and its bucket is full again (a full bucket is the same as none); at most
   ``max_sources`` entries, the oldest idle ones dropped first.

Costs: one asyncio hop per socket read each way, in the node's event loop.
A deployment that rate-limits per source in front of the node (a shaping
proxy, the kernel's) may turn it off (``TransportConfig.front_door``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from syncfw.notices import Notices, clip

if TYPE_CHECKING:
    from syncfw.metrics import NodeMetrics

__all__ = ["FrontDoor", "FrontLimits", "source_of"]

log = logging.getLogger("syncfw.transport.front")

_LIVE: dict[int, str] = {}
"""Loopback port of a relayed connection's upstream leg -> the real peer (invariant 4)."""


def source_of(peer: str) -> str:
    """The real peer behind grpc's ``context.peer()`` for a relayed connection; else ``peer``."""
    if peer.startswith("ipv4:127.0.0.1:"):
        try:
            port = int(peer.rsplit(":", 1)[1])
        except ValueError:
            return peer
        return _LIVE.get(port, peer)
    return peer


def _peer_string(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A socket address as grpc spells a peer (``ipv4:h:p``, ``ipv6:[h]:p``)."""
    host, port = addr[0], addr[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


@dataclass(frozen=True, slots=True)
class FrontLimits:
    """What the front door allows one source host (from ``TransportConfig``).

    Attributes:
        rate: bytes a second read from one host, all its connections together.
        burst: bytes a host may send at once before ``rate`` applies.
        per_source: connections at once from one host.
        max_connections: connections at once, all hosts together.
        high_water: bytes buffered for one side before the other is paused.
        max_sources: hosts tracked at most (invariant 6).
        log_interval_s: at most one WARNING per host and reason this often.
    """

    rate: int = 32 << 20
    burst: int = 8 << 20
    per_source: int = 32
    max_connections: int = 1024
    high_water: int = 1 << 20
    max_sources: int = 4096
    log_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.rate < 1 or self.burst < 1:
            raise ValueError("the front door's rate and burst must be at least 1 byte")
        if self.per_source < 1 or self.max_connections < 1:
            raise ValueError("the front door must allow at least one connection")


_CLOSING = 256  # refused connections waiting _CLOSE_AFTER_S to close, at most
_CLOSE_AFTER_S = 0.2
_SETTINGS = bytes((0, 0, 0, 4, 0, 0, 0, 0, 0))
_ENHANCE_YOUR_CALM = 0xB


def _goaway(text: str) -> bytes:
    """An empty SETTINGS frame then a GOAWAY (last stream 0) carrying ``text``."""
    debug = text.encode()[:256]
    body = (0).to_bytes(4, "big") + _ENHANCE_YOUR_CALM.to_bytes(4, "big") + debug
    return _SETTINGS + len(body).to_bytes(3, "big") + bytes((7, 0)) + bytes(4) + body

class _Source:
    """One host: its connections and its token bucket (invariant 1)."""

    __slots__ = ("connections", "level", "stamp")

    def __init__(self, burst: int, now: float) -> None:
        self.connections = 0
        self.level = float(burst)
        self.stamp = now

    def refill(self, limits: FrontLimits, now: float) -> None:
        self.level = min(float(limits.burst), self.level + (now - self.stamp) * limits.rate)
        self.stamp = now

    def take(self, n: int, limits: FrontLimits, now: float) -> float:
        """Charge ``n`` bytes; the seconds until the bucket is out of debt (0: none)."""
        self.refill(limits, now)
        self.level -= n
        return -self.level / limits.rate if self.level < 0 else 0.0


class _Side(asyncio.Protocol):
    """One leg of a relayed connection; ``other`` is the leg its bytes go to."""

    def __init__(self, high_water: int) -> None:
        self.high_water = high_water
        self.relay: _Relay | None = None
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self._paused: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.high_water)

    def pause(self, why: str) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused.add(why)

    def resume(self, why: str) -> None:
        self._paused.discard(why)
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # the other leg's reading follows this leg's outgoing buffer (invariant 3)
    def pause_writing(self) -> None:
        if self.other is not None:
            self.other.pause("full")

    def resume_writing(self) -> None:
        if self.other is not None:
            self.other.resume("full")

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)

    def eof_received(self) -> bool:
        if self.relay is not None:
            self.relay.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            self.relay.close()


class _Inbound(_Side):
    """The peer's leg: admitted when accepted, then charged to its host's bucket."""

    def __init__(self, door: FrontDoor) -> None:
        super().__init__(door.limits.high_water)
        self.door = door

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.relay = self.door.admit(self.transport, self)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is None:
            return
        super().data_received(data)
        self.door.bytes_in += len(data)
        wait = relay.source.take(len(data), self.door.limits, self.door.clock())
        if wait > 0:
            self.pause("rate")
            self.door.throttled(relay, wait)
            asyncio.get_running_loop().call_later(wait, self.resume, "rate")


class _Relay:
    """One accepted connection and its loopback leg to the gRPC server."""

    def __init__(self, door: FrontDoor, inbound: _Inbound, host: str, peer: str, source: _Source) -> None:
        self.door = door
        self.host = host
        self.peer = peer
        self.source = source
        self.inbound = inbound
        self.upstream = _Side(door.limits.high_water)
        self.upstream.relay = self
        inbound.other, self.upstream.other = self.upstream, inbound
        self.port: int | None = None
        self.closed = False
        inbound.pause("connecting")
        self.task = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        """Open the loopback leg, then let the peer's bytes through."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(("127.0.0.1", 0))  # a port of its own before connecting (invariant 4)
            sock.setblocking(False)
            self.port = sock.getsockname()[1]
            _LIVE[self.port] = self.peer
            await loop.sock_connect(sock, ("127.0.0.1", self.door.upstream_port))
            await loop.create_connection(lambda: self.upstream, sock=sock)
        except OSError as exc:
            sock.close()
            log.warning("front door: cannot reach the gRPC server for %s: %s", clip(self.peer), exc)
            self.close()
            return
        if self.closed:  # the peer went while we connected
            self.close()
            return
        self.inbound.resume("connecting")

    def close(self) -> None:
        if self.port is not None and _LIVE.get(self.port) == self.peer:
            del _LIVE[self.port]
        for side in (self.inbound, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()  # what is buffered is still written
        if not self.closed:
            self.closed = True
            self.door.gone(self)


class FrontDoor:
    """A running front door on ``host:port``, relaying to ``127.0.0.1:upstream_port``."""

    def __init__(
        self, limits: FrontLimits, upstream_port: int, metrics: NodeMetrics | None = None,
        *, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.upstream_port = upstream_port
        self._metrics = metrics
        self.clock = clock
        self._sources: dict[str, _Source] = {}
        self._relays: set[_Relay] = set()
        self._closing: set[asyncio.Transport] = set()  # refused, told why, closing
        self._server: asyncio.Server | None = None
        self._notices = Notices(log, limits.log_interval_s, max_keys=1024)
        self.port = 0
        self.bytes_in = 0
        """Bytes read from sources and relayed, all together."""
        self.throttled_s = 0.0
        """Seconds of pauses imposed on sources over their rate, all together."""
        self.refused: dict[str, int] = {}
        """Connections closed at once, by reason (invariant 2)."""

    @classmethod
    async def start(
        cls, host: str, port: int, upstream_port: int, limits: FrontLimits,
        metrics: NodeMetrics | None = None,
    ) -> FrontDoor:
        """Listen on ``host:port`` (0: a free port).

        Raises:
            OSError: the address cannot be bound.
        """
        door = cls(limits, upstream_port, metrics)
        door._server = await asyncio.get_running_loop().create_server(
            door._accept, host or None, port, reuse_address=True
        )
        door.port = door._server.sockets[0].getsockname()[1]
        return door

    @property
    def connections(self) -> int:
        """Connections relayed now."""
        return len(self._relays)

    @property
    def sources(self) -> int:
        """Hosts tracked now (invariant 6)."""
        return len(self._sources)

    def _accept(self) -> asyncio.Protocol:
        return _Inbound(self)

    def admit(self, transport: asyncio.Transport, inbound: _Inbound) -> _Relay | None:
        """A relay for a new connection, or None after closing it (invariant 2)."""
        addr = transport.get_extra_info("peername")
        if not addr:
            transport.abort()
            return None
        host, peer = str(addr[0]), _peer_string(addr)
        now = self.clock()
        src = self._sources.get(host)
        if len(self._relays) >= self.limits.max_connections:
            self._refuse(transport, host, "connections", "every connection slot is taken")
            return None
        if src is not None and src.connections >= self.limits.per_source:
            self._refuse(
                transport, host, "source_connections",
                f"{self.limits.per_source} connections from this host already",
            )
            return None
        if src is None:
            if len(self._sources) >= self.limits.max_sources:
                self._sweep(now)
            src = self._sources[host] = _Source(self.limits.burst, now)
        src.connections += 1
        relay = _Relay(self, inbound, host, peer, src)
        self._relays.add(relay)
        return relay

    def _refuse(self, transport: asyncio.Transport, host: str, reason: str, detail: str) -> None:
        # Say why before closing: an HTTP/2 server preface (empty SETTINGS) and a
        # GOAWAY with ENHANCE_YOUR_CALM, whose debug text the client reports. The
        # close waits a moment (nothing more is read), so a client applies the
        # GOAWAY before it sees the socket go; at most _CLOSING such sockets wait.
        transport.pause_reading()
        transport.write(_goaway(f"syncfw front door: {reason}: {detail}"))
        if len(self._closing) < _CLOSING:
            self._closing.add(transport)
            asyncio.get_running_loop().call_later(_CLOSE_AFTER_S, self._close, transport)
        else:
            transport.close()
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._notices.warn(f"{host}|{reason}", 1, "front door refused a connection from %s (%s): %s",
                           clip(host), reason, detail)
        if self._metrics is not None:
            self._metrics.refused_connections.labels(self._metrics.node_id, reason).inc()

    def _close(self, transport: asyncio.Transport) -> None:
        self._closing.discard(transport)
        transport.close()

    def throttled(self, relay: _Relay, wait_s: float) -> None:
        """A source ran over its rate: it is not read for ``wait_s``."""
        self.throttled_s += wait_s
        if self._metrics is not None:
            self._metrics.inbound_throttled.labels(self._metrics.node_id).inc(wait_s)
        self._notices.warn(
            f"{relay.host}|rate", 1,
            "front door: %s sends over %d bytes/s; its connections are read no faster",
            clip(relay.host), self.limits.rate,
        )

    def gone(self, relay: _Relay) -> None:
        self._relays.discard(relay)
        src = relay.source
        src.connections -= 1
        if src.connections == 0:
            src.refill(self.limits, self.clock())
            if src.level >= self.limits.burst:
                self._sources.pop(relay.host, None)

    def _sweep(self, now: float) -> None:
        """Drop idle hosts whose buckets are full again, then the oldest idle ones."""
        idle = [(s.stamp, h) for h, s in self._sources.items() if s.connections == 0]
        for h in [h for _, h in idle]:
            src = self._sources[h]
            src.refill(self.limits, now)
            if src.level >= self.limits.burst:
                del self._sources[h]
        if len(self._sources) >= self.limits.max_sources:
            for _, h in sorted(idle)[: max(1, len(self._sources) - self.limits.max_sources + 1)]:
                self._sources.pop(h, None)

    async def aclose(self) -> None:
        """Stop accepting and close every relayed connection (waiting at most 1 s for
        loopback legs still connecting)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for transport in list(self._closing):
            self._close(transport)
        relays = list(self._relays)
        for relay in relays:
            relay.close()
        # a loopback leg still connecting closes itself once connected; then one loop
        # turn lets each closed transport drop its socket (else a loop closed right
        # after this finds the transports unclosed)
        pending = [r.task for r in relays if not r.task.done()]
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        await asyncio.sleep(0)
