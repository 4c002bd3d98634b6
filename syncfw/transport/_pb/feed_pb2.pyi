from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedVvEntry(_message.Message):
    __slots__ = ("origin", "seq")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    origin: str
    seq: int
    def __init__(self, origin: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("since", "prefixes", "include_rejected")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    PREFIXES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REJECTED_FIELD_NUMBER: _ClassVar[int]
    since: _containers.RepeatedCompositeFieldContainer[FeedVvEntry]
    prefixes: _containers.RepeatedScalarFieldContainer[str]
    include_rejected: bool
    def __init__(self, since: _Optional[_Iterable[_Union[FeedVvEntry, _Mapping]]] = ..., prefixes: _Optional[_Iterable[str]] = ..., include_rejected: _Optional[bool] = ...) -> None: ...

class FeedOp(_message.Message):
    __slots__ = ("origin", "seq", "hlc", "zone", "epoch", "key", "kind", "value", "prev", "sig", "rejected", "local")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HLC_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PREV_FIELD_NUMBER: _ClassVar[int]
    SIG_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    origin: str
    seq: int
    hlc: int
    zone: str
    epoch: int
    key: str
    kind: str
    value: bytes
    prev: bytes
    sig: bytes
    rejected: bool
    local: bool
    def __init__(self, origin: _Optional[str] = ..., seq: _Optional[int] = ..., hlc: _Optional[int] = ..., zone: _Optional[str] = ..., epoch: _Optional[int] = ..., key: _Optional[str] = ..., kind: _Optional[str] = ..., value: _Optional[bytes] = ..., prev: _Optional[bytes] = ..., sig: _Optional[bytes] = ..., rejected: _Optional[bool] = ..., local: _Optional[bool] = ...) -> None: ...

class FeedPosition(_message.Message):
    __slots__ = ("vv", "lag_ops")
    VV_FIELD_NUMBER: _ClassVar[int]
    LAG_OPS_FIELD_NUMBER: _ClassVar[int]
    vv: _containers.RepeatedCompositeFieldContainer[FeedVvEntry]
    lag_ops: int
    def __init__(self, vv: _Optional[_Iterable[_Union[FeedVvEntry, _Mapping]]] = ..., lag_ops: _Optional[int] = ...) -> None: ...

class FeedBatch(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[FeedOp]
    def __init__(self, ops: _Optional[_Iterable[_Union[FeedOp, _Mapping]]] = ...) -> None: ...

class FeedMessage(_message.Message):
    __slots__ = ("batch", "position")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    batch: FeedBatch
    position: FeedPosition
    def __init__(self, batch: _Optional[_Union[FeedBatch, _Mapping]] = ..., position: _Optional[_Union[FeedPosition, _Mapping]] = ...) -> None: ...
