"""REST: the OpenAI routes, as Envoy's gRPC-JSON transcoder delivers them.

Bodies arrive and leave as google.api.HttpBody, so the caller's JSON (unknown fields
included) reaches the router byte for byte, and SSE leaves exactly as OpenAI frames it.
Errors are OpenAI-shaped JSON bodies; their HTTP status rides in the x-clawdbot-status
response header, which Envoy's Lua filter moves into :status.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import grpc
import orjson
from google.api import httpbody_pb2
from google.protobuf import empty_pb2

from clawdbot.adapter.dialects.anthropic_api import AnthropicRest
from clawdbot.adapter.dialects.responses_api import ResponsesRest
from clawdbot.adapter.gateway import workflow_event_type
from clawdbot.adapter.limits import rate_headers
from clawdbot.adapter.openai_requests import (
    ParsedRequest,
    load_json_object,
    parse_chat,
    parse_embeddings,
    parse_feedback,
    parse_intent,
    parse_speech,
    parse_transcription,
)
from clawdbot.adapter.protocols.base import (
    STATUS_HEADER,
    ProtocolContext,
    error_headers,
    explain_request,
    message_json,
    metadata_dict,
    routing_headers,
    send_headers,
)
from clawdbot.adapter.transcripts import render_transcription
from clawdbot.common.bounded import off_loop_if_large
from clawdbot.common.errors import GatewayError, internal_error
from clawdbot.gen.v1 import gateway_pb2, router_pb2

log = logging.getLogger(__name__)

JSON = "application/json"
SSE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def sse_named(event: bytes, payload: bytes) -> bytes:
    return b"event: " + event + b"\ndata: " + payload + b"\n\n"


def workflow_sse(payload: bytes) -> bytes:
    """A workflow event as SSE, named by its type (the gateway checked it has one)."""
    if b"\n" in payload or b"\r" in payload:
        payload = orjson.dumps(orjson.loads(payload))  # one `data:` line: compact JSON
    return sse_named((workflow_event_type(payload) or "message").encode(), payload)


def models_json(models: list[router_pb2.ModelInfo]) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by} for m in models],
        }
    )


class RestProtocol:
    name = "rest"

    def install(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway
        self._max_audio_seconds = ctx.config.gateway.max_audio_seconds
        # The Gateway's *Http methods (adapter/servicer.py RestServicer) delegate to this.
        ctx.rpcs.serve_rest(self)
        # Anthropic's Messages API and OpenAI's Responses API, on the same REST server.
        self.anthropic = AnthropicRest(ctx)
        self.responses = ResponsesRest(ctx)
        # Calls refused by admission control are answered here too, or the transcoder
        # would turn them into its own error shape instead of OpenAI's.
        ctx.host.admission.refusal = self._refused

    async def _refused(
        self, method: str, context: grpc.aio.ServicerContext, err: GatewayError
    ) -> httpbody_pb2.HttpBody | None:
        # Only the REST (*Http) methods answer errors as a body; typed gRPC callers get
        # the gRPC status (and the error in trailing metadata).
        if not method.endswith("Http"):
            return None
        # Anthropic's clients read Anthropic's error shape.
        if method.endswith(("/MessagesHttp", "/CountTokensHttp")):
            return await self.anthropic.refused(context, err)
        return await self._error(context, err)

    async def _error(self, context: grpc.aio.ServicerContext, err: GatewayError) -> httpbody_pb2.HttpBody:
        await context.send_initial_metadata(error_headers(err.status, err))
        return httpbody_pb2.HttpBody(content_type=JSON, data=err.to_json())

    async def chat_completions(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        started = time.perf_counter()
        headers = metadata_dict(context)
        gateway = self._gateway
        status = 200
        with gateway.span("POST /v1/chat/completions", headers, "rest") as span:
            try:
                meta = await gateway.accept(headers, "rest", context.peer())
                span.set_attribute("clawdbot.request_id", meta.request_id)
                parsed = parse_chat(load_json_object(request.data))
                model_request = await gateway.model_request(parsed, meta, request.data)
                if not parsed.stream:
                    response = await gateway.complete(model_request)
                    await context.send_initial_metadata(routing_headers(response))
                    yield httpbody_pb2.HttpBody(content_type=JSON, data=response.openai_json)
                    return
                async with contextlib.aclosing(gateway.stream(model_request)) as events:
                    # Wait for the router's first event before answering: failures that
                    # come before any token (unknown model, upstream 429) keep their status.
                    first = await anext(events)
                    await context.send_initial_metadata(routing_headers(first))
                    try:
                        async for event in events:
                            if event.HasField("chunk_json"):
                                yield httpbody_pb2.HttpBody(content_type=SSE, data=sse_event(event.chunk_json))
                    except GatewayError as err:
                        # Headers are gone already; OpenAI reports a mid-stream failure as
                        # an SSE event carrying an error object, which the SDKs raise.
                        status = err.status
                        yield httpbody_pb2.HttpBody(content_type=SSE, data=sse_event(err.to_json()))
                        return
                    yield httpbody_pb2.HttpBody(content_type=SSE, data=SSE_DONE)
            except StopAsyncIteration:
                status = 502
                yield await self._error(
                    context, GatewayError(502, "The router ended the stream without an answer.", "upstream_error")
                )
            except GatewayError as err:
                status = err.status
                yield await self._error(context, err)
            except Exception:
                log.exception("chat completion failed")
                status = 500
                yield await self._error(context, internal_error())
            finally:
                gateway.record("chat", "rest", status, started)

    async def _unary(
        self,
        operation: str,
        route: str,
        context: grpc.aio.ServicerContext,
        work: Callable[[router_pb2.RequestMeta], Awaitable[httpbody_pb2.HttpBody]],
        public: bool = False,
        admin: bool = False,
    ) -> httpbody_pb2.HttpBody:
        """Auth (unless public; the admin role when `admin`), span, metrics and
        OpenAI-shaped errors around one unary REST call."""
        started = time.perf_counter()
        headers = metadata_dict(context)
        status = 200
        with self._gateway.span(route, headers, "rest"):
            try:
                return await work(
                    await self._gateway.accept(headers, "rest", context.peer(), public=public, admin=admin)
                )
            except GatewayError as err:
                status = err.status
                return await self._error(context, err)
            except Exception:
                log.exception("%s failed", operation)
                status = 500
                return await self._error(context, internal_error())
            finally:
                self._gateway.record(operation, "rest", status, started)

    async def _routed(
        self, context: grpc.aio.ServicerContext, parsed: ParsedRequest, meta: router_pb2.RequestMeta, raw: bytes | None
    ) -> router_pb2.ModelResponse:
        """One model call through the router; its routing headers go out with the answer."""
        response = await self._gateway.complete(await self._gateway.model_request(parsed, meta, raw))
        await context.send_initial_metadata(routing_headers(response))
        return response

    async def embeddings(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            parsed = parse_embeddings(load_json_object(request.data))
            response = await self._routed(context, parsed, meta, request.data)
            return httpbody_pb2.HttpBody(content_type=JSON, data=response.openai_json)

        return await self._unary("embeddings", "POST /v1/embeddings", context, work)

    async def transcriptions(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            # A large upload's MIME parsing runs in a thread, so it holds up no other request.
            parsed, response_format = await off_loop_if_large(
                len(request.data), parse_transcription, request.content_type, request.data, self._max_audio_seconds
            )
            response = await self._routed(context, parsed, meta, None)
            data, content_type = render_transcription(orjson.loads(response.openai_json), response_format)
            return httpbody_pb2.HttpBody(content_type=content_type, data=data)

        return await self._unary("transcription", "POST /v1/audio/transcriptions", context, work)

    async def speech(self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            parsed = parse_speech(load_json_object(request.data))
            response = await self._routed(context, parsed, meta, request.data)
            return httpbody_pb2.HttpBody(content_type=response.content_type, data=response.binary)

        return await self._unary("speech", "POST /v1/audio/speech", context, work)

    async def intents(self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            parsed = parse_intent(load_json_object(request.data))
            response = await self._routed(context, parsed, meta, request.data)
            return httpbody_pb2.HttpBody(content_type=JSON, data=response.openai_json)

        return await self._unary("intent", "POST /v1/intents", context, work)

    async def run_workflow(
        self, request: gateway_pb2.RunWorkflowHttpRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[httpbody_pb2.HttpBody, None]:
        """{"input": ...} -> the finished run as JSON; with "stream": true, its progress as
        server-sent events (`event: <type>`), run.completed (the whole run) last."""
        started = time.perf_counter()
        headers = metadata_dict(context)
        gateway = self._gateway
        status = 200
        with gateway.span("POST /v1/workflows/{name}:run", headers, "rest") as span:
            try:
                meta = await gateway.accept(headers, "rest", context.peer())
                span.set_attribute("clawdbot.request_id", meta.request_id)
                body = load_json_object(request.body.data)
                stream = body.get("stream", False)
                if not isinstance(stream, bool):
                    raise GatewayError.bad_request("`stream` must be true or false.", "stream", "invalid_type")
                run_input = orjson.dumps(body.get("input"))
                if not stream:
                    run = await gateway.run_workflow(meta, request.name, run_input)
                    await send_headers(context, rate_headers())
                    yield httpbody_pb2.HttpBody(content_type=JSON, data=run)
                    return
                async with contextlib.aclosing(gateway.stream_workflow(meta, request.name, run_input)) as events:
                    # The first event before any byte goes out: an unknown workflow or a
                    # bad input still gets its own status and a JSON error body.
                    first = await anext(events)
                    await send_headers(context, rate_headers())
                    yield httpbody_pb2.HttpBody(content_type=SSE, data=workflow_sse(first))
                    try:
                        async for event in events:
                            yield httpbody_pb2.HttpBody(content_type=SSE, data=workflow_sse(event))
                    except GatewayError as err:
                        # Headers are gone already: the failure becomes the last event.
                        status = err.status
                        yield httpbody_pb2.HttpBody(content_type=SSE, data=sse_named(b"error", err.to_json()))
            except StopAsyncIteration:
                status = 502
                yield await self._error(
                    context, GatewayError(502, "The orchestrator ended the stream without an event.", "upstream_error")
                )
            except GatewayError as err:
                status = err.status
                yield await self._error(context, err)
            except Exception:
                log.exception("workflow run failed")
                status = 500
                yield await self._error(context, internal_error())
            finally:
                gateway.record("workflow.run", "rest", status, started)

    async def list_workflows(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            return httpbody_pb2.HttpBody(content_type=JSON, data=await self._gateway.list_workflows(meta))

        return await self._unary("workflow.list", "GET /v1/workflows", context, work)

    async def describe_workflow(
        self, request: gateway_pb2.DescribeWorkflowHttpRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            described = await self._gateway.describe_workflow(meta, request.name)
            return httpbody_pb2.HttpBody(content_type=JSON, data=described)

        return await self._unary("workflow.describe", "GET /v1/workflows/{name}", context, work)

    async def submit_job(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            job = await self._gateway.jobs.submit(meta, load_json_object(request.data))
            # 202: accepted (the queue has it), not done.
            await context.send_initial_metadata(
                [(STATUS_HEADER, "202"), ("location", f"/v1/jobs/{job.id}"), *rate_headers()]
            )
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(job.public()))

        return await self._unary("job.submit", "POST /v1/jobs", context, work)

    async def get_job(
        self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            job = await self._gateway.jobs.get(meta, request.id)
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(job.public()))

        return await self._unary("job.get", "GET /v1/jobs/{id}", context, work)

    async def list_jobs(
        self, request: gateway_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            jobs = await self._gateway.jobs.list(meta, request.limit)
            listed = {"object": "list", "data": [job.public() for job in jobs]}
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(listed))

        return await self._unary("job.list", "GET /v1/jobs", context, work)

    async def list_models(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            return httpbody_pb2.HttpBody(content_type=JSON, data=models_json(await self._gateway.list_models(meta)))

        return await self._unary("models", "GET /v1/models", context, work)

    async def feedback(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            reply = await self._gateway.feedback(parse_feedback(load_json_object(request.data), meta))
            return httpbody_pb2.HttpBody(content_type=JSON, data=message_json(reply))

        return await self._unary("feedback", "POST /v1/feedback", context, work)

    async def explain(
        self, request: gateway_pb2.ExplainRoutingRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            explanation = await self._gateway.explain(explain_request(request, meta))
            return httpbody_pb2.HttpBody(content_type=JSON, data=message_json(explanation))

        return await self._unary("explain", "GET /v1/routing/explain", context, work)

    async def reload(self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            return httpbody_pb2.HttpBody(content_type=JSON, data=message_json(await self._gateway.reload(meta)))

        return await self._unary("reload", "POST /v1/admin/reload", context, work, admin=True)

    async def health(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            return httpbody_pb2.HttpBody(content_type=JSON, data=await self._gateway.health(meta))

        return await self._unary("health", "GET /v1/health", context, work, public=True)

    async def instances(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            return httpbody_pb2.HttpBody(content_type=JSON, data=await self._gateway.instances(meta))

        return await self._unary("instances", "GET /v1/admin/instances", context, work, admin=True)

    # --- virtual keys (admin) ------------------------------------------------------------

    async def create_key(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            created = await self._gateway.keys.create(load_json_object(request.data))
            await context.send_initial_metadata(
                [(STATUS_HEADER, "201"), ("location", f"/v1/admin/keys/{created['id']}")]
            )
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(created))

        return await self._unary("keys.create", "POST /v1/admin/keys", context, work, admin=True)

    async def list_keys(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(await self._gateway.keys.list()))

        return await self._unary("keys.list", "GET /v1/admin/keys", context, work, admin=True)

    async def get_key(
        self, request: gateway_pb2.KeyRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(await self._gateway.keys.get(request.id)))

        return await self._unary("keys.get", "GET /v1/admin/keys/{id}", context, work, admin=True)

    async def update_key(
        self, request: gateway_pb2.UpdateKeyHttpRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            updated = await self._gateway.keys.update(request.id, load_json_object(request.body.data))
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(updated))

        return await self._unary("keys.update", "PATCH /v1/admin/keys/{id}", context, work, admin=True)

    async def revoke_key(
        self, request: gateway_pb2.KeyRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            revoked = await self._gateway.keys.revoke(request.id)
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(revoked))

        return await self._unary("keys.revoke", "DELETE /v1/admin/keys/{id}", context, work, admin=True)

    async def get_spend(
        self, request: gateway_pb2.GetSpendRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        async def work(meta: router_pb2.RequestMeta) -> httpbody_pb2.HttpBody:
            # `from` is a Python keyword: the generated field is reached by name.
            report = await self._gateway.keys.spend(request.group_by, getattr(request, "from"), request.to)
            return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(report))

        return await self._unary("spend", "GET /v1/admin/spend", context, work, admin=True)


def create_protocol() -> RestProtocol:
    return RestProtocol()
