"""Choosing ONNX Runtime execution providers, and checking which one is really in use.

The choice is a pure function of what is available (:func:`plan_providers`), so
it is testable on a CPU-only machine by passing the available list in. Only
:func:`detect_accelerator` and :func:`available_providers` touch the system.

ONNX Runtime silently falls back to the next provider when one fails to
initialise (a missing CUDA library, an unsupported op for TensorRT), so the
provider actually in use is read back from the session and compared with the
plan (:func:`resolve_actual`); fallback can be made an error.

TensorRT engines take seconds to minutes to build, so they are cached on disk.
A cached engine is only valid for the same model, the same GPU and the same
TensorRT version, hence the cache directory is keyed by all three
(:func:`trt_cache_key`).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from syncfw.inference.errors import ProviderError

__all__ = [
    "CPU",
    "CUDA",
    "DEFAULT_ORDER",
    "GPU_PROVIDERS",
    "TENSORRT",
    "AcceleratorInfo",
    "ProviderPlan",
    "available_providers",
    "detect_accelerator",
    "plan_providers",
    "resolve_actual",
    "trt_cache_key",
]

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_ORDER: tuple[str, ...] = (TENSORRT, CUDA, CPU)
GPU_PROVIDERS = frozenset({TENSORRT, CUDA})


@dataclass(frozen=True, slots=True)
class AcceleratorInfo:
    """What the TensorRT cache key needs to know about the machine.

    Attributes:
        gpu_name: e.g. ``"NVIDIA H100 80GB HBM3"``; None when no GPU is visible.
        trt_version: the TensorRT library version; None when unknown.
    """

    gpu_name: str | None = None
    trt_version: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderPlan:
    """The providers to ask ONNX Runtime for, in order, each with its options.

    Attributes:
        providers: provider names, most preferred first.
        options: one options dict per provider (same order).
        trt_cache_dir: where TensorRT engines and timing caches go (None without TensorRT).
    """

    providers: tuple[str, ...]
    options: tuple[dict[str, str], ...] = field(default=())
    trt_cache_dir: Path | None = None

    @property
    def preferred(self) -> str:
        """The provider the plan hopes to run on."""
        return self.providers[0]

    def for_session(self) -> list[tuple[str, dict[str, str]]]:
        """The ``providers=`` argument of ``onnxruntime.InferenceSession``."""
        opts = self.options or tuple({} for _ in self.providers)
        return [(p, dict(o)) for p, o in zip(self.providers, opts, strict=True)]


def trt_cache_key(model_sha256: str, accel: AcceleratorInfo) -> str:
    """A directory name for the TensorRT caches of one (model, GPU, TensorRT) triple.

    Args:
        model_sha256: hex sha256 of the model file.
        accel: the GPU name and TensorRT version.

    Returns:
        ``"<model sha prefix>-<digest of gpu and trt version>"``, safe as a path component.
    """
    env = f"{accel.gpu_name or 'unknown-gpu'}|{accel.trt_version or 'unknown-trt'}"
    env_digest = hashlib.sha256(env.encode()).hexdigest()[:16]
    return f"{model_sha256[:16]}-{env_digest}"


def plan_providers(
    available: Sequence[str],
    *,
    model_sha256: str,
    preferred: Sequence[str] | None = None,
    accel: AcceleratorInfo | None = None,
    cache_root: Path | None = None,
    device_id: int = 0,
    trt_fp16: bool = False,
) -> ProviderPlan:
    """Pick providers from ``available`` in the order TensorRT → CUDA → CPU (or ``preferred``).

    Args:
        available: what ``onnxruntime.get_available_providers()`` returned (injectable).
        model_sha256: keys the TensorRT caches.
        preferred: override the order; providers not available are dropped.
        accel: GPU name and TensorRT version for the cache key.
        cache_root: parent of the TensorRT cache directories; None disables the caches.
        device_id: the GPU to use.
        trt_fp16: let TensorRT build FP16 engines.

    Returns:
        The plan. CPU is appended as the last resort when it is available and
        ``preferred`` did not name it, so a GPU failure still serves.

    Raises:
        ProviderError: none of the wanted providers is available.
    """
    order = tuple(preferred) if preferred is not None else DEFAULT_ORDER
    chosen = [p for p in order if p in available]
    if preferred is None and CPU in available and CPU not in chosen:
        chosen.append(CPU)
    if not chosen:
        raise ProviderError(
            f"none of the wanted providers {list(order)} is available (available: {list(available)})"
        )
    options: list[dict[str, str]] = []
    trt_dir: Path | None = None
    for p in chosen:
        if p == TENSORRT:
            opts = {"device_id": str(device_id), "trt_fp16_enable": str(trt_fp16)}
            if cache_root is not None:
                trt_dir = cache_root / trt_cache_key(model_sha256, accel or AcceleratorInfo())
                opts |= {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(trt_dir),
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(trt_dir),
                }
            options.append(opts)
        elif p == CUDA:
            options.append({"device_id": str(device_id)})
        else:
            options.append({})
    return ProviderPlan(tuple(chosen), tuple(options), trt_dir)


def resolve_actual(
    plan: ProviderPlan, session_providers: Sequence[str], *, allow_fallback: bool
) -> str:
    """The provider really in use, from ``session.get_providers()``.

    Args:
        plan: what was asked for.
        session_providers: what the session reports, most preferred first.
        allow_fallback: when False, running on anything but ``plan.preferred``
            is an error instead of a recorded fact.

    Returns:
        The provider that runs the model's nodes first in line.

    Raises:
        ProviderError: the session reports no provider, or fell back while
            fallback was forbidden.
    """
    if not session_providers:
        raise ProviderError("the session reports no execution provider")
    actual = session_providers[0]
    if not allow_fallback and actual != plan.preferred:
        raise ProviderError(
            f"asked for {plan.preferred} but ONNX Runtime fell back to {actual} "
            f"(session providers: {list(session_providers)})"
        )
    return actual


def available_providers() -> list[str]:
    """``onnxruntime.get_available_providers()``."""
    import onnxruntime as ort

    providers: list[str] = list(ort.get_available_providers())
    return providers


def detect_accelerator(timeout_s: float = 2.0) -> AcceleratorInfo:
    """Find the GPU name (``nvidia-smi``) and TensorRT version (``tensorrt``), if present.

    Never raises: anything missing is reported as None.
    """
    gpu: str | None = None
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
            gpu = out.stdout.strip().splitlines()[0].strip() if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    trt: str | None = None
    try:
        import tensorrt  # type: ignore[import-not-found]

        trt = str(tensorrt.__version__)
    except Exception:  # any failure to import means: no TensorRT version to key on
        trt = None
    return AcceleratorInfo(gpu_name=gpu, trt_version=trt)
