from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheEntryMeta(_message.Message):
    __slots__ = ("content_type", "created_at", "expires_at", "attributes", "size")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    created_at: float
    expires_at: float
    attributes: _containers.ScalarMap[str, str]
    size: int
    def __init__(self, content_type: _Optional[str] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., attributes: _Optional[_Mapping[str, str]] = ..., size: _Optional[int] = ...) -> None: ...

class CacheGetRequest(_message.Message):
    __slots__ = ("key", "max_age_s", "lease", "wait_s")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    key: str
    max_age_s: float
    lease: bool
    wait_s: float
    def __init__(self, key: _Optional[str] = ..., max_age_s: _Optional[float] = ..., lease: _Optional[bool] = ..., wait_s: _Optional[float] = ...) -> None: ...

class CacheChunk(_message.Message):
    __slots__ = ("status", "level", "lease", "meta", "data")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    status: str
    level: str
    lease: str
    meta: CacheEntryMeta
    data: bytes
    def __init__(self, status: _Optional[str] = ..., level: _Optional[str] = ..., lease: _Optional[str] = ..., meta: _Optional[_Union[CacheEntryMeta, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CachePutChunk(_message.Message):
    __slots__ = ("key", "lease", "meta", "ttl_s", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: str
    lease: str
    meta: CacheEntryMeta
    ttl_s: float
    data: bytes
    def __init__(self, key: _Optional[str] = ..., lease: _Optional[str] = ..., meta: _Optional[_Union[CacheEntryMeta, _Mapping]] = ..., ttl_s: _Optional[float] = ..., data: _Optional[bytes] = ...) -> None: ...

class CachePutResponse(_message.Message):
    __slots__ = ("levels",)
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    levels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, levels: _Optional[_Iterable[str]] = ...) -> None: ...

class CacheDeleteRequest(_message.Message):
    __slots__ = ("key", "lease")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    key: str
    lease: str
    def __init__(self, key: _Optional[str] = ..., lease: _Optional[str] = ...) -> None: ...

class CacheDeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class CacheStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CacheLevelStats(_message.Message):
    __slots__ = ("level", "up", "hits", "misses", "entries", "bytes")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    level: str
    up: bool
    hits: int
    misses: int
    entries: int
    bytes: int
    def __init__(self, level: _Optional[str] = ..., up: _Optional[bool] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class CacheStatsResponse(_message.Message):
    __slots__ = ("levels", "coalesced", "in_flight")
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    COALESCED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    levels: _containers.RepeatedCompositeFieldContainer[CacheLevelStats]
    coalesced: int
    in_flight: int
    def __init__(self, levels: _Optional[_Iterable[_Union[CacheLevelStats, _Mapping]]] = ..., coalesced: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class SemanticSearchRequest(_message.Message):
    __slots__ = ("namespace", "vector", "threshold")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    threshold: float
    def __init__(self, namespace: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., threshold: _Optional[float] = ...) -> None: ...

class SemanticSearchResponse(_message.Message):
    __slots__ = ("found", "key", "similarity")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    found: bool
    key: str
    similarity: float
    def __init__(self, found: _Optional[bool] = ..., key: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class SemanticAddRequest(_message.Message):
    __slots__ = ("namespace", "key", "vector")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class SemanticAddResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: int
    def __init__(self, entries: _Optional[int] = ...) -> None: ...
