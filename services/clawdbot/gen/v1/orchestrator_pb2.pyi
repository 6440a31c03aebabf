from clawdbot.gen.v1 import router_pb2 as _router_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunWorkflowRequest(_message.Message):
    __slots__ = ("meta", "name", "input_json", "run_id")
    META_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    meta: _router_pb2.RequestMeta
    name: str
    input_json: bytes
    run_id: str
    def __init__(self, meta: _Optional[_Union[_router_pb2.RequestMeta, _Mapping]] = ..., name: _Optional[str] = ..., input_json: _Optional[bytes] = ..., run_id: _Optional[str] = ...) -> None: ...

class ListWorkflowsRequest(_message.Message):
    __slots__ = ("meta",)
    META_FIELD_NUMBER: _ClassVar[int]
    meta: _router_pb2.RequestMeta
    def __init__(self, meta: _Optional[_Union[_router_pb2.RequestMeta, _Mapping]] = ...) -> None: ...

class DescribeWorkflowRequest(_message.Message):
    __slots__ = ("meta", "name")
    META_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    meta: _router_pb2.RequestMeta
    name: str
    def __init__(self, meta: _Optional[_Union[_router_pb2.RequestMeta, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class WorkflowReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: bytes
    def __init__(self, json: _Optional[bytes] = ...) -> None: ...

class WorkflowEvent(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: bytes
    def __init__(self, json: _Optional[bytes] = ...) -> None: ...
