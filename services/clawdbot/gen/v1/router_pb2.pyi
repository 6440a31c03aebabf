from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestMeta(_message.Message):
    __slots__ = ("request_id", "client_ip", "device_type", "api_key_id", "protocol", "user_agent", "strategy", "headers", "cache_control", "grant")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_CONTROL_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    client_ip: str
    device_type: str
    api_key_id: str
    protocol: str
    user_agent: str
    strategy: str
    headers: _containers.ScalarMap[str, str]
    cache_control: str
    grant: KeyGrant
    def __init__(self, request_id: _Optional[str] = ..., client_ip: _Optional[str] = ..., device_type: _Optional[str] = ..., api_key_id: _Optional[str] = ..., protocol: _Optional[str] = ..., user_agent: _Optional[str] = ..., strategy: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., cache_control: _Optional[str] = ..., grant: _Optional[_Union[KeyGrant, _Mapping]] = ...) -> None: ...

class KeyGrant(_message.Message):
    __slots__ = ("models", "budget_usd", "budget_period", "stored", "cache_scope")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    budget_usd: float
    budget_period: str
    stored: bool
    cache_scope: str
    def __init__(self, models: _Optional[_Iterable[str]] = ..., budget_usd: _Optional[float] = ..., budget_period: _Optional[str] = ..., stored: _Optional[bool] = ..., cache_scope: _Optional[str] = ...) -> None: ...

class Spend(_message.Message):
    __slots__ = ("budgeted", "remaining_usd", "cost_usd", "input_tokens", "output_tokens")
    BUDGETED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_USD_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    budgeted: bool
    remaining_usd: float
    cost_usd: float
    input_tokens: int
    output_tokens: int
    def __init__(self, budgeted: _Optional[bool] = ..., remaining_usd: _Optional[float] = ..., cost_usd: _Optional[float] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("meta", "task", "model", "stream", "openai_json", "binary", "dialect", "native_json", "native_headers")
    class NativeHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    META_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OPENAI_JSON_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    DIALECT_FIELD_NUMBER: _ClassVar[int]
    NATIVE_JSON_FIELD_NUMBER: _ClassVar[int]
    NATIVE_HEADERS_FIELD_NUMBER: _ClassVar[int]
    meta: RequestMeta
    task: str
    model: str
    stream: bool
    openai_json: bytes
    binary: bytes
    dialect: str
    native_json: bytes
    native_headers: _containers.ScalarMap[str, str]
    def __init__(self, meta: _Optional[_Union[RequestMeta, _Mapping]] = ..., task: _Optional[str] = ..., model: _Optional[str] = ..., stream: _Optional[bool] = ..., openai_json: _Optional[bytes] = ..., binary: _Optional[bytes] = ..., dialect: _Optional[str] = ..., native_json: _Optional[bytes] = ..., native_headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ModelResponse(_message.Message):
    __slots__ = ("openai_json", "instance", "strategy", "cost_usd", "binary", "content_type", "cache", "spend", "dialect")
    OPENAI_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    DIALECT_FIELD_NUMBER: _ClassVar[int]
    openai_json: bytes
    instance: str
    strategy: str
    cost_usd: float
    binary: bytes
    content_type: str
    cache: str
    spend: Spend
    dialect: str
    def __init__(self, openai_json: _Optional[bytes] = ..., instance: _Optional[str] = ..., strategy: _Optional[str] = ..., cost_usd: _Optional[float] = ..., binary: _Optional[bytes] = ..., content_type: _Optional[str] = ..., cache: _Optional[str] = ..., spend: _Optional[_Union[Spend, _Mapping]] = ..., dialect: _Optional[str] = ...) -> None: ...

class StreamEvent(_message.Message):
    __slots__ = ("chunk_json", "instance", "settled", "strategy", "cache", "spend", "dialect")
    CHUNK_JSON_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    SPEND_FIELD_NUMBER: _ClassVar[int]
    DIALECT_FIELD_NUMBER: _ClassVar[int]
    chunk_json: bytes
    instance: str
    settled: Spend
    strategy: str
    cache: str
    spend: Spend
    dialect: str
    def __init__(self, chunk_json: _Optional[bytes] = ..., instance: _Optional[str] = ..., settled: _Optional[_Union[Spend, _Mapping]] = ..., strategy: _Optional[str] = ..., cache: _Optional[str] = ..., spend: _Optional[_Union[Spend, _Mapping]] = ..., dialect: _Optional[str] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("meta", "request_id", "score")
    META_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    meta: RequestMeta
    request_id: str
    score: float
    def __init__(self, meta: _Optional[_Union[RequestMeta, _Mapping]] = ..., request_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("instance", "task", "quality")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    instance: str
    task: str
    quality: float
    def __init__(self, instance: _Optional[str] = ..., task: _Optional[str] = ..., quality: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("meta", "model", "task", "strategy", "input_tokens", "max_tokens", "modality")
    META_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    meta: RequestMeta
    model: str
    task: str
    strategy: str
    input_tokens: int
    max_tokens: int
    modality: str
    def __init__(self, meta: _Optional[_Union[RequestMeta, _Mapping]] = ..., model: _Optional[str] = ..., task: _Optional[str] = ..., strategy: _Optional[str] = ..., input_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., modality: _Optional[str] = ...) -> None: ...

class ScoreTerms(_message.Message):
    __slots__ = ("latency", "accuracy", "cost")
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    latency: float
    accuracy: float
    cost: float
    def __init__(self, latency: _Optional[float] = ..., accuracy: _Optional[float] = ..., cost: _Optional[float] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("instance", "eligible", "reason", "expected_latency_s", "expected_cost_usd", "quality", "cold", "breaker", "in_flight", "terms", "score", "rank", "latency_source", "qps")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    COLD_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    QPS_FIELD_NUMBER: _ClassVar[int]
    instance: str
    eligible: bool
    reason: str
    expected_latency_s: float
    expected_cost_usd: float
    quality: float
    cold: bool
    breaker: str
    in_flight: int
    terms: ScoreTerms
    score: float
    rank: int
    latency_source: str
    qps: float
    def __init__(self, instance: _Optional[str] = ..., eligible: _Optional[bool] = ..., reason: _Optional[str] = ..., expected_latency_s: _Optional[float] = ..., expected_cost_usd: _Optional[float] = ..., quality: _Optional[float] = ..., cold: _Optional[bool] = ..., breaker: _Optional[str] = ..., in_flight: _Optional[int] = ..., terms: _Optional[_Union[ScoreTerms, _Mapping]] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., latency_source: _Optional[str] = ..., qps: _Optional[float] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("model", "task", "strategy", "weights", "candidates", "chosen", "why", "rules")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    model: str
    task: str
    strategy: str
    weights: ScoreTerms
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    chosen: str
    why: str
    rules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., task: _Optional[str] = ..., strategy: _Optional[str] = ..., weights: _Optional[_Union[ScoreTerms, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., chosen: _Optional[str] = ..., why: _Optional[str] = ..., rules: _Optional[_Iterable[str]] = ...) -> None: ...

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

class ReloadRequest(_message.Message):
    __slots__ = ("meta",)
    META_FIELD_NUMBER: _ClassVar[int]
    meta: RequestMeta
    def __init__(self, meta: _Optional[_Union[RequestMeta, _Mapping]] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("version", "added", "removed", "kept", "unhealthy", "took_ms", "source")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    TOOK_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    version: int
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    kept: _containers.RepeatedScalarFieldContainer[str]
    unhealthy: _containers.RepeatedScalarFieldContainer[str]
    took_ms: float
    source: str
    def __init__(self, version: _Optional[int] = ..., added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., kept: _Optional[_Iterable[str]] = ..., unhealthy: _Optional[_Iterable[str]] = ..., took_ms: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("instance_id", "timeout_s")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    timeout_s: float
    def __init__(self, instance_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("ok", "latency_s", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    latency_s: float
    error: str
    def __init__(self, ok: _Optional[bool] = ..., latency_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class RouterInstancesRequest(_message.Message):
    __slots__ = ("meta",)
    META_FIELD_NUMBER: _ClassVar[int]
    meta: RequestMeta
    def __init__(self, meta: _Optional[_Union[RequestMeta, _Mapping]] = ...) -> None: ...

class RouterInstancesReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: bytes
    def __init__(self, json: _Optional[bytes] = ...) -> None: ...
