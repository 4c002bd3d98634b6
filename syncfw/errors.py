"""The one error tree of syncfw.

Every error a user can see derives from :class:`SyncfwError`; third-party errors
(sqlite3, grpc, onnxruntime, msgpack) are translated at the seam where they occur
and never leak::

    SyncfwError
    ├── ClockError
    │   └── ClockSkewError            remote timestamp too far ahead of local time
    ├── ValueEncodingError            a value msgpack cannot carry
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
    │   └── StoreClosedError          the store was closed
    ├── DecodeError                   malformed bytes from the wire or disk
    ├── ProtocolError                 peer broke the sync protocol (version, fleet, order)
    └── InferenceError                (see syncfw.inference)
"""

from __future__ import annotations

__all__ = [
    "ChainError",
    "ClockError",
    "ClockSkewError",
    "CorruptDatabaseError",
    "DecodeError",
    "ForeignDatabaseError",
    "ForkError",
    "InferenceError",
    "NotAuthorityError",
    "OpError",
    "ProtocolError",
    "SchemaVersionError",
    "StorageError",
    "StorageFullError",
    "StoreClosedError",
    "SyncfwError",
    "ValueEncodingError",
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


class StoreClosedError(StorageError):
    """The store (or node) has been closed."""


class DecodeError(SyncfwError, ValueError):
    """Bytes from the wire or from disk could not be decoded."""


class ProtocolError(SyncfwError):
    """A peer broke the sync protocol: wrong version, another fleet, unexpected frame."""


class InferenceError(SyncfwError):
    """Base of the embedded inference errors (see :mod:`syncfw.inference`)."""
