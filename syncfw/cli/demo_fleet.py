"""The demo's fleet on loopback: a cloud aggregator, a depot, trucks and a factory station.

:class:`DemoFleet` opens every node with its own SQLite file and serves it on a
real gRPC mesh on 127.0.0.1 (mutual TLS and signed ops unless ``--insecure``).
Each node dials its peers through its own egress proxy, so :attr:`DemoFleet.partition`
can cut the backbone (the cloud and the depot on one side, the site on the other)
while the site's nodes keep talking to each other.

* ``cloud``: a :class:`~syncfw.cloud.Aggregator` holding the fleet authority's
  key, with its dashboard and, when ``nats-server`` is installed, an
  :class:`~syncfw.cloud.export.Exporter` to an embedded one-server JetStream.
* ``depot``: the yard's node; it keeps a copy of every release (``Artifacts.watch``)
  so a truck back in the yard shares one download.
* the trucks and the factory station: each runs the shipped inspection model in an
  :class:`~syncfw.inference.Engine` and, in a signed fleet, the model lifecycle
  (:class:`~syncfw.models.lifecycle.Lifecycle`) that rollouts drive.

Everything here is set-up and tear-down; the story is in :mod:`syncfw.cli.demo_acts`
and :mod:`syncfw.cli.demo_rollout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncfw.keyfiles import NodeKeys, add_node, init_fleet, load_fleet, load_node
from syncfw.keys import results_prefix
from syncfw.mesh import MeshConfig
from syncfw.mesh.models import ModelStatus, publish_model
from syncfw.node import Node
from syncfw.testing.partition import EgressProxy, Partition
from syncfw.transport.network import GrpcNetwork
from syncfw.transport.rpc import TlsConfig, TransportConfig
from syncfw.zones import Fleet, Grant

if TYPE_CHECKING:
    from syncfw.cloud import Aggregator
    from syncfw.inference import Engine
    from syncfw.models import Artifacts
    from syncfw.models.lifecycle import Lifecycle

__all__ = [
    "CLOUD",
    "DEMO_FLEET",
    "DEPOT",
    "EDGES",
    "STATION",
    "TRUCKS",
    "DemoFleet",
    "DemoOptions",
    "demo_keys",
]

CLOUD = "cloud"
DEPOT = "depot"
TRUCKS = ("t7", "t9", "t12", "t14")
STATION = "station-8"
EDGES = (*TRUCKS, STATION)
"""The nodes that run the inspection model (and, signed, the lifecycle)."""
MODEL_NAME = "inspection"
EXPORT_STREAM = "DEMO"
DEMO_MESH = MeshConfig.test().with_(
    interval_s=0.2,
    connect_timeout_s=2.0,
    probe_timeout_s=1.0,
    dead_after_s=2.0,
    dead_retry_s=0.5,
)
"""The test preset's fast rounds, with failure detection that seven nodes, TLS and
inference on a loaded two-core machine do not trip by themselves."""

DEMO_FLEET = Fleet(
    fleet_id="demo-mine",
    authority=CLOUD,
    grants=(
        *(Grant.of(f"trucks/{t}/", t) for t in TRUCKS),
        Grant.of("site/", "*"),
    ),
)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What one run of the demo does.

    Attributes:
        writes: writes per node per phase.
        frames: parts each edge inspects per phase.
        seed: seeds the random choices.
        secure: signed ops and mutual TLS (False: the unsigned development mode).
        quick: shorter watch windows and fewer rounds (tests, CI).
        http: where the dashboard listens (``HOST:PORT``).
        nats: run the embedded JetStream export when ``nats-server`` is installed.
    """

    writes: int = 40
    frames: int = 20
    seed: int = 7
    secure: bool = True
    quick: bool = False
    http: str = "127.0.0.1:0"
    nats: bool = True


def demo_keys(folder: Path, names: list[str]) -> tuple[Fleet, dict[str, NodeKeys]]:
    """The demo fleet's keys in ``folder/keys`` (made on first use) and the signed fleet."""
    root = folder / "keys"
    if not (root / "fleet.toml").exists():
        init_fleet(root, DEMO_FLEET.fleet_id, DEMO_FLEET.authority)
    for n in names:
        if not (root / "nodes" / n).exists():
            add_node(root, n)
    return load_fleet(root).bind(DEMO_FLEET), {n: load_node(root, n) for n in names}


@dataclass
class DemoFleet:
    """Every node of the demo, opened and serving (see the module). Close with :meth:`aclose`."""

    folder: Path
    options: DemoOptions
    fleet: Fleet = DEMO_FLEET
    keys: dict[str, NodeKeys] = field(default_factory=dict)
    partition: Partition = field(default_factory=Partition)
    proxies: dict[str, EgressProxy] = field(default_factory=dict)
    aggregator: Aggregator | None = None
    dashboard: Any = None
    exporter: Any = None
    nats: Any = None
    nats_note: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    engines: dict[str, Engine] = field(default_factory=dict)
    artifacts: dict[str, Artifacts] = field(default_factory=dict)
    lifecycles: dict[str, Lifecycle] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [CLOUD, DEPOT, *EDGES]

    @property
    def cloud(self) -> Node:
        return self.nodes[CLOUD]

    def all_nodes(self) -> list[Node]:
        return [self.nodes[n] for n in self.names]

    # ------------------------------------------------------------------ set-up

    async def open(self) -> DemoFleet:
        """Keys, proxies, the aggregator and its dashboard and exporter, the edges."""
        names = self.names
        print(f"fleet {DEMO_FLEET.fleet_id!r}: {', '.join(names)}; SQLite files in {self.folder}")
        if self.options.secure:
            self.fleet, self.keys = demo_keys(self.folder, names)
            print(f"  secure: signed ops, mutual TLS; keys made in {self.folder / 'keys'}")
        else:
            print("  INSECURE (--insecure): unsigned ops, no TLS: development mode only")
        for n in names:
            self.proxies[n] = await EgressProxy(n, self.partition).start()
        await self._open_cloud()
        for n in (DEPOT, *EDGES):
            await self._open_edge(n)
        await self._start_engines()
        return self

    def _tls(self, n: str) -> TlsConfig | None:
        k = self.keys.get(n)
        return None if k is None else TlsConfig(k.ca_pem, k.cert_pem, k.key_pem)

    async def _open_cloud(self) -> None:
        from syncfw.cloud import Aggregator, AggregatorConfig, FeedConfig

        # the demo attaches the cloud's artifacts and runs the authority's rollout loop
        # itself (demo_rollout), to print each decision as it is made
        cfg = AggregatorConfig(mesh=DEMO_MESH, feed=FeedConfig.test(), refresh_s=0.25, models=None)
        agg = await Aggregator.open(
            self.folder / f"{CLOUD}.db", self.keys.get(CLOUD), fleet=self.fleet, config=cfg
        )
        self.aggregator = agg
        self.nodes[CLOUD] = agg.node
        base = dataclasses.replace(
            cfg.transport,
            tls=self._tls(CLOUD),
            http_proxy=self.proxies[CLOUD].url,
            connect_timeout_s=1.0,
        )
        network = GrpcNetwork(
            cfg.mesh.transport(base), metrics=agg.node.metrics, services=[agg.feed.service()]
        )
        mesh = await agg.serve("127.0.0.1:0", [], network=network)
        self._served(CLOUD, mesh.address)
        print(
            f"  {CLOUD:<9} aggregator (fleet authority) on {mesh.address}; "
            "change feed on the same port"
        )
        if self.options.secure:
            from syncfw.models import Artifacts

            self.artifacts[CLOUD] = Artifacts.attach(agg.node, mesh)
        await self._start_dashboard(agg)
        await self._start_export(agg)

    async def _start_dashboard(self, agg: Aggregator) -> None:
        try:
            from syncfw.cloud.web import Dashboard, DashboardConfig
        except ImportError as exc:  # the cloud extra: starlette, uvicorn
            print(f"  dashboard: skipped, the cloud extra is not installed ({exc.name})")
            return
        self.dashboard = await Dashboard.start(
            agg, self.options.http, DashboardConfig(min_event_s=0.25, sample_s=0.5)
        )
        print(f"  dashboard {self.dashboard.url}  (the fleet live; open it while the demo runs)")

    async def _start_export(self, agg: Aggregator) -> None:
        if not self.options.nats:
            self.nats_note = "export skipped (--no-nats)"
            print(f"  JetStream: {self.nats_note}")
            return
        try:
            from syncfw.cloud.export import ExportConfig, Exporter
            from syncfw.cloud.export_servers import NatsCluster, NatsServerMissing
        except ImportError as exc:  # nats-py, in the cloud extra
            self.nats_note = f"export skipped: nats-py is not installed ({exc.name})"
            print(f"  JetStream: {self.nats_note}")
            return
        try:
            cluster = NatsCluster(self.folder / "nats", 1, name="demo")
        except NatsServerMissing as exc:
            self.nats_note = f"export skipped: {exc}"
            print(f"  JetStream: {self.nats_note}")
            return
        self.nats = await cluster.__aenter__()
        self.exporter = await Exporter.for_aggregator(
            agg, ExportConfig.test(cluster.urls, stream=EXPORT_STREAM)
        ).start()
        print(
            f"  JetStream: embedded nats-server on {cluster.urls[0]}; the aggregator "
            f"exports every op to stream {EXPORT_STREAM}"
        )

    async def _open_edge(self, n: str) -> None:
        from syncfw.models import ArtifactConfig, Artifacts, FetchConfig

        node = await Node.open(
            self.folder / f"{n}.db", node_id=n, fleet=self.fleet, keys=self.keys.get(n)
        )
        self.nodes[n] = node
        seeds = [self.addresses[CLOUD]] + ([self.addresses[DEPOT]] if n != DEPOT else [])
        mesh = await node.serve(
            "127.0.0.1:0",
            seeds,
            config=DEMO_MESH,
            # the mesh's dial timings (connect, capped reconnect backoff), as the cloud's
            network=GrpcNetwork(
                DEMO_MESH.transport(
                    TransportConfig(http_proxy=self.proxies[n].url, tls=self._tls(n))
                ),
                metrics=node.metrics,
            ),
        )
        self._served(n, mesh.address)
        role = (
            "depot (keeps every release for the yard)"
            if n == DEPOT
            else ("factory station" if n == STATION else "haul truck")
        )
        print(f"  {n:<9} {role} on {mesh.address}")
        if self.options.secure:
            arts = Artifacts.attach(
                node,
                mesh,
                config=ArtifactConfig(
                    fetch=FetchConfig(piece_timeout_s=3.0, stall_s=30.0, retry_s=0.05)
                ),
            )
            self.artifacts[n] = arts
            if n == DEPOT:
                arts.watch([MODEL_NAME])

    def _served(self, n: str, address: str) -> None:
        self.addresses[n] = address
        self.partition.owners[address] = n

    async def _start_engines(self) -> None:
        from syncfw.inference import Engine
        from syncfw.inference.train import MODEL_PATH

        info = None
        for n in EDGES:
            engine = self.engines[n] = Engine(self.nodes[n])
            info = await engine.load(MODEL_PATH)
            # the fleet's model view (and the rollout's member list) start from here
            await publish_model(
                self.nodes[n], n, ModelStatus(info.name, info.version, info.sha256, "active")
            )
        assert info is not None
        print(
            f"  {', '.join(EDGES)} run {info.name} {info.version} (the factory image, "
            f"sha256 {info.sha256[:12]}) on {info.provider}"
        )
        if self.options.secure:
            from syncfw.models.lifecycle import Lifecycle, LifecycleConfig

            quick = self.options.quick
            cfg = LifecycleConfig(
                window_s=1.0 if quick else 1.5, check_every_s=0.25, min_window_calls=5
            )
            for n in EDGES:
                lc = Lifecycle(self.nodes[n], self.artifacts[n], self.engines[n], MODEL_NAME, cfg)
                await lc.recover()
                self.lifecycles[n] = lc

    # ------------------------------------------------------------------ reading

    async def results(self, holder: Node, origin: str) -> dict[str, Any]:
        """``origin``'s inference results as ``holder`` holds them."""
        return await holder.scan(results_prefix(origin))

    # ------------------------------------------------------------------ tear-down

    async def aclose(self) -> None:
        """Close everything opened, in reverse; never raises."""
        for engine in self.engines.values():
            with contextlib.suppress(Exception):
                await engine.aclose()
        for arts in self.artifacts.values():
            with contextlib.suppress(Exception):
                await arts.aclose()
        if self.exporter is not None:
            with contextlib.suppress(Exception):
                await self.exporter.aclose()
        if self.dashboard is not None:
            with contextlib.suppress(Exception):
                await self.dashboard.aclose()
        for n, node in self.nodes.items():
            if n == CLOUD and self.aggregator is not None:
                continue
            with contextlib.suppress(Exception):
                await node.close()
        if self.aggregator is not None:
            with contextlib.suppress(Exception):
                await self.aggregator.aclose()
        if self.nats is not None:
            with contextlib.suppress(Exception):
                await self.nats.aclose()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                await proxy.aclose()
        # Tunnels and connections closed above finish on the loop, not at its shutdown.
        await asyncio.sleep(0.2)
