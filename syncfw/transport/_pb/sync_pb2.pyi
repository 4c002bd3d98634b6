from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Frame(_message.Message):
    __slots__ = ("hello", "digest", "summary", "ops", "ack", "peers", "close", "snapshot")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    digest: Digest
    summary: Summary
    ops: Ops
    ack: Ack
    peers: Peers
    close: Close
    snapshot: SnapshotPart
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., digest: _Optional[_Union[Digest, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ..., ops: _Optional[_Union[Ops, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., peers: _Optional[_Union[Peers, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., snapshot: _Optional[_Union[SnapshotPart, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol", "fleet_id", "node_id", "hlc", "features", "max_batch_bytes", "fleet_digest", "wall_ms")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    FLEET_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HLC_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLEET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WALL_MS_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    fleet_id: str
    node_id: str
    hlc: int
    features: _containers.RepeatedScalarFieldContainer[str]
    max_batch_bytes: int
    fleet_digest: bytes
    wall_ms: int
    def __init__(self, protocol: _Optional[int] = ..., fleet_id: _Optional[str] = ..., node_id: _Optional[str] = ..., hlc: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ..., max_batch_bytes: _Optional[int] = ..., fleet_digest: _Optional[bytes] = ..., wall_ms: _Optional[int] = ...) -> None: ...

class VvEntry(_message.Message):
    __slots__ = ("origin", "seq")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    origin: str
    seq: int
    def __init__(self, origin: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class Digest(_message.Message):
    __slots__ = ("vv_digest",)
    VV_DIGEST_FIELD_NUMBER: _ClassVar[int]
    vv_digest: bytes
    def __init__(self, vv_digest: _Optional[bytes] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("vv", "base_digest", "want_full", "vv_origins", "vv_seqs")
    VV_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WANT_FULL_FIELD_NUMBER: _ClassVar[int]
    VV_ORIGINS_FIELD_NUMBER: _ClassVar[int]
    VV_SEQS_FIELD_NUMBER: _ClassVar[int]
    vv: _containers.RepeatedCompositeFieldContainer[VvEntry]
    base_digest: bytes
    want_full: bool
    vv_origins: _containers.RepeatedScalarFieldContainer[str]
    vv_seqs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, vv: _Optional[_Iterable[_Union[VvEntry, _Mapping]]] = ..., base_digest: _Optional[bytes] = ..., want_full: _Optional[bool] = ..., vv_origins: _Optional[_Iterable[str]] = ..., vv_seqs: _Optional[_Iterable[int]] = ...) -> None: ...

class Ops(_message.Message):
    __slots__ = ("batch", "last")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    batch: bytes
    last: bool
    def __init__(self, batch: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class SnapshotPart(_message.Message):
    __slots__ = ("data", "last")
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    last: bool
    def __init__(self, data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("vv", "vv_origins", "vv_seqs")
    VV_FIELD_NUMBER: _ClassVar[int]
    VV_ORIGINS_FIELD_NUMBER: _ClassVar[int]
    VV_SEQS_FIELD_NUMBER: _ClassVar[int]
    vv: _containers.RepeatedCompositeFieldContainer[VvEntry]
    vv_origins: _containers.RepeatedScalarFieldContainer[str]
    vv_seqs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, vv: _Optional[_Iterable[_Union[VvEntry, _Mapping]]] = ..., vv_origins: _Optional[_Iterable[str]] = ..., vv_seqs: _Optional[_Iterable[int]] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("node_id", "address", "heartbeat")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    heartbeat: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., heartbeat: _Optional[int] = ...) -> None: ...

class Peers(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("target", "timeout_ms")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    target: str
    timeout_ms: int
    def __init__(self, target: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("reachable", "node_id", "reason")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    node_id: str
    reason: str
    def __init__(self, reachable: _Optional[bool] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
