"""The node's admin endpoint on bad input, and the status file's slower digest."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from syncfw import Fleet, Grant, Node
from syncfw.cli.node_cmd import StatusWriter
from syncfw.mesh import Mesh, MeshConfig
from syncfw.node.admin import MAX_CONCURRENT, AdminServer, live_status

FLEET = Fleet(fleet_id="adm", grants=(Grant.of("site/", "*"),))


async def _http(address: str, raw: bytes) -> tuple[int, dict[str, object]]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            reply = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):  # refused early: the rest was not read
            await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post(path: str, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def test_the_admin_endpoint_refuses_bad_requests_clearly_and_keeps_serving(
    tmp_path: Path,
) -> None:
    async with Node.open(tmp_path / "a.db", node_id="a", fleet=FLEET) as node:
        admin = await AdminServer.start(node, "127.0.0.1:0")
        try:
            addr = admin.address
            status, body = await _http(addr, _post("/v1/put", b"{not json"))
            assert status == 400 and "not JSON" in str(body["message"])
            status, body = await _http(addr, _post("/v1/put", b"[1, 2]"))
            assert status == 400 and "JSON object" in str(body["message"])
            status, body = await _http(addr, _post("/v1/put", b'{"key": "site/k"}'))
            assert status == 400 and "value" in str(body["message"])
            status, body = await _http(addr, _post("/v1/put", b'{"key": "fleet/b/k", "value": 1}'))
            assert (status, body["error"]) == (403, "ZoneOwnershipError")
            big = json.dumps({"key": "site/big", "value": "x" * 1_500_000}).encode()
            status, body = await _http(addr, _post("/v1/put", big))
            assert (status, body["error"]) == (400, "ValueTooLargeError")
            status, body = await _http(addr, _post("/v1/put", b"x" * (3 * 1024 * 1024)))
            assert status == 413
            status, body = await _http(
                addr, b"GET /v1/get?key=" + b"k" * 20_000 + b" HTTP/1.1\r\n\r\n"
            )
            assert status == 413
            status, body = await _http(addr, b"GET /v1/nothing HTTP/1.1\r\n\r\n")
            assert status == 404
            status, body = await _http(addr, b"POST /v1/status HTTP/1.1\r\n\r\n")
            assert status == 405
            status, body = await _http(addr, b"GET /v1/get HTTP/1.1\r\n\r\n")
            assert status == 400 and "key=" in str(body["message"])
            status, body = await _http(addr, b"GET /v1/scan?limit=0 HTTP/1.1\r\n\r\n")
            assert status == 400
            status, body = await _http(addr, b"garbage\r\n\r\n")
            assert status == 400
            # nothing was written by any of that, and it still serves
            assert await node.scan("") == {}
            status, body = await _http(
                addr, _post("/v1/put", b'{"key": "site/k", "value": [1, "a"]}')
            )
            assert status == 200 and body["seq"] == 1
            status, body = await _http(addr, b"GET /v1/get?key=site/k HTTP/1.1\r\n\r\n")
            assert (status, body["found"], body["value"]) == (200, True, [1, "a"])
            status, body = await _http(addr, _post("/v1/delete", b'{"key": "site/k"}'))
            assert status == 200
            status, body = await _http(addr, b"GET /v1/get?key=site/k HTTP/1.1\r\n\r\n")
            assert body["found"] is False
        finally:
            await admin.aclose()


async def test_slow_clients_beyond_the_limit_are_answered_busy(tmp_path: Path) -> None:
    async with Node.open(tmp_path / "a.db", node_id="a", fleet=FLEET) as node:
        admin = await AdminServer.start(node, "127.0.0.1:0")
        host, port = admin.address.rsplit(":", 1)
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(MAX_CONCURRENT)]
        try:
            await asyncio.sleep(0.1)  # let the server take them (they send nothing)
            status, body = await _http(admin.address, b"GET /v1/status HTTP/1.1\r\n\r\n")
            assert status == 503
        finally:
            for _, w in idle:
                w.close()
        async with asyncio.timeout(10):
            while True:  # the slots free as the idle clients go
                status, body = await _http(admin.address, b"GET /v1/status HTTP/1.1\r\n\r\n")
                if status == 200:
                    break
                await asyncio.sleep(0.05)
        assert body["node_id"] == "a"
        await admin.aclose()


async def test_the_status_file_recomputes_the_digest_only_when_due_and_says_so(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.json"
    async with Node.open(tmp_path / "a.db", node_id="a", fleet=FLEET) as node:
        mesh = await Mesh.start(node, listen=None, config=MeshConfig.test(), run_loop=False)
        try:
            writer = StatusWriter(path, node, mesh, digest_every=3600)
            await writer.write()
            first = json.loads(path.read_text())
            assert first["state_digest"] == await node.state_digest()
            assert first["state_digest_current"] is True and first["written_at"] > 0
            await node.put("site/k", 1)
            await writer.write()
            second = json.loads(path.read_text())
            assert second["state_digest"] == first["state_digest"]  # not due yet
            assert second["state_digest_current"] is False
            assert second["state_digest_at"] == first["state_digest_at"]
            assert second["written_at"] >= first["written_at"]
            writer.digest_every = 0
            await writer.write()
            third = json.loads(path.read_text())
            assert third["state_digest"] == await node.state_digest() != first["state_digest"]
            assert third["state_digest_current"] is True
            snap = await live_status(node, mesh)
            assert snap["source"] == "node" and snap["version_vector"] == {"a": 1}
        finally:
            await mesh.aclose()
