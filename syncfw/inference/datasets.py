"""Calibration and canary sets: read, checked against a model input, as float32 batches.

Invariants:

1. One convention, the shipped canary set's: ``uint8`` arrays are 8-bit camera
   frames and are scaled to ``[0, 1]``; float arrays are taken as they are
   (and must be finite); nothing else is accepted. An array holds either a
   batch (the model input's rank) or one sample (one dimension less); fixed
   dimensions must match the model's.
2. Every problem is a :class:`~syncfw.errors.DatasetError` naming the file and
   what is wrong; numpy's and zipfile's exceptions never leak, and files are
   opened through our own handle (numpy leaks its own when an archive is bad).
   Pickles are refused.

Pure: numpy, the standard library and the inference package's own modules.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from syncfw.errors import DatasetError
from syncfw.inference.signature import TensorSpec

__all__ = ["CALIBRATION_BATCH", "CanarySet", "fit_input", "load_calibration", "load_canary_set"]

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 64
"""Samples per batch the calibration reader hands the quantizer."""

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class CanarySet:
    """A labelled canary set, as :func:`load_canary_set` reads it.

    Attributes:
        x: float32 samples ``[n, ...]`` (``uint8`` frames already scaled to ``[0, 1]``).
        y: int64 labels ``[n]``.
        labels: class names, when the file names them.
        source: where it was read from (for messages).
        digest: hex sha256 over ``x`` and ``y``: two reports compare only on equal digests.
    """

    x: F32
    y: I64
    labels: tuple[str, ...] | None
    source: str
    digest: str

    @classmethod
    def of(
        cls,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        *,
        labels: Sequence[str] | None = None,
        source: str = "canary set",
    ) -> CanarySet:
        """A canary set from arrays (checked as a file's would be).

        Raises:
            DatasetError: no samples, labels that are not integers ``>= 0``, or
                a different number of samples and labels.
        """
        fx = _as_float(x, f"{source} 'x'")
        if fx.ndim < 1 or len(fx) == 0:
            raise DatasetError(f"{source} holds no samples")
        ly = np.asarray(y)
        if ly.ndim != 1 or ly.dtype.kind not in "iu":
            raise DatasetError(
                f"{source} 'y' must be integer labels [n], got {ly.dtype} {list(ly.shape)}"
            )
        if len(ly) != len(fx):
            raise DatasetError(f"{source} has {len(fx)} samples but {len(ly)} labels")
        if ly.min() < 0:
            raise DatasetError(f"{source} has a negative label ({int(ly.min())})")
        iy = ly.astype(np.int64)
        digest = hashlib.sha256(np.ascontiguousarray(fx).tobytes() + iy.tobytes()).hexdigest()
        names = tuple(str(s) for s in labels) if labels is not None else None
        return cls(fx, iy, names, source, digest)


def load_canary_set(path: str | Path) -> CanarySet:
    """Read a labelled canary set: an ``.npz`` with ``x`` (samples) and ``y`` (labels).

    The shipped ``canary.npz`` is the format: ``x`` uint8 frames ``[n, 1, 16, 16]``,
    ``y`` int64 ``[n]``, optionally ``labels`` (class names).

    Raises:
        DatasetError: missing or unreadable file, no ``x`` or no ``y`` (a canary
            set without labels cannot measure accuracy), or arrays that do not
            fit together.
    """
    p = Path(path)
    arrays = _read_npz(p, "canary set")
    if "x" not in arrays:
        raise DatasetError(f"canary set {p} has no 'x' (samples); it holds {sorted(arrays)}")
    if "y" not in arrays:
        raise DatasetError(
            f"canary set {p} has no 'y' (labels): accuracy cannot be measured without them"
        )
    names = arrays.get("labels")
    labels = [str(s) for s in names.tolist()] if names is not None and names.ndim == 1 else None
    return CanarySet.of(arrays["x"], arrays["y"], labels=labels, source=f"canary set {p}")


def load_calibration(path: str | Path, spec: TensorSpec) -> list[F32]:
    """Read a calibration set for the input ``spec``: a directory of ``.npy``/``.npz`` or one ``.npz``.

    In an ``.npz`` the array named like the input is used, else ``x``, else
    its only array. Labels are not needed (and ignored). Arrays are checked
    against the input (invariant 3) and split into batches.

    Args:
        path: a directory (its ``.npy`` and ``.npz`` files, in name order) or an ``.npz``/``.npy``.
        spec: the model input the samples feed.

    Returns:
        float32 batches ``[<= CALIBRATION_BATCH, ...]`` in file order.

    Raises:
        DatasetError: missing path, a directory without data files, an
            unreadable file, or samples of the wrong shape or dtype.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".npy", ".npz") and f.is_file())
        others = sorted(
            f.name for f in p.iterdir() if f not in files and not f.name.startswith(".")
        )
        if others:
            log.warning(
                "calibration set %s: ignoring %d file(s) that are not .npy/.npz: %s",
                p,
                len(others),
                ", ".join(others[:5]),
            )
        if not files:
            raise DatasetError(f"calibration directory {p} holds no .npy or .npz files")
    elif p.exists():
        files = [p]
    else:
        raise DatasetError(f"calibration set {p} does not exist")
    batches: list[F32] = []
    for f in files:
        arr = _pick(f, _read_any(f, "calibration set"), spec.name)
        samples = fit_input(arr, spec, f"calibration set {f}")
        batches += [
            samples[i : i + CALIBRATION_BATCH] for i in range(0, len(samples), CALIBRATION_BATCH)
        ]
    return batches


def _read_any(path: Path, what: str) -> dict[str, npt.NDArray[Any]]:
    if path.suffix == ".npy":
        try:
            with path.open("rb") as fh:  # our handle: numpy leaks its own when a file is bad
                return {"x": np.load(fh, allow_pickle=False)}
        except FileNotFoundError:
            raise DatasetError(f"{what} {path} does not exist") from None
        except (OSError, ValueError, EOFError) as exc:
            raise DatasetError(f"{what} {path} is not a readable .npy file: {exc}") from None
    return _read_npz(path, what)


def _read_npz(path: Path, what: str) -> dict[str, npt.NDArray[Any]]:
    if not path.exists():
        raise DatasetError(f"{what} {path} does not exist")
    if path.is_dir():
        raise DatasetError(f"{what} {path} is a directory, not an .npz file")
    try:
        with path.open("rb") as fh:  # our handle: numpy leaks its own when an archive is bad
            data = np.load(fh, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise DatasetError(f"{what} {path} is a bare .npy array, not an .npz archive")
            with data:
                return {k: data[k] for k in data.files}
    except DatasetError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickles refused), OSError
        raise DatasetError(
            f"{what} {path} is not a readable .npz file: {type(exc).__name__}: {exc}"
        ) from None


def _pick(path: Path, arrays: dict[str, npt.NDArray[Any]], name: str) -> npt.NDArray[Any]:
    for key in (name, "x"):
        if key in arrays:
            return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise DatasetError(
        f"calibration set {path} holds {sorted(arrays)}: name the samples {name!r} or 'x'"
    )


def _as_float(arr: npt.NDArray[Any], what: str) -> F32:
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        return (a.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    if a.dtype.kind != "f":
        raise DatasetError(f"{what} must be uint8 frames or floats, got {a.dtype}")
    out = a.astype(np.float32)
    if not np.isfinite(out).all():
        raise DatasetError(f"{what} holds NaN or infinity")
    return out


def fit_input(arr: npt.NDArray[Any], spec: TensorSpec, what: str) -> F32:
    """Samples as a float32 batch for ``spec`` (one sample gets a batch axis).

    Args:
        arr: the samples as read.
        spec: the model input they feed.
        what: names them in errors.

    Raises:
        DatasetError: a dtype, shape or value the input does not take, or no samples.
    """
    if spec.np_dtype != np.float32:
        raise DatasetError(
            f"model input {spec.name!r} is {spec.dtype}; only float32 inputs are supported"
        )
    x = _as_float(arr, what)
    rank = len(spec.shape)
    if x.ndim == rank - 1:
        x = x[None]
    want = [d if d is not None else "?" for d in spec.shape]
    if x.ndim != rank or any(
        d is not None and d != got for d, got in zip(spec.shape, x.shape, strict=True)
    ):
        raise DatasetError(
            f"{what}: samples of shape {list(x.shape)} do not fit the model input "
            f"{spec.name!r} {want} (or one sample {want[1:]})"
        )
    if len(x) == 0:
        raise DatasetError(f"{what} holds no samples")
    return x
