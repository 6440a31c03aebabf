from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestMeta(_message.Message):
    __slots__ = ("request_id", "client_ip", "device_type", "api_key_id", "protocol", "user_agent", "strategy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    client_ip: str
    device_type: str
    api_key_id: str
    protocol: str
    user_agent: str
    strategy: str
    def __init__(self, request_id: _Optional[str] = ..., client_ip: _Optional[str] = ..., device_type: _Optional[str] = ..., api_key_id: _Optional[str] = ..., protocol: _Optional[str] = ..., user_agent: _Optional[str] = ..., strategy: _Optional[str] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("meta", "task", "model", "stream", "openai_json")
    META_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OPENAI_JSON_FIELD_NUMBER: _ClassVar[int]
    meta: RequestMeta
    task: str
    model: str
    stream: bool
    openai_json: bytes
    def __init__(self, meta: _Optional[_Union[RequestMeta, _Mapping]] = ..., task: _Optional[str] = ..., model: _Optional[str] = ..., stream: _Optional[bool] = ..., openai_json: _Optional[bytes] = ...) -> None: ...

class ModelResponse(_message.Message):
    __slots__ = ("openai_json", "instance")
    OPENAI_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    openai_json: bytes
    instance: str
    def __init__(self, openai_json: _Optional[bytes] = ..., instance: _Optional[str] = ...) -> None: ...

class StreamEvent(_message.Message):
    __slots__ = ("chunk_json", "instance")
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    chunk_json: bytes
    instance: str
    def __init__(self, chunk_json: _Optional[bytes] = ..., instance: _Optional[str] = ...) -> None: ...

class RouterListModelsRequest(_message.Message):
    __slots__ = ("meta",)
    META_FIELD_NUMBER: _ClassVar[int]
    meta: RequestMeta
    def __init__(self, meta: _Optional[_Union[RequestMeta, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "task", "owned_by", "created")
    ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    id: str
    task: str
    owned_by: str
    created: int
    def __init__(self, id: _Optional[str] = ..., task: _Optional[str] = ..., owned_by: _Optional[str] = ..., created: _Optional[int] = ...) -> None: ...

class RouterListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
