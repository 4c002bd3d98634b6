"""A serving node's whole model side, in one object: what ``syncfw node serve`` runs.

:class:`ModelService` joins the pieces of this package on one node with no code from the
user: its artifacts (chunks held, served to peers at bulk priority and advertised), and
for each model name it runs, an :class:`~syncfw.inference.engine.Engine` driven by a
:class:`~syncfw.models.lifecycle.Lifecycle` that follows the rollout ops for its stage
(:func:`~syncfw.models.rollout_ops.follow`): fetch from peers, verify, validate,
activate, watch, commit or roll back. On the fleet authority it also runs the
authority's loop (:func:`~syncfw.models.rollout_ops.advance`): promote or halt from the
nodes' reports.

Entry points (the demo and ``node serve`` use these, keep them stable):

* ``svc = await ModelService.start(node, mesh, ServiceConfig(names=("inspection",)))``;
* ``svc.engines[name]`` serves calls (``await engine.infer(x)``);
* ``svc.status()`` (also the ``models`` entry of ``node.status()``);
* ``await svc.aclose()``.

A node with no names (or without the inference extra) still holds, serves and
advertises every release's chunks: a depot or a relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from syncfw.mesh import Mesh
from syncfw.models.artifacts import ArtifactConfig, Artifacts
from syncfw.models.lifecycle import Lifecycle, LifecycleConfig
from syncfw.models.manifest import check_name
from syncfw.node import Node

if TYPE_CHECKING:
    from syncfw.inference.engine import Engine

__all__ = ["ModelService", "ServiceConfig"]

log = logging.getLogger("syncfw.models.service")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """What a serving node runs of the model lifecycle.

    Attributes:
        names: the models this node runs (an engine and a lifecycle each); empty: it
            only holds, serves and advertises chunks (and fetches every release).
        artifacts: the chunk store and fetch tunables.
        lifecycle: the state machine's tunables (the gate is each rollout's own).
        follow_every_s: how often a node looks at its rollouts with no op arriving.
        advance_every_s: how often the authority decides its open rollouts with no
            record arriving (0: never); a node's lifecycle record or a rollout op
            arriving decides them at once.
        engine: an :class:`~syncfw.inference.config.EngineConfig` (None: the edge preset).
    """

    names: tuple[str, ...] = ()
    artifacts: ArtifactConfig = field(default_factory=ArtifactConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    follow_every_s: float = 2.0
    advance_every_s: float = 2.0
    engine: Any = None

    def __post_init__(self) -> None:
        for n in self.names:
            check_name(n)


class ModelService:
    """One node's model side; make with :meth:`start`, close with :meth:`aclose`."""

    def __init__(self, node: Node, artifacts: Artifacts, config: ServiceConfig) -> None:
        self.node = node
        self.artifacts = artifacts
        self.config = config
        self.engines: dict[str, Engine] = {}
        self.lifecycles: dict[str, Lifecycle] = {}
        self.advanced: dict[str, str] = {}
        """The authority's last decision per rollout ``name:version``."""
        self.advance_error = ""
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def is_authority(self) -> bool:
        """True if this node is the fleet authority (it promotes and halts rollouts)."""
        return self.node.node_id == self.node.fleet.authority

    @classmethod
    async def start(cls, node: Node, mesh: Mesh | None, config: ServiceConfig) -> ModelService:
        """Attach the artifacts, recover each name's lifecycle (serve what its record
        says, resume or roll back an update a restart interrupted), then follow rollouts.

        Raises:
            ImportError: ``config.names`` is not empty and the inference extra is missing.
            StorageError: the chunk folder cannot be used.
        """
        engine_cls = None
        if config.names:
            from syncfw.inference.engine import Engine

            engine_cls = Engine
        arts = Artifacts.attach(node, mesh, config=config.artifacts)
        self = cls(node, arts, config)
        try:
            for name in config.names:
                assert engine_cls is not None
                engine = engine_cls(node, config.engine)
                self.engines[name] = engine
                lc = Lifecycle(node, arts, engine, name, config.lifecycle)
                self.lifecycles[name] = lc
                rec = await lc.recover()
                log.info(
                    "%s: model %s: %s",
                    node.node_id,
                    name,
                    "no release run yet"
                    if rec is None
                    else f"{rec.step} v{rec.version}, serving v{rec.serving_version or '-'}",
                )
            if not config.names:
                arts.watch()
            for lc in self.lifecycles.values():
                self._tasks.append(asyncio.create_task(self._follow(lc), name=f"follow-{lc.name}"))
            if self.is_authority and config.advance_every_s > 0:
                self._tasks.append(asyncio.create_task(self._advance(), name="rollout-advance"))
        except BaseException:
            await self.aclose()
            raise
        node.add_status_source("models", self.status)
        return self

    async def _follow(self, lc: Lifecycle) -> None:
        from syncfw.models.rollout_ops import follow

        await follow(lc, every_s=self.config.follow_every_s)

    async def _advance(self) -> None:
        from syncfw.models.rollout_ops import authority_loop

        def decided(got: dict[tuple[str, int], Any]) -> None:
            self.advanced = {
                f"{n}:{v}": f"{d.verdict.value}: {d.reason}" for (n, v), d in got.items()
            }
            self.advance_error = ""

        def failed(exc: Exception) -> None:
            self.advance_error = str(exc)

        await authority_loop(
            self.node, every_s=self.config.advance_every_s, on_decisions=decided, on_error=failed
        )

    def status(self) -> dict[str, Any]:
        """The ``models`` entry of ``node.status()``: each name's record and engine."""
        return {
            "names": list(self.config.names),
            "authority": self.is_authority,
            "rollout_decisions": dict(self.advanced),
            "advance_error": self.advance_error,
            "running": {name: self._running(name) for name in self.lifecycles},
        }

    def _running(self, name: str) -> dict[str, Any]:
        lc, model = self.lifecycles[name], self.engines[name].model
        return {
            "serving": lc.status().get("serving", "none"),
            "step": lc.record.step if lc.record else None,
            "version": lc.record.version if lc.record else None,
            "engine_model": model.version if model is not None else None,
        }

    async def aclose(self) -> None:
        """Stop following, close the engines and the artifacts (the files stay)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        for e in self.engines.values():
            await e.aclose()
        await self.artifacts.aclose()


def lifecycle_config(base: LifecycleConfig | None = None, **changes: Any) -> LifecycleConfig:
    """``base`` (default :class:`LifecycleConfig`) with ``changes``, for callers that
    set a few tunables (the CLI's flags)."""
    return replace(base or LifecycleConfig(), **changes)
