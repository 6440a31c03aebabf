"""Anthropic's Messages API: POST /v1/messages (streamed or not), /v1/messages/count_tokens,
and their typed gRPC twins.

A Messages request becomes the one internal request (its Chat Completions translation,
common/dialects/anthropic.py) carrying the caller's own body and Anthropic headers beside
it, and follows the Chat path from there (auth, allowlist, rate limits, cache, router,
budgets). An instance that speaks Anthropic natively is sent the caller's body and answers
natively: that answer (or event stream) is relayed as it came; any other answer is encoded
from Chat. Errors are Anthropic's shape and statuses, their HTTP status in the
x-clawdbot-status header (Envoy's Lua filter makes it the :status), as REST's are.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import orjson
from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2

from clawdbot.adapter.auth import require_model
from clawdbot.adapter.openai_requests import load_json_object, parse_chat
from clawdbot.adapter.protocols.base import error_headers, metadata_dict, routing_headers
from clawdbot.common.dialects import anthropic
from clawdbot.common.errors import GatewayError, internal_error
from clawdbot.common.json_numbers import whole_numbers
from clawdbot.gen.v1 import router_pb2

if TYPE_CHECKING:
    from clawdbot.adapter.gateway import Gateway
    from clawdbot.adapter.protocols.base import ProtocolContext
    from clawdbot.common.config import Config

log = logging.getLogger(__name__)

JSON = "application/json"
SSE = "text/event-stream"
# count_tokens answers an estimate (no tokenizer of every model is at hand): said so.
ESTIMATE_HEADER = ("x-clawdbot-token-count", "estimate")
# The connectors that speak Anthropic's API natively (common/config.py ModelEntry.connector).
NATIVE_CONNECTORS = frozenset({"anthropic"})
AUTO_MODEL = "auto"


def frames(events: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(anthropic.sse_frame(event) for event in events)


def native_frame(payload: bytes) -> bytes:
    """One native event (its data JSON, as the upstream sent it) as its SSE frame."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise GatewayError(502, "The Anthropic upstream sent an event that is not JSON.", "upstream_error") from None
    kind = event.get("type") if isinstance(event, dict) else None
    if not isinstance(kind, str) or not kind or not kind.isprintable():
        raise GatewayError(502, "The Anthropic upstream sent an event without a type.", "upstream_error")
    if b"\n" in payload or b"\r" in payload:
        payload = orjson.dumps(event)  # one `data:` line
    return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"


@dataclass(frozen=True)
class Prepared:
    request: router_pb2.ModelRequest
    model: str
    stream: bool
    input_estimate: int


class MessagesCore:
    """What the REST route and its typed twin share: a Messages body to an admitted
    ModelRequest, and answers back to Anthropic's shapes."""

    def __init__(self, gateway: Gateway, config: Config) -> None:
        self.gateway = gateway
        self._config = config

    def native_only_ok(self, model: str) -> bool:
        """Every configured chat instance of the model speaks Anthropic natively, so the
        caller's body is what will be sent: fields Chat cannot carry need no translation."""
        entries = [
            entry
            for entry in self._config.models
            if (model == AUTO_MODEL or entry.name == model) and "chat" in (entry.tasks or (entry.task,))
        ]
        return bool(entries) and all(str(entry.connector) in NATIVE_CONNECTORS for entry in entries)

    async def prepare(
        self, body: dict[str, Any], raw: bytes, headers: Mapping[str, str], meta: router_pb2.RequestMeta
    ) -> Prepared:
        model = body.get("model")
        chat = anthropic.messages_to_chat(body, self.native_only_ok(model) if isinstance(model, str) else False)
        # Chat's own bounds apply to the translation too.
        parsed = parse_chat(chat)
        request = await self.gateway.model_request(parsed, meta, None)
        request.dialect = anthropic.DIALECT
        request.native_json = raw
        request.native_headers["anthropic-version"] = (
            headers.get("anthropic-version") or anthropic.DEFAULT_ANTHROPIC_VERSION
        )
        if headers.get("anthropic-beta"):
            request.native_headers["anthropic-beta"] = headers["anthropic-beta"]
        return Prepared(request, parsed.model, parsed.stream, anthropic.count_tokens_estimate(body))

    @staticmethod
    def message(response: router_pb2.ModelResponse, model: str) -> bytes:
        """The answer as an Anthropic Message: the native one as it came, else encoded."""
        if response.dialect == anthropic.DIALECT:
            return response.openai_json
        return orjson.dumps(anthropic.chat_to_message(orjson.loads(response.openai_json), model))


async def stream_events(
    prepared: Prepared,
    first: router_pb2.StreamEvent,
    events: AsyncGenerator[router_pb2.StreamEvent, None],
) -> AsyncGenerator[tuple[bytes, list[dict[str, Any]]], None]:
    """After the announcement `first`: each step as (a native event's data JSON, b"" else)
    or (b"", encoded events). A failure midway is the last step: an `error` event. Raises
    nothing but cancellation."""
    native = first.dialect == anthropic.DIALECT
    encoder = anthropic.MessagesStreamEncoder(prepared.model, input_tokens=prepared.input_estimate)
    if not native:
        yield b"", encoder.start()
    try:
        async for event in events:
            if not event.HasField("chunk_json"):
                continue
            if native:
                yield event.chunk_json, []
            else:
                encoded = encoder.chunk(orjson.loads(event.chunk_json))
                if encoded:
                    yield b"", encoded
        if not native:
            yield b"", encoder.finish()
    except GatewayError as err:
        # Headers are gone already: Anthropic reports it as an `error` event, then nothing.
        log.warning("messages stream failed midway", extra={"status": err.status, "error": err.message})
        yield b"", [anthropic.anthropic_error(err)[1]] if native else encoder.error(err)


class AnthropicRest:
    def __init__(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway
        self._core = MessagesCore(ctx.gateway, ctx.config)

    async def refused(self, context: grpc.aio.ServicerContext, err: GatewayError) -> httpbody_pb2.HttpBody:
        """A call refused before it reached this route (admission control), in
        Anthropic's shape: for RestProtocol._refused to answer the Messages routes with."""
        return await self._error(context, err)

    async def _error(self, context: grpc.aio.ServicerContext, err: GatewayError) -> httpbody_pb2.HttpBody:
        status, body = anthropic.anthropic_error(err)
        await context.send_initial_metadata(error_headers(status, err))
        return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(body))

    async def messages(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        started = time.perf_counter()
        headers = metadata_dict(context)
        gateway = self._gateway
        status = 200
        with gateway.span("POST /v1/messages", headers, "rest") as span:
            try:
                meta = await gateway.accept(headers, "rest", context.peer())
                span.set_attribute("clawdbot.request_id", meta.request_id)
                prepared = await self._core.prepare(load_json_object(request.data), request.data, headers, meta)
                if not prepared.stream:
                    response = await gateway.complete(prepared.request)
                    answer = self._core.message(response, prepared.model)
                    await context.send_initial_metadata(routing_headers(response))
                    yield httpbody_pb2.HttpBody(content_type=JSON, data=answer)
                    return
                async with contextlib.aclosing(gateway.stream(prepared.request)) as events:
                    # Wait for the router's first event before answering: failures that
                    # come before any token (unknown model, upstream 429) keep their status.
                    first = await anext(events)
                    await context.send_initial_metadata(routing_headers(first))
                    async with contextlib.aclosing(stream_events(prepared, first, events)) as steps:
                        async for native, encoded in steps:
                            data = native_frame(native) if native else frames(encoded)
                            if encoded and encoded[-1]["type"] == "error":
                                status = 502
                            yield httpbody_pb2.HttpBody(content_type=SSE, data=data)
            except StopAsyncIteration:
                status = 502
                yield await self._error(
                    context, GatewayError(502, "The router ended the stream without an answer.", "upstream_error")
                )
            except GatewayError as err:
                status = err.status
                yield await self._error(context, err)
            except Exception:
                log.exception("messages request failed")
                status = 500
                yield await self._error(context, internal_error())
            finally:
                gateway.record("messages", "rest", status, started)

    async def count_tokens(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        started = time.perf_counter()
        headers = metadata_dict(context)
        status = 200
        with self._gateway.span("POST /v1/messages/count_tokens", headers, "rest"):
            try:
                await self._gateway.accept(headers, "rest", context.peer())
                counted = count_tokens(load_json_object(request.data))
                await context.send_initial_metadata([ESTIMATE_HEADER])
                return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(counted))
            except GatewayError as err:
                status = err.status
                return await self._error(context, err)
            except Exception:
                log.exception("count_tokens failed")
                status = 500
                return await self._error(context, internal_error())
            finally:
                self._gateway.record("messages.count_tokens", "rest", status, started)


def count_tokens(body: dict[str, Any]) -> dict[str, int]:
    """{"input_tokens": N}, an estimate; 403 when the key may not use the model."""
    tokens = anthropic.count_tokens_estimate(body)
    if isinstance(body.get("model"), str):
        require_model(body["model"])
    return {"input_tokens": tokens}


def struct_body(request: struct_pb2.Struct) -> dict[str, Any]:
    # Struct numbers are doubles: max_tokens 64 arrives as 64.0.
    body: dict[str, Any] = whole_numbers(json_format.MessageToDict(request))
    return body


def json_struct(data: bytes | Mapping[str, Any]) -> struct_pb2.Struct:
    value = orjson.loads(data) if isinstance(data, bytes) else dict(data)
    return json_format.ParseDict(value, struct_pb2.Struct())


class AnthropicTyped:
    """The typed twins: the body as a Struct in, the Message (or each event) as a Struct
    out; failures before the answer are gRPC statuses (the server gate's, as every typed
    method's), a failure midway in a stream its `error` event."""

    def __init__(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway
        self._core = MessagesCore(ctx.gateway, ctx.config)

    async def _prepare(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext, stream: bool) -> Prepared:
        headers = metadata_dict(context)
        meta = await self._gateway.accept(headers, "grpc", context.peer())
        body = struct_body(request)
        body["stream"] = stream
        return await self._core.prepare(body, orjson.dumps(body), headers, meta)

    async def create_message(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        started = time.perf_counter()
        status = 200
        with self._gateway.span("grpc messages", metadata_dict(context), "grpc"):
            try:
                prepared = await self._prepare(request, context, stream=False)
                response = await self._gateway.complete(prepared.request)
                answer = self._core.message(response, prepared.model)
                await context.send_initial_metadata(routing_headers(response))
                return json_struct(answer)
            except GatewayError as err:
                status = err.status  # for the metrics; the server gate answers it
                raise
            except Exception:
                status = 500
                raise
            finally:
                self._gateway.record("messages", "grpc", status, started)

    async def stream_message(
        self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[struct_pb2.Struct, None]:
        started = time.perf_counter()
        status = 200
        with self._gateway.span("grpc messages.stream", metadata_dict(context), "grpc"):
            try:
                prepared = await self._prepare(request, context, stream=True)
                async with contextlib.aclosing(self._gateway.stream(prepared.request)) as events:
                    first = await anext(events)
                    await context.send_initial_metadata(routing_headers(first))
                    async with contextlib.aclosing(stream_events(prepared, first, events)) as steps:
                        async for native, encoded in steps:
                            if native:
                                yield json_struct(native)
                            for event in encoded:
                                if event["type"] == "error":
                                    status = 502
                                yield json_struct(event)
            except StopAsyncIteration:
                status = 502
                raise GatewayError(502, "The router ended the stream without an answer.", "upstream_error") from None
            except GatewayError as err:
                status = err.status
                raise
            except Exception:
                status = 500
                raise
            finally:
                self._gateway.record("messages", "grpc", status, started)

    async def count_tokens(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        await self._gateway.accept(metadata_dict(context), "grpc", context.peer())
        counted = count_tokens(struct_body(request))
        await context.send_initial_metadata([ESTIMATE_HEADER])
        return json_struct(counted)
