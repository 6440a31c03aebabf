"""gRPC: the typed Gateway methods (grpcurl, generated clients).

Typed messages are mapped to OpenAI JSON by json_format (field names match OpenAI's),
`extra` is merged in as-is, and from there the request follows the same path as REST.
What REST sends as response headers (routing, cost, budget left, x-ratelimit-*) goes out
as initial metadata; a refused call's Retry-After and x-ratelimit-* too, beside the error
the server gate puts in the trailing metadata.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

import grpc
import orjson
from google.protobuf import empty_pb2, json_format, struct_pb2
from google.protobuf.message import Message

from clawdbot.adapter.dialects.anthropic_api import AnthropicTyped
from clawdbot.adapter.dialects.responses_api import ResponsesTyped
from clawdbot.adapter.limits import rate_headers
from clawdbot.adapter.openai_requests import (
    ParsedRequest,
    parse_chat,
    parse_embeddings,
    parse_feedback,
    parse_intent,
    parse_speech,
    transcription_request,
)
from clawdbot.adapter.protocols.base import (
    ProtocolContext,
    explain_request,
    metadata_dict,
    routing_headers,
    send_headers,
)
from clawdbot.common.clients.jobs import Job
from clawdbot.common.errors import GatewayError
from clawdbot.common.json_numbers import whole_numbers
from clawdbot.gen.v1 import gateway_pb2, router_pb2

M = TypeVar("M", bound=Message)


async def send_error_headers(context: grpc.aio.ServicerContext, err: GatewayError) -> None:
    """A refused call's Retry-After and x-ratelimit-* as initial metadata, read by typed
    clients as REST clients read the headers (the error itself travels in the trailing
    metadata). Only before anything was sent: initial metadata goes once."""
    headers = list(err.headers or rate_headers())
    if err.retry_after:
        headers.insert(0, ("retry-after", err.retry_after))
    if headers:
        await context.send_initial_metadata(headers)


def to_openai(message: Message) -> dict[str, Any]:
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    extra = body.pop("extra", None)
    if isinstance(extra, dict):
        for key, value in whole_numbers(extra).items():
            body.setdefault(key, value)
    return body


def from_openai(data: bytes, message: M) -> M:
    json_format.ParseDict(orjson.loads(data), message, ignore_unknown_fields=True)
    return message


def json_struct(data: bytes) -> struct_pb2.Struct:
    """A JSON object (a workflow run or event, health, instances) as a typed reply."""
    return json_format.ParseDict(orjson.loads(data), struct_pb2.Struct())


class GrpcProtocol:
    name = "grpc"

    def install(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway
        self._max_audio_seconds = ctx.config.gateway.max_audio_seconds
        # The Gateway's typed methods (adapter/servicer.py TypedServicer) delegate to this.
        ctx.rpcs.serve_typed(self)
        # The Messages and Responses APIs' typed twins.
        self.anthropic = AnthropicTyped(ctx)
        self.responses = ResponsesTyped(ctx)

    async def _unary(
        self,
        operation: str,
        parsed_of: Callable[[dict[str, Any]], ParsedRequest],
        request: Message,
        reply: M | Callable[[router_pb2.ModelResponse], M],
        context: grpc.aio.ServicerContext,
    ) -> M:
        """One typed call: request -> OpenAI JSON -> router -> the typed reply (a message
        filled from the answer's JSON, or built from the response by a function)."""
        started = time.perf_counter()
        headers = metadata_dict(context)
        status = 200
        with self._gateway.span(f"grpc {operation}", headers, "grpc"):
            try:
                meta = await self._gateway.accept(headers, "grpc", context.peer())
                parsed: ParsedRequest = parsed_of(to_openai(request))
                response = await self._gateway.complete(await self._gateway.model_request(parsed, meta, None))
                await context.send_initial_metadata(routing_headers(response))
                return reply(response) if callable(reply) else from_openai(response.openai_json, reply)
            except GatewayError as err:
                status = err.status  # for the metrics; the server gate answers it
                await send_error_headers(context, err)
                raise
            except Exception:
                status = 500  # the server gate logs it and answers internal_error
                raise
            finally:
                self._gateway.record(operation, "grpc", status, started)

    async def create_chat_completion(
        self, request: gateway_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ChatCompletion:
        def parsed_of(body: dict[str, Any]) -> ParsedRequest:
            body["stream"] = False
            return parse_chat(body)

        return await self._unary("chat", parsed_of, request, gateway_pb2.ChatCompletion(), context)

    async def create_embeddings(
        self, request: gateway_pb2.EmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.EmbeddingsResponse:
        def parsed_of(body: dict[str, Any]) -> ParsedRequest:
            body["encoding_format"] = "float"  # the typed reply holds floats
            return parse_embeddings(body)

        return await self._unary("embeddings", parsed_of, request, gateway_pb2.EmbeddingsResponse(), context)

    async def create_transcription(
        self, request: gateway_pb2.TranscriptionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.Transcription:
        def parsed_of(body: dict[str, Any]) -> ParsedRequest:
            return transcription_request(body, request.file, self._max_audio_seconds)

        # The bytes go beside the body: mapped to JSON they would be base64-encoded on the
        # event loop (about 13 ms for 4 MiB) only to be thrown away.
        fields = gateway_pb2.TranscriptionRequest()
        fields.CopyFrom(request)
        fields.ClearField("file")
        return await self._unary("transcription", parsed_of, fields, gateway_pb2.Transcription(), context)

    async def create_speech(
        self, request: gateway_pb2.SpeechRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SpeechAudio:
        def reply(response: router_pb2.ModelResponse) -> gateway_pb2.SpeechAudio:
            return gateway_pb2.SpeechAudio(audio=response.binary, content_type=response.content_type)

        return await self._unary("speech", parse_speech, request, reply, context)

    async def classify_intent(
        self, request: gateway_pb2.IntentRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.IntentResponse:
        return await self._unary("intent", parse_intent, request, gateway_pb2.IntentResponse(), context)

    async def stream_chat_completion(
        self, request: gateway_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[gateway_pb2.ChatCompletionChunk, None]:
        started = time.perf_counter()
        headers = metadata_dict(context)
        status = 200
        announced = False
        with self._gateway.span("grpc chat.stream", headers, "grpc"):
            try:
                meta = await self._gateway.accept(headers, "grpc", context.peer())
                body = to_openai(request)
                body["stream"] = True
                parsed = parse_chat(body)
                model_request = await self._gateway.model_request(parsed, meta, None)
                async with contextlib.aclosing(self._gateway.stream(model_request)) as events:
                    async for event in events:
                        if event.HasField("instance"):
                            await context.send_initial_metadata(routing_headers(event))
                            announced = True
                        else:
                            chunk = from_openai(event.chunk_json, gateway_pb2.ChatCompletionChunk())
                            yield chunk
            except GatewayError as err:
                status = err.status  # for the metrics; the server gate answers it
                if not announced:
                    await send_error_headers(context, err)
                raise
            except Exception:
                status = 500  # the server gate logs it and answers internal_error
                raise
            finally:
                self._gateway.record("chat", "grpc", status, started)

    async def list_models(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        headers = metadata_dict(context)
        meta = await self._gateway.accept(headers, "grpc", context.peer())
        models = await self._gateway.list_models(meta)
        return gateway_pb2.ListModelsResponse(
            object="list",
            data=[gateway_pb2.Model(id=m.id, object="model", created=m.created, owned_by=m.owned_by) for m in models],
        )

    async def submit_feedback(
        self, request: gateway_pb2.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.FeedbackResponse:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer())
        body = {"request_id": request.request_id, "score": request.score}
        return await self._gateway.feedback(parse_feedback(body, meta))

    async def explain_routing(
        self, request: gateway_pb2.ExplainRoutingRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.Explanation:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer())
        return await self._gateway.explain(explain_request(request, meta))

    async def get_health(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), public=True)
        status = await self._gateway.health(meta)
        return json_struct(status)

    async def list_instances(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), admin=True)
        listed = await self._gateway.instances(meta)
        return json_struct(listed)

    async def run_workflow(
        self, request: gateway_pb2.WorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer())
        try:
            run = await self._gateway.run_workflow(meta, request.name, orjson.dumps(workflow_input(request)))
        except GatewayError as err:
            await send_error_headers(context, err)
            raise
        await send_headers(context, rate_headers())
        return json_struct(run)

    async def stream_workflow(
        self, request: gateway_pb2.WorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[struct_pb2.Struct, None]:
        """The run's progress events, one Struct each, run.completed (the whole run) last."""
        started = time.perf_counter()
        headers = metadata_dict(context)
        status = 200
        with self._gateway.span("grpc workflow.stream", headers, "grpc"):
            started_run = False
            try:
                meta = await self._gateway.accept(headers, "grpc", context.peer())
                run_input = workflow_input(request)
                events = self._gateway.stream_workflow(meta, request.name, orjson.dumps(run_input))
                async with contextlib.aclosing(events):
                    async for event in events:
                        if not started_run:
                            started_run = True
                            await send_headers(context, rate_headers())
                        yield json_struct(event)
            except GatewayError as err:
                status = err.status  # for the metrics; the server gate answers it
                if not started_run:
                    await send_error_headers(context, err)
                raise
            except Exception:
                status = 500  # the server gate logs it and answers internal_error
                raise
            finally:
                self._gateway.record("workflow.run", "grpc", status, started)

    async def submit_job(
        self, request: gateway_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.Job:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer())
        body = whole_numbers(json_format.MessageToDict(request, preserving_proto_field_name=True))
        try:
            job = await self._gateway.jobs.submit(meta, body)
        except GatewayError as err:
            await send_error_headers(context, err)
            raise
        await send_headers(context, rate_headers())
        return job_message(job)

    async def get_job(self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.Job:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer())
        return job_message(await self._gateway.jobs.get(meta, request.id))

    async def list_jobs(
        self, request: gateway_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.JobList:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer())
        jobs = await self._gateway.jobs.list(meta, request.limit)
        return gateway_pb2.JobList(object="list", data=[job_message(job) for job in jobs])

    async def reload_config(
        self, request: gateway_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ReloadResponse:
        meta = await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), admin=True)
        return await self._gateway.reload(meta)

    # --- virtual keys (admin) ------------------------------------------------------------

    async def create_key(
        self, request: gateway_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), admin=True)
        created = await self._gateway.keys.create(create_key_body(request))
        return json_format.ParseDict(created, struct_pb2.Struct())

    async def list_keys(
        self, request: gateway_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), admin=True)
        return json_format.ParseDict(await self._gateway.keys.list(), struct_pb2.Struct())

    async def get_key(self, request: gateway_pb2.KeyRequest, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), admin=True)
        return json_format.ParseDict(await self._gateway.keys.get(request.id), struct_pb2.Struct())

    async def update_key(
        self, request: gateway_pb2.UpdateKeyRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), admin=True)
        changes = whole_numbers(json_format.MessageToDict(request.changes)) if request.HasField("changes") else {}
        return json_format.ParseDict(await self._gateway.keys.update(request.id, changes), struct_pb2.Struct())

    async def revoke_key(self, request: gateway_pb2.KeyRequest, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), admin=True)
        return json_format.ParseDict(await self._gateway.keys.revoke(request.id), struct_pb2.Struct())

    async def get_spend(
        self, request: gateway_pb2.GetSpendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SpendReport:
        await self._gateway.accept(metadata_dict(context), "grpc", context.peer(), admin=True)
        # `from` is a Python keyword: the generated field is reached by name.
        report = await self._gateway.keys.spend(request.group_by, getattr(request, "from"), request.to)
        return json_format.ParseDict(report, gateway_pb2.SpendReport())


def create_key_body(request: gateway_pb2.CreateKeyRequest) -> dict[str, Any]:
    """The typed request as the JSON body POST /v1/admin/keys takes: unset fields left out,
    so that they take their defaults; Struct numbers back to whole ones where whole."""
    body: dict[str, Any] = whole_numbers(json_format.MessageToDict(request, preserving_proto_field_name=True))
    return body


def workflow_input(request: gateway_pb2.WorkflowRunRequest) -> Any:
    # Struct numbers are doubles: 7 arrives as 7.0, which a template would print as "7.0".
    return whole_numbers(json_format.MessageToDict(request.input)) if request.HasField("input") else None


def job_message(job: Job) -> gateway_pb2.Job:
    return json_format.ParseDict(job.public(), gateway_pb2.Job(), ignore_unknown_fields=True)


def create_protocol() -> GrpcProtocol:
    return GrpcProtocol()
