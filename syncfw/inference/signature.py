"""What a model declares it takes and returns, and the digest of what it was given.

Pure: numpy and (for reading a file's declarations) onnx; no I/O, no runtime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from syncfw.inference.errors import InferenceError, ModelLoadError
from syncfw.inference.providers import ProviderPlan

__all__ = ["ModelInfo", "TensorSpec", "batchable", "declared_signature", "input_digest"]

Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared input or output.

    Attributes:
        name: tensor name.
        dtype: numpy dtype name (``"float32"``).
        shape: one entry per dimension: an int when fixed, None when symbolic.
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    # Derived once: check() runs for every tensor of every call.
    np_dtype: np.dtype[Any] = field(init=False, repr=False, compare=False)
    _fixed: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "np_dtype", np.dtype(self.dtype))
        fixed = tuple((i, d) for i, d in enumerate(self.shape) if d is not None)
        object.__setattr__(self, "_fixed", fixed)

    def check(self, arr: Any, what: str, error: type[InferenceError]) -> None:
        """Raise ``error`` unless ``arr`` is an ndarray of this dtype and shape."""
        if not isinstance(arr, np.ndarray):
            raise error(f"{what} {self.name!r} must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != self.np_dtype:
            raise error(f"{what} {self.name!r} must be {self.dtype}, got {arr.dtype}")
        shape = arr.shape
        ok = len(shape) == len(self.shape)
        if ok:
            for i, d in self._fixed:
                if shape[i] != d:
                    ok = False
                    break
        if not ok:
            raise error(
                f"{what} {self.name!r} must have shape {self.display_shape}, got {list(arr.shape)}"
            )

    @property
    def display_shape(self) -> list[int | str]:
        """The shape with symbolic dimensions shown as ``"?"``."""
        return [d if d is not None else "?" for d in self.shape]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What is serving: identity, signature and where it runs.

    Attributes:
        path: the file it was loaded from ("" for a model loaded from memory).
        name: model name: the manifest's; for a file loaded without one, the
            engine's ``name``, else the model's ``name`` metadata, else the file stem.
        version: model version: the manifest's; else the engine's ``version``,
            else ``version`` metadata, else ``"0"``.
        sha256: hex sha256 of the model bytes.
        size: length of the model bytes.
        inputs: declared inputs.
        outputs: declared outputs.
        labels: class labels (the manifest's, else the engine's ``labels``, else
            ``labels`` metadata; none: indices).
        provider: the execution provider the session actually uses.
        session_providers: every provider the session reports.
        plan: what was asked for.
        batchable: every input and output has a dynamic first dimension and fixed
            others, so concurrent calls can share one ``session.run``.
        load_s: seconds to create the session.
        warmup_s: seconds of warm-up.
    """

    path: str
    name: str
    version: str
    sha256: str
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    provider: str
    session_providers: tuple[str, ...]
    plan: ProviderPlan
    batchable: bool
    load_s: float
    warmup_s: float

    @property
    def fell_back(self) -> bool:
        """ONNX Runtime runs the model on a provider other than the first one wanted."""
        return self.provider != self.plan.preferred

    def as_dict(self) -> dict[str, Any]:
        """Plain data for node status."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "provider": self.provider,
            "session_providers": list(self.session_providers),
            "requested_providers": list(self.plan.providers),
            "fell_back": self.fell_back,
            "inputs": [[s.name, s.dtype, s.display_shape] for s in self.inputs],
            "outputs": [[s.name, s.dtype, s.display_shape] for s in self.outputs],
            "batchable": self.batchable,
            "load_ms": round(self.load_s * 1e3, 3),
            "warmup_ms": round(self.warmup_s * 1e3, 3),
        }


_HEADERS: dict[tuple[str, str, tuple[int, ...]], bytes] = {}


def input_digest(feeds: Mapping[str, Array]) -> str:
    """Hex sha256 over the inputs' names, dtypes, shapes and bytes (name order)."""
    h = hashlib.sha256()  # sha256: hardware-accelerated here, ~2 GB/s
    for name in sorted(feeds) if len(feeds) > 1 else feeds:
        arr = feeds[name]
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        hkey = (name, arr.dtype.str, arr.shape)
        header = _HEADERS.get(hkey)
        if header is None:
            if len(_HEADERS) > 1024:  # a bound: shapes vary little in practice
                _HEADERS.clear()
            header = _HEADERS[hkey] = f"{name}|{arr.dtype.str}|{arr.shape}|".encode()
        h.update(header)
        h.update(arr.data)
    return h.hexdigest()


def declared_signature(model: Any, what: str) -> tuple[TensorSpec, ...]:
    """The signature the ONNX file declares (``graph.input`` less initializers, ``graph.output``).

    Read from the file, not from the session: ONNX Runtime merges a declared
    shape that contradicts its own inference "leniently" into a looser one, which
    would hide exactly the mismatch this is for.
    """
    from onnx import helper

    graph = model.graph
    if what == "input":
        inits = {t.name for t in graph.initializer}
        values = [v for v in graph.input if v.name not in inits]
    else:
        values = list(graph.output)
    specs: list[TensorSpec] = []
    for v in values:
        if v.type.WhichOneof("value") != "tensor_type":
            raise ModelLoadError(f"{what} {v.name!r} is not a tensor; only tensors are supported")
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
        except Exception:  # an element type numpy cannot hold (strings, bfloat16, ...)
            raise ModelLoadError(f"{what} {v.name!r} has an unsupported element type") from None
        dims = v.type.tensor_type.shape.dim if v.type.tensor_type.HasField("shape") else []
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims
        )
        specs.append(TensorSpec(v.name, dtype.name, shape))
    return tuple(specs)


def batchable(specs: Sequence[TensorSpec]) -> bool:
    """Every tensor has a dynamic first dimension and fixed others (calls can be stacked)."""
    return all(
        len(s.shape) >= 1 and s.shape[0] is None and all(d is not None for d in s.shape[1:])
        for s in specs
    )
