from clawdbot.gen.v1 import gateway_pb2 as _gateway_pb2
from clawdbot.gen.v1 import router_pb2 as _router_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobSubmission(_message.Message):
    __slots__ = ("meta", "kind", "request_json", "callback_url")
    META_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    meta: _router_pb2.RequestMeta
    kind: str
    request_json: bytes
    callback_url: str
    def __init__(self, meta: _Optional[_Union[_router_pb2.RequestMeta, _Mapping]] = ..., kind: _Optional[str] = ..., request_json: _Optional[bytes] = ..., callback_url: _Optional[str] = ...) -> None: ...

class JobLookup(_message.Message):
    __slots__ = ("meta", "request")
    META_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    meta: _router_pb2.RequestMeta
    request: _gateway_pb2.GetJobRequest
    def __init__(self, meta: _Optional[_Union[_router_pb2.RequestMeta, _Mapping]] = ..., request: _Optional[_Union[_gateway_pb2.GetJobRequest, _Mapping]] = ...) -> None: ...

class JobListing(_message.Message):
    __slots__ = ("meta", "request")
    META_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    meta: _router_pb2.RequestMeta
    request: _gateway_pb2.ListJobsRequest
    def __init__(self, meta: _Optional[_Union[_router_pb2.RequestMeta, _Mapping]] = ..., request: _Optional[_Union[_gateway_pb2.ListJobsRequest, _Mapping]] = ...) -> None: ...

class JobView(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: bytes
    def __init__(self, json: _Optional[bytes] = ...) -> None: ...

class JobViews(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobView]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobView, _Mapping]]] = ...) -> None: ...
