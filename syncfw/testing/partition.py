"""Partitions for real gRPC meshes on loopback: per-node HTTP CONNECT egress proxies.

Each node dials its peers through its own :class:`EgressProxy` (gRPC honours
``TransportConfig(http_proxy=...)``). A :class:`Partition` shared by the
proxies decides which pairs of nodes may talk: cutting a pair refuses new
tunnels and closes the open ones; healing lets them through again. Used by the
demo and by the multi-process tests; plain asyncio, no third-party code.

Invariant: no byte crosses a cut, whenever its tunnel was made. A tunnel
is checked when it is asked for, again once its upstream is connected, and
before every chunk it forwards; one found crossing a cut is closed. (A tunnel
checked before a cut and registered after it, while its upstream connected,
once carried a whole outage's sync across: :meth:`Partition.split` closes only
the tunnels registered when it runs.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["EgressProxy", "Partition"]


UNKNOWN = "?"
"""The owner of an address no node listens on (:meth:`Partition.allows`)."""
log = logging.getLogger("syncfw.testing")


@dataclass
class Partition:
    """Which node pairs are cut, and who listens where (shared by every proxy)."""

    owners: dict[str, str] = field(default_factory=dict)  # address -> node id
    blocked: set[frozenset[str]] = field(default_factory=set)
    proxies: list[EgressProxy] = field(default_factory=list)

    def split(self, *sides: Iterable[str]) -> None:
        """Cut every pair of nodes on different sides; open tunnels across are closed."""
        groups = [set(s) for s in sides]
        for i, a in enumerate(groups):
            for b in groups[i + 1 :]:
                self.blocked |= {frozenset((x, y)) for x in a for y in b}
        for proxy in self.proxies:
            proxy.cut()

    def heal(self) -> None:
        """Let every pair talk again."""
        self.blocked.clear()

    def allows(self, a: str, b: str) -> bool:
        """True if ``a`` may reach ``b``. While any pair is cut, an address no node
        owns (``b`` is ``"?"``) is refused too: a cut that an unknown route could
        cross would not be a cut."""
        if b == UNKNOWN:
            return not self.blocked
        return frozenset((a, b)) not in self.blocked


@dataclass
class EgressProxy:
    """The egress proxy of one node: HTTP CONNECT, refusing destinations cut off from it."""

    node: str
    partition: Partition
    server: asyncio.Server | None = None
    tunnels: list[tuple[str, asyncio.StreamWriter, asyncio.StreamWriter]] = field(
        default_factory=list
    )
    refused: int = 0
    crossed: int = 0
    """Tunnels a forward found open across a cut (closed then; none should be)."""

    @property
    def url(self) -> str:
        """The proxy's address, for ``TransportConfig(http_proxy=...)``."""
        assert self.server is not None, "start() the proxy first"
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> EgressProxy:
        """Listen on a free loopback port."""
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.partition.proxies.append(self)
        return self

    def cut(self) -> None:
        """Close every open tunnel that now crosses a cut."""
        for dst, a, b in list(self.tunnels):
            if not self.partition.allows(self.node, dst):
                a.close()
                b.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        up: list[asyncio.StreamWriter] = []
        try:
            await self._tunnel(r, w, up)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client or the target went away mid-handshake
        finally:  # whatever ended it (a cut, an error, the loop ending): no socket left open
            w.close()
            for uw in up:
                uw.close()

    async def _tunnel(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, up: list[asyncio.StreamWriter]
    ) -> None:
        try:
            request = await r.readline()
            while (await r.readline()) not in (b"\r\n", b""):
                pass
            target = request.split()[1].decode()
            dst = self.partition.owners.get(target, UNKNOWN)
            if dst == UNKNOWN and self.partition.blocked:
                log.warning(
                    "proxy of %s: refused %s, which no node owns, during a cut", self.node, target
                )
            if not self.partition.allows(self.node, dst):
                self.refused += 1
                w.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                await w.drain()
                return
            host, port = target.rsplit(":", 1)
            ur, uw = await asyncio.open_connection(host, int(port))
        except (IndexError, ValueError):
            return
        up.append(uw)
        entry = (dst, w, uw)
        self.tunnels.append(entry)  # from here on a cut closes it
        if not self.partition.allows(self.node, dst):  # cut while the upstream connected
            self.tunnels.remove(entry)
            self.refused += 1
            w.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            await w.drain()
            return
        try:
            w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await w.drain()
        except BaseException:
            self.tunnels.remove(entry)
            raise

        async def pipe(src: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if not self.partition.allows(self.node, dst):
                        if not (w.is_closing() or uw.is_closing()):  # the cut missed it
                            self.crossed += 1
                            log.warning(
                                "proxy of %s: closed a tunnel to %s found open across a cut",
                                self.node,
                                dst,
                            )
                        w.close()
                        uw.close()
                        break
                    out.write(data)
                    await out.drain()
            out.close()

        try:
            await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)
        finally:
            self.tunnels.remove(entry)

    async def aclose(self) -> None:
        """Stop listening and close every tunnel."""
        if self.server is not None:
            self.server.close()
        for _, a, b in self.tunnels:
            a.close()
            b.close()
        with contextlib.suppress(ValueError):
            self.partition.proxies.remove(self)
