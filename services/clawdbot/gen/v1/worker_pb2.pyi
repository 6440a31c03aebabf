from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferRequest(_message.Message):
    __slots__ = ("model", "task", "openai_json", "request_id", "binary")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OPENAI_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    model: str
    task: str
    openai_json: bytes
    request_id: str
    binary: bytes
    def __init__(self, model: _Optional[str] = ..., task: _Optional[str] = ..., openai_json: _Optional[bytes] = ..., request_id: _Optional[str] = ..., binary: _Optional[bytes] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("openai_json", "binary", "content_type", "model_version")
    OPENAI_JSON_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    openai_json: bytes
    binary: bytes
    content_type: str
    model_version: str
    def __init__(self, openai_json: _Optional[bytes] = ..., binary: _Optional[bytes] = ..., content_type: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class InferChunk(_message.Message):
    __slots__ = ("chunk_json",)
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    chunk_json: bytes
    def __init__(self, chunk_json: _Optional[bytes] = ...) -> None: ...

class WorkerListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerModel(_message.Message):
    __slots__ = ("name", "task", "runtime", "state", "detail", "version", "in_flight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    runtime: str
    state: str
    detail: str
    version: str
    in_flight: int
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., runtime: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., version: _Optional[str] = ..., in_flight: _Optional[int] = ...) -> None: ...

class WorkerListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[WorkerModel]
    def __init__(self, models: _Optional[_Iterable[_Union[WorkerModel, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("name", "version", "previous_version", "load_ms", "warmup_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    previous_version: str
    load_ms: float
    warmup_ms: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., previous_version: _Optional[str] = ..., load_ms: _Optional[float] = ..., warmup_ms: _Optional[float] = ...) -> None: ...
