"""Loading a model: bytes and manifest checked, providers planned, session made, warmed up, swapped in.

Invariants:

1. A model is swapped in only once it is fully loaded: read, checked against
   its manifest (size, then sha256, then declared signature), session created
   on the planned providers, provider checked, warmed up and its warm-up
   outputs checked. Any failure raises and leaves the previously loaded model
   serving; calls already running finish on the model they started with.
2. The provider recorded is the one the session reports (``get_providers()``),
   not the one asked for: ONNX Runtime falls back silently otherwise.
3. Loads are serialised (one lock): two concurrent loads end with the one
   that finished last serving, never a mix.
4. ONNX Runtime's and protobuf's exceptions never leave this module: they
   become :class:`~syncfw.errors.ModelLoadError` with the model named.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from syncfw.inference.config import EngineConfig
from syncfw.inference.errors import EngineStateError, InferenceError, ModelLoadError
from syncfw.inference.isolation import ProcessSession
from syncfw.inference.manifest import (
    ModelManifest,
    ParsedModel,
    manifest_of,
    metadata_labels,
    parse_model,
)
from syncfw.inference.pipeline import Loaded, check_outputs
from syncfw.inference.providers import (
    TENSORRT,
    AcceleratorInfo,
    ProviderPlan,
    available_providers,
    detect_accelerator,
    plan_providers,
    resolve_actual,
)
from syncfw.inference.signature import ModelInfo, batchable

__all__ = ["Loader", "ModelSource"]

ModelSource = str | Path | bytes
"""A path to an ``.onnx`` file, or the model's bytes (which need a manifest)."""


@dataclass(frozen=True, slots=True)
class _Checked:
    """Bytes that passed every check before a session is made."""

    data: bytes
    manifest: ModelManifest
    parsed: ParsedModel
    where: str  # names the model in errors
    path: str  # ModelInfo.path: the file, or "" for a model held in memory


class Loader:
    """Owns the model serving now and replaces it, whole or not at all.

    Args:
        config: the engine's config (providers, isolation, warm-up, threads).
        name: overrides the model's name for a model loaded from a file.
        version: overrides the model's version for a model loaded from a file.
        labels: class labels when neither the manifest nor the file gives them.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        name: str | None = None,
        version: str | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        self._config = config
        self._name = name
        self._version = version
        self._labels = tuple(labels) if labels is not None else None
        self._accelerator: AcceleratorInfo | None = config.accelerator
        self._lock = asyncio.Lock()
        self.current: Loaded | None = None
        self.closed = False
        self.loads = 0
        self.failures = 0

    async def swap(
        self,
        source: ModelSource,
        manifest: ModelManifest | None,
        retire: Callable[[Loaded], None],
    ) -> ModelInfo:
        """Load ``source`` and make it the one serving; ``retire`` gets the model it replaced.

        Raises:
            ModelLoadError, ProviderError, OutputSignatureError: see :meth:`Engine.load`.
            EngineStateError: closed before or while loading.
            TypeError: bytes without a manifest.
        """
        if self.closed:
            raise EngineStateError("the engine is closed")
        if isinstance(source, (bytes, bytearray, memoryview)) and manifest is None:
            raise TypeError("a model held in memory needs its ModelManifest: load(data, manifest)")
        async with self._lock:
            try:
                loaded = await asyncio.to_thread(self._load_sync, source, manifest)
            except InferenceError:
                self.failures += 1
                raise
            if self.closed:  # closed while loading: do not start serving
                if isinstance(loaded.session, ProcessSession):
                    await asyncio.to_thread(loaded.session.close)
                raise EngineStateError("the engine was closed while loading")
            old, self.current = self.current, loaded
            self.loads += 1
            if old is not None:
                retire(old)
            return loaded.info

    async def unload(self, retire: Callable[[Loaded], None]) -> ModelInfo | None:
        """Stop serving the current model (after any load in progress); returns what served."""
        async with self._lock:
            old, self.current = self.current, None
            if old is not None:
                retire(old)
            return None if old is None else old.info

    # -- on a worker thread ----------------------------------------------------

    def _load_sync(self, source: ModelSource, manifest: ModelManifest | None) -> Loaded:
        checked = self._check(source, manifest)
        session, plan, load_s = self._create_session(checked)
        try:
            return self._finish(session, checked, plan, load_s)
        except BaseException:
            if isinstance(session, ProcessSession):
                session.close()
            raise

    def _check(self, source: ModelSource, manifest: ModelManifest | None) -> _Checked:
        """Read and check the bytes: against the manifest if there is one, else build it."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            assert manifest is not None
            data, path = bytes(source), ""
            where = f"{manifest.name!r} {manifest.version} (in memory)"
        else:
            p = Path(source)
            path, where = str(p), repr(str(p))
            try:
                data = p.read_bytes()
            except OSError as exc:
                raise ModelLoadError(f"cannot read model {where}: {exc}") from None
        if manifest is not None:
            try:
                manifest.verify(data)
            except ModelLoadError as exc:
                raise ModelLoadError(f"refusing {where}: {exc}") from None
            parsed = parse_model(data, where)
            manifest.check_signature(parsed)
            if manifest.labels is None:
                labels = self._labels if self._labels is not None else metadata_labels(parsed.meta)
                manifest = dataclasses.replace(manifest, labels=labels)
        else:
            parsed = parse_model(data, where)
            manifest = manifest_of(
                data,
                parsed,
                default_name=Path(path).stem,
                name=self._name,
                version=self._version,
                labels=self._labels,
            )
        return _Checked(data, manifest, parsed, where, path)

    def _plan(self, sha256: str) -> ProviderPlan:
        cfg = self._config
        available = cfg.available if cfg.available is not None else tuple(available_providers())
        wants_trt = TENSORRT in available and (cfg.providers is None or TENSORRT in cfg.providers)
        if self._accelerator is None and wants_trt:
            # Only the TensorRT cache key needs it; detected once (nvidia-smi is slow).
            self._accelerator = detect_accelerator()
        plan = plan_providers(
            available,
            model_sha256=sha256,
            preferred=cfg.providers,
            accel=self._accelerator,
            cache_root=cfg.trt_cache_dir,
        )
        if plan.trt_cache_dir is not None:
            plan.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        return plan

    def _create_session(self, checked: _Checked) -> tuple[Any, ProviderPlan, float]:
        import onnxruntime as ort

        cfg = self._config
        data, sha, where = checked.data, checked.manifest.sha256, checked.where
        plan = self._plan(sha)
        entries = cfg.session_entries
        t0 = time.perf_counter()
        session: Any
        try:
            if cfg.isolation == "process":
                session = ProcessSession(
                    data,
                    plan.for_session(),
                    intra_op_threads=cfg.intra_op_threads,
                    session_config=entries,
                )
            else:
                opts = ort.SessionOptions()
                # Shape mismatches are checked and reported by us, not logged by ORT.
                opts.log_severity_level = 3
                if cfg.intra_op_threads is not None:
                    opts.intra_op_num_threads = cfg.intra_op_threads
                for k, v in entries.items():
                    opts.add_session_config_entry(k, v)
                session = ort.InferenceSession(
                    data, sess_options=opts, providers=plan.for_session()
                )
        except ModelLoadError as exc:
            raise ModelLoadError(f"cannot load {where}: {exc}") from None
        except Exception as exc:  # ORT raises its own pybind types: translate them here
            raise ModelLoadError(
                f"ONNX Runtime cannot load {where} ({len(data)} bytes, sha256 {sha[:12]}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        return session, plan, time.perf_counter() - t0

    def _finish(self, session: Any, checked: _Checked, plan: ProviderPlan, load_s: float) -> Loaded:
        """Check the provider, describe the model, warm it up."""
        provider = resolve_actual(
            plan, session.get_providers(), allow_fallback=self._config.allow_fallback
        )
        m = checked.manifest
        inputs, outputs = checked.parsed.inputs, checked.parsed.outputs
        info = ModelInfo(
            path=checked.path,
            name=m.name,
            version=m.version,
            sha256=m.sha256,
            size=m.size,
            inputs=inputs,
            outputs=outputs,
            labels=m.labels if m.labels is not None else (),
            provider=provider,
            session_providers=tuple(session.get_providers()),
            plan=plan,
            batchable=batchable(inputs) and batchable(outputs),
            load_s=load_s,
            warmup_s=0.0,
        )
        t1 = time.perf_counter()
        zeros = {s.name: np.zeros([d or 1 for d in s.shape], dtype=s.dtype) for s in inputs}
        for _ in range(self._config.warmup_runs):
            try:
                raw = session.run(None, zeros)
            except Exception as exc:  # translated: ORT's types must not leak
                raise ModelLoadError(
                    f"warm-up of {info.name!r} failed: {type(exc).__name__}: {exc}"
                ) from None
            check_outputs(info, raw, 1)
        return Loaded(session, dataclasses.replace(info, warmup_s=time.perf_counter() - t1))
