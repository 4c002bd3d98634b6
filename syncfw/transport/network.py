"""Listen-and-dial adapters the mesh runs on: gRPC, or the in-memory network.

Both offer :meth:`serve` (start accepting exchanges) and :meth:`connect` (open
a :class:`FrameStream` to an address), so the mesh is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from syncfw.metrics import NodeMetrics
from syncfw.transport.base import FrameStream
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.rpc import ChannelPool, GrpcServer, TransportConfig

__all__ = ["GrpcNetwork", "InMemoryNetwork", "Listener", "Network"]

Handler = Callable[[FrameStream], Coroutine[Any, Any, object]]


class Listener(Protocol):
    """A running listener."""

    @property
    def address(self) -> str:
        """Where it accepts exchanges."""
        ...

    async def aclose(self) -> None:
        """Stop accepting; let running exchanges finish briefly."""
        ...


class Network(Protocol):
    """What the mesh needs from a transport."""

    async def serve(self, listen: str, handler: Handler) -> Listener:
        """Accept exchanges on ``listen``, each handed to ``handler``."""
        ...

    async def connect(self, address: str, *, source: str, timeout_s: float) -> FrameStream:
        """Open an exchange stream to ``address`` (``LinkError`` if unreachable)."""
        ...

    async def forget(self, address: str) -> None:
        """Drop cached connections to ``address`` (a peer declared dead)."""
        ...

    async def aclose(self) -> None:
        """Release every connection."""
        ...


class GrpcNetwork:
    """The mesh over gRPC: a :class:`GrpcServer` and a :class:`ChannelPool`.

    Args:
        config: transport tunables (quotas, deadlines, connection limits, TLS).
        metrics: the node's registry; the server counts refused and cut
            streams there (``syncfw_refused_streams{reason}``).
    """

    def __init__(
        self, config: TransportConfig | None = None, *, metrics: NodeMetrics | None = None
    ) -> None:
        self.config = config or TransportConfig()
        self.metrics = metrics
        self.pool = ChannelPool(self.config)

    async def serve(self, listen: str, handler: Handler) -> GrpcServer:
        """Start a gRPC server on ``listen``."""
        return await GrpcServer.start(listen, handler, config=self.config, metrics=self.metrics)

    async def connect(self, address: str, *, source: str, timeout_s: float) -> FrameStream:
        """Open an Exchange call on the pooled channel to ``address``."""
        return await self.pool.open(address, timeout_s=timeout_s)

    async def forget(self, address: str) -> None:
        """Close the pooled channel to ``address``."""
        await self.pool.drop(address)

    async def aclose(self) -> None:
        """Close every pooled channel."""
        await self.pool.aclose()


class _MemoryListener:
    def __init__(self, net: MemoryNetwork, address: str) -> None:
        self._net = net
        self._address = address

    @property
    def address(self) -> str:
        return self._address

    async def aclose(self) -> None:
        self._net.unlisten(self._address)


class InMemoryNetwork:
    """The mesh over a shared :class:`MemoryNetwork` (tests, the simulator, examples)."""

    def __init__(self, net: MemoryNetwork) -> None:
        self.net = net

    async def serve(self, listen: str, handler: Handler) -> _MemoryListener:
        """Listen under the name ``listen``."""
        self.net.listen(listen, handler)
        return _MemoryListener(self.net, listen)

    async def connect(self, address: str, *, source: str, timeout_s: float) -> FrameStream:
        """Open an in-memory pipe to ``address``."""
        return await self.net.connect(address, source=source)

    async def forget(self, address: str) -> None:
        """Nothing is cached."""

    async def aclose(self) -> None:
        """Nothing to release (the shared network outlives one node)."""
