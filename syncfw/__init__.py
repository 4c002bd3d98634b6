"""syncfw: offline-first edge fleets.

Each node keeps its state in SQLite-backed CRDTs stamped with hybrid logical
clocks, partitioned into owned key zones; every change is an op in a
replicated log that peers merge into the same state.

Quick start::

    import syncfw

    fleet = syncfw.Fleet(authority="cloud", grants=(syncfw.Grant.of("site/", "*"),))
    async with syncfw.Node.open("truck-7.db", node_id="t7", fleet=fleet) as node:
        await node.put("fleet/t7/position", {"lat": -22.3, "lon": 118.6})
        await node.counter("site/ore-tonnes").add(40)
"""

import os as _os

# gRPC's C core reads GRPC_VERBOSITY when grpc is first imported (below, through
# the transport), and would print its own lines (a refused proxy handshake) to
# stderr; syncfw reports link failures through its logging instead. A value the
# user set is kept. The ``syncfw`` command's package imports this first, so this
# is the one place early enough for it too.
_os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from syncfw.clock import HLC, NtpResult, check_ntp
from syncfw.errors import (
    AccuracyBudgetError,
    ArtifactError,
    ChainError,
    ChainFencedError,
    ChangeFeedLagged,
    ChunkError,
    ClockError,
    ClockSkewError,
    CorruptDatabaseError,
    DatabaseLockedError,
    DatasetError,
    DecodeError,
    EngineStateError,
    FeedError,
    FeedPositionError,
    FetchError,
    ForeignDatabaseError,
    ForkError,
    InferenceError,
    InferenceRunError,
    InferenceTimeoutError,
    InputSignatureError,
    KeyFileError,
    ManifestError,
    ModelLoadError,
    NonFiniteInputError,
    NotAuthorityError,
    OpError,
    OutputSignatureError,
    ProtocolError,
    ProviderError,
    SchemaVersionError,
    SignatureError,
    SnapshotTooLargeError,
    StorageError,
    StorageFullError,
    StoreClosedError,
    SyncfwError,
    TrustError,
    ValueEncodingError,
    ValueTooLargeError,
    WorkerDied,
    ZoneError,
    ZoneOwnershipError,
)
from syncfw.log import ApplyResult, Op, Replica, VersionVector
from syncfw.node import Counter, Node, ORSet, Register
from syncfw.store import Change, FeedItem, Follow, StoreConfig
from syncfw.transport.base import LinkError
from syncfw.zones import Fleet, Grant

__version__ = "0.1.0"

__all__ = [
    "AccuracyBudgetError",
    "ApplyResult",
    "ArtifactError",
    "ChunkError",
    "FetchError",
    "ManifestError",
    "ChainError",
    "ChainFencedError",
    "Change",
    "ChangeFeedLagged",
    "ClockError",
    "ClockSkewError",
    "CorruptDatabaseError",
    "Counter",
    "DatabaseLockedError",
    "DatasetError",
    "DecodeError",
    "EngineStateError",
    "FeedError",
    "FeedPositionError",
    "FeedItem",
    "Fleet",
    "Follow",
    "ForeignDatabaseError",
    "ForkError",
    "Grant",
    "HLC",
    "InferenceError",
    "InferenceRunError",
    "InferenceTimeoutError",
    "InputSignatureError",
    "KeyFileError",
    "LinkError",
    "ModelLoadError",
    "Node",
    "NonFiniteInputError",
    "NotAuthorityError",
    "NtpResult",
    "ORSet",
    "Op",
    "OpError",
    "OutputSignatureError",
    "ProtocolError",
    "ProviderError",
    "Register",
    "Replica",
    "SchemaVersionError",
    "SignatureError",
    "StorageError",
    "SnapshotTooLargeError",
    "StorageFullError",
    "StoreClosedError",
    "StoreConfig",
    "SyncfwError",
    "TrustError",
    "ValueEncodingError",
    "ValueTooLargeError",
    "VersionVector",
    "WorkerDied",
    "ZoneError",
    "ZoneOwnershipError",
    "check_ntp",
    "__version__",
]
