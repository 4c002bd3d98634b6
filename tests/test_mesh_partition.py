"""The partition proxy: no byte crosses a cut, whenever its tunnel was made.

An echo server stands for a peer behind a node's :class:`EgressProxy`. The
demo once saw the cloud match the site mid-outage: a tunnel checked before
the cut and registered after it (while its upstream connected) was never
closed by the cut, and carried the outage's sync across.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from syncfw.testing.partition import EgressProxy, Partition

_open = asyncio.open_connection  # the test's own dials, whatever the proxy's are patched to


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


async def _connect(proxy: EgressProxy, target: str) -> tuple[bytes, Any, Any]:
    port = int(proxy.url.rsplit(":", 1)[1])
    r, w = await _open("127.0.0.1", port)
    w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    await w.drain()
    status = await asyncio.wait_for(r.readline(), 5)
    while (await asyncio.wait_for(r.readline(), 5)) not in (b"\r\n", b""):
        pass
    return status, r, w


async def _echoes(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes) -> bytes:
    w.write(data)
    await w.drain()
    try:
        return await asyncio.wait_for(r.read(len(data)), 2)
    except (OSError, TimeoutError):
        return b""


async def test_a_tunnel_the_cut_missed_carries_no_byte_across_it(echo: str) -> None:
    part = Partition(owners={echo: "b"})
    proxy = await EgressProxy("a", part).start()
    try:
        status, r, w = await _connect(proxy, echo)
        assert status.startswith(b"HTTP/1.1 200")
        assert await _echoes(r, w, b"before") == b"before"
        part.blocked.add(frozenset(("a", "b")))  # cut, without the proxy closing its tunnels
        assert await _echoes(r, w, b"during") == b""
        assert proxy.crossed == 1
        w.close()
    finally:
        await proxy.aclose()


async def test_a_cut_while_the_upstream_connects_refuses_the_tunnel(
    echo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = Partition(owners={echo: "b"})
    proxy = await EgressProxy("a", part).start()
    real = asyncio.open_connection
    cuts = 0

    async def connect_then_cut(*args: Any, **kw: Any) -> Any:
        nonlocal cuts
        got = await real(*args, **kw)
        cuts += 1
        part.split(["a"], ["b"])  # the cut lands after the check, before the tunnel is listed
        return got

    monkeypatch.setattr(asyncio, "open_connection", connect_then_cut)  # the proxy's too
    try:
        status, r, w = await _connect(proxy, echo)
        assert status.startswith(b"HTTP/1.1 403"), status
        assert cuts == 1  # the upstream was dialed: the first check had let it through
        assert proxy.refused == 1 and not proxy.tunnels
        w.close()
        monkeypatch.setattr(asyncio, "open_connection", real)
        part.heal()
        status, r, w = await _connect(proxy, echo)
        assert status.startswith(b"HTTP/1.1 200")
        assert await _echoes(r, w, b"healed") == b"healed"
        w.close()
    finally:
        await proxy.aclose()
