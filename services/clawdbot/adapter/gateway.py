"""The protocol-independent core of the adapter.

Every protocol plugin turns what it received into a ModelRequest (through accept() and
model_request()) and hands it here; this is where the router is called, traced, timed
and counted, so REST, gRPC and WebSocket behave the same. It is also where each request
is held to its key: the model and workflow allowlists, the rate limits (admitted in
model_request(), finished by complete()/stream() with the tokens used; adapter/limits.py)
and meta.grant, which carries the rest (budget, cache scope) to the router.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
import orjson
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from clawdbot.adapter.auth import ANONYMOUS, Authenticator, caller, forbidden, require_model, require_workflow
from clawdbot.adapter.chat_streams import assemble_chat, replay_chat
from clawdbot.adapter.jobs import JobsFront
from clawdbot.adapter.limits import Admitter, current, nothing_produced, response_tokens, token_estimate
from clawdbot.adapter.metadata import build_meta
from clawdbot.adapter.openai_requests import ParsedRequest
from clawdbot.adapter.virtual_keys import VirtualKeys
from clawdbot.common.clients.cache import CacheLookup, ResponseCache
from clawdbot.common.dialects import NATIVE_REPLAY
from clawdbot.common.errors import GatewayError
from clawdbot.common.logging import request_id_var
from clawdbot.common.metrics import Metrics
from clawdbot.common.telemetry import extract_context
from clawdbot.gen.v1 import (
    monitor_pb2,
    monitor_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

log = logging.getLogger(__name__)

Reply = TypeVar("Reply")


class Gateway:
    def __init__(
        self,
        router: router_pb2_grpc.RouterStub,
        auth: Authenticator,
        metrics: Metrics,
        router_timeout_s: float,
        cache: ResponseCache | None = None,
        jobs: JobsFront | None = None,
        orchestrator: orchestrator_pb2_grpc.OrchestratorStub | None = None,
        health: monitor_pb2_grpc.HealthMonitorStub | None = None,
        keys: VirtualKeys | None = None,
        admitter: Admitter | None = None,
    ) -> None:
        self._router = router
        # Without one (tests, tools): no rate limits.
        self._admitter = admitter or Admitter(None)
        self._keys = keys
        self._orchestrator = orchestrator
        self._health = health
        self._cache = cache
        self._jobs = jobs
        self._auth = auth
        self._metrics = metrics
        self._timeout = router_timeout_s
        self._tracer = trace.get_tracer("clawdbot.adapter")

    # --- intake ------------------------------------------------------------------------

    async def accept(
        self,
        headers: Mapping[str, str],
        protocol: str,
        peer: str = "",
        api_key: str | None = None,
        public: bool = False,
        admin: bool = False,
    ) -> router_pb2.RequestMeta:
        """Authenticate (unless the route is public) and describe the caller. Raises
        GatewayError(401), or 403 when an admin route is asked for without the admin role.
        The principal becomes the current caller (auth.caller), whose models
        model_request() and job submissions are checked against; what its key allows
        travels on in meta.grant, and its default strategy fills in for a caller who
        names none."""
        if public:
            principal = ANONYMOUS
        else:
            if api_key is None and not headers.get("authorization"):
                # Anthropic's clients send their key as x-api-key; any route takes it.
                api_key = headers.get("x-api-key") or None
            principal = await self._auth.authenticate(headers.get("authorization"), api_key)
        if admin and not principal.is_admin:
            raise forbidden()
        caller.set(principal)
        meta = build_meta(headers, protocol, principal.key_id, peer, principal.grant())
        if not meta.strategy:
            meta.strategy = principal.strategy
        request_id_var.set(meta.request_id)
        return meta

    async def model_request(
        self, parsed: ParsedRequest, meta: router_pb2.RequestMeta, raw: bytes | None
    ) -> router_pb2.ModelRequest:
        """The internal request, admitted: 403 model_not_allowed when the caller's key
        may not use the model, 429 when it is over its rate limits (every protocol's model
        calls come through here, before the cache or the router is asked). complete() or
        stream() must follow: they finish the admission."""
        require_model(parsed.model)
        openai_json = raw if raw is not None else orjson.dumps(parsed.body)
        await self._admitter.admit(token_estimate(len(openai_json), parsed.body))
        return router_pb2.ModelRequest(
            meta=meta,
            task=parsed.task,
            model=parsed.model,
            stream=parsed.stream,
            openai_json=openai_json,
            binary=parsed.binary,
        )

    @contextlib.contextmanager
    def span(self, name: str, headers: Mapping[str, str], protocol: str) -> Iterator[Span]:
        """The request's server span, described. A request that came as a gRPC call (REST
        transcoded by Envoy, typed gRPC) has one already: the call's, which the gate
        started from the caller's trace context and counts as in flight. A WebSocket
        frame, served on the HTTP side, gets one of its own here, counted the same way."""
        current = trace.get_current_span()
        if current.get_span_context().is_valid:
            current.set_attribute("clawdbot.protocol", protocol)
            current.set_attribute("clawdbot.operation", name)
            yield current
            return
        in_flight = self._metrics.in_flight.labels("adapter")
        in_flight.inc()
        try:
            with self._tracer.start_as_current_span(
                name, context=extract_context(headers), kind=SpanKind.SERVER
            ) as span:
                span.set_attribute("clawdbot.protocol", protocol)
                yield span
        finally:
            in_flight.dec()

    def record(self, operation: str, protocol: str, status: int, started: float) -> None:
        self._metrics.requests.labels("adapter", operation, protocol, str(status)).inc()
        self._metrics.request_duration.labels("adapter", operation, protocol).observe(time.perf_counter() - started)

    @property
    def jobs(self) -> JobsFront:
        if self._jobs is None:
            raise GatewayError(
                503, "Async jobs are turned off here (jobs.enabled).", "service_unavailable", "jobs_disabled"
            )
        return self._jobs

    @property
    def keys(self) -> VirtualKeys:
        if self._keys is None:
            raise GatewayError(503, "Virtual keys are not available here.", "service_unavailable", "keys_disabled")
        return self._keys

    # --- calls to the router -------------------------------------------------------------

    async def _unary(
        self, method: Callable[..., Awaitable[Reply]], request: Message, deadline_s: float, peer: str = "router"
    ) -> Reply:
        try:
            return await method(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as err:
            raise self._failure(err, peer) from None

    async def complete(self, request: router_pb2.ModelRequest) -> router_pb2.ModelResponse:
        """The answer, from the cache when it has it; a miss is stored for the next caller.
        The request's admission is finished with the tokens the answer used."""
        admission = current()
        try:
            if self._cache is None:
                response = await self._complete(request)
                response.cache = "miss"
            else:
                response = await self._cache.complete(request, self._complete)
        except GatewayError as err:
            await self._admitter.finish(admission, 0 if nothing_produced(err) else None)
            raise
        except BaseException:
            await self._admitter.finish(admission, None)
            raise
        await self._admitter.finish(admission, response_tokens(response))
        return response

    async def _complete(self, request: router_pb2.ModelRequest) -> router_pb2.ModelResponse:
        return await self._unary(self._router.Complete, request, self._timeout)

    async def stream(self, request: router_pb2.ModelRequest) -> AsyncGenerator[router_pb2.StreamEvent, None]:
        """Events: the instance announcement first, then chunks. GatewayError before or
        during the stream. A cached answer is replayed; a streamed one cached once whole.
        The request's admission is finished at the end: with the tokens of the router's
        `settled` event (consumed here, never relayed), 0 for a cached answer, the
        admission's estimate for a stream cut short or failing."""
        admission = current()
        tokens: int | None = None
        produced = False
        try:
            async with contextlib.aclosing(self._stream_answer(request)) as events:
                async for event in events:
                    if event.HasField("settled"):
                        tokens = event.settled.input_tokens + event.settled.output_tokens
                        continue
                    if event.HasField("instance") and event.cache and event.cache != "miss":
                        tokens = 0  # a replayed answer: the request counts, its tokens do not
                    produced = produced or event.HasField("chunk_json")
                    yield event
        except GatewayError as err:
            if tokens is None and not produced and nothing_produced(err):
                tokens = 0
            raise
        finally:
            await self._admitter.finish(admission, tokens)

    async def _stream_answer(self, request: router_pb2.ModelRequest) -> AsyncGenerator[router_pb2.StreamEvent, None]:
        plan = self._cache.plan(request) if self._cache else None
        found = CacheLookup()
        if plan is not None and self._cache is not None:
            found = await self._cache.read(plan)
            cached = found.response
            if cached is not None and cached.openai_json and (not cached.dialect or cached.dialect in NATIVE_REPLAY):
                yield router_pb2.StreamEvent(
                    instance=cached.instance, strategy=cached.strategy, cache=cached.cache, dialect=cached.dialect
                )
                answer = orjson.loads(cached.openai_json)
                # A native answer (another dialect's, passed through) replays as its own events.
                if cached.dialect:
                    replay = NATIVE_REPLAY[cached.dialect](answer)
                else:
                    replay = replay_chat(answer, plan.include_usage)
                for payload in replay:
                    yield router_pb2.StreamEvent(chunk_json=payload)
                return
        chunks: list[bytes] = []
        announced = router_pb2.StreamEvent()
        complete = False
        try:
            async with contextlib.aclosing(self._stream(request)) as events:
                async for event in events:
                    if event.HasField("instance"):
                        event.cache = "miss"
                        announced = event
                    elif plan is not None and event.HasField("chunk_json"):
                        chunks.append(event.chunk_json)
                    yield event
            complete = True
        finally:
            if plan is not None and self._cache is not None:
                answer = assemble_chat(chunks) if complete else None
                if answer is None:
                    await self._cache.abandon(plan, found.lease)
                else:
                    response = router_pb2.ModelResponse(
                        openai_json=orjson.dumps(answer), instance=announced.instance, strategy=announced.strategy
                    )
                    await self._cache.write(plan, found, response)

    async def _stream(self, request: router_pb2.ModelRequest) -> AsyncGenerator[router_pb2.StreamEvent, None]:
        call = self._router.CompleteStream(request, timeout=self._timeout)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as err:
            raise self._failure(err) from None
        finally:
            # An abandoned stream (client went away) must not keep the upstream busy.
            call.cancel()

    def _workflows(self) -> orchestrator_pb2_grpc.OrchestratorStub:
        if self._orchestrator is None:
            raise GatewayError(503, "Workflows are turned off here (orchestrator.enabled).", "service_unavailable")
        return self._orchestrator

    async def run_workflow(self, meta: router_pb2.RequestMeta, name: str, run_input: bytes) -> bytes:
        """The finished run. 403 when the key may not run the workflow, 429 over its rate
        limits (the run counts as one request; each of its model steps is held to the
        key's models and budget by the router, from meta.grant)."""
        require_workflow(name)
        request = orchestrator_pb2.RunWorkflowRequest(meta=meta, name=name, input_json=run_input)
        async with self._admitter.holding(token_estimate(len(run_input), {})):
            reply: orchestrator_pb2.WorkflowReply = await self._unary(
                self._workflows().Run, request, self._timeout, "orchestrator"
            )
        return reply.json

    async def stream_workflow(
        self, meta: router_pb2.RequestMeta, name: str, run_input: bytes
    ) -> AsyncGenerator[bytes, None]:
        """The run's progress events, each a JSON object with a "type", `run.completed`
        (carrying the whole run) last. GatewayError before the first event (unknown
        workflow, bad input, not allowed for the key, over its rate limits) or during the
        run (the orchestrator failed or went away)."""
        require_workflow(name)
        request = orchestrator_pb2.RunWorkflowRequest(meta=meta, name=name, input_json=run_input)
        async with self._admitter.holding(token_estimate(len(run_input), {})):
            call = self._workflows().RunStream(request, timeout=self._timeout)
            completed = False
            try:
                async for event in call:
                    kind = workflow_event_type(event.json)
                    if kind is None:
                        raise GatewayError(
                            502, "The orchestrator sent a workflow event without a type.", "upstream_error"
                        )
                    completed = kind == "run.completed"
                    yield event.json
            except grpc.aio.AioRpcError as err:
                raise self._failure(err, "orchestrator") from None
            finally:
                # An abandoned stream (client went away) must not keep the run going.
                call.cancel()
            if not completed:
                # Every protocol promises run.completed last; a stream cut short is a failure.
                raise GatewayError(
                    502, "The orchestrator ended the workflow stream before the run completed.", "upstream_error"
                )

    async def list_workflows(self, meta: router_pb2.RequestMeta) -> bytes:
        """The workflows; a key held to some sees those alone (and not the catalog's
        problems, which name files and workflows it has no business with)."""
        request = orchestrator_pb2.ListWorkflowsRequest(meta=meta)
        reply: orchestrator_pb2.WorkflowReply = await self._unary(self._workflows().List, request, 10.0, "orchestrator")
        principal = caller.get(ANONYMOUS)
        if not principal.workflows:
            return reply.json
        listed = orjson.loads(reply.json)
        listed["data"] = [
            workflow
            for workflow in listed.get("data") or ()
            if isinstance(workflow, dict) and principal.allows_workflow(str(workflow.get("name", "")))
        ]
        listed["problems"] = []
        return orjson.dumps(listed)

    async def describe_workflow(self, meta: router_pb2.RequestMeta, name: str) -> bytes:
        require_workflow(name)
        request = orchestrator_pb2.DescribeWorkflowRequest(meta=meta, name=name)
        reply: orchestrator_pb2.WorkflowReply = await self._unary(
            self._workflows().Describe, request, 10.0, "orchestrator"
        )
        return reply.json

    # --- health --------------------------------------------------------------------------

    async def _health_status(self, meta: router_pb2.RequestMeta, detailed: bool) -> dict[str, Any]:
        """The health service's report; when it cannot be asked, a report that says so."""
        if self._health is not None:
            request = monitor_pb2.HealthStatusRequest(meta=meta, detailed=detailed)
            try:
                reply = await self._health.Status(request, timeout=10)
                status: dict[str, Any] = orjson.loads(reply.json)
                return status
            except grpc.aio.AioRpcError as err:
                log.warning("health service unavailable", extra={"error": err.code().name})
                unreachable = f"unreachable ({err.code().name})"
                return {"object": "health", "status": "degraded", "services": {"health": unreachable}, "instances": []}
        # Turned off (the lite image): nothing watches the instances, and nothing is wrong.
        return {"object": "health", "status": "ok", "services": {"health": "disabled"}, "instances": []}

    async def health(self, meta: router_pb2.RequestMeta) -> bytes:
        """The public summary: is the gateway serving, which instances are available."""
        status = await self._health_status(meta, detailed=False)
        status["services"] = {"adapter": "serving", **status.get("services", {})}
        return orjson.dumps(status)

    async def instances(self, meta: router_pb2.RequestMeta) -> bytes:
        """Every instance: the router's view (breaker, latency, the verdict it applies)
        beside the health service's (windows, probes, anomaly score)."""
        routed: router_pb2.RouterInstancesReply = await self._unary(
            self._router.Instances, router_pb2.RouterInstancesRequest(meta=meta), 10.0
        )
        watched = {i["id"]: i for i in (await self._health_status(meta, detailed=True)).get("instances", [])}
        listed = []
        for entry in orjson.loads(routed.json)["data"]:
            seen = watched.pop(entry["id"], None)
            listed.append({**entry, "monitor": seen})
        # Instances the health service heard of that this router no longer routes to.
        listed += [{"id": i, "monitor": seen, "routed": False} for i, seen in watched.items()]
        return orjson.dumps({"object": "list", "data": listed})

    async def feedback(self, request: router_pb2.FeedbackRequest) -> router_pb2.FeedbackResponse:
        return await self._unary(self._router.Feedback, request, 10.0)

    async def explain(self, request: router_pb2.ExplainRequest) -> router_pb2.Explanation:
        return await self._unary(self._router.Explain, request, 10.0)

    async def reload(self, meta: router_pb2.RequestMeta) -> router_pb2.ReloadResponse:
        # Generous: a reload health-checks the instances it adds.
        return await self._unary(self._router.Reload, router_pb2.ReloadRequest(meta=meta), 60.0)

    async def list_models(self, meta: router_pb2.RequestMeta) -> list[router_pb2.ModelInfo]:
        reply: router_pb2.RouterListModelsResponse = await self._unary(
            self._router.ListModels, router_pb2.RouterListModelsRequest(meta=meta), 10.0
        )
        # A key held to some models is shown those (as OpenAI lists a project's models).
        principal = caller.get(ANONYMOUS)
        return [model for model in reply.models if principal.allows_model(model.id)]

    def _failure(self, err: grpc.aio.AioRpcError, peer: str = "router") -> GatewayError:
        failure = GatewayError.from_rpc_error(err, peer)
        span = trace.get_current_span()
        span.set_status(Status(StatusCode.ERROR, failure.message))
        if failure.status >= 500:
            log.warning(f"{peer} call failed", extra={"status": failure.status, "error": failure.message})
        return failure


def workflow_event_type(payload: bytes) -> str | None:
    """A workflow event's "type", or None when the payload is not an event object."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    kind = event.get("type") if isinstance(event, dict) else None
    # Printable: it becomes an SSE `event:` line, which a newline would break.
    return kind if isinstance(kind, str) and kind and kind.isprintable() else None
