"""The router's gRPC servicer: resolve a model name to instances, order them by the
strategy, call the best one, fall back to the next on a retryable failure."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import orjson
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError, internal_error
from clawdbot.common.logging import request_id_var
from clawdbot.common.metrics import Metrics
from clawdbot.common.service import ServiceHost
from clawdbot.common.telemetry import extract_context, inject_headers
from clawdbot.gen.v1 import router_pb2, router_pb2_grpc
from clawdbot.router import strategy
from clawdbot.router.connectors.openai import OpenAIConnector, UpstreamError
from clawdbot.router.registry import Instance, Registry

log = logging.getLogger(__name__)


def _record_usage(metrics: Metrics, instance: Instance, task: str, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    for key, token_type in (("prompt_tokens", "input"), ("completion_tokens", "output")):
        value = usage.get(key)
        if isinstance(value, int):
            metrics.token_usage.labels(task, instance.name, token_type, instance.id).observe(value)


def _describe(span: trace.Span, meta: router_pb2.RequestMeta) -> None:
    """The caller's metadata on the server span: who asked, from where, on what."""
    span.set_attribute("clawdbot.request_id", meta.request_id)
    span.set_attribute("clawdbot.client_ip", meta.client_ip)
    span.set_attribute("clawdbot.device_type", meta.device_type)
    span.set_attribute("clawdbot.api_key_id", meta.api_key_id)
    span.set_attribute("clawdbot.protocol", meta.protocol)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, config: Config, registry: Registry, connector: OpenAIConnector, metrics: Metrics) -> None:
        self._config = config
        self._registry = registry
        self._connector = connector
        self._metrics = metrics
        self._tracer = trace.get_tracer("clawdbot.router")

    # --- shared steps ----------------------------------------------------------------

    def _plan(self, request: router_pb2.ModelRequest) -> tuple[dict[str, Any], list[Instance]]:
        try:
            body = orjson.loads(request.openai_json)
        except orjson.JSONDecodeError as exc:
            raise GatewayError.bad_request(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise GatewayError.bad_request("request body must be a JSON object")
        if not self._registry.knows(request.model):
            raise GatewayError.model_not_found(request.model)
        candidates = self._registry.candidates(request.model, request.task)
        if not candidates:
            raise GatewayError.bad_request(
                f"The model `{request.model}` does not serve {request.task} requests.", "model", "model_not_supported"
            )
        try:
            weights = self._config.model_router.weights(request.meta.strategy or None)
        except KeyError:
            names = [s.name for s in self._config.model_router.strategies]
            raise GatewayError.bad_request(
                f"Unknown routing strategy `{request.meta.strategy}`; known: {', '.join(names)}.", "strategy"
            ) from None
        # A rough token estimate is all the ordering needs (about four bytes a token).
        ranked = strategy.rank(candidates, request.task, weights, max(1, len(request.openai_json) // 4))
        return body, ranked

    async def _abort(self, context: grpc.aio.ServicerContext, err: GatewayError) -> None:
        await context.abort(err.grpc_code(), err.message, trailing_metadata=err.trailing_metadata())

    # --- RPCs ------------------------------------------------------------------------

    async def Complete(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ModelResponse:
        request_id_var.set(request.meta.request_id)
        parent = extract_context(context.invocation_metadata() or ())
        with self._tracer.start_as_current_span("router.complete", context=parent, kind=SpanKind.SERVER) as span:
            _describe(span, request.meta)
            try:
                return await self._complete(request, span)
            except GatewayError as err:
                span.set_status(Status(StatusCode.ERROR, err.message))
                await self._abort(context, err)
            except Exception:
                log.exception("router failed")
                await self._abort(context, internal_error())
        raise AssertionError("unreachable: abort raises")

    @contextlib.contextmanager
    def _attempt(self, request: router_pb2.ModelRequest, instance: Instance, fallback_left: bool) -> Iterator[None]:
        """One call to one instance: its client span, in-flight count, stats and metrics."""
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            f"{request.task} {instance.upstream_model}", kind=SpanKind.CLIENT
        ) as call_span:
            call_span.set_attribute("gen_ai.operation.name", request.task)
            call_span.set_attribute("gen_ai.request.model", instance.upstream_model)
            call_span.set_attribute("clawdbot.instance", instance.id)
            instance.stats.in_flight += 1
            try:
                yield
            except UpstreamError as err:
                call_span.set_status(Status(StatusCode.ERROR, err.message))
                instance.stats.observe(time.perf_counter() - started, ok=False)
                self._metrics.upstream_errors.labels(instance.id, err.kind).inc()
                log.warning(
                    "upstream call failed",
                    extra={
                        "instance": instance.id,
                        "kind": err.kind,
                        "status": err.status,
                        "error": err.message,
                        "falling_back": err.retryable and fallback_left,
                    },
                )
                raise
            else:
                elapsed = time.perf_counter() - started
                instance.stats.observe(elapsed, ok=True)
                self._metrics.operation_duration.labels(
                    request.task, instance.name, instance.connector, instance.id
                ).observe(elapsed)
            finally:
                instance.stats.in_flight -= 1

    async def _complete(self, request: router_pb2.ModelRequest, span: trace.Span) -> router_pb2.ModelResponse:
        body, ranked = self._plan(request)
        for position, instance in enumerate(ranked):
            fallback_left = position + 1 < len(ranked)
            body["model"] = instance.upstream_model
            try:
                with self._attempt(request, instance, fallback_left):
                    data = await self._connector.call(
                        instance, request.task, body, inject_headers(), request.meta.request_id
                    )
            except UpstreamError as err:
                if err.retryable and fallback_left:
                    continue
                raise
            _record_usage(self._metrics, instance, request.task, data.get("usage"))
            data["model"] = instance.name
            span.set_attribute("clawdbot.instance", instance.id)
            return router_pb2.ModelResponse(openai_json=orjson.dumps(data), instance=instance.id)
        raise AssertionError("unreachable: the last candidate raises")

    async def CompleteStream(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.StreamEvent]:
        request_id_var.set(request.meta.request_id)
        parent = extract_context(context.invocation_metadata() or ())
        with self._tracer.start_as_current_span("router.stream", context=parent, kind=SpanKind.SERVER) as span:
            _describe(span, request.meta)
            try:
                async for event in self._stream(request):
                    yield event
            except GatewayError as err:
                span.set_status(Status(StatusCode.ERROR, err.message))
                await self._abort(context, err)
            except Exception:
                log.exception("router stream failed")
                await self._abort(context, internal_error())

    async def _stream(self, request: router_pb2.ModelRequest) -> AsyncIterator[router_pb2.StreamEvent]:
        body, ranked = self._plan(request)
        for position, instance in enumerate(ranked):
            fallback_left = position + 1 < len(ranked)
            body["model"] = instance.upstream_model
            started = time.perf_counter()
            first = True
            try:
                with self._attempt(request, instance, fallback_left):
                    chunks = self._connector.stream(instance, body, inject_headers(), request.meta.request_id)
                    async for payload in chunks:
                        if first:
                            first = False
                            self._metrics.time_to_first_token.labels(instance.name, instance.id).observe(
                                time.perf_counter() - started
                            )
                            yield router_pb2.StreamEvent(instance=instance.id)
                        yield router_pb2.StreamEvent(chunk_json=self._restamp(payload, instance, request.task))
            except UpstreamError as err:
                # The connector clears `retryable` once a chunk went out: no fallback then.
                if err.retryable and fallback_left:
                    continue
                raise
            return

    def _restamp(self, payload: bytes, instance: Instance, task: str) -> bytes:
        """Show the caller's model name in each chunk, and count tokens from usage."""
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload  # not ours to judge; pass the upstream's bytes on untouched
        if not isinstance(chunk, dict):
            return payload
        if chunk.get("usage"):
            _record_usage(self._metrics, instance, task, chunk["usage"])
        if "model" in chunk:
            chunk["model"] = instance.name
        return orjson.dumps(chunk)

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: router_pb2.RouterListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterListModelsResponse:
        created = {i.name: i.created for i in self._registry.instances()}
        models = [
            router_pb2.ModelInfo(id=name, task=task, owned_by="clawdbot", created=created[name])
            for name, task in self._registry.model_names()
        ]
        return router_pb2.RouterListModelsResponse(models=models)


def create_server(config: Config) -> ServiceHost:
    metrics = Metrics("router")
    host = ServiceHost("router", config.router, metrics, reflection_services=("clawdbot.v1.Router",))
    connector = OpenAIConnector(config.router.max_connections)
    servicer = RouterServicer(config, Registry(config.models), connector, metrics)
    router_pb2_grpc.add_RouterServicer_to_server(servicer, host.grpc_server)
    host.add_service_name("clawdbot.v1.Router")
    host.on_shutdown(connector.close)
    return host
