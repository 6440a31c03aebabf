"""The public clawdbot.v1.Gateway servicer: every RPC defined here, typed, in one place.

The RPCs fall in two groups, each served by one protocol plugin: the REST methods (*Http,
google.api.HttpBody in and out, as Envoy's transcoder delivers them) by `rest`
(protocols/rest.py), the typed methods by `grpc` (protocols/grpc_typed.py). A plugin's
install() registers it as its group's implementation in GatewayRpcs; once every plugin is
installed, GatewayRpcs.servicer() builds the servicer, whose methods delegate to it.

A group whose protocol is off (adapter.types / ADAPTER_TYPES) keeps the generated base
class's method: synchronous, answering UNIMPLEMENTED, and as such neither counted nor
refused for load by the server gate (common/server_gate.py). That is why the servicer's
class is chosen by which groups are served, rather than one class checking at each call.
"""

# The methods carry the generated servicer's names (the gRPC method names), not snake_case.
# ruff: noqa: N802

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from google.api import httpbody_pb2
from google.protobuf import empty_pb2, struct_pb2

from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc, router_pb2

if TYPE_CHECKING:  # the protocols import this module (through protocols.base)
    from clawdbot.adapter.protocols.grpc_typed import GrpcProtocol
    from clawdbot.adapter.protocols.rest import RestProtocol


class GatewayRpcs:
    """Which protocol serves each group of Gateway RPCs: filled by the plugins' install()."""

    def __init__(self) -> None:
        self.rest: RestProtocol | None = None
        self.typed: GrpcProtocol | None = None

    def serve_rest(self, rest: RestProtocol) -> None:
        if self.rest is not None:
            raise ValueError("two protocols registered for the REST (*Http) Gateway methods")
        self.rest = rest

    def serve_typed(self, typed: GrpcProtocol) -> None:
        if self.typed is not None:
            raise ValueError("two protocols registered for the typed gRPC Gateway methods")
        self.typed = typed

    def servicer(self) -> gateway_pb2_grpc.GatewayServicer:
        """The servicer for add_GatewayServicer_to_server: the registered groups delegate,
        the others are the generated base class's UNIMPLEMENTED methods."""
        rest, typed = self.rest, self.typed
        if rest is not None and typed is not None:
            return GatewayServicer(rest, typed)
        if rest is not None:
            return RestServicer(rest)
        if typed is not None:
            return TypedServicer(typed)
        return gateway_pb2_grpc.GatewayServicer()


class RestServicer(gateway_pb2_grpc.GatewayServicer):
    """The REST (*Http) methods, served by RestProtocol."""

    def __init__(self, rest: RestProtocol) -> None:
        self._rest = rest

    async def ChatCompletionsHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        # aclosing: a client gone mid-stream closes this generator (the server gate does),
        # and the protocol's clean-up must run then, not when its generator is collected.
        async with contextlib.aclosing(self._rest.chat_completions(request, context)) as bodies:
            async for body in bodies:
                yield body

    async def EmbeddingsHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.embeddings(request, context)

    async def TranscriptionsHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.transcriptions(request, context)

    async def SpeechHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.speech(request, context)

    async def IntentsHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.intents(request, context)

    async def SubmitJobHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.submit_job(request, context)

    async def GetJobHttp(
        self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.get_job(request, context)

    async def ListJobsHttp(
        self, request: gateway_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.list_jobs(request, context)

    async def RunWorkflowHttp(
        self, request: gateway_pb2.RunWorkflowHttpRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with contextlib.aclosing(self._rest.run_workflow(request, context)) as bodies:
            async for body in bodies:
                yield body

    async def ListWorkflowsHttp(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.list_workflows(request, context)

    async def DescribeWorkflowHttp(
        self, request: gateway_pb2.DescribeWorkflowHttpRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.describe_workflow(request, context)

    async def ListModelsHttp(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.list_models(request, context)

    async def FeedbackHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.feedback(request, context)

    async def ExplainRoutingHttp(
        self, request: gateway_pb2.ExplainRoutingRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.explain(request, context)

    async def ReloadHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.reload(request, context)

    async def HealthHttp(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        return await self._rest.health(request, context)

    async def InstancesHttp(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        return await self._rest.instances(request, context)

    async def CreateKeyHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.create_key(request, context)

    async def ListKeysHttp(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:
        return await self._rest.list_keys(request, context)

    async def GetKeyHttp(
        self, request: gateway_pb2.KeyRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.get_key(request, context)

    async def UpdateKeyHttp(
        self, request: gateway_pb2.UpdateKeyHttpRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.update_key(request, context)

    async def RevokeKeyHttp(
        self, request: gateway_pb2.KeyRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.revoke_key(request, context)

    async def GetSpendHttp(
        self, request: gateway_pb2.GetSpendRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.get_spend(request, context)

    # Anthropic's Messages API and OpenAI's Responses API (adapter/dialects/).

    async def MessagesHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with contextlib.aclosing(self._rest.anthropic.messages(request, context)) as bodies:
            async for body in bodies:
                yield body

    async def CountTokensHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.anthropic.count_tokens(request, context)

    async def ResponsesHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        async with contextlib.aclosing(self._rest.responses.create(request, context)) as bodies:
            async for body in bodies:
                yield body

    async def InputTokensHttp(
        self, request: httpbody_pb2.HttpBody, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.responses.input_tokens(request, context)

    async def GetResponseHttp(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.responses.get(request, context)

    async def DeleteResponseHttp(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.responses.delete(request, context)

    async def ListInputItemsHttp(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> httpbody_pb2.HttpBody:
        return await self._rest.responses.input_items(request, context)


class TypedServicer(gateway_pb2_grpc.GatewayServicer):
    """The typed gRPC methods, served by GrpcProtocol."""

    def __init__(self, typed: GrpcProtocol) -> None:
        self._typed = typed

    async def CreateChatCompletion(
        self, request: gateway_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ChatCompletion:
        return await self._typed.create_chat_completion(request, context)

    async def StreamChatCompletion(
        self, request: gateway_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.ChatCompletionChunk]:
        # aclosing: as in RestServicer.ChatCompletionsHttp.
        async with contextlib.aclosing(self._typed.stream_chat_completion(request, context)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def CreateEmbeddings(
        self, request: gateway_pb2.EmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.EmbeddingsResponse:
        return await self._typed.create_embeddings(request, context)

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        return await self._typed.list_models(request, context)

    async def CreateTranscription(
        self, request: gateway_pb2.TranscriptionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.Transcription:
        return await self._typed.create_transcription(request, context)

    async def CreateSpeech(
        self, request: gateway_pb2.SpeechRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SpeechAudio:
        return await self._typed.create_speech(request, context)

    async def ClassifyIntent(
        self, request: gateway_pb2.IntentRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.IntentResponse:
        return await self._typed.classify_intent(request, context)

    async def SubmitJob(
        self, request: gateway_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.Job:
        return await self._typed.submit_job(request, context)

    async def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.Job:
        return await self._typed.get_job(request, context)

    async def ListJobs(
        self, request: gateway_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.JobList:
        return await self._typed.list_jobs(request, context)

    async def RunWorkflow(
        self, request: gateway_pb2.WorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.run_workflow(request, context)

    async def StreamWorkflow(
        self, request: gateway_pb2.WorkflowRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[struct_pb2.Struct]:
        async with contextlib.aclosing(self._typed.stream_workflow(request, context)) as events:
            async for event in events:
                yield event

    async def GetHealth(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        return await self._typed.get_health(request, context)

    async def ListInstances(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        return await self._typed.list_instances(request, context)

    async def SubmitFeedback(
        self, request: gateway_pb2.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.FeedbackResponse:
        return await self._typed.submit_feedback(request, context)

    async def ExplainRouting(
        self, request: gateway_pb2.ExplainRoutingRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.Explanation:
        return await self._typed.explain_routing(request, context)

    async def ReloadConfig(
        self, request: gateway_pb2.ReloadConfigRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ReloadResponse:
        return await self._typed.reload_config(request, context)

    async def CreateKey(
        self, request: gateway_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.create_key(request, context)

    async def ListKeys(
        self, request: gateway_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.list_keys(request, context)

    async def GetKey(self, request: gateway_pb2.KeyRequest, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        return await self._typed.get_key(request, context)

    async def UpdateKey(
        self, request: gateway_pb2.UpdateKeyRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.update_key(request, context)

    async def RevokeKey(self, request: gateway_pb2.KeyRequest, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        return await self._typed.revoke_key(request, context)

    async def GetSpend(
        self, request: gateway_pb2.GetSpendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SpendReport:
        return await self._typed.get_spend(request, context)

    async def CreateMessage(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        return await self._typed.anthropic.create_message(request, context)

    async def StreamMessage(
        self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[struct_pb2.Struct]:
        async with contextlib.aclosing(self._typed.anthropic.stream_message(request, context)) as events:
            async for event in events:
                yield event

    async def CountMessageTokens(
        self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.anthropic.count_tokens(request, context)

    async def CreateResponse(self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext) -> struct_pb2.Struct:
        return await self._typed.responses.create(request, context)

    async def StreamResponse(
        self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[struct_pb2.Struct]:
        async with contextlib.aclosing(self._typed.responses.stream(request, context)) as events:
            async for event in events:
                yield event

    async def GetResponse(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.responses.get(request, context)

    async def DeleteResponse(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.responses.delete(request, context)

    async def ListInputItems(
        self, request: gateway_pb2.ResponseRequest, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.responses.input_items(request, context)

    async def CountResponseInputTokens(
        self, request: struct_pb2.Struct, context: grpc.aio.ServicerContext
    ) -> struct_pb2.Struct:
        return await self._typed.responses.input_tokens(request, context)


class GatewayServicer(RestServicer, TypedServicer):
    """Both groups (the two define disjoint methods: *Http and typed)."""

    def __init__(self, rest: RestProtocol, typed: GrpcProtocol) -> None:
        RestServicer.__init__(self, rest)
        TypedServicer.__init__(self, typed)
