"""The node's update state machine for one model name, persisted as ops.

download -> verify (whole sha256; the manifest's authority signature was checked by
:meth:`Artifacts.releases`) -> load (the bytes against the manifest's signature) ->
validate (canary accuracy against the model serving before, and latency, against the
gate) -> activate (``Engine.load``: a hot swap, the old session serves until the new one
is ready) -> watch for a window (error rate of the calls served; canary accuracy and
latency measured again on this node, under its load of the moment) -> commit.

Invariants:

1. Each step is an op at ``fleet/<node>/model/<name>`` (:func:`lifecycle_key`, the
   node's own zone) written *before* the step's side effect, so the fleet sees where
   every node is (:meth:`Record.report` is the rollout's :class:`Report`) and a restart
   knows what was under way.
2. The record always names the model that serves (``serving``): before activation it is
   the previous model, after a rollback it is the previous model again, after commit it
   is the new one. :meth:`Lifecycle.recover` loads exactly that, so a power cut at any
   step comes back serving a valid model.
3. A restart in a step before activation resumes from the download (held chunks are not
   fetched again); a restart inside the watch window reloads the new model and watches
   again. A step interrupted more than ``max_resumes`` times rolls back with that reason,
   so a model that kills its node never wedges it.
4. A failed validation or a regression in the window rolls back on its own: the
   ``rolled_back`` op (with the reason) is written first, then the previous model is
   swapped back. A version that rolled back or failed is never tried again: versions
   only move forward, a fix is a new release.
5. The previous model's chunks stay in the chunk store (nothing here removes them), so a
   rollback needs no network.
6. A first model has nothing to fall back to: its rollback unloads it (``Engine.unload``),
   the record says ``serving_version`` 0 with the reason, the fleet view says
   ``rolled_back``, and the status entry says ``serving: none`` in so many words. The
   node serves no model rather than one that failed its gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncfw.errors import SyncfwError
from syncfw.keys import fleet_key
from syncfw.mesh.models import ModelStatus, publish_model
from syncfw.models.artifacts import Artifacts
from syncfw.models.manifest import ReleaseManifest
from syncfw.models.rollout import Bound, Report, State, parse_gate
from syncfw.node import Node

if TYPE_CHECKING:
    from syncfw.inference.engine import Engine

__all__ = [
    "PRE_ACTIVE",
    "STEPS",
    "Lifecycle",
    "LifecycleConfig",
    "Record",
    "lifecycle_key",
    "member_key",
    "members_in",
    "read_records",
    "records_of",
]

log = logging.getLogger("syncfw.models.lifecycle")

STEPS = (
    "downloading",
    "verifying",
    "loading",
    "validating",
    "activating",
    "active",
    "committed",
    "rolled_back",
    "failed",
)
"""Every step a record can be in, in the order a good update walks them."""
PRE_ACTIVE = ("downloading", "verifying", "loading", "validating", "activating")
"""Steps where the previous model still serves and a restart resumes from the download."""
TERMINAL = ("committed", "rolled_back", "failed")

_STATE_OF = {
    "downloading": State.DOWNLOADING,
    "verifying": State.VALIDATING,
    "loading": State.VALIDATING,
    "validating": State.VALIDATING,
    "activating": State.VALIDATING,
    "active": State.ACTIVE,
    "committed": State.COMMITTED,
    "rolled_back": State.ROLLED_BACK,
    "failed": State.FAILED,
}
_SHIPPED_CANARY = Path(__file__).resolve().parent.parent / "inference" / "assets" / "canary.npz"


def lifecycle_key(node_id: str, name: str) -> str:
    """``fleet/<node>/model/<name>``: where a node's state machine for ``name`` writes."""
    return fleet_key(node_id, f"model/{name}")


def member_key(node_id: str, name: str) -> str:
    """``fleet/<node>/runs/<name>``: a node's enrolment in the rollouts of ``name``
    (:meth:`Lifecycle.enrol`), what makes it a member a stage counts before it reports."""
    return fleet_key(node_id, f"runs/{name}")


def members_in(state: Mapping[str, Any], name: str) -> set[str]:
    """The nodes that run ``name`` in a ``scan("fleet/")`` result (pure): every node
    enrolled (``{"runs": true}`` at :func:`member_key`) and every node holding a
    lifecycle record of ``name``, less those that left (``{"runs": false}``)."""
    out = set(records_of(state, name))
    suffix = f"/runs/{name}"
    for key, value in state.items():
        if not key.endswith(suffix):
            continue
        nid = key[len("fleet/") : -len(suffix)]
        if not nid or "/" in nid or not isinstance(value, Mapping):
            continue
        if value.get("runs") is True:
            out.add(nid)
        elif value.get("runs") is False:
            out.discard(nid)
    return out


@dataclass(frozen=True, slots=True)
class Record:
    """One node's state op for one model name.

    Attributes:
        name: the model name.
        step: one of :data:`STEPS`.
        version, sha256: the release the step is about (the target).
        serving_version, serving_sha256: the model serving now (0 / "": none).
        serving_accuracy: canary accuracy of the serving model (the baseline of the
            next validation), or None.
        prev_version, prev_sha256: what served before the target (the rollback target).
        prev_accuracy: its canary accuracy.
        accuracy, accuracy_delta, error_rate, p99_ms: the target's figures, as measured.
        reason: why a rollback or a failure happened.
        attempt: restarts that found this update under way.
        at_ms: wall clock of the write.
    """

    name: str
    step: str
    version: int
    sha256: str
    serving_version: int = 0
    serving_sha256: str = ""
    serving_accuracy: float | None = None
    prev_version: int = 0
    prev_sha256: str = ""
    prev_accuracy: float | None = None
    accuracy: float | None = None
    accuracy_delta: float | None = None
    error_rate: float | None = None
    p99_ms: float | None = None
    reason: str = ""
    attempt: int = 0
    at_ms: int = 0

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise ValueError(f"unknown lifecycle step {self.step!r}")

    @property
    def state(self) -> State:
        """The rollout's state of this record."""
        return _STATE_OF[self.step]

    def value(self) -> dict[str, Any]:
        """The op value."""
        return {
            "name": self.name,
            "step": self.step,
            "state": self.state.value,
            "version": self.version,
            "sha256": self.sha256,
            "serving_version": self.serving_version,
            "serving_sha256": self.serving_sha256,
            "serving_accuracy": self.serving_accuracy,
            "prev_version": self.prev_version,
            "prev_sha256": self.prev_sha256,
            "prev_accuracy": self.prev_accuracy,
            "accuracy": self.accuracy,
            "accuracy_delta": self.accuracy_delta,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "reason": self.reason,
            "attempt": self.attempt,
            "at_ms": self.at_ms,
        }

    @classmethod
    def of(cls, value: Any) -> Record | None:
        """A record from an op value, or None if it is not one (old code, garbage)."""
        if not isinstance(value, Mapping):
            return None
        try:
            return cls(
                str(value["name"]),
                str(value["step"]),
                int(value["version"]),
                str(value["sha256"]),
                int(value.get("serving_version", 0)),
                str(value.get("serving_sha256", "")),
                _opt(value.get("serving_accuracy")),
                int(value.get("prev_version", 0)),
                str(value.get("prev_sha256", "")),
                _opt(value.get("prev_accuracy")),
                _opt(value.get("accuracy")),
                _opt(value.get("accuracy_delta")),
                _opt(value.get("error_rate")),
                _opt(value.get("p99_ms")),
                str(value.get("reason", "")),
                int(value.get("attempt", 0)),
                int(value.get("at_ms", 0)),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def report(self, node_id: str) -> Report:
        """What the rollout's rule table reads of this node."""
        return Report(
            node_id,
            self.version,
            self.state,
            self.accuracy_delta,
            self.error_rate,
            self.p99_ms,
            self.reason,
        )


def _opt(x: Any) -> float | None:
    return None if x is None else float(x)


async def read_records(node: Node, name: str) -> dict[str, Record]:
    """Every node's record for ``name`` as ``node`` holds them now."""
    return records_of(await node.scan("fleet/"), name)


def records_of(state: Mapping[str, Any], name: str) -> dict[str, Record]:
    """Every node's record for ``name`` in a ``scan("fleet/")`` result (pure)."""
    out: dict[str, Record] = {}
    suffix = f"/model/{name}"
    for key, value in state.items():
        if not key.endswith(suffix):
            continue
        nid = key[len("fleet/") : -len(suffix)]
        rec = Record.of(value)
        if nid and "/" not in nid and rec is not None and rec.name == name:
            out[nid] = rec
    return dict(sorted(out.items()))


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    """Tunables of the state machine.

    Attributes:
        canary: the labelled canary set (``.npz`` with x and y).
        gate: the bounds a new model must pass at validation and in the window
            (the rollout's gate; default: at most two points of accuracy lost).
        window_s: how long a new model is watched before it is committed.
        check_every_s: how often the window is checked.
        min_window_calls: calls served in the window before its error rate counts.
        remeasure_every_s: how often in the window the canary set is run again (accuracy
            and p99 against the gate); it is always run once more at the window's end,
            before the commit.
        max_resumes: restarts that may find one update under way before it rolls back.
    """

    canary: str | Path = _SHIPPED_CANARY
    gate: tuple[Bound, ...] = field(default_factory=lambda: parse_gate("accuracy>=-0.02"))
    window_s: float = 30.0
    check_every_s: float = 1.0
    min_window_calls: int = 20
    remeasure_every_s: float = 10.0
    max_resumes: int = 3


StepHook = Callable[[Record], Awaitable[None] | None]


class Lifecycle:
    """One node's state machine for model ``name``.

    Args:
        node: the node (writes the records in its zone).
        artifacts: its artifact side (releases, fetch, read).
        engine: the engine that serves; swapped on activation and rollback.
        name: the model name.
        config: tunables.
        on_step: called after each record is durable and before its side effect
            (tests kill the process there).
    """

    def __init__(
        self,
        node: Node,
        artifacts: Artifacts,
        engine: Engine,
        name: str,
        config: LifecycleConfig | None = None,
        *,
        on_step: StepHook | None = None,
    ) -> None:
        self.node = node
        self.artifacts = artifacts
        self.engine = engine
        self.name = name
        self.config = config or LifecycleConfig()
        self.on_step = on_step
        self.record: Record | None = None
        self.key = lifecycle_key(node.node_id, name)
        self._lock = asyncio.Lock()
        self._enrolled = False
        node.add_status_source(f"model_lifecycle:{name}", self.status)

    # ------------------------------------------------------------------ records

    async def _write(self, rec: Record) -> Record:
        rec = replace(rec, at_ms=self.node.wall_ms())
        await self.node.put(self.key, rec.value())
        self.record = rec
        log.info(
            "%s %s v%d: %s%s",
            self.node.node_id,
            self.name,
            rec.version,
            rec.step,
            f" ({rec.reason})" if rec.reason else "",
        )
        if self.on_step is not None:
            got = self.on_step(rec)
            if got is not None:
                await got
        return rec

    async def _view(self, rec: Record, status: str) -> None:
        if rec.serving_version:
            await publish_model(
                self.node,
                self.node.node_id,
                ModelStatus(self.name, str(rec.serving_version), rec.serving_sha256, status),
            )

    async def _manifest(self, version: int) -> ReleaseManifest | None:
        return await self.artifacts.release(self.name, version)

    async def _serve(self, version: int, sha256: str) -> None:
        m = await self._manifest(version)
        if m is None or m.sha256 != sha256:
            raise SyncfwError(f"{self.name} v{version} ({sha256[:12]}) is no standing release")
        if not self.artifacts.held(m):
            await self.artifacts.fetch(m)
        data = await self.artifacts.read(m)
        await self.engine.load(data, m.model_manifest())

    # ------------------------------------------------------------------ membership

    async def enrol(self) -> None:
        """Say this node runs ``name`` (``{"runs": true}`` at :func:`member_key`), once:
        from then on a stage the hash puts it in waits for its report."""
        if self._enrolled:
            return
        key = member_key(self.node.node_id, self.name)
        got = await self.node.get(key)
        if not (isinstance(got, Mapping) and got.get("runs") is True):
            await self.node.put(
                key, {"name": self.name, "runs": True, "since_ms": self.node.wall_ms()}
            )
        self._enrolled = True

    async def leave(self) -> None:
        """Say this node no longer runs ``name`` (a truck taken out of service): stages
        stop waiting for it. Its records stay (the log keeps what happened)."""
        await self.node.put(
            member_key(self.node.node_id, self.name),
            {"name": self.name, "runs": False, "since_ms": self.node.wall_ms()},
        )
        self._enrolled = False

    # ------------------------------------------------------------------ restart

    async def recover(self) -> Record | None:
        """Read this node's record and serve, resume or roll back what it says (invariant 3).

        Returns the record as it stands once recovery is done.
        """
        async with self._lock:
            rec = Record.of(await self.node.get(self.key))
            self.record = rec
            if rec is None:
                return None
            if rec.step in TERMINAL:
                await self._serve_recorded(rec)
                return rec
            if rec.attempt >= self.config.max_resumes:
                return await self._rollback(
                    rec, (f"interrupted {rec.attempt + 1} times at {rec.step}: rolled back")
                )
            if rec.step == "active":
                rec = await self._write(replace(rec, attempt=rec.attempt + 1))
                try:
                    await self._serve(rec.version, rec.sha256)
                except SyncfwError as exc:
                    return await self._rollback(rec, f"reload after restart failed: {exc}")
                await self._view(rec, "active")
                return await self._watch(rec)
            # before activation: the previous model serves; resume from the download
            await self._serve_recorded(rec)
            m = await self._manifest(rec.version)
            if m is None or m.sha256 != rec.sha256:
                return await self._fail(rec, "the release no longer stands")
            return await self._update(m, resume=replace(rec, attempt=rec.attempt + 1))

    async def _serve_recorded(self, rec: Record) -> None:
        if not rec.serving_version:
            return
        try:
            await self._serve(rec.serving_version, rec.serving_sha256)
        except SyncfwError as exc:
            log.warning(
                "%s: cannot serve %s v%d after restart: %s",
                self.node.node_id,
                self.name,
                rec.serving_version,
                exc,
            )

    # ------------------------------------------------------------------ update

    async def update(self, manifest: ReleaseManifest) -> Record:
        """Run release ``manifest`` through the state machine; returns the final record.

        A version at or below the record's (an update done, rolled back or failed) is
        not tried again: the record is returned unchanged.
        """
        if manifest.name != self.name:
            raise ValueError(f"release of {manifest.name!r}, not {self.name!r}")
        async with self._lock:
            rec = self.record
            if rec is not None and (
                manifest.version < rec.version
                or (manifest.version == rec.version and rec.step in TERMINAL)
            ):
                return rec
            return await self._update(manifest, resume=None)

    async def _update(self, m: ReleaseManifest, *, resume: Record | None) -> Record:
        if resume is not None:
            rec = replace(resume, step="downloading")
        else:
            cur = self.record
            rec = Record(self.name, "downloading", m.version, m.sha256)
            if cur is not None:
                rec = replace(
                    rec,
                    serving_version=cur.serving_version,
                    serving_sha256=cur.serving_sha256,
                    serving_accuracy=cur.serving_accuracy,
                    prev_version=cur.serving_version,
                    prev_sha256=cur.serving_sha256,
                    prev_accuracy=cur.serving_accuracy,
                )
        rec = await self._write(rec)
        try:
            if not self.artifacts.held(m):
                await self.artifacts.fetch(m)
            rec = await self._write(replace(rec, step="verifying"))
            data = await self.artifacts.read(m)
            rec = await self._write(replace(rec, step="loading"))
            mm = m.model_manifest()
            mm.verify(data)
        except (SyncfwError, KeyError, ValueError, OSError) as exc:
            return await self._fail(rec, f"{rec.step}: {exc}")
        rec = await self._write(replace(rec, step="validating"))
        try:
            rec = await self._validate(rec, m, data)
        except SyncfwError as exc:
            return await self._rollback(rec, f"validating: {exc}")
        fails = rec.report(self.node.node_id).failures(self.config.gate)
        if fails:
            return await self._rollback(rec, "validation failed the gate: " + "; ".join(fails))
        rec = await self._write(replace(rec, step="activating"))
        try:
            await self.engine.load(data, mm)
        except SyncfwError as exc:
            return await self._rollback(rec, f"activating: {exc}")
        rec = await self._write(
            replace(
                rec,
                step="active",
                serving_version=m.version,
                serving_sha256=m.sha256,
                serving_accuracy=rec.accuracy,
            )
        )
        await self._view(rec, "active")
        return await self._watch(rec)

    async def _validate(self, rec: Record, m: ReleaseManifest, data: bytes) -> Record:
        from syncfw.inference.optimize import evaluate

        got = await asyncio.to_thread(evaluate, data, self.config.canary, label=f"v{m.version}")
        base = rec.prev_accuracy
        if base is None and rec.prev_version:
            prev = await self._manifest(rec.prev_version)
            if prev is not None and self.artifacts.held(prev):
                old = await asyncio.to_thread(
                    evaluate, await self.artifacts.read(prev), self.config.canary
                )
                base = old.accuracy
        if base is None:
            base = m.canary_accuracy if m.canary_accuracy is not None else got.accuracy
        return replace(
            rec,
            accuracy=got.accuracy,
            accuracy_delta=got.accuracy - base,
            error_rate=0.0,
            p99_ms=got.p99_ms,
        )

    def _calls(self) -> tuple[int, int]:
        """Finished calls and the ok ones among them. A call still in flight counts in
        neither (the engine counts ``calls`` at the start), so a sample taken mid-call
        never reads as an error."""
        st = self.engine.status()
        ok = int(st["ok"])
        failed = sum(int(n) for n in st["errors"].values())
        return ok + failed, ok

    async def _watch(self, rec: Record) -> Record:
        cfg = self.config
        calls0, ok0 = self._calls()
        start = time.monotonic()
        end = start + cfg.window_s
        measured = start
        while True:
            await asyncio.sleep(max(0.0, min(cfg.check_every_s, end - time.monotonic())))
            calls, ok = self._calls()
            n = calls - calls0
            if n >= cfg.min_window_calls and n > 0:
                rate = (n - (ok - ok0)) / n
                probe = replace(rec, error_rate=rate)
                fails = probe.report(self.node.node_id).failures(
                    b for b in cfg.gate if b.figure == "error_rate"
                )
                if fails:
                    return await self._rollback(
                        probe, "regression in the watch window: " + "; ".join(fails)
                    )
                rec = probe
            now = time.monotonic()
            if now >= end or now - measured >= cfg.remeasure_every_s:
                measured = now
                probe = await self._remeasure(rec)
                fails = probe.report(self.node.node_id).failures(
                    b for b in cfg.gate if b.figure in ("accuracy", "p99_ms")
                )
                if fails:
                    return await self._rollback(
                        probe,
                        "regression in the watch window "
                        "(canary measured again): " + "; ".join(fails),
                    )
                rec = probe
            if now >= end:
                break
        rec = await self._write(replace(rec, step="committed"))
        await self._view(rec, "active")
        return rec

    async def _remeasure(self, rec: Record) -> Record:
        """The canary set run again on the serving model's bytes, on this node, now: the
        accuracy against the same baseline as at validation, and the p99 under the
        node's load of the moment."""
        from syncfw.inference.optimize import evaluate

        m = await self._manifest(rec.version)
        if m is None or m.sha256 != rec.sha256:
            return rec
        data = await self.artifacts.read(m)
        try:
            got = await asyncio.to_thread(
                evaluate, data, self.config.canary, label=f"v{m.version} window"
            )
        except SyncfwError as exc:
            log.warning(
                "%s: %s v%d: the canary could not be run again in the window: %s",
                self.node.node_id,
                self.name,
                rec.version,
                exc,
            )
            return rec
        base = None
        if rec.accuracy is not None and rec.accuracy_delta is not None:
            base = rec.accuracy - rec.accuracy_delta
        delta = rec.accuracy_delta if base is None else got.accuracy - base
        return replace(rec, accuracy=got.accuracy, accuracy_delta=delta, p99_ms=got.p99_ms)

    async def _rollback(self, rec: Record, reason: str) -> Record:
        out = await self._write(
            replace(
                rec,
                step="rolled_back",
                reason=reason[:500],
                serving_version=rec.prev_version,
                serving_sha256=rec.prev_sha256,
                serving_accuracy=rec.prev_accuracy,
            )
        )
        log.warning("%s: %s v%d rolled back: %s", self.node.node_id, self.name, rec.version, reason)
        with contextlib.suppress(SyncfwError):
            if out.serving_version and (
                self.engine.model is None or self.engine.model.sha256 != out.serving_sha256
            ):
                await self._serve(out.serving_version, out.serving_sha256)
        if not out.serving_version:
            await self._unload(out)
            return out
        await self._view(out, "active")
        return out

    async def _unload(self, rec: Record) -> None:
        """A first model rolled back: serve none rather than it (invariant 6)."""
        model = self.engine.model
        gone = None
        if model is not None and model.sha256 == rec.sha256:  # never a model loaded otherwise
            gone = await self.engine.unload()
        log.warning(
            "%s: %s v%d was the first model of %s: unloaded, no model serves now (%s)",
            self.node.node_id,
            self.name,
            rec.version,
            self.name,
            "it was serving" if gone is not None else "it never served",
        )
        await publish_model(
            self.node,
            self.node.node_id,
            ModelStatus(self.name, str(rec.version), rec.sha256, "rolled_back"),
        )

    async def _fail(self, rec: Record, reason: str) -> Record:
        log.warning("%s: %s v%d failed: %s", self.node.node_id, self.name, rec.version, reason)
        return await self._write(replace(rec, step="failed", reason=reason[:500]))

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The ``model_lifecycle:<name>`` entry of the node's status."""
        if self.record is None:
            return {}
        rec = self.record
        model = self.engine.model
        serving = (
            f"v{rec.serving_version}"
            if rec.serving_version
            else "none (the first model rolled back: no model serves)"
            if rec.step == "rolled_back"
            else "none"
        )
        return rec.value() | {
            "serving": serving,
            "engine_sha256": model.sha256 if model is not None else None,
        }
