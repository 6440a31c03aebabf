"""The adapter's use of the cache service: which requests are cached, under what key, and
reading and storing whole answers (a ModelResponse, so instance, strategy and binary
answers come back exactly as they were).

The cache is an optimisation and never a reason for a request to fail: when the cache
service is unreachable, requests go to the router as if nothing were cached.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import grpc
import orjson

from clawdbot.cache.keys import cache_key
from clawdbot.common.config import CacheConfig, ModelEntry
from clawdbot.gen.v1 import cache_pb2, cache_pb2_grpc, router_pb2

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "application/x-protobuf; message=clawdbot.v1.ModelResponse"
CHUNK_BYTES: Final = 256 * 1024
# Request header: `on` caches a request that is not deterministic, `off` never caches it.
OPT_HEADER: Final = "x-clawdbot-cache"
# Tasks whose answers do not depend on sampling.
DETERMINISTIC_TASKS: Final = frozenset({"embeddings", "intent"})


@dataclass(frozen=True)
class CachePlan:
    key: str
    read: bool  # false for Cache-Control: no-cache (fetch fresh, then store)
    max_age_s: float  # Cache-Control: max-age; 0 = any age
    include_usage: bool  # for replaying a cached answer to a streaming client


@dataclass
class CacheLookup:
    response: router_pb2.ModelResponse | None = None
    lease: str = ""


def _cache_control(value: str) -> tuple[bool, bool, float]:
    """(no_store, no_cache, max_age_s) from a Cache-Control request header."""
    no_store = no_cache = False
    max_age = 0.0
    for directive in value.lower().split(","):
        name, _, argument = directive.strip().partition("=")
        if name == "no-store":
            no_store = True
        elif name == "no-cache":
            no_cache = True
        elif name == "max-age":
            try:
                max_age = max(float(argument.strip('"')), 0.0)
            except ValueError:
                continue  # an unreadable max-age is ignored, as HTTP caches do
            no_cache = no_cache or max_age == 0
    return no_store, no_cache, max_age


def _deterministic(task: str, body: dict[str, Any]) -> bool:
    if task in DETERMINISTIC_TASKS:
        return True
    temperature = body.get("temperature")
    return temperature == 0 or body.get("seed") is not None


class ResponseCache:
    def __init__(
        self, stub: cache_pb2_grpc.CacheServiceStub, config: CacheConfig, models: tuple[ModelEntry, ...]
    ) -> None:
        self._stub = stub
        self._config = config
        # The key names a model's versions, so a new version never serves an old answer.
        versions: dict[str, set[str]] = {}
        for entry in models:
            versions.setdefault(entry.name, set()).add(entry.version)
        self._versions = {name: ",".join(sorted(v)) for name, v in versions.items()}
        self._warned_at = 0.0

    def plan(self, request: router_pb2.ModelRequest) -> CachePlan | None:
        """How to cache this request; None when it must not touch the cache."""
        if request.task not in self._config.tasks:
            return None
        opt = request.meta.headers.get(OPT_HEADER, "").lower()
        no_store, no_cache, max_age = _cache_control(request.meta.cache_control)
        if no_store or opt == "off":
            return None
        try:
            body = orjson.loads(request.openai_json)
        except orjson.JSONDecodeError:
            return None  # the router will refuse it with the right message
        if not isinstance(body, dict) or not (opt == "on" or _deterministic(request.task, body)):
            return None
        scope = "shared" if self._config.shared else request.meta.api_key_id
        version = self._versions.get(request.model, "")
        key = cache_key(request.task, request.model, version, scope, body, request.binary)
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return CachePlan(key, not no_cache, max_age, include_usage)

    def _unreachable(self, err: grpc.aio.AioRpcError) -> None:
        # Once a minute at most: a cache outage must not flood the logs at full traffic.
        if time.monotonic() - self._warned_at > 60:
            self._warned_at = time.monotonic()
            log.warning("cache service unavailable; serving without it", extra={"error": err.code().name})

    async def lookup(self, plan: CachePlan) -> CacheLookup:
        """A hit, or a miss with the lease to fill the key (identical requests wait for it)."""
        if not plan.read:
            return CacheLookup()
        request = cache_pb2.CacheGetRequest(
            key=plan.key, max_age_s=plan.max_age_s, lease=True, wait_s=self._config.wait_s
        )
        first: cache_pb2.CacheChunk | None = None
        parts: list[bytes] = []
        try:
            async for chunk in self._stub.Get(request, timeout=self._config.wait_s + 10):
                first = first or chunk
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as err:
            self._unreachable(err)
            return CacheLookup()
        if first is None or first.status != "hit":
            return CacheLookup(lease=first.lease if first else "")
        try:
            response = router_pb2.ModelResponse.FromString(b"".join(parts))
        except Exception:  # noqa: BLE001 - protobuf's DecodeError; a bad entry is a miss, never an answer
            log.warning("unreadable cache entry ignored", extra={"key": plan.key})
            return CacheLookup()
        response.cache = f"hit-{first.level}"
        response.cost_usd = 0.0  # a cached answer costs nothing
        return CacheLookup(response)

    async def store(self, plan: CachePlan, lease: str, response: router_pb2.ModelResponse) -> None:
        body = response.SerializeToString()
        meta = cache_pb2.CacheEntryMeta(
            content_type=CONTENT_TYPE,
            created_at=time.time(),
            attributes={"instance": response.instance, "strategy": response.strategy},
        )

        def chunks() -> Any:
            yield cache_pb2.CachePutChunk(key=plan.key, lease=lease, meta=meta, data=body[:CHUNK_BYTES])
            for start in range(CHUNK_BYTES, len(body), CHUNK_BYTES):
                yield cache_pb2.CachePutChunk(data=body[start : start + CHUNK_BYTES])

        try:
            await self._stub.Put(chunks(), timeout=30)
        except grpc.aio.AioRpcError as err:
            self._unreachable(err)

    async def abandon(self, plan: CachePlan, lease: str) -> None:
        """The fill failed: give the lease up, so a waiting request tries for itself."""
        if not lease:
            return
        try:
            await self._stub.Delete(cache_pb2.CacheDeleteRequest(key=plan.key, lease=lease), timeout=10)
        except grpc.aio.AioRpcError as err:
            self._unreachable(err)
