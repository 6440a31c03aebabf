"""OpenAI's Responses API: POST /v1/responses (streamed or not), GET and DELETE
/v1/responses/{id}, its input items, /v1/responses/input_tokens, and the typed twins.

A Responses request is translated to the one internal request (a Chat Completions body,
common/dialects/responses.py), checked by parse_chat like any Chat request, and served by
the Gateway as Chat Completions is (auth, allowlists, rate limits, cache, router,
budgets); the Chat answer or chunks are translated back.

Responses are stored (store: true, the default) per API key for RESPONSE_TTL_S (30 days,
as OpenAI keeps them): the Response object, this turn's input items and the whole
conversation so far, which previous_response_id continues. In Redis (the quota/cache
Redis) so every adapter replica sees them; without Redis, in this process, bounded to
LOCAL_MAX_RESPONSES (least recently used evicted first).
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import orjson
import redis.asyncio as aioredis
from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2

from clawdbot.adapter.openai_requests import ParsedRequest, load_json_object, parse_chat
from clawdbot.adapter.protocols.base import error_headers, metadata_dict, routing_headers
from clawdbot.common.dialects.responses import (
    RESPONSE_TTL_S,
    NativeRelay,
    ResponsesStream,
    Turn,
    check_history_bounds,
    estimate_input_tokens,
    not_found,
    output_to_chat,
    restamp,
    to_chat,
    wrong_type,
)
from clawdbot.common.errors import GatewayError, internal_error, redis_available
from clawdbot.common.json_numbers import whole_numbers
from clawdbot.common.quota import quota_redis
from clawdbot.gen.v1 import gateway_pb2, router_pb2

if TYPE_CHECKING:
    from clawdbot.adapter.gateway import Gateway
    from clawdbot.adapter.protocols.base import ProtocolContext

log = logging.getLogger(__name__)

JSON = "application/json"
SSE = "text/event-stream"
# Without Redis: responses kept in this process, at most this many (the oldest evicted).
LOCAL_MAX_RESPONSES = 10_000
REDIS_PREFIX = "clawdbot:responses:"
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100


class ResponseStore:
    """Stored responses, each under its id with the API key it belongs to: another key's
    response is not found, as an unknown one is."""

    def __init__(self, redis: aioredis.Redis | None, ttl_s: int = RESPONSE_TTL_S) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        if redis is None:
            log.warning(
                "responses stored in this process's memory (no Redis): lost on restart, not shared by replicas",
                extra={"max_responses": LOCAL_MAX_RESPONSES, "ttl_s": ttl_s},
            )

    async def put(self, response_id: str, record: dict[str, Any]) -> None:
        data = orjson.dumps(record)
        if self._redis is not None:
            async with redis_available("response store", "response_store_unavailable"):
                await self._redis.set(REDIS_PREFIX + response_id, data, ex=self._ttl_s)
            return
        self._local[response_id] = (time.monotonic() + self._ttl_s, data)
        self._local.move_to_end(response_id)
        while len(self._local) > LOCAL_MAX_RESPONSES:
            self._local.popitem(last=False)

    async def get(self, key_id: str, response_id: str) -> dict[str, Any] | None:
        if self._redis is not None:
            async with redis_available("response store", "response_store_unavailable"):
                data = await self._redis.get(REDIS_PREFIX + response_id)
        else:
            entry = self._local.get(response_id)
            data = None
            if entry is not None and entry[0] > time.monotonic():
                data = entry[1]
            elif entry is not None:
                del self._local[response_id]
        if data is None:
            return None
        record: dict[str, Any] = orjson.loads(data)
        return record if record.get("key") == key_id else None

    async def delete(self, key_id: str, response_id: str) -> bool:
        if await self.get(key_id, response_id) is None:
            return False
        if self._redis is not None:
            async with redis_available("response store", "response_store_unavailable"):
                await self._redis.delete(REDIS_PREFIX + response_id)
        else:
            self._local.pop(response_id, None)
        return True


@dataclass
class Prepared:
    turn: Turn
    parsed: ParsedRequest


class ResponsesService:
    """What the REST and typed routes share: translation, storage, the Gateway calls."""

    def __init__(self, gateway: Gateway, store: ResponseStore) -> None:
        self.gateway = gateway
        self.store = store

    async def prepare(self, body: dict[str, Any], meta: router_pb2.RequestMeta) -> Prepared:
        """The request translated to Chat after its previous response's conversation,
        checked by parse_chat (the Chat route's bounds apply)."""
        history: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            if not isinstance(previous, str):
                raise wrong_type("previous_response_id", "a string", previous)
            record = await self.store.get(meta.api_key_id, previous)
            if record is None:
                raise not_found(previous, "previous_response_id")
            history = record["conversation"]
        turn = to_chat(body, history)
        check_history_bounds(len(orjson.dumps(turn.conversation)), len(turn.conversation))
        return Prepared(turn, parse_chat(turn.chat))

    async def model_request(
        self, prepared: Prepared, meta: router_pb2.RequestMeta, native: bytes
    ) -> router_pb2.ModelRequest:
        request = await self.gateway.model_request(prepared.parsed, meta, None)
        request.dialect = "responses"
        # The caller's own body, for an upstream that speaks Responses (the router passes
        # it through then). Not when it continues a conversation: the upstream does not
        # know our response ids; the translated history goes instead.
        if prepared.turn.echo["previous_response_id"] is None:
            request.native_json = native
        return request

    async def complete(
        self, prepared: Prepared, meta: router_pb2.RequestMeta, native: bytes
    ) -> tuple[dict[str, Any], router_pb2.ModelResponse]:
        answer = await self.gateway.complete(await self.model_request(prepared, meta, native))
        if answer.dialect == "responses":  # passed through: the upstream's own Response
            response = restamp(prepared.turn, orjson.loads(answer.openai_json))
        elif answer.dialect:
            raise GatewayError(502, f"The router answered in the '{answer.dialect}' dialect.", "upstream_error")
        else:
            response = prepared.turn.response(orjson.loads(answer.openai_json))
        await self.save(prepared.turn, response, meta)
        return response, answer

    async def relay(
        self, prepared: Prepared, meta: router_pb2.RequestMeta, events: AsyncGenerator[router_pb2.StreamEvent, None]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """An upstream's own Responses events (the router passed the request through),
        relayed with our id and sequence numbers; the final response is stored before
        its event goes out, as a translated one is."""
        relay = NativeRelay(prepared.turn)
        try:
            async for streamed in events:
                if not streamed.HasField("chunk_json"):
                    continue
                event = relay.relay(orjson.loads(streamed.chunk_json))
                final = relay.response is not None and event.get("response") is relay.response
                if final and relay.response is not None and relay.response.get("status") != "failed":
                    await self.save(prepared.turn, relay.response, meta)
                yield event
        except GatewayError as err:
            for event in relay.fail(err):
                yield event

    async def save(self, turn: Turn, response: dict[str, Any], meta: router_pb2.RequestMeta) -> None:
        if not turn.store:
            return
        record = {
            "key": meta.api_key_id,
            "response": response,
            "input_items": turn.input_items,
            "conversation": turn.conversation + output_to_chat(response.get("output") or []),
        }
        await self.store.put(turn.response_id, record)

    async def stored(self, meta: router_pb2.RequestMeta, response_id: str) -> dict[str, Any]:
        record = await self.store.get(meta.api_key_id, response_id)
        if record is None:
            raise not_found(response_id)
        return record

    async def get(self, meta: router_pb2.RequestMeta, response_id: str) -> dict[str, Any]:
        response: dict[str, Any] = (await self.stored(meta, response_id))["response"]
        return response

    async def delete(self, meta: router_pb2.RequestMeta, response_id: str) -> dict[str, Any]:
        if not await self.store.delete(meta.api_key_id, response_id):
            raise not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def input_items(self, meta: router_pb2.RequestMeta, request: gateway_pb2.ResponseRequest) -> dict[str, Any]:
        items: list[dict[str, Any]] = list((await self.stored(meta, request.id))["input_items"])
        order = request.order or "desc"
        if order not in ("asc", "desc"):
            raise GatewayError.bad_request(
                f"Invalid value for 'order': '{order}'. Supported values are: 'asc' and 'desc'.", "order"
            )
        limit = request.limit or DEFAULT_LIST_LIMIT
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise GatewayError.bad_request(
                f"Invalid 'limit': expected a value between 1 and {MAX_LIST_LIMIT}, but got {limit}.", "limit"
            )
        if order == "desc":
            items.reverse()
        if request.after:
            ids = [item["id"] for item in items]
            if request.after not in ids:
                raise GatewayError.bad_request(f"No input item with id '{request.after}'.", "after")
            items = items[ids.index(request.after) + 1 :]
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }

    async def input_tokens(self, body: dict[str, Any], meta: router_pb2.RequestMeta) -> dict[str, Any]:
        """An estimate (about 4 bytes per token) of the input a create would send:
        instructions, the previous response's conversation, the input and the tools."""
        body = {**body, "stream": False}
        body.setdefault("model", "count")  # the count does not need a model
        prepared = await self.prepare(body, meta)
        return {
            "object": "response.input_tokens",
            "input_tokens": estimate_input_tokens(prepared.turn.chat, orjson.dumps),
        }


# One service per Gateway: the REST and the typed routes share its store.
_services: weakref.WeakKeyDictionary[Gateway, ResponsesService] = weakref.WeakKeyDictionary()


def service_for(ctx: ProtocolContext) -> ResponsesService:
    service = _services.get(ctx.gateway)
    if service is None:
        redis = quota_redis(ctx.config)
        if redis is not None:
            ctx.host.on_shutdown(redis.aclose)
        service = ResponsesService(ctx.gateway, ResponseStore(redis))
        _services[ctx.gateway] = service
    return service


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def body_json(value: dict[str, Any]) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(value))


class ResponsesRest:
    def __init__(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway
        self._service = service_for(ctx)

    async def _error(self, context: grpc.aio.ServicerContext, err: GatewayError) -> httpbody_pb2.HttpBody:
        """OpenAI's error body, its status in x-clawdbot-status (as RestProtocol._error)."""
        await context.send_initial_metadata(error_headers(err.status, err))
        return httpbody_pb2.HttpBody(content_type=JSON, data=err.to_json())

    async def create(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        started = time.perf_counter()
        headers = metadata_dict(context)
        gateway = self._gateway
        service = self._service
        status = 200
        with gateway.span("POST /v1/responses", headers, "rest") as span:
            try:
                meta = await gateway.accept(headers, "rest", context.peer())
                span.set_attribute("clawdbot.request_id", meta.request_id)
                prepared = await service.prepare(load_json_object(request.data), meta)
                if not prepared.parsed.stream:
                    response, answer = await service.complete(prepared, meta, request.data)
                    await context.send_initial_metadata(routing_headers(answer))
                    yield body_json(response)
                    return
                model_request = await service.model_request(prepared, meta, request.data)
                async with contextlib.aclosing(gateway.stream(model_request)) as events:
                    # The router's first event before answering: failures before any token
                    # keep their status and a JSON error body.
                    first = await anext(events)
                    if first.dialect == "responses":
                        await context.send_initial_metadata(routing_headers(first))
                        async for body in self._relay(prepared, meta, events):
                            yield body
                        return
                    if first.dialect:
                        raise GatewayError(502, f"The router streamed the '{first.dialect}' dialect.", "upstream_error")
                    await context.send_initial_metadata(routing_headers(first))
                    encoder = ResponsesStream(prepared.turn)
                    for event in encoder.start():
                        yield httpbody_pb2.HttpBody(content_type=SSE, data=sse(event))
                    try:
                        async for streamed in events:
                            if streamed.HasField("chunk_json"):
                                for event in encoder.feed(orjson.loads(streamed.chunk_json)):
                                    yield httpbody_pb2.HttpBody(content_type=SSE, data=sse(event))
                    except GatewayError as err:
                        # Headers are gone: the failure is the stream's last event.
                        status = err.status
                        for event in encoder.fail(err):
                            yield httpbody_pb2.HttpBody(content_type=SSE, data=sse(event))
                        return
                    final = encoder.finish()
                    try:
                        if encoder.response is not None:
                            await service.save(prepared.turn, encoder.response, meta)
                    except GatewayError as err:
                        # Not stored (the store is down): a response a continuation could
                        # not find must not be announced as completed.
                        status = err.status
                        final = encoder.fail(err)
                    for event in final:
                        yield httpbody_pb2.HttpBody(content_type=SSE, data=sse(event))
            except StopAsyncIteration:
                status = 502
                yield await self._error(
                    context, GatewayError(502, "The router ended the stream without an answer.", "upstream_error")
                )
            except GatewayError as err:
                status = err.status
                yield await self._error(context, err)
            except Exception:
                log.exception("response failed")
                status = 500
                yield await self._error(context, internal_error())
            finally:
                gateway.record("responses", "rest", status, started)

    async def _relay(
        self, prepared: Prepared, meta: router_pb2.RequestMeta, events: AsyncGenerator[router_pb2.StreamEvent, None]
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        async for event in self._service.relay(prepared, meta, events):
            yield httpbody_pb2.HttpBody(content_type=SSE, data=sse(event))

    async def _unary(
        self,
        operation: str,
        route: str,
        context: grpc.aio.ServicerContext,
        work: Callable[[router_pb2.RequestMeta], Awaitable[dict[str, Any]]],
    ) -> httpbody_pb2.HttpBody:
        started = time.perf_counter()
        headers = metadata_dict(context)
        status = 200
        with self._gateway.span(route, headers, "rest"):
            try:
                return body_json(await work(await self._gateway.accept(headers, "rest", context.peer())))
            except GatewayError as err:
                status = err.status
                return await self._error(context, err)
            except Exception:
                log.exception("%s failed", operation)
                status = 500
                return await self._error(context, internal_error())
            finally:
                self._gateway.record(operation, "rest", status, started)

    async def input_tokens(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            return await self._service.input_tokens(load_json_object(request.data), meta)

        return await self._unary("responses.input_tokens", "POST /v1/responses/input_tokens", context, work)

    async def get(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            return await self._service.get(meta, request.id)

        return await self._unary("responses.get", "GET /v1/responses/{id}", context, work)

    async def delete(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            return await self._service.delete(meta, request.id)

        return await self._unary("responses.delete", "DELETE /v1/responses/{id}", context, work)

    async def input_items(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            return await self._service.input_items(meta, request)

        return await self._unary("responses.input_items", "GET /v1/responses/{id}/input_items", context, work)


def struct_of(value: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(value, struct_pb2.Struct())


def dict_of(request: struct_pb2.Struct) -> dict[str, Any]:
    # Struct numbers are doubles: max_output_tokens 64 arrives as 64.0.
    body: dict[str, Any] = whole_numbers(json_format.MessageToDict(request))
    return body


class ResponsesTyped:
    """The typed twins: the request and answers as their JSON would be, in a Struct;
    errors as the server gate answers every typed call's (gRPC status + trailers)."""

    def __init__(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway
        self._service = service_for(ctx)

    async def _call(
        self,
        operation: str,
        context: grpc.aio.ServicerContext,
        work: Callable[[router_pb2.RequestMeta], Awaitable[dict[str, Any]]],
    ) -> struct_pb2.Struct:
        # Imported here: grpc_typed imports this module.
        from clawdbot.adapter.protocols.grpc_typed import send_error_headers

        started = time.perf_counter()
        headers = metadata_dict(context)
        status = 200
        with self._gateway.span(f"grpc {operation}", headers, "grpc"):
            try:
                return struct_of(await work(await self._gateway.accept(headers, "grpc", context.peer())))
            except GatewayError as err:
                status = err.status  # for the metrics; the server gate answers it
                await send_error_headers(context, err)
                raise
            except Exception:
                status = 500
                raise
            finally:
                self._gateway.record(operation, "grpc", status, started)

    async def create(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            body = {**dict_of(request), "stream": False}
            response, answer = await self._service.complete(
                await self._service.prepare(body, meta), meta, orjson.dumps(body)
            )
            await context.send_initial_metadata(routing_headers(answer))
            return response

        return await self._call("responses", context, work)

    async def stream(
        self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[struct_pb2.Struct, None]:
        from clawdbot.adapter.protocols.grpc_typed import send_error_headers

        started = time.perf_counter()
        headers = metadata_dict(context)
        status = 200
        announced = False
        with self._gateway.span("grpc responses.stream", headers, "grpc"):
            try:
                meta = await self._gateway.accept(headers, "grpc", context.peer())
                body = {**dict_of(request), "stream": True}
                prepared = await self._service.prepare(body, meta)
                model_request = await self._service.model_request(prepared, meta, orjson.dumps(body))
                encoder = ResponsesStream(prepared.turn)
                async with contextlib.aclosing(self._gateway.stream(model_request)) as events:
                    try:
                        async for streamed in events:
                            if streamed.HasField("instance"):
                                await context.send_initial_metadata(routing_headers(streamed))
                                announced = True
                                if streamed.dialect == "responses":  # passed through
                                    async for event in self._service.relay(prepared, meta, events):
                                        yield struct_of(event)
                                    return
                                for event in encoder.start():
                                    yield struct_of(event)
                            elif streamed.HasField("chunk_json"):
                                for event in encoder.feed(orjson.loads(streamed.chunk_json)):
                                    yield struct_of(event)
                    except GatewayError as err:
                        if not announced:
                            raise
                        # Started: the failure is the stream's last event, as over REST.
                        status = err.status
                        for event in encoder.fail(err):
                            yield struct_of(event)
                        return
                final = encoder.finish()
                if encoder.response is not None:
                    await self._service.save(prepared.turn, encoder.response, meta)
                for event in final:
                    yield struct_of(event)
            except GatewayError as err:
                status = err.status  # for the metrics; the server gate answers it
                if not announced:
                    await send_error_headers(context, err)
                raise
            except Exception:
                status = 500
                raise
            finally:
                self._gateway.record("responses", "grpc", status, started)

    async def get(self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            return await self._service.get(meta, request.id)

        return await self._call("responses.get", context, work)

    async def delete(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            return await self._service.delete(meta, request.id)

        return await self._call("responses.delete", context, work)

    async def input_items(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            return await self._service.input_items(meta, request)

        return await self._call("responses.input_items", context, work)

    async def input_tokens(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        async def work(meta: router_pb2.RequestMeta) -> dict[str, Any]:
            return await self._service.input_tokens(dict_of(request), meta)

        return await self._call("responses.input_tokens", context, work)
