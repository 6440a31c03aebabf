"""The cache service as its callers use it (the adapter for client requests, the
orchestrator for model steps): which requests are cached, under what key, and reading and
storing whole answers (a ModelResponse, so instance, strategy and binary answers come back
exactly as they were).

The cache is an optimisation and never a reason for a request to fail: when the cache
service is unreachable, requests go to the router as if nothing were cached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
import orjson
from google.protobuf.message import DecodeError

from clawdbot.common.clients.cache_keys import IGNORED_FIELDS, cache_key
from clawdbot.common.clients.router import embed
from clawdbot.common.config import CacheConfig, ModelEntry
from clawdbot.gen.v1 import cache_pb2, cache_pb2_grpc, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "application/x-protobuf; message=clawdbot.v1.ModelResponse"
CHUNK_BYTES: Final = 256 * 1024
# Request header: `on` caches a request that is not deterministic, `off` never caches it.
OPT_HEADER: Final = "x-clawdbot-cache"
# Tasks whose answers do not depend on sampling.
DETERMINISTIC_TASKS: Final = frozenset({"embeddings", "intent"})
# The tail of a conversation that is embedded: the small local embeddings model reads at
# most 256 tokens, and the latest turns carry the question.
SEMANTIC_TEXT_CHARS: Final = 1000


@dataclass(frozen=True)
class CachePlan:
    key: str
    read: bool  # false for Cache-Control: no-cache (fetch fresh, then store)
    max_age_s: float  # Cache-Control: max-age; 0 = any age
    include_usage: bool  # for replaying a cached answer to a streaming client
    meta: router_pb2.RequestMeta
    # Semantic cache (models that opted in): where matches may come from, and the
    # conversation whose meaning is compared.
    semantic_namespace: str = ""
    semantic_text: str = ""


@dataclass
class CacheLookup:
    response: router_pb2.ModelResponse | None = None
    lease: str = ""
    # The conversation's embedding, when the semantic cache computed one: stored with the
    # answer once there is one.
    vector: list[float] | None = None


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


def _conversation(body: dict[str, Any]) -> tuple[str, str]:
    """(system prompt, the rest of the conversation as text) of a chat body."""
    system: list[str] = []
    turns: list[str] = []
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = f"{content}" if content is not None else ""
        if message.get("role") in ("system", "developer"):
            system.append(text)
        else:
            turns.append(f"{message.get('role')}: {text}")
    return "\n".join(system), "\n".join(turns)


def cache_scope(meta: router_pb2.RequestMeta, shared: bool) -> str:
    """Whose answers a request may be served: its key's cache default when it has one
    (meta.grant.cache_scope "private": this key's alone; "shared": everyone's), else the
    configured scope (cache.shared)."""
    wanted = meta.grant.cache_scope
    if wanted == "private":
        return meta.api_key_id
    if wanted == "shared" or shared:
        return "shared"
    return meta.api_key_id


def _deterministic(task: str, body: dict[str, Any]) -> bool:
    if task in DETERMINISTIC_TASKS:
        return True
    temperature = body.get("temperature")
    return temperature == 0 or body.get("seed") is not None


class ResponseCache:
    def __init__(
        self,
        stub: cache_pb2_grpc.CacheServiceStub,
        config: CacheConfig,
        models: tuple[ModelEntry, ...],
        router: router_pb2_grpc.RouterStub | None = None,
    ) -> None:
        self._stub = stub
        self._config = config
        self._router = router  # for the semantic cache's embeddings
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
        scope = cache_scope(request.meta, self._config.shared)
        version = self._versions.get(request.model, "")
        key = cache_key(
            request.task, request.model, version, scope, body, request.binary, request.dialect, request.native_json
        )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        namespace = text = ""
        if request.task == "chat" and request.model in self._config.semantic.models:
            system, text = _conversation(body)
            params = {k: v for k, v in body.items() if k not in IGNORED_FIELDS and k != "messages"}
            namespace = cache_key(
                "semantic", request.model, version, scope, {"system": system, "params": params}, dialect=request.dialect
            )
        return CachePlan(
            key, not no_cache, max_age, include_usage, request.meta, namespace, text[-SEMANTIC_TEXT_CHARS:]
        )

    def _unreachable(self, err: grpc.aio.AioRpcError) -> None:
        # Once a minute at most: a cache outage must not flood the logs at full traffic.
        if time.monotonic() - self._warned_at > 60:
            self._warned_at = time.monotonic()
            log.warning("cache service unavailable; serving without it", extra={"error": err.code().name})

    async def lookup(self, plan: CachePlan, lease: bool = True) -> CacheLookup:
        """A hit, or a miss with the lease to fill the key (identical requests wait for it)."""
        if not plan.read:
            return CacheLookup()
        request = cache_pb2.CacheGetRequest(
            key=plan.key, max_age_s=plan.max_age_s, lease=lease, wait_s=self._config.wait_s
        )
        try:
            found = await self._stub.Lookup(request, timeout=self._config.wait_s + 10)
            first: cache_pb2.CacheChunk | None = found
            body = found.data
            if found.status == "hit" and len(body) < found.meta.size:
                # Larger than one message: read it in chunks (no lease: it is there).
                first, body = await self._read_chunked(plan)
        except grpc.aio.AioRpcError as err:
            self._unreachable(err)
            return CacheLookup()
        if first is None or first.status != "hit":
            # A miss, or a large entry gone between the two reads (a miss without a lease).
            return CacheLookup(lease=first.lease if first else "")
        try:
            response = router_pb2.ModelResponse.FromString(body)
        except DecodeError:  # a bad entry is a miss, never an answer
            log.warning("unreadable cache entry ignored", extra={"key": plan.key})
            return CacheLookup()
        response.cache = f"hit-{first.level}"
        response.cost_usd = 0.0  # a cached answer costs nothing
        # Nor does it say anything about the key's budget now (entries stored before
        # spend was left out may carry another call's).
        response.ClearField("spend")
        return CacheLookup(response)

    async def _read_chunked(self, plan: CachePlan) -> tuple[cache_pb2.CacheChunk | None, bytes]:
        """A value read with Get's stream: its first chunk (None if none came) and its bytes."""
        first: cache_pb2.CacheChunk | None = None
        parts: list[bytes] = []
        request = cache_pb2.CacheGetRequest(key=plan.key, max_age_s=plan.max_age_s)
        async for chunk in self._stub.Get(request, timeout=30):
            first = first or chunk
            parts.append(chunk.data)
        return first, b"".join(parts)

    async def store(self, plan: CachePlan, lease: str, response: router_pb2.ModelResponse) -> None:
        if response.HasField("spend"):
            # What the call cost its key, and that key's budget left, are no part of the
            # answer: a hit (perhaps another key's, shared) costs nothing and tells nothing.
            stripped = router_pb2.ModelResponse()
            stripped.CopyFrom(response)
            stripped.ClearField("spend")
            response = stripped
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

    async def _embed(self, plan: CachePlan) -> list[float] | None:
        if self._router is None or not plan.semantic_text.strip():
            return None
        try:
            (vector,) = await embed(
                self._router, plan.meta, self._config.semantic.embeddings_model, [plan.semantic_text], 10
            )
        except (grpc.aio.AioRpcError, KeyError, IndexError, TypeError, ValueError) as exc:
            # Without a vector the request is just an exact-cache miss.
            log.warning("semantic cache: no embedding", extra={"error": f"{type(exc).__name__}: {exc}"})
            return None
        return vector

    async def semantic_lookup(self, plan: CachePlan) -> tuple[router_pb2.ModelResponse | None, list[float] | None]:
        """A stored answer to a conversation that means the same, and this one's vector."""
        if not plan.semantic_namespace or not plan.read:
            return None, None
        vector = await self._embed(plan)
        if vector is None:
            return None, None
        search = cache_pb2.SemanticSearchRequest(
            namespace=plan.semantic_namespace, vector=vector, threshold=self._config.semantic.threshold
        )
        try:
            match = await self._stub.SemanticSearch(search, timeout=10)
        except grpc.aio.AioRpcError as err:
            self._unreachable(err)
            return None, vector
        if not match.found:
            return None, vector
        found = await self.lookup(
            CachePlan(match.key, True, plan.max_age_s, plan.include_usage, plan.meta), lease=False
        )
        if found.response is None:
            return None, vector  # the matching answer has expired from every level
        found.response.cache = "semantic"
        return found.response, vector

    async def semantic_add(self, plan: CachePlan, vector: list[float]) -> None:
        add = cache_pb2.SemanticAddRequest(namespace=plan.semantic_namespace, key=plan.key, vector=vector)
        try:
            await self._stub.SemanticAdd(add, timeout=10)
        except grpc.aio.AioRpcError as err:
            self._unreachable(err)

    async def read(self, plan: CachePlan) -> CacheLookup:
        """The exact entry, else (models that opted in) one that means the same; a miss
        carries the lease to fill the key and the conversation's vector."""
        found = await self.lookup(plan)
        if found.response is not None or not plan.semantic_namespace:
            return found
        similar, vector = await self.semantic_lookup(plan)
        if similar is None:
            return CacheLookup(lease=found.lease, vector=vector)
        # Also the answer to this exact request from now on (and to those waiting on it).
        stored = router_pb2.ModelResponse()
        stored.CopyFrom(similar)
        stored.cache = ""
        await self.store(plan, found.lease, stored)
        return CacheLookup(similar)

    async def complete(
        self,
        request: router_pb2.ModelRequest,
        call: Callable[[router_pb2.ModelRequest], Awaitable[router_pb2.ModelResponse]],
    ) -> router_pb2.ModelResponse:
        """The answer from the cache when it has one; otherwise call's, stored for the next
        caller (identical requests meanwhile wait for it rather than calling too)."""
        plan = self.plan(request)
        if plan is None:
            response = await call(request)
            response.cache = "miss"
            return response
        found = await self.read(plan)
        if found.response is not None:
            return found.response
        try:
            response = await call(request)
        except BaseException:
            await self.abandon(plan, found.lease)
            raise
        await self.write(plan, found, response)
        response.cache = "miss"
        return response

    async def write(self, plan: CachePlan, found: CacheLookup, response: router_pb2.ModelResponse) -> None:
        """Store a fresh answer under the plan's key (and its vector, for the semantic cache)."""
        await self.store(plan, found.lease, response)
        if found.vector is not None:
            await self.semantic_add(plan, found.vector)
