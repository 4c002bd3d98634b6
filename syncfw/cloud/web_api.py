"""The dashboard's HTTP API and page as one Starlette app (documented in ``docs/dashboard.md``).

Routes (all ``GET``; ``HEAD`` too):

- ``/`` the page; ``/static/{name}`` its script and style sheet (no CDN);
- ``/api/v1`` what is served here (the routes, the limits);
- ``/api/v1/fleet`` the fleet view (``?state=S`` repeatable, ``?prefix=P``);
- ``/api/v1/nodes/{node_id}`` one node's entry of the view;
- ``/api/v1/nodes/{node_id}/history`` its recent samples (``?points=N``);
- ``/api/v1/events`` server-sent events: ``snapshot``, ``delta``, ``sample``.

Invariants:

1. Every answer but the page, its assets and the event stream is a JSON
   object; every refusal is ``{"error": CODE, "message": TEXT, "status": N}``
   with a 4xx/5xx status (never a traceback, never HTML), counted in
   ``syncfw_dashboard_requests_total{route, code}`` and logged as a
   rate-limited WARNING.
2. Bounded before it is read: a request head over ``max_header_bytes`` is 431,
   a target (path and query) over ``max_target_bytes`` 414, an unknown query
   parameter, a repeated single one or a bad value 400, a node id outside
   :data:`syncfw.log.NODE_ID_RE` 400, an unknown node 404, a wrong method 405
   (with ``Allow``), a stream past ``max_streams`` 503.
3. Read-only: nothing here writes to the aggregator or its log.
4. An event stream costs a bounded queue (the view's :class:`ViewUpdates`)
   and at most one event per ``min_event_s``: deltas arriving in between are
   merged by node, a listener that fell a whole queue behind gets a fresh
   ``snapshot``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from syncfw.log import is_node_id
from syncfw.notices import Notices, clip

if TYPE_CHECKING:
    from syncfw.cloud.web import Dashboard

__all__ = ["API_VERSION", "STATES", "ApiError", "build_app", "dumps"]

API_VERSION = 1
"""Bumped when a route or a field of its answer changes meaning or goes away."""
STATES = ("alive", "suspect", "dead", "not a member")
"""The liveness states a node entry may have (``?state=`` takes these)."""

log = logging.getLogger("syncfw.cloud.web")

_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class ApiError(Exception):
    """A refusal: answered as the JSON error object of invariant 1."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _jsonable(value: Any) -> Any:
    # The view holds values edges wrote: bytes and non-finite floats have no JSON form.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """``value`` as strict JSON (bytes as ``{"$bytes": base64}``, NaN and inf as null)."""
    return json.dumps(_jsonable(value), allow_nan=False, separators=(",", ":")).encode()


def _json(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(value), status, headers={"Cache-Control": "no-store", **(headers or {})},
                    media_type="application/json")


def _error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message, "status": status}


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request",
               413: "body_too_large"}


# -- query parameters ----------------------------------------------------------------


def _params(request: Request, allowed: Mapping[str, bool]) -> dict[str, list[str]]:
    """The query's parameters, each known (``allowed``: name -> may repeat)."""
    out: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, "bad_query", f"unknown query parameter {clip(name)} "
                           f"(this route takes: {names})")
        out.setdefault(name, []).append(value)
        if len(out[name]) > 1 and not allowed[name]:
            raise ApiError(400, "bad_query", f"query parameter {name!r} given more than once")
    return out


def _int_param(values: list[str] | None, name: str, lo: int, hi: int, default: int) -> int:
    if not values:
        return default
    text = values[0].strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9 or not lo <= int(text) <= hi:
        raise ApiError(400, "bad_query", f"{name} must be an integer from {lo} to {hi}, "
                       f"not {clip(values[0])}")
    return int(text)


def _node_id(request: Request) -> str:
    node_id = str(request.path_params["node_id"])
    if not is_node_id(node_id):
        raise ApiError(400, "bad_node_id", f"not a node id: {clip(node_id)} (letters, digits "
                       "and . _ : @ + -, at most 256 characters, starting with a letter or digit)")
    return node_id


# -- the routes ----------------------------------------------------------------------


@dataclass(slots=True)
class _Routes:
    dash: Dashboard

    async def page(self, request: Request) -> Response:
        _params(request, {})
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    async def static(self, request: Request) -> Response:
        _params(request, {})
        name = str(request.path_params["name"])
        if name not in _ASSETS:
            raise ApiError(404, "not_found", f"no asset {clip(name)} (there are: "
                           f"{', '.join(sorted(_ASSETS))})")
        return Response(_asset(name), media_type=f"{_ASSETS[name]}; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})

    async def index(self, request: Request) -> Response:
        _params(request, {})
        c = self.dash.config
        return _json({
            "api_version": API_VERSION,
            "aggregator": self.dash.aggregator.node.node_id,
            "routes": {
                "/api/v1/fleet": "the fleet view (?state=S repeatable, ?prefix=P)",
                "/api/v1/nodes/{node_id}": "one node's entry of the view",
                "/api/v1/nodes/{node_id}/history": f"its recent samples (?points=1..{c.history_points})",
                "/api/v1/events": "server-sent events: snapshot, delta, sample",
            },
            "limits": {
                "max_header_bytes": c.max_header_bytes,
                "max_target_bytes": c.max_target_bytes,
                "max_streams": c.max_streams,
                "min_event_s": c.min_event_s,
                "sample_s": c.sample_s,
                "history_points": c.history_points,
                "history_nodes": c.history_nodes,
            },
        })

    async def fleet(self, request: Request) -> Response:
        q = _params(request, {"state": True, "prefix": False})
        states = q.get("state", [])
        for s in states:
            if s not in STATES:
                raise ApiError(400, "bad_query", f"state must be one of {', '.join(STATES)}, "
                               f"not {clip(s)}")
        prefix = (q.get("prefix") or [""])[0]
        if len(prefix) > 256:
            raise ApiError(400, "bad_query", "prefix is longer than a node id (256 characters)")
        view = self.dash.aggregator.view()
        if states or prefix:
            view["nodes"] = {
                n: e for n, e in view["nodes"].items()
                if n.startswith(prefix) and (not states or e["state"] in states)
            }
        view["api_version"] = API_VERSION
        return _json(view)

    async def node(self, request: Request) -> Response:
        _params(request, {})
        node_id = _node_id(request)
        entry = self.dash.aggregator.view()["nodes"].get(node_id)
        if entry is None:
            raise ApiError(404, "unknown_node", f"the fleet view has no node {clip(node_id)}")
        return _json(entry)

    async def history(self, request: Request) -> Response:
        q = _params(request, {"points": False})
        node_id = _node_id(request)
        c = self.dash.config
        n = _int_param(q.get("points"), "points", 1, c.history_points, c.history_points)
        h = self.dash.history
        if not h.has(node_id):
            if node_id in h.untracked:
                raise ApiError(404, "untracked_node", f"node {clip(node_id)} is past the "
                               f"{h.max_nodes} nodes sampled (history_nodes)")
            if node_id not in self.dash.aggregator.view()["nodes"]:
                raise ApiError(404, "unknown_node", f"the fleet view has no node {clip(node_id)}")
        return _json({"node_id": node_id, "sample_s": c.sample_s,
                      "points": h.points_of(node_id, n)})

    async def events(self, request: Request) -> Response:
        _params(request, {})
        if request.method == "HEAD":  # the headers only: no stream to hold open
            return Response(media_type="text/event-stream",
                            headers={"Cache-Control": "no-store"})
        if self.dash.streams >= self.dash.config.max_streams:
            raise ApiError(503, "too_many_streams",
                           f"{self.dash.streams} event streams are open (max_streams)",
                           {"Retry-After": "5"})
        self.dash.stream_opened()  # taken here, so two requests at once cannot both pass
        return _EventStream(self.dash)


def _asset(name: str) -> bytes:
    return resources.files("syncfw.cloud").joinpath("static", name).read_bytes()


# -- the event stream ----------------------------------------------------------------


def _event(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"


class _EventStream(Response):
    """``text/event-stream`` of the view (invariant 4); ends when the client or the server goes."""

    def __init__(self, dash: Dashboard) -> None:
        super().__init__(media_type="text/event-stream")
        self.dash = dash

    def snapshot(self) -> bytes:
        d = self.dash
        return _event("snapshot", {
            "api_version": API_VERSION,
            "view": d.aggregator.view(),
            "history": d.history.all_points(d.config.chart_points),
            "sample_s": d.config.sample_s,
        })

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        d = self.dash  # its stream slot was taken by the route, and is given back below
        updates = d.aggregator.updates()
        tick = d.ticks()
        gone = asyncio.ensure_future(_disconnected(receive))
        delta: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(updates.__anext__())
        sample: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(tick.get())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),
            ]})
            await self._body(send, self.snapshot())
            await self._loop(send, updates, tick, gone, delta, sample)
            # the dashboard closes (or the client went): end the body properly
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went mid-write
        finally:
            for fut in (gone, delta, sample):
                fut.cancel()
            updates.close()
            d.unticks(tick)
            d.stream_closed()

    @staticmethod
    async def _body(send: Send, chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _loop(self, send: Send, updates: Any, tick: asyncio.Queue[dict[str, Any]],
                    gone: asyncio.Future[None], delta: asyncio.Future[dict[str, Any]],
                    sample: asyncio.Future[dict[str, Any]]) -> None:
        d = self.dash
        merged: dict[str, Any] = {}
        seq = 0
        reset = False
        last_sent = 0.0
        while True:
            wait_s = d.config.keepalive_s
            if merged or reset:
                wait_s = max(0.0, last_sent + d.config.min_event_s - time.monotonic())
            waited: set[asyncio.Future[Any]] = {gone, delta, sample, d.closing}
            done, _ = await asyncio.wait(waited, timeout=wait_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if gone in done or d.closing in done:
                return
            if delta in done:
                got = delta.result()
                seq = int(got.get("seq", seq))
                if got.get("reset"):
                    reset, merged = True, {}
                elif not reset:
                    merged.update(got.get("nodes", {}))
                delta = asyncio.ensure_future(updates.__anext__())
            if sample in done:
                await self._body(send, _event("sample", sample.result()))
                sample = asyncio.ensure_future(tick.get())
            now = time.monotonic()
            if (merged or reset) and now - last_sent >= d.config.min_event_s:
                if reset:
                    await self._body(send, self.snapshot())
                else:
                    await self._body(send, _event("delta", {"seq": seq, "nodes": merged}))
                merged, reset, last_sent = {}, False, now
            elif not done:
                await self._body(send, b": keepalive\n\n")


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# -- limits, errors and accounting ---------------------------------------------------


class _Guard:
    """Invariant 2's head limits, and every answer's status counted (invariant 1)."""

    def __init__(self, app: ASGIApp, dash: Dashboard, notices: Notices) -> None:
        self.app = app
        self.dash = dash
        self.notices = notices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        c = self.dash.config
        head = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if head > c.max_header_bytes:
            err = ApiError(431, "headers_too_large",
                           f"request headers of {head} bytes (at most {c.max_header_bytes})")
            await _send_error(err, scope, receive, counted)
        elif target > c.max_target_bytes:
            err = ApiError(414, "target_too_large",
                           f"request target of {target} bytes (at most {c.max_target_bytes})")
            await _send_error(err, scope, receive, counted)
        else:
            try:
                await self.app(scope, receive, counted)
            except Exception:
                # Starlette answered 500 and _on_crash logged it, then re-raised for the
                # server's sake: the answer is out, so the error ends here.
                if status[0] == 0:
                    raise
        route = _route_name(scope)
        self.dash.count(route, status[0])
        if status[0] >= 400:
            self.notices.warn(f"{route}:{status[0]}", 1, "dashboard: %s %s answered %d",
                              scope["method"], clip(scope.get("path", ""), 80), status[0])


def _route_name(scope: Scope) -> str:
    endpoint = scope.get("endpoint")
    name = getattr(endpoint, "__name__", None)
    return str(name) if name else "unmatched"


async def _send_error(err: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await _json(_error_body(err.status, err.code, err.message), err.status, err.headers)(
        scope, receive, send)


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _json(_error_body(exc.status, exc.code, exc.message), exc.status, exc.headers)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if "Allow" in headers:  # Starlette's order is a set's
        headers["Allow"] = ", ".join(sorted(m.strip() for m in headers["Allow"].split(",")))
    message = {
        404: f"no route {clip(request.url.path, 80)} (see /api/v1)",
        405: f"{request.method} is not allowed here (allowed: {headers.get('Allow', 'GET')})",
    }.get(exc.status_code, str(exc.detail))
    return _json(_error_body(exc.status_code, code, message), exc.status_code, headers)


async def _on_crash(request: Request, exc: Exception) -> Response:
    log.error("dashboard: %s %s failed", request.method, clip(request.url.path, 80),
              exc_info=exc)
    return _json(_error_body(500, "internal", f"{type(exc).__name__} (logged)"), 500)


def build_app(dash: Dashboard, notices: Notices | None = None) -> ASGIApp:
    """The dashboard's ASGI app, reading ``dash.aggregator`` and ``dash.history``."""
    r = _Routes(dash)
    get = ["GET"]
    routes = [
        Route("/", r.page, methods=get),
        Route("/static/{name}", r.static, methods=get),
        Route("/api/v1", r.index, methods=get),
        Route("/api/v1/fleet", r.fleet, methods=get),
        Route("/api/v1/nodes/{node_id}", r.node, methods=get),
        Route("/api/v1/nodes/{node_id}/history", r.history, methods=get),
        Route("/api/v1/events", r.events, methods=get),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Any]] = {
        ApiError: _on_api_error,
        HTTPException: _on_http_error,
        Exception: _on_crash,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    return _Guard(app, dash, notices or Notices(log, 10.0))

