"""What a model claims to be, checked against the bytes before a session is made.

A :class:`ModelManifest` names a model (name, version), pins its bytes (size,
sha256) and declares its signature. :meth:`ModelManifest.verify` compares
bytes with it, size first (cheap), then the hash; the loader then compares
the signature the file declares with the manifest's. A model fetched by the
model-lifecycle machinery arrives as bytes plus its manifest; a model loaded
from a file gets a manifest built from the file (:func:`manifest_of`).

Pure: hashlib, and onnx for reading a file's declarations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from syncfw.inference.errors import ModelLoadError
from syncfw.inference.signature import TensorSpec, declared_signature

__all__ = ["ModelManifest", "ParsedModel", "manifest_of", "metadata_labels", "parse_model"]


@dataclass(frozen=True, slots=True)
class ModelManifest:
    """A model's identity, its bytes' fingerprint and its declared signature.

    Attributes:
        name: model name (results are keyed ``results/<node>/<name>/...``).
        version: model version.
        sha256: hex sha256 of the model bytes.
        size: length of the model bytes.
        inputs: the declared inputs, in order.
        outputs: the declared outputs, in order.
        labels: class labels (None: from the engine, else the model's metadata).

    Raises:
        ValueError: an empty name or version, a sha256 that is not 64 hex
            digits, or a negative size.
    """

    name: str
    version: str
    sha256: str
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("a manifest needs a name and a version")
        sha = self.sha256.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"sha256 must be 64 hex digits, got {self.sha256!r}")
        object.__setattr__(self, "sha256", sha)
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))

    @classmethod
    def of(
        cls,
        data: bytes,
        *,
        name: str | None = None,
        version: str | None = None,
        labels: Sequence[str] | None = None,
    ) -> ModelManifest:
        """The manifest of model bytes as they are (what a publisher ships with them).

        Args:
            data: the ONNX model bytes.
            name: default the model's ``name`` metadata, else ``"model"``.
            version: default the model's ``version`` metadata, else ``"0"``.
            labels: default the model's ``labels`` metadata.

        Raises:
            ModelLoadError: the bytes are not a readable ONNX model.
        """
        return manifest_of(
            data,
            parse_model(data, "model bytes"),
            default_name="model",
            name=name,
            version=version,
            labels=labels,
        )

    def verify(self, data: bytes) -> None:
        """Check that ``data`` are the bytes this manifest pins.

        Raises:
            ModelLoadError: the size or the sha256 differs.
        """
        if len(data) != self.size:
            raise ModelLoadError(
                f"model {self.name!r} {self.version}: {len(data)} bytes, "
                f"the manifest says {self.size}"
            )
        got = hashlib.sha256(data).hexdigest()
        if got != self.sha256:
            raise ModelLoadError(
                f"model {self.name!r} {self.version}: sha256 {got[:12]}…, "
                f"the manifest says {self.sha256[:12]}…"
            )

    def check_signature(self, parsed: ParsedModel) -> None:
        """Check that the file declares the signature this manifest declares.

        Raises:
            ModelLoadError: the inputs or outputs differ (names, dtypes or shapes).
        """
        for what, mine, theirs in (
            ("inputs", self.inputs, parsed.inputs),
            ("outputs", self.outputs, parsed.outputs),
        ):
            if mine != theirs:
                raise ModelLoadError(
                    f"model {self.name!r} {self.version} declares {what} {_show(theirs)}, "
                    f"the manifest says {_show(mine)}"
                )


def _show(specs: Sequence[TensorSpec]) -> list[list[Any]]:
    return [[s.name, s.dtype, s.display_shape] for s in specs]


@dataclass(frozen=True, slots=True)
class ParsedModel:
    """What the ONNX bytes declare: signature and metadata."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    meta: Mapping[str, str]


def parse_model(data: bytes, where: str) -> ParsedModel:
    """Read the declared signature and the metadata of ONNX bytes.

    Args:
        data: the model bytes.
        where: names the model in errors (a path, or the manifest's name).

    Raises:
        ModelLoadError: empty, truncated or not an ONNX model; a non-tensor
            or unsupported input or output; no inputs or no outputs.
    """
    if not data:
        raise ModelLoadError(f"model {where} is empty")
    try:
        import onnx

        proto = onnx.load_model_from_string(data)
        inputs = declared_signature(proto, "input")
        outputs = declared_signature(proto, "output")
        meta = {p.key: p.value for p in proto.metadata_props}
    except ModelLoadError:
        raise
    except Exception as exc:  # protobuf's DecodeError and friends: translated here
        raise ModelLoadError(
            f"{where} is not a readable ONNX model ({len(data)} bytes): {type(exc).__name__}: {exc}"
        ) from None
    if not inputs or not outputs:
        raise ModelLoadError(f"model {where} declares no inputs or no outputs")
    return ParsedModel(inputs, outputs, meta)


def metadata_labels(meta: Mapping[str, str]) -> tuple[str, ...]:
    """The class labels in a model's ``labels`` metadata (comma-separated; none: ``()``)."""
    return tuple(x for x in meta.get("labels", "").split(",") if x)


def manifest_of(
    data: bytes,
    parsed: ParsedModel,
    *,
    default_name: str,
    name: str | None = None,
    version: str | None = None,
    labels: Sequence[str] | None = None,
) -> ModelManifest:
    """The manifest of bytes already parsed: hashed here, identity from the arguments or metadata.

    Args:
        data: the model bytes.
        parsed: what :func:`parse_model` read from them.
        default_name: the name when neither ``name`` nor the metadata gives one
            (a file's stem, say).
        name: overrides the metadata's ``name``.
        version: overrides the metadata's ``version`` (default ``"0"``).
        labels: overrides the metadata's ``labels`` (comma-separated).
    """
    meta = parsed.meta
    if labels is None:
        labels = metadata_labels(meta)
    return ModelManifest(
        name=name or meta.get("name") or default_name,
        version=version or meta.get("version") or "0",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        inputs=parsed.inputs,
        outputs=parsed.outputs,
        labels=tuple(labels),
    )
