"""Signed release manifests: what the fleet authority says a model release is.

A release is published as one op at ``sys/models/<name>/<version>`` (the
``sys/`` zone: only the authority writes there), whose value is
:func:`seal_manifest`'s bytes. Every receiver opens it with
:func:`open_manifest` against the fleet's authority key, and judges the set of
a name's releases with :func:`judge_releases`.

Invariants:

1. The signed bytes are a msgpack list that starts with the domain tag
   ``syncfw/model/v1`` and names the fleet, so a manifest is never valid for
   another purpose or another fleet. The op value is
   ``msgpack([body, signer_public_key, signature])``: the body exactly as
   signed, never re-encoded before verification.
2. A manifest verifies only against the fleet authority's ed25519 key
   (:attr:`syncfw.zones.Fleet.authority_key`): no signature is ``unsigned``, a
   signer other than the authority is ``not_authority``, a signature that does
   not verify is ``bad_signature``. Each refusal is a :class:`ManifestError`
   with that ``reason``.
3. Versions only move forward, judged on the whole set of a name's verified
   releases so that every replica holding the same ops decides the same: in
   order of issue (the authority's hybrid clock), a release whose version is not
   above every one issued before it is ``backwards``; two different releases
   of one version are ``reused_version`` (the later issued one). A rollback is
   a new, higher version with the old bytes (its chunks are already held).
4. Everything a manifest holds is bounded before it is trusted
   (:data:`MAX_MANIFEST_BYTES`, name and field shapes, chunk count matching
   size and chunk size).

Pure: msgpack and cryptography; no I/O.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from syncfw.errors import ManifestError
from syncfw.trust import public_key_bytes
from syncfw.zones import SYS_PREFIX

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MANIFEST_PREFIX",
    "MAX_CHUNK_BYTES",
    "MAX_MANIFEST_BYTES",
    "MIN_CHUNK_BYTES",
    "MODEL_TAG",
    "Judgement",
    "ReleaseManifest",
    "Tensor",
    "build_manifest",
    "check_name",
    "judge_releases",
    "manifest_key",
    "open_manifest",
    "parse_manifest_key",
    "seal_manifest",
]

MODEL_TAG = "syncfw/model/v1"
MANIFEST_PREFIX = f"{SYS_PREFIX}models/"
"""Where releases live: ``sys/models/<name>/<version>``."""
MAX_MANIFEST_BYTES = 512 << 10
"""A manifest op value is refused past this size before anything is decoded."""
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 4 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_TENSORS = 64
_MAX_NOTE = 1000

Tensor = tuple[str, str, tuple[int | None, ...]]
"""A declared input or output: ``(name, dtype, shape)`` (None: a symbolic dimension)."""


def check_name(name: str) -> str:
    """A model name, checked: 1 to 64 of ``[A-Za-z0-9._-]``, starting alphanumeric.

    Raises:
        ManifestError: ``malformed``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ManifestError(f"model name {str(name)[:70]!r} is not 1-64 of [A-Za-z0-9._-]")
    return name


def manifest_key(name: str, version: int) -> str:
    """``sys/models/<name>/<version>``."""
    return f"{MANIFEST_PREFIX}{check_name(name)}/{int(version)}"


def parse_manifest_key(key: str) -> tuple[str, int] | None:
    """``(name, version)`` of a manifest key, or None if ``key`` is not one."""
    if not key.startswith(MANIFEST_PREFIX):
        return None
    name, sep, version = key[len(MANIFEST_PREFIX) :].partition("/")
    if not sep or not _NAME_RE.match(name) or not version.isdigit() or len(version) > 18:
        return None
    return name, int(version)


@dataclass(frozen=True, slots=True)
class ReleaseManifest:
    """One signed model release.

    Attributes:
        name: model name.
        version: an int >= 1, moving only forward per name.
        sha256: hex sha256 of the whole artifact.
        size: its length in bytes.
        chunk_size: bytes per chunk (the last one may be shorter).
        chunks: the sha256 of each chunk, in order.
        inputs: declared inputs ``(name, dtype, shape)``.
        outputs: declared outputs.
        labels: class labels, if the model has them.
        canary_accuracy: accuracy on the labelled canary set (a fraction), if measured.
        canary_p50_ms: canary p50 latency, if measured.
        canary_p99_ms: canary p99 latency, if measured.
        issued: the authority's hybrid timestamp when it issued the release.
        note: free text (why this release; a rollback names what it undoes).
    """

    name: str
    version: int
    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[bytes, ...]
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    labels: tuple[str, ...] | None = None
    canary_accuracy: float | None = None
    canary_p50_ms: float | None = None
    canary_p99_ms: float | None = None
    issued: int = 0
    note: str = ""
    _body: bytes = field(default=b"", repr=False, compare=False)

    @property
    def key(self) -> str:
        """The op key it is published at."""
        return manifest_key(self.name, self.version)

    @property
    def digest(self) -> bytes:
        """The raw 32-byte sha256 of the artifact."""
        return bytes.fromhex(self.sha256)

    def chunk_length(self, index: int) -> int:
        """The length of chunk ``index``."""
        if index == len(self.chunks) - 1:
            return self.size - index * self.chunk_size
        return self.chunk_size

    def body(self, fleet_id: str) -> bytes:
        """The bytes the authority signs."""
        canary = {
            k: v
            for k, v in (
                ("accuracy", self.canary_accuracy),
                ("p50_ms", self.canary_p50_ms),
                ("p99_ms", self.canary_p99_ms),
            )
            if v is not None
        }
        return msgpack.packb(
            [
                MODEL_TAG,
                fleet_id,
                self.name,
                self.version,
                self.issued,
                bytes.fromhex(self.sha256),
                self.size,
                self.chunk_size,
                b"".join(self.chunks),
                [[n, d, list(s)] for n, d, s in self.inputs],
                [[n, d, list(s)] for n, d, s in self.outputs],
                None if self.labels is None else list(self.labels),
                canary,
                self.note,
            ],
            use_bin_type=True,
        )

    def model_manifest(self) -> Any:
        """The :class:`syncfw.inference.manifest.ModelManifest` that
        ``Engine.load(bytes, manifest)`` takes (needs the inference extra)."""
        from syncfw.inference.manifest import ModelManifest
        from syncfw.inference.signature import TensorSpec

        return ModelManifest(
            name=self.name,
            version=str(self.version),
            sha256=self.sha256,
            size=self.size,
            inputs=tuple(TensorSpec(n, d, s) for n, d, s in self.inputs),
            outputs=tuple(TensorSpec(n, d, s) for n, d, s in self.outputs),
            labels=self.labels,
        )

    def describe(self) -> dict[str, Any]:
        """A plain summary (for status and the CLI)."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "chunks": len(self.chunks),
            "chunk_size": self.chunk_size,
            "canary_accuracy": self.canary_accuracy,
            "canary_p99_ms": self.canary_p99_ms,
            "note": self.note,
        }


def build_manifest(
    data: bytes,
    *,
    name: str,
    version: int,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
    inputs: Sequence[Tensor] = (),
    outputs: Sequence[Tensor] = (),
    labels: Sequence[str] | None = None,
    canary_accuracy: float | None = None,
    canary_p50_ms: float | None = None,
    canary_p99_ms: float | None = None,
    issued: int = 0,
    note: str = "",
) -> ReleaseManifest:
    """The manifest of ``data`` cut into ``chunk_size`` chunks (not signed yet).

    Raises:
        ManifestError: ``malformed``: a bad name, a version below 1, a chunk
            size outside [:data:`MIN_CHUNK_BYTES`, :data:`MAX_CHUNK_BYTES`], empty data.
    """
    check_name(name)
    if type(version) is not int or not 1 <= version < 1 << 62:
        raise ManifestError(f"version must be an int >= 1, got {version!r}")
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise ManifestError(
            f"chunk size {chunk_size} outside [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]"
        )
    if not data:
        raise ManifestError("an artifact cannot be empty")
    mv = memoryview(data)
    chunks = tuple(
        hashlib.sha256(mv[i : i + chunk_size]).digest() for i in range(0, len(data), chunk_size)
    )
    return ReleaseManifest(
        name,
        version,
        hashlib.sha256(data).hexdigest(),
        len(data),
        chunk_size,
        chunks,
        tuple((n, d, tuple(s)) for n, d, s in inputs),
        tuple((n, d, tuple(s)) for n, d, s in outputs),
        None if labels is None else tuple(labels),
        canary_accuracy,
        canary_p50_ms,
        canary_p99_ms,
        issued,
        note[:_MAX_NOTE],
    )


def seal_manifest(manifest: ReleaseManifest, key: Ed25519PrivateKey, fleet_id: str) -> bytes:
    """The op value publishing ``manifest``, signed by ``key`` (the authority's)."""
    body = manifest.body(fleet_id)
    return msgpack.packb([body, public_key_bytes(key), key.sign(body)], use_bin_type=True)


def _refuse(reason: str, message: str) -> ManifestError:
    return ManifestError(message, reason)


def open_manifest(value: Any, authority_key: bytes, fleet_id: str) -> ReleaseManifest:
    """Verify and decode a manifest op's value (invariants 1, 2 and 4).

    Args:
        value: the op value (bytes from :func:`seal_manifest`).
        authority_key: the fleet authority's raw 32-byte public key.
        fleet_id: the fleet the manifest must name.

    Raises:
        ManifestError: with ``reason`` ``unsigned``, ``not_authority``,
            ``bad_signature``, ``other_fleet`` or ``malformed``.
    """
    if not isinstance(value, bytes):
        raise _refuse("malformed", f"a manifest must be bytes, got {type(value).__name__}")
    if len(value) > MAX_MANIFEST_BYTES:
        raise _refuse("malformed", f"manifest of {len(value)} bytes exceeds {MAX_MANIFEST_BYTES}")
    if len(authority_key) != 32:
        raise _refuse("unsigned", "the fleet has no authority key to verify manifests against")
    try:
        outer = msgpack.unpackb(value, raw=False)
    except Exception:  # msgpack raises several unrelated types
        raise _refuse("malformed", "manifest is not msgpack") from None
    if isinstance(outer, bytes):
        raise _refuse("unsigned", "manifest carries no signature")
    if not isinstance(outer, list) or not outer or not isinstance(outer[0], bytes):
        raise _refuse("malformed", "manifest is not [body, signer, signature]")
    if len(outer) < 3 or not outer[2]:
        raise _refuse("unsigned", "manifest carries no signature")
    body, signer, sig = outer[0], outer[1], outer[2]
    if not (isinstance(signer, bytes) and len(signer) == 32 and isinstance(sig, bytes)):
        raise _refuse("malformed", "manifest signer or signature is malformed")
    if signer != authority_key:
        raise _refuse(
            "not_authority",
            f"manifest signed by key {signer.hex()[:16]}…, not the fleet authority's "
            f"{authority_key.hex()[:16]}…",
        )
    try:
        Ed25519PublicKey.from_public_bytes(authority_key).verify(sig, body)
    except (InvalidSignature, ValueError):
        raise _refuse("bad_signature", "manifest signature does not verify") from None
    manifest = _decode_body(body, fleet_id)
    object.__setattr__(manifest, "_body", body)
    return manifest


def _decode_body(body: bytes, fleet_id: str) -> ReleaseManifest:
    try:
        f = msgpack.unpackb(body, raw=False)
        tag, fleet, name, version, issued, sha, size, chunk_size, blob = f[:9]
        inputs, outputs, labels, canary, note = f[9:14]
    except Exception:
        raise _refuse("malformed", "manifest body is malformed") from None
    if tag != MODEL_TAG:
        raise _refuse("malformed", f"not a model manifest (tag {str(tag)[:32]!r})")
    if fleet != fleet_id:
        raise _refuse("other_fleet", f"manifest is for fleet {str(fleet)[:64]!r}, not {fleet_id!r}")
    try:
        check_name(name)
        ok = (
            all(type(x) is int and x >= 0 for x in (version, issued, size, chunk_size))
            and version >= 1
            and isinstance(sha, bytes)
            and len(sha) == 32
            and isinstance(blob, bytes)
            and len(blob) % 32 == 0
            and MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES
            and size > 0
            and len(blob) // 32 == math.ceil(size / chunk_size)
            and isinstance(canary, dict)
            and isinstance(note, str)
            and len(note) <= _MAX_NOTE
            and (
                labels is None
                or (isinstance(labels, list) and all(isinstance(x, str) for x in labels))
            )
        )
        if not ok:
            raise ValueError
        tensors = (_tensors(inputs), _tensors(outputs))
        accuracy, p50, p99 = (_opt_float(canary.get(k)) for k in ("accuracy", "p50_ms", "p99_ms"))
    except (ValueError, TypeError, ManifestError):
        raise _refuse("malformed", f"manifest of {str(name)[:64]!r} has malformed fields") from None
    return ReleaseManifest(
        name,
        version,
        sha.hex(),
        size,
        chunk_size,
        tuple(blob[i : i + 32] for i in range(0, len(blob), 32)),
        tensors[0],
        tensors[1],
        None if labels is None else tuple(labels),
        accuracy,
        p50,
        p99,
        issued,
        note,
    )


def _tensors(x: Any) -> tuple[Tensor, ...]:
    if not isinstance(x, list) or len(x) > _MAX_TENSORS:
        raise ValueError
    out: list[Tensor] = []
    for t in x:
        n, d, s = t
        if not (isinstance(n, str) and isinstance(d, str) and isinstance(s, list)):
            raise ValueError
        if not all(v is None or type(v) is int for v in s):
            raise ValueError
        out.append((n, d, tuple(s)))
    return tuple(out)


def _opt_float(x: Any) -> float | None:
    if x is None:
        return None
    if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x):
        raise ValueError
    return float(x)


@dataclass(frozen=True, slots=True)
class Judgement:
    """A name's releases judged together (invariant 3).

    Attributes:
        accepted: the releases that stand, by version.
        refused: ``(manifest, reason, message)`` for each that does not.
    """

    accepted: tuple[ReleaseManifest, ...]
    refused: tuple[tuple[ReleaseManifest, str, str], ...]

    @property
    def latest(self) -> ReleaseManifest | None:
        """The highest accepted version, or None."""
        return self.accepted[-1] if self.accepted else None


def judge_releases(releases: Iterable[ReleaseManifest]) -> Judgement:
    """Which of one name's verified releases stand: versions only move forward.

    Deterministic over the set (any order in, the same verdicts out).
    """
    ordered = sorted(releases, key=lambda m: (m.issued, m.version, m._body))
    accepted: dict[int, ReleaseManifest] = {}
    refused: list[tuple[ReleaseManifest, str, str]] = []
    top = 0
    for m in ordered:
        same = accepted.get(m.version)
        if same is not None:
            if same._body != m._body:
                refused.append(
                    (
                        m,
                        "reused_version",
                        (
                            f"{m.name} version {m.version} was already released with other contents "
                            f"(sha256 {same.sha256[:12]}…); a new release needs a new version"
                        ),
                    )
                )
            continue
        if m.version <= top:
            refused.append(
                (
                    m,
                    "backwards",
                    (
                        f"{m.name} version {m.version} was issued after version {top}: "
                        "versions only move forward (a rollback is a new, higher version)"
                    ),
                )
            )
            continue
        accepted[m.version] = m
        top = m.version
    return Judgement(tuple(accepted[v] for v in sorted(accepted)), tuple(refused))
