from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferRequest(_message.Message):
    __slots__ = ("model", "task", "openai_json", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OPENAI_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    task: str
    openai_json: bytes
    request_id: str
    def __init__(self, model: _Optional[str] = ..., task: _Optional[str] = ..., openai_json: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("openai_json",)
    OPENAI_JSON_FIELD_NUMBER: _ClassVar[int]
    openai_json: bytes
    def __init__(self, openai_json: _Optional[bytes] = ...) -> None: ...

class InferChunk(_message.Message):
    __slots__ = ("chunk_json",)
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    chunk_json: bytes
    def __init__(self, chunk_json: _Optional[bytes] = ...) -> None: ...

class WorkerListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerModel(_message.Message):
    __slots__ = ("name", "task", "runtime", "state", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    runtime: str
    state: str
    detail: str
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., runtime: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class WorkerListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[WorkerModel]
    def __init__(self, models: _Optional[_Iterable[_Union[WorkerModel, _Mapping]]] = ...) -> None: ...
