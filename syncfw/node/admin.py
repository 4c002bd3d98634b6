"""A node's operator view: one status snapshot, and a small local HTTP endpoint serving it.

The snapshot answers "how is this node doing with its peers": each peer's
state and last contact (from the mesh), its lag in ops and in seconds (from
what it acknowledged), the pending and rejected counts and the clock offsets.
:func:`live_status` reads it from a running node; :func:`file_status` reads
the same shape from a node's SQLite file, read-only, without its lock (peer
states and clock offsets are then unknown: only a running node has them).

Invariants:

1. The endpoint binds where it is told; the CLI allows only loopback unless
   asked (it can write to the node). It is HTTP/1.1 with JSON bodies and one
   request per connection, bounded: a request head of 16 KiB, a body of
   2 MiB, 10 s to send the request, at most 16 requests at once (more are
   answered 503 at once).
2. Every answer is a JSON object; an error is ``{"error": <class>, "message": ...}``
   with a 4xx/5xx status, never a traceback. Errors of syncfw (a zone not
   owned, a value too large) are the caller's: 4xx; the rest are 500 and logged.
3. Values cross as JSON; bytes (which JSON cannot carry) as ``{"$bytes": <base64>}``,
   both ways.
4. A peer's lag in seconds is the age, by this node's wall clock, of the oldest
   op this node holds and the peer has not acknowledged (0 when it has all);
   its lag in ops is the count of such ops.

May import: the node and everything below it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import aiosqlite

from syncfw.clock import hlc_physical, wall_ms
from syncfw.errors import StorageError, SyncfwError, ZoneError
from syncfw.log import VersionVector
from syncfw.metrics import PEER_SOURCE
from syncfw.store.inspect import inspect_store

if TYPE_CHECKING:
    from syncfw.mesh import Mesh
    from syncfw.node.node import Node

__all__ = [
    "AdminServer",
    "file_status",
    "from_json",
    "live_status",
    "peer_lags",
    "to_json",
]

log = logging.getLogger("syncfw.node.admin")

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 2 * 1024 * 1024
REQUEST_TIMEOUT_S = 10.0
MAX_CONCURRENT = 16
SCAN_LIMIT = 1000
LINGER_S = 1.0
LINGER_BYTES = 8 * 1024 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


# -- values as JSON (invariant 3) ------------------------------------------------------


def to_json(value: Any) -> Any:
    """``value`` with bytes made JSON-safe (``{"$bytes": base64}``), recursively."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"} and isinstance(value["$bytes"], str):
            return base64.b64decode(value["$bytes"], validate=True)
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


# -- the snapshot --------------------------------------------------------------------


def _ro_uri(path: str) -> str:
    return "file:" + Path(path).resolve().as_posix() + "?mode=ro"


async def peer_lags(
    conn: aiosqlite.Connection,
    ours: Mapping[str, int],
    acks: Mapping[str, Mapping[str, int]],
    now_ms: int,
) -> dict[str, tuple[int, float]]:
    """Each peer's lag as ``(ops, seconds)`` (invariant 4).

    One indexed lookup per origin a peer lacks: within an origin, timestamps
    rise with seq, so the op after the acknowledged one is the origin's
    oldest the peer lacks.
    """
    out: dict[str, tuple[int, float]] = {}
    for peer, acked in acks.items():
        missing = [(o, acked.get(o, 0) + 1) for o, seq in ours.items() if seq > acked.get(o, 0)]
        n_ops = sum(seq - acked.get(o, 0) for o, seq in ours.items() if seq > acked.get(o, 0))
        oldest: int | None = None
        for i in range(0, len(missing), 400):  # SQLite's bound-parameter limit
            chunk = missing[i : i + 400]
            rows = await conn.execute_fetchall(
                "SELECT min(hlc) FROM ops WHERE (origin, seq) IN (VALUES "
                + ", ".join("(?, ?)" for _ in chunk)
                + ")",
                [x for pair in chunk for x in pair],
            )
            got = next(iter(rows))[0] if rows else None
            if got is not None and (oldest is None or got < oldest):
                oldest = got
        # A lacked op already compacted away cannot be: compaction waits for every peer.
        seconds = 0.0 if oldest is None else max(0.0, (now_ms - hlc_physical(oldest)) / 1000.0)
        out[peer] = (n_ops, round(seconds, 3))
    return out


def _clock(figures: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """The node's own clock offsets by source, and each peer's, from the metric."""
    own: dict[str, float] = {}
    peers: dict[str, float] = {}
    for source, ms in dict(figures.get("clock_offset_ms", {})).items():
        if str(source).startswith(PEER_SOURCE):
            peers[str(source)[len(PEER_SOURCE) :]] = ms
        else:
            own[str(source)] = ms
    return own, peers


def _stamp(now: float) -> dict[str, Any]:
    return {
        "time": round(now, 3),
        "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    }


async def live_status(node: Node, mesh: Mesh | None = None) -> dict[str, Any]:
    """The operator snapshot of a running node (see the module docstring)."""
    now = time.time()
    st = await node.status()
    ours = await node.version_vector()
    acks = await node.store.peer_acks()
    async with aiosqlite.connect(_ro_uri(node.store.path), uri=True) as conn:
        lags = await peer_lags(conn, ours, acks, node.wall_ms())
    own_clock, peer_clock = _clock(st["metrics"])
    mono = time.monotonic()
    peers: list[dict[str, Any]] = []
    seen: set[str] = set()
    for m in mesh.members() if mesh is not None else []:
        seen.add(m.node_id)
        lag = lags.get(m.node_id) if m.node_id else None
        peers.append(
            {
                "node_id": m.node_id or None,
                "address": m.address,
                "state": m.state.value,
                "failures": m.failures,
                "last_contact": None if m.last_ok is None else round(now - (mono - m.last_ok), 3),
                "last_contact_ago_s": None if m.last_ok is None else round(mono - m.last_ok, 3),
                "lag_ops": None if lag is None else lag[0],
                "lag_s": None if lag is None else lag[1],
                "clock_offset_ms": peer_clock.get(m.node_id),
            }
        )
    for peer, (n_ops, seconds) in sorted(lags.items()):
        if peer not in seen:  # acknowledged once, not in the member table now
            peers.append(
                {
                    "node_id": peer,
                    "address": None,
                    "state": "not a member",
                    "failures": None,
                    "last_contact": None,
                    "last_contact_ago_s": None,
                    "lag_ops": n_ops,
                    "lag_s": seconds,
                    "clock_offset_ms": peer_clock.get(peer),
                }
            )
    return {
        "source": "node",
        **_stamp(now),
        "node_id": node.node_id,
        "fleet_id": node.fleet_id,
        "address": mesh.address if mesh is not None else None,
        "hlc": st["hlc"],
        "version_vector": dict(ours),
        "ops": st["ops"],
        "keys": st["keys"],
        "pending": st["pending"],
        "pending_by_reason": st["pending_by_reason"],
        "rejected": st["rejected"],
        "discarded": st["discarded"],
        "clock_offset_ms": own_clock,
        "peers": peers,
        # the model side's entries (chunk store, fetches, each lifecycle), for ``syncfw model``
        "models": {
            k: v
            for k, v in st.items()
            if k in ("artifacts", "models") or k.startswith("model_lifecycle:")
        },
    }


async def file_status(path: str | Path) -> dict[str, Any]:
    """The operator snapshot read from a node's file, read-only (no lock taken).

    Raises:
        StorageError: the file does not exist or cannot be opened.
        CorruptDatabaseError, ForeignDatabaseError, SchemaVersionError: as at open.
    """
    now = time.time()
    info = await inspect_store(path, rejected_limit=0)
    ours: VersionVector = info["version_vector"]
    acks: dict[str, dict[str, int]] = info["peers"]
    try:
        async with aiosqlite.connect(_ro_uri(str(path)), uri=True) as conn:
            lags = await peer_lags(conn, ours, acks, wall_ms())
            reasons: dict[str, int] = dict(
                await conn.execute_fetchall(  # type: ignore[arg-type]
                    "SELECT reason, count(*) FROM pending GROUP BY reason ORDER BY reason"
                )
            )
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read {str(path)!r}: {exc}") from None
    counts = info["counts"]
    return {
        "source": "file",
        **_stamp(now),
        "node_id": info["node_id"],
        "fleet_id": info["fleet_id"],
        "address": None,
        "hlc": info["hlc"]["value"],
        "version_vector": ours,
        "ops": counts["ops"],
        "keys": counts["state"],
        "pending": counts["pending"],
        "pending_by_reason": reasons,
        "rejected": counts["rejected"],
        "discarded": None,
        "clock_offset_ms": {},
        "peers": [
            {
                "node_id": peer,
                "address": None,
                "state": None,
                "failures": None,
                "last_contact": None,
                "last_contact_ago_s": None,
                "lag_ops": n,
                "lag_s": s,
                "clock_offset_ms": None,
            }
            for peer, (n, s) in sorted(lags.items())
        ],
    }


# -- the endpoint --------------------------------------------------------------------


class HttpError(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


Handler = Callable[[dict[str, list[str]], Any], Awaitable[dict[str, Any]]]


class AdminServer:
    """The node's admin endpoint: ``GET /v1/status``, ``GET /v1/get?key=``,
    ``GET /v1/scan?prefix=&limit=``, ``POST /v1/put`` and ``POST /v1/delete``
    (body ``{"key": ..., "value": ...}``). Start with :meth:`start`, stop with :meth:`aclose`."""

    def __init__(self, node: Node, mesh: Mesh | None, server: asyncio.Server) -> None:
        self.node = node
        self.mesh = mesh
        self._server = server
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        host, port = server.sockets[0].getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/status"): self._status,
            ("GET", "/v1/get"): self._get,
            ("GET", "/v1/scan"): self._scan,
            ("POST", "/v1/put"): self._put,
            ("POST", "/v1/delete"): self._delete,
        }

    @classmethod
    async def start(cls, node: Node, address: str, mesh: Mesh | None = None) -> AdminServer:
        """Serve on ``address`` (``host:port``; port 0: any free one; see ``.address``).

        Raises:
            ValueError: ``address`` is not ``host:port``.
            OSError: it cannot be bound.
        """
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"admin address must be host:port, not {address!r}")
        holder: list[AdminServer] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0]._serve(reader, writer)

        server = await asyncio.start_server(
            handle, host.strip("[]") or "127.0.0.1", int(port), limit=MAX_HEAD_BYTES
        )
        holder.append(cls(node, mesh, server))
        log.info("%s serves its admin endpoint on http://%s", node.node_id, holder[0].address)
        return holder[0]

    async def aclose(self) -> None:
        """Stop serving (idempotent)."""
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._slots.locked():
                await self._reply(
                    writer, 503, {"error": "Busy", "message": "too many requests at once"}
                )
                await _linger(reader, writer)
                return
            async with self._slots:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        method, target, body = await _read_request(reader)
                    status, answer = 200, await self._dispatch(method, target, body)
                except HttpError as exc:
                    status, answer = exc.status, {"error": exc.error, "message": exc.message}
                except TimeoutError:
                    status, answer = (
                        400,
                        {"error": "Timeout", "message": "request not sent in time"},
                    )
                await self._reply(writer, status, answer)
                if status != 200:
                    await _linger(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, method: str, target: str, body: bytes) -> dict[str, Any]:
        parts = urlsplit(target)
        route = self._routes.get((method, parts.path))
        if route is None:
            if any(path == parts.path for _, path in self._routes):
                raise HttpError(405, "MethodNotAllowed", f"{method} {parts.path}")
            raise HttpError(404, "NotFound", f"no such endpoint {parts.path!r}")
        payload: Any = None
        if method == "POST":
            try:
                payload = from_json(json.loads(body or b"null"))
            except ValueError as exc:
                raise HttpError(400, "BadRequest", f"the body is not JSON: {exc}") from None
            if not isinstance(payload, dict):
                raise HttpError(400, "BadRequest", "the body must be a JSON object")
        try:
            return await route(parse_qs(parts.query), payload)
        except HttpError:
            raise
        except ZoneError as exc:
            raise HttpError(403, type(exc).__name__, str(exc)) from None
        except (SyncfwError, ValueError, TypeError) as exc:
            raise HttpError(400, type(exc).__name__, str(exc)) from None
        except Exception as exc:  # invariant 2: logged here, a 500 there
            log.exception("admin request %s %s failed", method, parts.path)
            raise HttpError(500, type(exc).__name__, str(exc)) from None

    async def _reply(
        self, writer: asyncio.StreamWriter, status: int, answer: dict[str, Any]
    ) -> None:
        body = json.dumps(to_json(answer), default=str).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()

    # -- routes

    async def _status(self, query: dict[str, list[str]], _: Any) -> dict[str, Any]:
        return await live_status(self.node, self.mesh)

    async def _get(self, query: dict[str, list[str]], _: Any) -> dict[str, Any]:
        key = _one(query, "key")
        missing = object()
        value = await self.node.get(key, missing)
        found = value is not missing
        return {"key": key, "found": found, "value": value if found else None}

    async def _scan(self, query: dict[str, list[str]], _: Any) -> dict[str, Any]:
        prefix = _one(query, "prefix", "")
        limit_text = _one(query, "limit", str(SCAN_LIMIT))
        if not limit_text.isdigit() or int(limit_text) < 1:
            raise HttpError(
                400, "BadRequest", f"limit must be a whole number >= 1, not {limit_text!r}"
            )
        limit = int(limit_text)
        items = sorted((await self.node.scan(prefix)).items())
        return {
            "prefix": prefix,
            "items": [[k, v] for k, v in items[:limit]],
            "more": len(items) > limit,
        }

    async def _put(self, _: dict[str, list[str]], body: dict[str, Any]) -> dict[str, Any]:
        if "key" not in body or "value" not in body:
            raise HttpError(400, "BadRequest", 'the body must be {"key": ..., "value": ...}')
        op = await self.node.put(_key(body["key"]), body["value"])
        return {"key": op.key, "origin": op.origin, "seq": op.seq, "hlc": op.hlc}

    async def _delete(self, _: dict[str, list[str]], body: dict[str, Any]) -> dict[str, Any]:
        op = await self.node.delete(_key(body.get("key")))
        return {"key": op.key, "origin": op.origin, "seq": op.seq, "hlc": op.hlc}


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After refusing a request early, read what the client still sends (bounded in
    bytes and time) so closing does not reset the connection before it read the answer."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            left = LINGER_BYTES
            while left > 0 and (chunk := await reader.read(65536)):
                left -= len(chunk)


def _key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise HttpError(400, "BadRequest", "key must be a non-empty string")
    return key


def _one(query: dict[str, list[str]], name: str, default: str | None = None) -> str:
    got = query.get(name)
    if not got:
        if default is None:
            raise HttpError(400, "BadRequest", f"the query needs {name}=...")
        return default
    return got[0]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(413, "TooLarge", f"request head over {MAX_HEAD_BYTES} bytes") from None
    if len(head) > MAX_HEAD_BYTES:
        raise HttpError(413, "TooLarge", f"request head over {MAX_HEAD_BYTES} bytes")
    lines = head.decode("latin-1").split("\r\n")
    request = lines[0].split()
    if len(request) != 3 or not request[2].startswith("HTTP/"):
        raise HttpError(400, "BadRequest", "not an HTTP request")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                raise HttpError(400, "BadRequest", "bad Content-Length")
            length = int(value.strip())
    if length > MAX_BODY_BYTES:
        raise HttpError(413, "TooLarge", f"body over {MAX_BODY_BYTES} bytes")
    body = await reader.readexactly(length) if length else b""
    return request[0].upper(), request[1], body
