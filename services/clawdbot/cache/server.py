"""The cache service: L1 memory, L2 Redis, L3 object storage behind one gRPC CacheService.

Values travel in chunks both ways (Get streams, Put is a client stream), so an audio answer
of many megabytes never has to be one message. Get with a lease is how the adapter reads:
the first miss for a key fills it, identical requests meanwhile wait for that answer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

import grpc
import numpy as np

from clawdbot.cache.entry import Entry
from clawdbot.cache.memory import MemoryLevel
from clawdbot.cache.metrics import CacheMetrics
from clawdbot.cache.objects import ObjectLevel
from clawdbot.cache.redis_level import RedisLevel
from clawdbot.cache.s3_level import S3Level
from clawdbot.cache.semantic import SemanticIndex
from clawdbot.cache.singleflight import Flights, Lookup
from clawdbot.cache.store import TieredStore
from clawdbot.common.config import CacheConfig, Config, RedisConfig
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost
from clawdbot.gen.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)

CHUNK_BYTES: Final = 256 * 1024


def build_store(
    config: CacheConfig, metrics: CacheMetrics, redis: RedisConfig | None = None
) -> tuple[TieredStore, RedisLevel | None]:
    def level_state(name: str) -> Callable[[bool], None]:
        def changed(up: bool) -> None:
            metrics.level_up.labels(name).set(1 if up else 0)

        return changed

    def corrupt(level: str) -> None:
        metrics.corrupt.labels(level).inc()

    l1 = MemoryLevel(
        config.l1_max_bytes, config.l1_ttl_s, on_evict=lambda reason: metrics.evictions.labels("l1", reason).inc()
    )
    l2 = (
        RedisLevel(
            config.redis_url,
            config.l2_ttl_s,
            on_corrupt=corrupt,
            on_state_change=level_state("l2"),
            settings=redis,
        )
        if config.redis_url
        else None
    )
    l3: ObjectLevel | S3Level | None = None
    if config.s3 is not None:
        l3 = S3Level(
            config.s3.bucket,
            endpoint_url=config.s3.endpoint_url,
            region=config.s3.region,
            access_key=os.environ.get(config.s3.access_key_env),
            secret_key=os.environ.get(config.s3.secret_key_env),
            prefix=config.s3.prefix,
            ttl_s=config.l3_ttl_s,
            on_corrupt=corrupt,
            on_state_change=level_state("l3"),
        )
    elif config.object_dir:
        l3 = ObjectLevel(
            Path(config.object_dir), config.l3_ttl_s, on_corrupt=corrupt, on_state_change=level_state("l3")
        )
    for level in (l1, l2, l3):
        if level is not None:
            metrics.level_up.labels(level.name).set(1)
    return TieredStore(l1, l2, l3, config.large_value_bytes, metrics), l2


def _meta(entry: Entry) -> cache_pb2.CacheEntryMeta:
    return cache_pb2.CacheEntryMeta(
        content_type=entry.content_type,
        created_at=entry.created_at,
        expires_at=entry.expires_at,
        attributes=dict(entry.attributes),
        size=len(entry.body),
    )


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, config: CacheConfig, metrics: Metrics, redis: RedisConfig | None = None) -> None:
        self._config = config
        self._metrics = CacheMetrics(metrics)
        self.store, self._redis = build_store(config, self._metrics, redis)
        self._flights = Flights(self.store, self._redis, config.wait_s, self._metrics)
        self._semantic = SemanticIndex(config.semantic.max_entries)

    async def prepare(self) -> None:
        """Create the bucket if the object storage is S3 and it has none yet."""
        if isinstance(self.store.l3, S3Level):
            await self.store.l3.ensure_bucket()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()
        if isinstance(self.store.l3, S3Level):
            await self.store.l3.close()

    async def _find(self, request: cache_pb2.CacheGetRequest, context: grpc.aio.ServicerContext) -> Lookup:
        if not request.key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key is required")
        wait_s = min(request.wait_s or self._config.wait_s, self._config.wait_s)
        return await self._flights.get(request.key, request.max_age_s, request.lease, wait_s)

    async def Get(  # noqa: N802 - gRPC method name
        self, request: cache_pb2.CacheGetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.CacheChunk]:
        found = await self._find(request, context)
        if found.entry is None:
            yield cache_pb2.CacheChunk(status="miss", lease=found.lease)
            return
        body = found.entry.body
        yield cache_pb2.CacheChunk(status="hit", level=found.level, meta=_meta(found.entry), data=body[:CHUNK_BYTES])
        for start in range(CHUNK_BYTES, len(body), CHUNK_BYTES):
            yield cache_pb2.CacheChunk(data=body[start : start + CHUNK_BYTES])

    async def Lookup(  # noqa: N802 - gRPC method name
        self, request: cache_pb2.CacheGetRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CacheChunk:
        found = await self._find(request, context)
        if found.entry is None:
            return cache_pb2.CacheChunk(status="miss", lease=found.lease)
        body = found.entry.body
        data = body if len(body) <= CHUNK_BYTES else b""
        return cache_pb2.CacheChunk(status="hit", level=found.level, meta=_meta(found.entry), data=data)

    async def Put(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[cache_pb2.CachePutChunk], context: grpc.aio.ServicerContext
    ) -> cache_pb2.CachePutResponse:
        first: cache_pb2.CachePutChunk | None = None
        parts: list[bytes] = []
        async for chunk in request_iterator:
            first = first or chunk
            parts.append(chunk.data)
        if first is None or not first.key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must carry the key")
        assert first is not None
        now = time.time()
        ttl_expiry = now + first.ttl_s if first.ttl_s > 0 else 0.0
        expires = (
            min(e for e in (first.meta.expires_at, ttl_expiry) if e > 0)
            if (first.meta.expires_at or ttl_expiry)
            else 0.0
        )
        entry = Entry(
            body=b"".join(parts),
            content_type=first.meta.content_type,
            created_at=first.meta.created_at or now,
            expires_at=expires,
            attributes=dict(first.meta.attributes),
        )
        try:
            levels = await self.store.put(first.key, entry)
        finally:
            if first.lease:
                await self._flights.finish(first.key, first.lease)
        return cache_pb2.CachePutResponse(levels=levels)

    async def Delete(  # noqa: N802 - gRPC method name
        self, request: cache_pb2.CacheDeleteRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CacheDeleteResponse:
        if request.lease:
            await self._flights.finish(request.key, request.lease)
            return cache_pb2.CacheDeleteResponse(deleted=False)
        await self.store.delete(request.key)
        return cache_pb2.CacheDeleteResponse(deleted=True)

    async def Stats(  # noqa: N802 - gRPC method name
        self, request: cache_pb2.CacheStatsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.CacheStatsResponse:
        store = self.store
        levels = []
        for level in store.levels:
            in_memory = level is store.l1
            levels.append(
                cache_pb2.CacheLevelStats(
                    level=level.name,
                    up=level.up,
                    hits=store.hits[level.name],
                    misses=store.misses[level.name],
                    entries=len(store.l1) if in_memory else 0,
                    bytes=store.l1.bytes_used if in_memory else 0,
                )
            )
        return cache_pb2.CacheStatsResponse(
            levels=levels, coalesced=self._flights.coalesced, in_flight=self._flights.in_flight
        )

    async def SemanticSearch(  # noqa: N802 - gRPC method name
        self, request: cache_pb2.SemanticSearchRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.SemanticSearchResponse:
        if not request.vector:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "vector is required")
        match = self._semantic.search(request.namespace, np.asarray(request.vector, np.float32), request.threshold)
        if match is None:
            return cache_pb2.SemanticSearchResponse(found=False)
        return cache_pb2.SemanticSearchResponse(found=True, key=match[0], similarity=match[1])

    async def SemanticAdd(  # noqa: N802 - gRPC method name
        self, request: cache_pb2.SemanticAddRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.SemanticAddResponse:
        if not request.vector or not request.key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "key and vector are required")
        self._semantic.add(request.namespace, request.key, np.asarray(request.vector, np.float32))
        return cache_pb2.SemanticAddResponse(entries=len(self._semantic))


def create_server(config: Config) -> ServiceHost:
    metrics = Metrics("cache")
    host = ServiceHost("cache", config.cache, metrics, reflection_services=("clawdbot.v1.CacheService",))
    servicer = CacheServicer(config.cache, metrics, config.redis)
    cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, host.grpc_server)
    host.add_service_name("clawdbot.v1.CacheService")
    host.in_background(servicer.prepare)
    host.on_shutdown(servicer.close)
    return host
