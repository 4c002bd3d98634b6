"""The one error tree of syncfw.

Every error a user can see derives from :class:`SyncfwError`; third-party errors
(sqlite3, grpc, onnxruntime, msgpack) are translated at the seam where they occur
and never leak::

    SyncfwError
    ├── ClockError
    │   └── ClockSkewError            remote timestamp too far ahead of local time
    ├── ValueEncodingError            a value msgpack cannot carry
    │   └── ValueTooLargeError        a value or key over the store's limit (nothing written)
    ├── ZoneError
    │   ├── ZoneOwnershipError        local write outside this node's zones
    │   └── NotAuthorityError         zone grant attempted by a non-authority node
    ├── OpError
    │   ├── ChainError                an op whose ``prev`` does not match its origin's chain
    │   └── ForkError                 two different ops at one (origin, seq)
    ├── StorageError
    │   ├── StorageFullError          size cap or disk full; nothing was written
    │   ├── CorruptDatabaseError      the file is not a readable SQLite database
    │   ├── ForeignDatabaseError      a SQLite file that syncfw did not create, or another node's
    │   ├── SchemaVersionError        written by a newer/unknown schema version
    │   ├── SnapshotTooLargeError     the state is larger than a peer takes; none built
    │   ├── StoreClosedError          the store was closed
    │   ├── DatabaseLockedError       the file is open in another store (names the holder)
    │   └── ChainFencedError          the file lost this node's own ops: writes wait for them
    ├── FeedError
    │   ├── ChangeFeedLagged          a live change subscriber fell a whole buffer behind
    │   └── FeedPositionError         follow() from a vector ahead of the node or below compaction
    ├── TrustError                    a key, signature or authority statement does not verify
    │   └── KeyFileError              a fleet or node key directory is missing, unreadable or unsafe
    ├── ArtifactError                 a model artifact cannot be published, verified or fetched;
    │   │                             the model serving before still serves
    │   ├── ManifestError             a release manifest refused: unsigned, badly signed, not the
    │   │                             authority's, another fleet's, or a version moving backwards
    │   ├── ChunkError                chunk bytes that do not match their hash (tampered, a lying peer)
    │   └── FetchError                an artifact's chunks could not all be fetched (names why)
    ├── DecodeError                   malformed bytes from the wire or disk
    ├── ProtocolError                 peer broke the sync protocol (version, fleet, order)
    │   └── LinkError                 the link failed or the peer ended with an error status
    │                                 (defined in syncfw.transport.base: it carries a Status)
    └── InferenceError                nothing was written; the model serving before still serves
        ├── ModelLoadError            unreadable, corrupt or truncated .onnx; session creation failed
        ├── ProviderError             the requested provider is unavailable, or ONNX Runtime
        │                             fell back from it while fallback was forbidden
        ├── SignatureError (ValueError)
        │   ├── InputSignatureError   wrong input names, shapes or dtypes
        │   ├── NonFiniteInputError   NaN or infinity in an input
        │   └── OutputSignatureError  outputs that do not match the declared signature
        ├── InferenceTimeoutError (TimeoutError)   the per-call watchdog fired
        ├── InferenceRunError         the runtime, or a pre/post function, raised during the call
        │   └── WorkerDied            the isolated worker process exited or was killed
        ├── EngineStateError          no model loaded yet, or the engine is closed
        ├── DatasetError (ValueError) a calibration or canary set that is missing, unreadable,
        │                             empty, unlabelled or the wrong shape for the model
        └── AccuracyBudgetError       an optimized model loses more canary accuracy than the
                                      budget allows (names both figures)

A test walks ``SyncfwError.__subclasses__()`` recursively: every class is drawn
here and exported from :mod:`syncfw`.
"""

from __future__ import annotations

__all__ = [
    "AccuracyBudgetError",
    "ArtifactError",
    "ChunkError",
    "FetchError",
    "ManifestError",
    "ChainError",
    "ChainFencedError",
    "ChangeFeedLagged",
    "ClockError",
    "ClockSkewError",
    "CorruptDatabaseError",
    "DatabaseLockedError",
    "DatasetError",
    "DecodeError",
    "KeyFileError",
    "EngineStateError",
    "FeedError",
    "FeedPositionError",
    "ForeignDatabaseError",
    "ForkError",
    "InferenceError",
    "InferenceRunError",
    "InferenceTimeoutError",
    "InputSignatureError",
    "ModelLoadError",
    "NonFiniteInputError",
    "NotAuthorityError",
    "OpError",
    "OutputSignatureError",
    "ProtocolError",
    "ProviderError",
    "SchemaVersionError",
    "SignatureError",
    "StorageError",
    "StorageFullError",
    "SnapshotTooLargeError",
    "StoreClosedError",
    "TrustError",
    "SyncfwError",
    "ValueEncodingError",
    "ValueTooLargeError",
    "WorkerDied",
    "ZoneError",
    "ZoneOwnershipError",
]


class SyncfwError(Exception):
    """Root of every error raised by syncfw."""


class ClockError(SyncfwError):
    """A problem with time: skew, a clock that cannot be trusted."""


class ClockSkewError(ClockError):
    """A remote hybrid timestamp is further ahead of local physical time than ``max_offset``."""

    def __init__(self, remote_ms: int, local_ms: int, max_offset_ms: int) -> None:
        self.remote_ms = remote_ms
        self.local_ms = local_ms
        self.max_offset_ms = max_offset_ms
        super().__init__(
            f"remote clock is {remote_ms - local_ms} ms ahead of local time "
            f"(max_offset is {max_offset_ms} ms)"
        )


class ValueEncodingError(SyncfwError, TypeError):
    """A value cannot be stored: it is not representable in msgpack."""


class ValueTooLargeError(ValueEncodingError):
    """A value (or key) larger than the store accepts: it could never be sent in one
    sync batch. Nothing was written.

    Attributes:
        size: the size refused, in bytes.
        limit: the limit it exceeds (``StoreConfig.max_value_bytes`` or ``max_key_bytes``).
    """

    def __init__(self, message: str, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class ZoneError(SyncfwError):
    """A problem with key zones and their ownership."""


class ZoneOwnershipError(ZoneError, PermissionError):
    """A local write to a key whose zone this node does not own. Nothing was written."""


class NotAuthorityError(ZoneError, PermissionError):
    """Only the fleet authority may grant zones."""


class OpError(SyncfwError):
    """An op that cannot be accepted as it is."""


class ChainError(OpError):
    """An op whose ``prev`` hash does not extend its origin's hash chain."""


class ForkError(OpError):
    """Two different ops claim the same (origin, seq): evidence of a fork or forgery."""


class StorageError(SyncfwError):
    """The local SQLite store failed."""


class StorageFullError(StorageError):
    """The configured size cap or the disk is full. The batch was rolled back whole."""


class CorruptDatabaseError(StorageError):
    """The file is not a readable SQLite database (or is damaged)."""


class ForeignDatabaseError(StorageError):
    """The file is a SQLite database, but not a syncfw store (or belongs to another node)."""


class SchemaVersionError(StorageError):
    """The file was written by a schema version this syncfw does not know."""


class SnapshotTooLargeError(StorageError):
    """The state is larger than the largest snapshot a peer takes: none was built."""


class StoreClosedError(StorageError):
    """The store (or node) has been closed."""


class DatabaseLockedError(StorageError):
    """The database file is already open in another store (this process or another).

    Attributes:
        holder: who holds it, as the holder recorded it (``"pid 123 node n1"``).
    """

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


class TrustError(SyncfwError):
    """A key, a chain-head signature or an authority statement does not verify."""


class KeyFileError(TrustError):
    """A fleet or node key directory is missing, unreadable or unsafe (e.g. a private
    key readable by others)."""


class ChainFencedError(StorageError):
    """The database lost ops of this node's own chain that it once committed (a lost WAL,
    a restore from an older backup): local writes are refused until a peer relays them
    back, or an operator accepts the loss, because re-issuing their seqs forks the chain."""


class ArtifactError(SyncfwError):
    """A model artifact cannot be published, verified or fetched; nothing was activated and
    the model serving before still serves."""


class ManifestError(ArtifactError):
    """A release manifest is refused: unsigned, badly signed, signed by another key than the
    fleet authority's, for another fleet, malformed, or a version that moves backwards.

    Attributes:
        reason: a short fixed label (``unsigned``, ``bad_signature``, ``not_authority``,
            ``other_fleet``, ``malformed``, ``backwards``, ``reused_version``), the
            ``reason`` of the ``syncfw_model_manifests_refused`` metric.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class ChunkError(ArtifactError):
    """Chunk bytes that do not match the hash they were asked or stored under (a tampered
    file, a peer that lies about what it holds); they are never stored or served."""


class FetchError(ArtifactError):
    """An artifact's chunks could not all be fetched; what was fetched stays held, so the
    next fetch resumes.

    Attributes:
        missing: how many chunks are still missing.
    """

    def __init__(self, message: str, missing: int = 0) -> None:
        super().__init__(message)
        self.missing = missing


class DecodeError(SyncfwError, ValueError):
    """Bytes from the wire or from disk could not be decoded."""


class ProtocolError(SyncfwError):
    """A peer broke the sync protocol: wrong version, another fleet, unexpected frame."""


class InferenceError(SyncfwError):
    """Base of the embedded inference errors (see :mod:`syncfw.inference`)."""


class ModelLoadError(InferenceError):
    """The model could not be loaded; the previously loaded model (if any) keeps serving."""


class ProviderError(InferenceError):
    """The requested execution provider is unavailable, or ONNX Runtime fell back from it."""


class SignatureError(InferenceError, ValueError):
    """Tensors that do not match the model's declared signature."""


class InputSignatureError(SignatureError):
    """An input with a wrong name, shape or dtype (checked before running)."""


class NonFiniteInputError(SignatureError):
    """An input holding NaN or infinity."""


class OutputSignatureError(SignatureError):
    """The model produced outputs that do not match its declared output signature."""


class InferenceTimeoutError(InferenceError, TimeoutError):
    """The call ran past the watchdog timeout. Its worker thread was abandoned."""


class InferenceRunError(InferenceError):
    """The runtime, or a user pre/post function, raised during the call."""


class WorkerDied(InferenceRunError):
    """The isolated worker process exited or was killed during the call."""


class EngineStateError(InferenceError):
    """No model is loaded yet, or the engine has been closed."""


class DatasetError(InferenceError, ValueError):
    """A calibration or canary set that cannot be used: missing, unreadable, empty, without
    labels, or of a shape or dtype the model does not take. Nothing was written."""


class AccuracyBudgetError(InferenceError):
    """An optimized model loses more accuracy on the canary set than the budget allows.

    Attributes:
        baseline: the reference model's canary accuracy (a fraction, e.g. 0.96).
        candidate: the optimized model's canary accuracy.
        loss_points: ``(baseline - candidate) * 100``, in percentage points.
        budget_points: the largest loss allowed, in percentage points.
    """

    def __init__(
        self,
        message: str,
        *,
        baseline: float = 0.0,
        candidate: float = 0.0,
        loss_points: float = 0.0,
        budget_points: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.baseline = baseline
        self.candidate = candidate
        self.loss_points = loss_points
        self.budget_points = budget_points


class FeedError(SyncfwError):
    """A change feed cannot go on as asked."""


class ChangeFeedLagged(FeedError):
    """A live change subscriber fell further behind than its buffer; re-read and resubscribe
    (or use :meth:`Node.follow`, which pages a slow consumer from SQLite instead)."""


class FeedPositionError(FeedError):
    """``follow()`` was asked to start where the node cannot serve without a hole.

    Attributes:
        missing: per origin, the ``(first, last)`` seqs the feed cannot serve.
    """

    def __init__(self, message: str, missing: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__(message)
        self.missing = dict(missing or {})
