"""The aggregator's web dashboard: :class:`Dashboard` serves the page and its JSON API.

``syncfw cloud run --http 127.0.0.1:8080`` (or ``await Dashboard.start(agg,
"127.0.0.1:8080")``) serves, on that address, a page showing the fleet as a
table (liveness, sync lag, model versions and rollout stages, degraded sites,
rejected and forked ops) and latency and lag charts (inline SVG drawn by the
page's own script; nothing is fetched from elsewhere), updated live over
server-sent events. The page reads the JSON API of :mod:`syncfw.cloud.web_api`,
documented in ``docs/dashboard.md``.

The stack is Starlette on uvicorn (the ``cloud`` extra:
``pip install 'syncfw[cloud]'``); this module and ``web_api`` are the only
ones that import them.

Invariants:

1. The dashboard only reads: :meth:`Aggregator.view`, :meth:`Aggregator.updates`
   and its own :class:`~syncfw.cloud.web_history.History`, which a sampler
   fills from the view every ``sample_s``.
2. It never takes the process's signals (uvicorn's handlers are not
   installed): the caller decides when to stop, with :meth:`Dashboard.aclose`,
   which ends every event stream first.
3. Refusals and open streams are visible: ``syncfw_dashboard_requests_total``
   ``{route, code}``, ``syncfw_dashboard_streams`` and the aggregator's status
   (``dashboard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import uvicorn
from prometheus_client import Counter, Gauge

from syncfw.cloud.web_api import build_app
from syncfw.cloud.web_history import History, Sample
from syncfw.metrics import NodeMetrics
from syncfw.notices import Notices

if TYPE_CHECKING:
    from syncfw.cloud.aggregator import Aggregator

__all__ = ["Dashboard", "DashboardConfig", "parse_listen"]

log = logging.getLogger("syncfw.cloud.web")


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """Tunables of the dashboard (presets: the defaults, :meth:`test`).

    Attributes:
        max_header_bytes: a request head larger is refused 431 (JSON).
        max_target_bytes: a path and query longer are refused 414 (JSON).
        max_streams: event streams open at once; past it 503.
        keepalive_s: an idle stream gets a comment line this often.
        min_event_s: the least time between two view events of one stream.
        sample_s: how often the history is sampled from the view.
        history_points: samples kept per node.
        history_nodes: nodes sampled at most.
        chart_points: samples per node sent in a stream's first snapshot.
        max_connections: connections uvicorn serves at once (past it: 503).
    """

    max_header_bytes: int = 8192
    max_target_bytes: int = 2048
    max_streams: int = 32
    keepalive_s: float = 15.0
    min_event_s: float = 0.25
    sample_s: float = 1.0
    history_points: int = 600
    history_nodes: int = 1024
    chart_points: int = 120
    max_connections: int = 256

    @classmethod
    def test(cls) -> DashboardConfig:
        """Tests: quick samples and events, few streams."""
        return cls(max_streams=4, keepalive_s=1.0, min_event_s=0.1, sample_s=0.25)


def parse_listen(text: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[::1]:8080`` for IPv6).

    Raises:
        ValueError: not ``HOST:PORT`` with a port from 0 to 65535.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--http wants HOST:PORT (e.g. 127.0.0.1:8080), not {text[:80]!r}")
    return host, int(port)


class _Metrics:
    _by_registry: ClassVar[weakref.WeakKeyDictionary[NodeMetrics, _Metrics]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, metrics: NodeMetrics) -> None:
        self.node = metrics.node_id
        r = metrics.registry
        self.requests = Counter(
            "syncfw_dashboard_requests", "Dashboard HTTP answers by route and status code.",
            ("node", "route", "code"), registry=r,
        )
        self.streams = Gauge(
            "syncfw_dashboard_streams", "Dashboard event streams open now.", ("node",),
            registry=r,
        )
        self.streams.labels(self.node).set(0)

    @classmethod
    def of(cls, metrics: NodeMetrics) -> _Metrics:
        # One set of series per registry: a second dashboard on one aggregator shares them.
        got = cls._by_registry.get(metrics)
        if got is None:
            got = cls._by_registry[metrics] = cls(metrics)
        return got


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (invariant 2)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Dashboard:
    """The web dashboard of one aggregator (see the module). Start with :meth:`start`."""

    def __init__(self, aggregator: Aggregator, config: DashboardConfig | None = None) -> None:
        self.aggregator = aggregator
        self.config = config or DashboardConfig()
        self.history = History(self.config.history_points, self.config.history_nodes)
        self.closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.streams = 0
        self.answers: dict[int, int] = {}
        self._metrics = _Metrics.of(aggregator.node.metrics)
        self._ticks: set[asyncio.Queue[dict[str, Any]]] = set()
        self._server: _Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._address: tuple[str, int] | None = None
        self.app = build_app(self, Notices(log, 10.0))

    @classmethod
    async def start(
        cls, aggregator: Aggregator, listen: str = "127.0.0.1:0",
        config: DashboardConfig | None = None,
    ) -> Dashboard:
        """Serve the dashboard of ``aggregator`` on ``listen`` (``HOST:PORT``; port 0: any).

        Raises:
            ValueError: ``listen`` is not ``HOST:PORT``.
            OSError: it cannot be bound.
        """
        host, port = parse_listen(listen)
        dash = cls(aggregator, config)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
        try:
            await dash._serve(sock)
        except BaseException:
            sock.close()
            await dash.aclose()
            raise
        return dash

    async def _serve(self, sock: socket.socket) -> None:
        c = self.config
        ucfg = uvicorn.Config(
            self.app, http="h11", ws="none", lifespan="off", log_config=None,
            access_log=False, server_header=False, timeout_keep_alive=5,
            limit_concurrency=c.max_connections, timeout_graceful_shutdown=2,
            # Heads up to 8x our limit reach the app and get its JSON 431; past that
            # h11 refuses them itself (a 400 and a closed connection).
            h11_max_incomplete_event_size=max(65536, 8 * c.max_header_bytes),
        )
        self._server = server = _Server(ucfg)
        name = sock.getsockname()
        self._address = (name[0], name[1])
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="syncfw-dashboard")
        self._tasks.append(serving)
        self._tasks.append(asyncio.create_task(self._sample_loop(), name="syncfw-dashboard-sample"))
        async with asyncio.timeout(10):
            while not server.started:
                if serving.done():
                    serving.result()  # its error, if it failed to start
                    raise OSError("the dashboard's server stopped as it started")
                await asyncio.sleep(0.01)
        self.aggregator.node.add_status_source("dashboard", self.status)
        log.info("dashboard on %s", self.url)

    @property
    def address(self) -> str:
        """``host:port`` served."""
        if self._address is None:
            raise RuntimeError("the dashboard is not serving")
        host, port = self._address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        """The page's URL."""
        return f"http://{self.address}/"

    # -- what the app calls -------------------------------------------------------

    def count(self, route: str, code: int) -> None:
        """One answer of ``route`` with status ``code`` (invariant 3)."""
        self.answers[code] = self.answers.get(code, 0) + 1
        self._metrics.requests.labels(self._metrics.node, route, str(code)).inc()

    def stream_opened(self) -> None:
        self.streams += 1
        self._metrics.streams.labels(self._metrics.node).set(self.streams)

    def stream_closed(self) -> None:
        self.streams -= 1
        self._metrics.streams.labels(self._metrics.node).set(self.streams)

    def ticks(self) -> asyncio.Queue[dict[str, Any]]:
        """A stream's queue of history samples (the oldest dropped when it is full)."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(8)
        self._ticks.add(q)
        return q

    def unticks(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._ticks.discard(q)

    def sample(self) -> dict[str, Sample]:
        """Take one history sample now and hand it to every stream."""
        now = self.aggregator.node.wall_ms()
        points = self.history.record(self.aggregator.view(), now)
        event = {"t_ms": now, "points": points}
        for q in list(self._ticks):
            if q.full():
                q.get_nowait()
            q.put_nowait(event)
        return points

    async def _sample_loop(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as exc:  # a failed sample must not end the charts
                log.warning("dashboard: history not sampled: %s", exc)
            await asyncio.sleep(self.config.sample_s)

    def status(self) -> dict[str, Any]:
        """The ``dashboard`` entry of the aggregator's status."""
        return {
            "url": self.url if self._address else None,
            "streams": self.streams,
            "answers": {str(k): v for k, v in sorted(self.answers.items())},
            "refused": sum(v for k, v in self.answers.items() if k >= 400),
            "history_nodes": len(self.history.nodes()),
            "history_untracked": len(self.history.untracked),
        }

    # -- lifecycle ----------------------------------------------------------------

    async def aclose(self) -> None:
        """End the event streams, stop serving. Idempotent."""
        if not self.closing.done():
            self.closing.set_result(None)
        if self._server is not None:
            self._server.should_exit = True
        for t in self._tasks[1:]:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    async def __aenter__(self) -> Dashboard:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
