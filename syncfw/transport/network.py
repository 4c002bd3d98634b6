"""Listen-and-dial adapters the mesh runs on: gRPC, or the in-memory network.

Both offer :meth:`serve` (start accepting exchanges) and :meth:`connect` (open
a :class:`FrameStream` to an address), so the mesh is written once.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Protocol

from syncfw.metrics import NodeMetrics
from syncfw.transport.artifacts import (
    ArtifactSlot,
    ChunkPiece,
    memory_fetch,
    memory_listen,
    memory_unlisten,
)
from syncfw.transport.artifacts_rpc import artifact_service, grpc_fetch
from syncfw.transport.base import FrameStream
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.probe import ProbeAnswer, ProbeHandler
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

    async def serve(
        self, listen: str, handler: Handler, *, probe: ProbeHandler | None = None
    ) -> Listener:
        """Accept exchanges on ``listen``, each handed to ``handler``; answer probes with ``probe``."""
        ...

    async def connect(
        self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
    ) -> FrameStream:
        """Open an exchange stream to ``address`` (``LinkError`` if unreachable).

        ``expect_id``: the node id the caller means to reach, when it knows it; under
        mTLS the link is refused unless the server's certificate names it."""
        ...

    async def probe(
        self, address: str, *, source: str, target: str = "", timeout_s: float
    ) -> ProbeAnswer:
        """Probe ``address`` (directly, or ``target`` through it); never raises."""
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
        services: more gRPC services served beside the mesh's (the change
            feed: :func:`syncfw.transport.feed.feed_service`).
    """

    def __init__(
        self,
        config: TransportConfig | None = None,
        *,
        metrics: NodeMetrics | None = None,
        services: Sequence[Any] = (),
    ) -> None:
        self.config = config or TransportConfig()
        self.metrics = metrics
        self.pool = ChannelPool(self.config, metrics=metrics)
        self.services = tuple(services)
        self._artifacts = ArtifactSlot()
        self.services += (artifact_service(self._artifacts, self.config, metrics),)

    async def serve(
        self, listen: str, handler: Handler, *, probe: ProbeHandler | None = None
    ) -> GrpcServer:
        """Start a gRPC server on ``listen``."""
        return await GrpcServer.start(
            listen, handler, config=self.config, metrics=self.metrics, probe=probe,
            services=self.services,
        )

    async def probe(
        self, address: str, *, source: str, target: str = "", timeout_s: float
    ) -> ProbeAnswer:
        """``syncfw.v1.Sync/Probe`` on the pooled channel to ``address``."""
        return await self.pool.probe(address, target=target, timeout_s=timeout_s)

    async def connect(
        self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
    ) -> FrameStream:
        """Open an Exchange call on the pooled channel to ``address``, bound to
        ``expect_id`` when given (see :meth:`ChannelPool.open`)."""
        return await self.pool.open(address, timeout_s=timeout_s, expect_id=expect_id)

    async def forget(self, address: str) -> None:
        """Close the pooled channel to ``address``."""
        await self.pool.drop(address)

    @property
    def artifacts(self) -> ArtifactSlot:
        """The slot this network's server serves ``syncfw.v1.Artifacts/Fetch`` from."""
        return self._artifacts

    async def fetch(
        self,
        address: str,
        hashes: Sequence[bytes],
        *,
        source: str,
        node_id: str,
        timeout_s: float,
    ) -> AsyncIterator[ChunkPiece]:
        """``syncfw.v1.Artifacts/Fetch`` on the pooled channel to ``address`` (same identity
        binding as an exchange)."""
        _, san = await self.pool.identity(address, timeout_s=timeout_s)
        async for piece in grpc_fetch(
            self.pool.channel(address, san), address, hashes, node_id=node_id, timeout_s=timeout_s
        ):
            yield piece

    async def aclose(self) -> None:
        """Close every pooled channel."""
        await self.pool.aclose()


# probe handlers of in-memory listeners, per shared network (each node has its own adapter)
_MEMORY_PROBES: weakref.WeakKeyDictionary[MemoryNetwork, dict[str, ProbeHandler]] = (
    weakref.WeakKeyDictionary()
)


class _MemoryListener:
    def __init__(self, net: MemoryNetwork, address: str) -> None:
        self._net = net
        self._address = address

    @property
    def address(self) -> str:
        return self._address

    async def aclose(self) -> None:
        self._net.unlisten(self._address)
        _MEMORY_PROBES.get(self._net, {}).pop(self._address, None)
        memory_unlisten(self._net, self._address)


class InMemoryNetwork:
    """The mesh over a shared :class:`MemoryNetwork` (tests, the simulator, examples)."""

    def __init__(self, net: MemoryNetwork) -> None:
        self.net = net
        self._artifacts = ArtifactSlot()

    async def serve(
        self, listen: str, handler: Handler, *, probe: ProbeHandler | None = None
    ) -> _MemoryListener:
        """Listen under the name ``listen``."""
        self.net.listen(listen, handler)
        if probe is not None:
            _MEMORY_PROBES.setdefault(self.net, {})[listen] = probe
        memory_listen(self.net, listen, self._artifacts)
        return _MemoryListener(self.net, listen)

    async def probe(
        self, address: str, *, source: str, target: str = "", timeout_s: float
    ) -> ProbeAnswer:
        """Probe a listener of the shared network; partitions and unlistened names fail it."""
        if (
            address not in self.net._listeners  # the adapter of this very network
            or frozenset((source, address)) in self.net.blocked
        ):
            return ProbeAnswer(False, "", f"{address} is unreachable")
        handler = _MEMORY_PROBES.get(self.net, {}).get(address)
        if handler is None:
            return ProbeAnswer(not target, "", "the peer does not serve Probe")
        return await handler(target, timeout_s / 2 if target else 0.0)

    async def connect(
        self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
    ) -> FrameStream:
        """Open an in-memory pipe to ``address`` (no certificates: ``expect_id`` unused)."""
        return await self.net.connect(address, source=source)

    async def forget(self, address: str) -> None:
        """Nothing is cached."""

    @property
    def artifacts(self) -> ArtifactSlot:
        """The slot this adapter's listeners serve fetches from."""
        return self._artifacts

    async def fetch(
        self,
        address: str,
        hashes: Sequence[bytes],
        *,
        source: str,
        node_id: str,
        timeout_s: float,
    ) -> AsyncIterator[ChunkPiece]:
        """A fetch from a listener of the shared network (partitions cut it; the
        caller bounds how long it waits for each piece)."""
        async for piece in memory_fetch(self.net, address, hashes, source=source, node_id=node_id):
            yield piece

    async def aclose(self) -> None:
        """Nothing to release (the shared network outlives one node)."""
