"""What the dashboard's tests share (no tests here): a small real fleet on loopback gRPC behind
egress proxies (so a node can be cut off), an aggregator with its dashboard, and a raw HTTP/1.1
client that can send what a polite client would not (huge heads, odd methods)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncfw import Fleet, Node
from syncfw.cloud import Aggregator, AggregatorConfig
from syncfw.cloud.web import Dashboard, DashboardConfig
from syncfw.keys import result_key
from syncfw.mesh import MeshConfig
from syncfw.testing.partition import EgressProxy, Partition
from syncfw.transport.network import GrpcNetwork
from syncfw.transport.rpc import TransportConfig

__all__ = ["FLEET", "MESH", "EventReader", "Reply", "WebFleet", "http", "results", "web_fleet"]

FLEET = Fleet(fleet_id="web-fleet", authority="cloud")
MESH = MeshConfig.test().with_(probe_timeout_s=2.0, dead_after_s=5.0, connect_timeout_s=2.0)
"""Failure detection that a loaded two-core machine (a browser starting) does not trip."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def http(address: str, target: str, *, method: str = "GET",
               headers: dict[str, str] | None = None, raw_head: bytes | None = None,
               body: bytes = b"") -> Reply:
    """One request on a fresh connection (``Connection: close``); the whole answer."""
    r, w = await asyncio.open_connection(*_split_address(address))
    try:
        if raw_head is None:
            lines = [f"{method} {target} HTTP/1.1", f"Host: {address}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if body:
                lines.append(f"Content-Length: {len(body)}")
            raw_head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        w.write(raw_head + body)
        await w.drain()
        async with asyncio.timeout(15):
            data = await r.read()
    finally:
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip()
            for k, _, v in (h.partition(":") for h in header_lines)}
    return Reply(int(status_line.split()[1]), hdrs, rest)


class EventReader:
    """A raw server-sent events client of ``/api/v1/events`` (chunked HTTP/1.1)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self._buf = b""
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> EventReader:
        self._r, self._w = await asyncio.open_connection(*_split_address(self.address))
        self._w.write(f"GET /api/v1/events HTTP/1.1\r\nHost: {self.address}\r\n"
                      "Accept: text/event-stream\r\n\r\n".encode())
        await self._w.drain()
        head = await self._r.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").strip().split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip()
                        for k, _, v in (h.partition(":") for h in lines)}
        if "content-length" in self.headers:
            self.body = await self._r.readexactly(int(self.headers["content-length"]))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._w is not None:
            self._w.close()
            with contextlib.suppress(OSError):
                await self._w.wait_closed()

    async def _chunk(self) -> bytes:
        assert self._r is not None
        size = int((await self._r.readline()).strip() or b"0", 16)
        if size == 0:
            raise EOFError("the stream ended")
        data = await self._r.readexactly(size)
        await self._r.readexactly(2)
        return data

    async def next(self, timeout_s: float = 10.0) -> tuple[str, Any]:
        """The next event as ``(kind, data)``; comments (keepalives) as ``("", text)``."""
        async with asyncio.timeout(timeout_s):
            while b"\n\n" not in self._buf:
                self._buf += await self._chunk()
        block, _, self._buf = self._buf.partition(b"\n\n")
        text = block.decode()
        if text.startswith(":"):
            return "", text[1:].strip()
        fields = dict(line.split(": ", 1) for line in text.split("\n"))
        return fields["event"], json.loads(fields["data"])

    async def until(self, kind: str, timeout_s: float = 10.0) -> Any:
        """The data of the next event of ``kind`` (others passed over)."""
        async with asyncio.timeout(timeout_s):
            while True:
                k, data = await self.next(timeout_s)
                if k == kind:
                    return data


@dataclass
class WebFleet:
    agg: Aggregator
    dash: Dashboard
    edges: dict[str, Node]
    partition: Partition
    proxies: list[EgressProxy] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.dash.address


async def results(node: Node, latencies: list[float], start: int = 0) -> None:
    """Inference results of ``node`` with these total latencies (ms)."""
    await node.put_many([
        (result_key(node.node_id, "det", f"r{start + i}"),
         {"model": {"name": "det", "version": "2"}, "label": "ok", "confidence": 0.9,
          "latency_ms": {"total": ms}})
        for i, ms in enumerate(latencies)
    ])


@asynccontextmanager
async def web_fleet(tmp: Path, names: tuple[str, ...] = ("t1", "t2"),
                    config: DashboardConfig | None = None,
                    mesh: MeshConfig | None = None) -> AsyncIterator[WebFleet]:
    """An aggregator with its dashboard and edges ``names``, each dialing through its own
    egress proxy (``partition.split`` cuts a node off), all on loopback gRPC (``mesh``:
    :data:`MESH` by default)."""
    partition = Partition()
    proxies: list[EgressProxy] = []

    async def proxy(name: str) -> TransportConfig:
        p = await EgressProxy(name, partition).start()
        proxies.append(p)
        return TransportConfig(http_proxy=p.url, connect_timeout_s=1.0)

    mcfg = mesh or MESH
    agg = await Aggregator.open(tmp / "cloud.db", fleet=FLEET,
                                config=dataclasses.replace(AggregatorConfig.test(), mesh=mcfg))
    edges: dict[str, Node] = {}
    dash: Dashboard | None = None
    try:
        served = await agg.serve("127.0.0.1:0", network=GrpcNetwork(
            mcfg.transport(await proxy("cloud")), metrics=agg.node.metrics,
            services=[agg.feed.service()]))
        partition.owners[served.address] = "cloud"
        for name in names:
            node = edges[name] = await Node.open(tmp / f"{name}.db", node_id=name, fleet=FLEET)
            m = await node.serve("127.0.0.1:0", [served.address], config=mcfg, network=GrpcNetwork(
                mcfg.transport(await proxy(name)), metrics=node.metrics))
            partition.owners[m.address] = name
        dash = await Dashboard.start(agg, "127.0.0.1:0", config or DashboardConfig.test())
        yield WebFleet(agg, dash, edges, partition, proxies)
    finally:
        if dash is not None:
            await dash.aclose()
        for node in edges.values():
            await node.close()
        await agg.aclose()
        for p in proxies:
            await p.aclose()
        await _proxy_handlers_done()


async def _proxy_handlers_done() -> None:
    """Let the proxies' connection handlers end (a dial caught mid-way by the closing nodes
    fails at once): left to the loop's teardown they would be cancelled holding a socket."""
    handlers = [t for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "EgressProxy._handle"]
    if handlers:
        _, pending = await asyncio.wait(handlers, timeout=5)
        for t in pending:
            t.cancel()
