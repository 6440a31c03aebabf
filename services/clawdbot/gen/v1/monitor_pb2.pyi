from clawdbot.gen.v1 import router_pb2 as _router_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ObservationBatch(_message.Message):
    __slots__ = ("observations_json",)
    OBSERVATIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    observations_json: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, observations_json: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("watcher",)
    WATCHER_FIELD_NUMBER: _ClassVar[int]
    watcher: str
    def __init__(self, watcher: _Optional[str] = ...) -> None: ...

class InstanceVerdict(_message.Message):
    __slots__ = ("instance_id", "status", "penalty", "reason")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PENALTY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    status: str
    penalty: float
    reason: str
    def __init__(self, instance_id: _Optional[str] = ..., status: _Optional[str] = ..., penalty: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class InstanceVerdicts(_message.Message):
    __slots__ = ("verdicts", "version")
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[InstanceVerdict]
    version: int
    def __init__(self, verdicts: _Optional[_Iterable[_Union[InstanceVerdict, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class HealthStatusRequest(_message.Message):
    __slots__ = ("meta", "detailed")
    META_FIELD_NUMBER: _ClassVar[int]
    DETAILED_FIELD_NUMBER: _ClassVar[int]
    meta: _router_pb2.RequestMeta
    detailed: bool
    def __init__(self, meta: _Optional[_Union[_router_pb2.RequestMeta, _Mapping]] = ..., detailed: _Optional[bool] = ...) -> None: ...

class HealthStatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: bytes
    def __init__(self, json: _Optional[bytes] = ...) -> None: ...
