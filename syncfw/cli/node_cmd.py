"""``syncfw node serve``: run a node in the mesh until interrupted.

Every setting comes from a flag, a ``SYNCFW_*`` variable, a TOML file
(``--config``) or its default, in that order (:mod:`syncfw.cli.settings`);
all are checked before anything is opened. :func:`node_parts` is the one place
that turns settings into the mesh and transport configuration, and
:func:`serve` the one place that opens the node with them.

Every serving node runs its model side (:class:`syncfw.models.service.ModelService`):
it holds, serves and advertises release chunks, and for each ``--model NAME`` it follows
that model's rollouts (fetch from peers, verify, validate on the canary set, activate,
watch, commit or roll back); the fleet authority also promotes and halts rollouts from
the nodes' reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncfw.cli.common import fail
from syncfw.cli.logs import configure_logging
from syncfw.cli.sdnotify import notify
from syncfw.cli.settings import (
    SERVE_OPTIONS,
    Option,
    SettingsError,
    add_options,
    ntp_servers,
    resolve,
)
from syncfw.cli.target import admin_file
from syncfw.errors import SyncfwError
from syncfw.mesh import Mesh, MeshConfig
from syncfw.transport.network import GrpcNetwork
from syncfw.transport.rpc import TlsConfig, TransportConfig
from syncfw.zones import Fleet, Grant

PRESETS = {"lan": MeshConfig.lan, "metered": MeshConfig.metered_link, "test": MeshConfig.test}


def _model_name(value: str) -> str | None:
    from syncfw.models.manifest import check_name

    try:
        check_name(value)
    except SyncfwError as exc:
        return str(exc)
    return None


def _each_name(values: list[str]) -> str | None:
    for v in values:
        why = _model_name(v)
        if why is not None:
            return why
    return None


def _file(value: str) -> str | None:
    return None if os.path.isfile(value) else "is no such file"


def _positive(value: float) -> str | None:
    return None if 0 < value < float("inf") else "must be a number above 0"


def _not_negative(value: float) -> str | None:
    return None if 0 <= value < float("inf") else "must be a number >= 0"


MODEL_OPTIONS: list[Option] = [
    Option(
        "model",
        "run the model lifecycle for NAME (repeatable): follow its rollouts, fetch from "
        "peers, validate, activate, watch, commit or roll back (needs the inference extra)",
        kind="list",
        default=[],
        check=_each_name,
        metavar="NAME",
    ),
    Option(
        "canary",
        "labelled canary set (.npz with x and y) a new model is validated and watched on "
        "(default: the shipped one, for the shipped inspection model)",
        check=_file,
        metavar="NPZ",
    ),
    Option(
        "model-window-s",
        "seconds a new model is watched before it is committed",
        kind="float",
        default=30.0,
        check=_not_negative,
        metavar="S",
    ),
    Option(
        "chunk-max-bytes",
        "disk budget of the chunk store beside the database (default: the disk)",
        kind="float",
        check=_positive,
        metavar="N",
    ),
]
"""The model settings of ``node serve`` (beside :data:`SERVE_OPTIONS`)."""
NODE_OPTIONS = [*SERVE_OPTIONS[:-2], *MODEL_OPTIONS, *SERVE_OPTIONS[-2:]]
""":data:`SERVE_OPTIONS` and :data:`MODEL_OPTIONS`, the logging settings last."""


def register(sub: Any) -> None:
    """Add the ``node`` verb to the ``syncfw`` command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "node",
        help="run a node: serve its store to the mesh and gossip with peers",
        description="Run a syncfw node in the mesh.",
    )
    verbs = p.add_subparsers(dest="node_command", metavar="VERB", required=True)
    s: argparse.ArgumentParser = verbs.add_parser(
        "serve",
        aliases=["run"],
        help="open the store, listen, gossip with seeds until SIGINT/SIGTERM",
        description="Open the node's store, serve sync over gRPC and gossip with peers. "
        "Each setting may also come from the environment variable in [brackets] or from "
        "a TOML file (--config; keys are the flag names with '_' for '-', e.g. "
        'peer_bytes_per_s = 65536, seed = ["10.0.0.2:7000"]); a flag wins over the '
        "environment, which wins over the file. Lists in the environment are "
        "comma-separated. --log-level and --log-format may also come from "
        "SYNCFW_LOG_LEVEL, SYNCFW_LOG_FORMAT or log_level, log_format in the file.",
    )
    add_options(s, NODE_OPTIONS)
    s.set_defaults(func=run)


def fleet_of(args: argparse.Namespace) -> Fleet:
    """The fleet bootstrap the (resolved) settings describe."""
    return Fleet(
        fleet_id=args.fleet,
        authority=args.authority,
        grants=tuple(Grant.of(p, "*") for p in args.shared),
    )


@dataclass(frozen=True, slots=True)
class NodeParts:
    """What the settings make of the node beside its file: mesh and transport."""

    fleet: Fleet
    mesh: MeshConfig
    transport: TransportConfig


def node_parts(settings: argparse.Namespace) -> NodeParts:
    """The fleet, mesh and transport configuration the settings describe.

    Raises:
        SettingsError: the settings do not make a valid fleet or configuration.
        OSError: a TLS file cannot be read (``.filename`` names it).
    """
    try:
        fleet = fleet_of(settings)
    except ValueError as exc:  # e.g. a shared prefix nesting with sys/ or a node zone
        raise SettingsError(f"--shared: {exc}") from None
    config = PRESETS[settings.preset]()
    if settings.peer_bytes_per_s:
        config = config.with_(peer_bytes_per_s=settings.peer_bytes_per_s)
    tls = None
    if settings.ca:
        tls = TlsConfig.from_files(settings.ca, settings.cert, settings.key)
    # the mesh's connect timeout and reconnect backoff apply to the transport it dials with
    transport = config.transport(TransportConfig(http_proxy=settings.proxy, tls=tls))
    return NodeParts(fleet, config, transport)


async def write_status(
    path: Path,
    node: Any,
    mesh: Mesh,
    extra: dict[str, Any] | None = None,
    *,
    digest: tuple[str, float, bool] | None = None,
) -> None:
    """Write the node's and mesh's status to ``path`` atomically.

    Args:
        extra: more top-level entries.
        digest: ``(state digest, when it was computed (Unix s), whether the log
            has not moved since)``; computed now when None.
    """
    status = await node.status()
    status["mesh"] = mesh.status()
    if digest is None:
        digest = (await node.state_digest(), time.time(), True)
    status["state_digest"], status["state_digest_at"], status["state_digest_current"] = digest
    now = time.time()
    status["written_at"] = round(now, 3)
    status["written_at_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    status.update(extra or {})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(status, default=str, sort_keys=True))
    os.replace(tmp, path)


class StatusWriter:
    """The status file, with the state digest on a slower cadence.

    The digest reads the whole state (about 0.2 s at 100k keys), so it is
    recomputed only when the log moved since the last one *and*
    ``digest_every`` seconds have passed; the file says when it was computed
    and whether it is current (``state_digest_at``, ``state_digest_current``).
    """

    def __init__(self, path: Path, node: Any, mesh: Mesh, digest_every: float) -> None:
        self.path, self.node, self.mesh, self.digest_every = path, node, mesh, digest_every
        self._digest: tuple[str, float] | None = None
        self._digest_vv: dict[str, int] | None = None
        self._digest_mono = 0.0
        self.extra: dict[str, Any] = {}

    async def write(self) -> None:
        vv = dict(await self.node.version_vector())
        due = time.monotonic() - self._digest_mono >= self.digest_every
        if self._digest is None or (vv != self._digest_vv and due):
            self._digest = (await self.node.state_digest(), round(time.time(), 3))
            self._digest_vv, self._digest_mono = vv, time.monotonic()
        current = vv == self._digest_vv
        await write_status(
            self.path, self.node, self.mesh, self.extra, digest=(*self._digest, current)
        )


async def serve(settings: argparse.Namespace) -> int:
    """Open the node, join the mesh, run until a signal."""
    from syncfw.node import Node  # the composition root; imported only when serving
    from syncfw.node.admin import AdminServer

    try:
        parts = node_parts(settings)
    except SettingsError as exc:
        return fail("node", str(exc))
    except OSError as exc:  # a missing or unreadable PEM file: say which, no traceback
        return fail("node", f"cannot read TLS file {exc.filename!r}: {exc.strerror}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    admin_path = Path(admin_file(settings.db))
    keys = None
    if settings.keys:  # a signed fleet: keys, authority key and mTLS from the key directory
        from syncfw.cli.keys_cmd import node_keys

        try:
            keys, parts = node_keys(settings.keys, settings.node_id, parts)
        except SyncfwError as exc:
            return fail("node", str(exc))
    async with Node.open(
        settings.db, node_id=settings.node_id, fleet=parts.fleet, keys=keys
    ) as node:
        network = GrpcNetwork(parts.transport, metrics=node.metrics)
        mesh = await node.serve(
            settings.listen,
            settings.seed,
            config=parts.mesh,
            advertise=settings.advertise,
            network=network,
        )
        print(f"listening {mesh.listener.address if mesh.listener else '-'}", flush=True)
        models = await _start_models(node, mesh, settings)
        if isinstance(models, int):
            return models
        if settings.ntp:  # checked at start (settings), so this cannot raise
            hosts, port = ntp_servers(settings.ntp)
            node.watch_clock(hosts, interval_s=settings.ntp_every, port=port)
        admin: AdminServer | None = None
        try:
            if settings.metrics:
                print(
                    f"metrics http://{node.serve_metrics(settings.metrics).address}/metrics",
                    flush=True,
                )
            if settings.admin and settings.admin != "none":
                admin = await AdminServer.start(node, settings.admin, mesh)
                _write_file(admin_path, admin.address + "\n")
                print(f"admin http://{admin.address}", flush=True)
        except OSError as exc:
            return fail("node", f"cannot serve {exc.filename or ''}: {exc.strerror or exc}")
        writer = (
            StatusWriter(Path(settings.status_file), node, mesh, settings.digest_every)
            if settings.status_file
            else None
        )
        if writer is not None and admin is not None:
            writer.extra["admin"] = admin.address
        notify(f"READY=1\nSTATUS=listening {mesh.address}\nMAINPID={os.getpid()}")
        try:
            while not stop.is_set():
                if writer is not None:
                    await writer.write()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(settings.status_every):
                        await stop.wait()
        finally:
            notify("STOPPING=1")
            if admin is not None:
                await admin.aclose()
                _remove_file(admin_path)
            await models.aclose()
    return 0


async def _start_models(node: Any, mesh: Mesh, settings: argparse.Namespace) -> Any:
    """The node's model side (see the module docstring), or an exit status."""
    from syncfw.models.artifacts import ArtifactConfig
    from syncfw.models.lifecycle import LifecycleConfig
    from syncfw.models.service import ModelService, ServiceConfig

    names = tuple(getattr(settings, "model", None) or ())
    lifecycle = LifecycleConfig(window_s=getattr(settings, "model_window_s", 30.0))
    if getattr(settings, "canary", None):
        lifecycle = dataclasses.replace(lifecycle, canary=settings.canary)
    max_bytes = getattr(settings, "chunk_max_bytes", None)
    config = ServiceConfig(
        names=names,
        artifacts=ArtifactConfig(max_bytes=int(max_bytes) if max_bytes else None),
        lifecycle=lifecycle,
    )
    try:
        return await ModelService.start(node, mesh, config)
    except ImportError as exc:
        return fail(
            "node",
            f"--model needs the inference extra ({exc.name} is missing): "
            "pip install 'syncfw[inference]'",
        )


def _write_file(path: Path, text: str) -> None:
    path.write_text(text)


def _remove_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``syncfw node serve``."""
    try:
        settings = resolve(args, NODE_OPTIONS)
    except SettingsError as exc:
        return fail("node", str(exc))
    # the logging settings may come from the environment or the config file too
    configure_logging(
        settings.log_level.upper(), settings.log_format, verbose=getattr(args, "verbose", False)
    )
    try:
        return asyncio.run(serve(settings))
    except (SyncfwError, ValueError) as exc:  # ValueError: an invalid node id
        return fail("node", str(exc))
