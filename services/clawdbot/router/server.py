"""The router's gRPC servicer: resolve a model name to instances, score them by the
strategy, call the chosen one, retry the next-best on a retryable failure.

What the router knows lives in two places. The snapshot (registry + routing config) is
immutable and replaced whole on reload; a request keeps the snapshot it started with.
Live knowledge (latency averages, breakers, feedback) is keyed by instance id and
outlives snapshots.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import orjson
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from clawdbot.common.clients.router import probe_request
from clawdbot.common.config import SOURCE_CONFIG_ENV, Config, StrategyWeights, config_path
from clawdbot.common.errors import GatewayError
from clawdbot.common.kafka import KafkaEndpoint
from clawdbot.common.metrics import Metrics
from clawdbot.common.retry import RetryBudget
from clawdbot.common.service import ServiceHost, mesh_channel
from clawdbot.common.telemetry import inject_headers
from clawdbot.gen.v1 import monitor_pb2_grpc, router_pb2, router_pb2_grpc
from clawdbot.router.attempts import Attempts
from clawdbot.router.breaker import CircuitBreaker
from clawdbot.router.connectors.anthropic import AnthropicConnector
from clawdbot.router.connectors.base import Connector, NativeConnector, NativeRequest, StreamMeter, passes_through
from clawdbot.router.connectors.openai import OpenAIConnector, UpstreamError
from clawdbot.router.connectors.worker import WorkerConnector
from clawdbot.router.health_view import HealthView
from clawdbot.router.observations import Observation, ReportingPublisher, TelemetryPublisher
from clawdbot.router.prometheus_feed import PrometheusFeed
from clawdbot.router.quality import QualityBook
from clawdbot.router.registry import Instance, Registry
from clawdbot.router.reload import Reloader
from clawdbot.router.rules import Features, Routing, apply_rules, modality_of
from clawdbot.router.scoring import Candidate, RequestShape, Scorer, explain_choice
from clawdbot.router.snapshot import Snapshot
from clawdbot.router.spend import Charge, Estimate, RouterSpending, Spending, estimate, unreported_cost
from clawdbot.router.stats import StatsStore

log = logging.getLogger(__name__)

# Gateway options ride in the OpenAI body under this key; they never reach a provider.
GATEWAY_FIELD = "clawdbot"
# Failures that say something about the instance's health (a 400 says nothing).
_BREAKER_KINDS = frozenset({"unreachable", "server_error", "timeout", "rate_limited", "bad_response", "truncated"})


@dataclass
class Plan:
    body: dict[str, Any]
    shape: RequestShape
    strategy: str
    weights: StrategyWeights
    ranked: list[Candidate]
    snapshot: Snapshot
    # The instance the scorer picked (the first in the order of attempts).
    chosen: str = ""


def _audio_seconds(usage: Any) -> float:
    """OpenAI reports audio usage as {"type": "duration", "seconds": N}."""
    seconds = usage.get("seconds") if isinstance(usage, dict) else None
    return float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else 0.0


def _usage_tokens(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else 0), (completion if isinstance(completion, int) else 0)


def _features(meta: router_pb2.RequestMeta, task: str, model: str, modality: str, input_tokens: int) -> Features:
    return Features(
        task, model, modality, input_tokens, meta.device_type, meta.api_key_id, meta.protocol, dict(meta.headers)
    )


def _describe(meta: router_pb2.RequestMeta) -> trace.Span:
    """The caller's metadata on the call's server span (the gate's, which has the request
    id the call came with already): who asked, from where, on what."""
    span = trace.get_current_span()
    span.set_attribute("clawdbot.client_ip", meta.client_ip)
    span.set_attribute("clawdbot.device_type", meta.device_type)
    span.set_attribute("clawdbot.api_key_id", meta.api_key_id)
    span.set_attribute("clawdbot.protocol", meta.protocol)
    return span


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Trust: `meta.api_key_id` (and the rest of RequestMeta) is taken as the caller says,
    for rules, spend, cost metrics and feedback. That is sound only because every call
    reaching this servicer has passed ServiceHost's ServerGate: the caller is a
    service of the mesh holding the internal credential: the adapter, which sets the key id
    from the API key it authenticated, or jobs and the orchestrator, which pass on the key
    id the adapter recorded. A caller without the credential is refused before any method
    runs, so nothing outside the mesh can choose a key id."""

    def __init__(
        self,
        config: Config,
        connectors: Mapping[str, Connector],
        metrics: Metrics,
        spending: Spending | None = None,
    ) -> None:
        self._connectors = connectors
        self._metrics = metrics
        # Budgets and the ledger (router/spend.py). Without one (a router built bare, as in
        # some tests) a budgeted call is refused, never let through unchecked.
        self._spending = spending or Spending(None, None, config.quota.default_max_tokens)
        self._max_audio_seconds = config.gateway.max_audio_seconds
        self._tracer = trace.get_tracer("clawdbot.router")
        self._stats = StatsStore()
        self._quality = QualityBook(
            config.model_router.quality_prior_weight,
            config.model_router.feedback_remember,
            config.model_router.feedback_window_s,
        )
        # On demand: a request still on an old snapshot may retry an instance whose state
        # was already forgotten; it gets a fresh breaker rather than a KeyError.
        self._breaker_config = config.model_router.breaker
        self._breakers: dict[str, CircuitBreaker] = defaultdict(lambda: CircuitBreaker(self._breaker_config))
        # One budget for all of this router's retries: an upstream that is down gets at
        # most a fifth more calls from retries, not three times its traffic.
        self._retry_budget = RetryBudget()
        self._versions = 0
        self.health = HealthView()
        routing = config.model_router
        self.fleet = (
            PrometheusFeed(routing.prometheus_url, routing.prometheus_refresh_s) if routing.prometheus_url else None
        )
        self.snapshot = self.build_snapshot(config)
        self.reloader: Reloader | None = None
        # Per-call observations for the health service (Kafka, or gRPC without Kafka).
        self.telemetry: TelemetryPublisher | None = None

    # --- the snapshot and what outlives it (SnapshotOwner, for reload.py) --------------

    def build_snapshot(self, config: Config) -> Snapshot:
        registry = Registry(config.models)
        self._breaker_config = config.model_router.breaker
        fleet = self.fleet
        scorer = Scorer(
            config.model_router,
            self._stats,
            self._quality,
            self._breakers,
            fleet=(lambda: fleet.view) if fleet else None,
            health=lambda: self.health.verdicts,
        )
        self._versions += 1
        return Snapshot(registry, config.model_router, scorer, self._versions)

    def breaker(self, instance_id: str) -> CircuitBreaker:
        return self._breakers[instance_id]

    def in_flight(self, instance_id: str) -> int:
        return self._stats.get(instance_id).in_flight

    def forget(self, instance_ids: set[str]) -> None:
        live = {i.id for i in self.snapshot.registry.instances()}
        for instance_id in instance_ids - live:  # a later reload may have brought one back
            self._stats.drop(instance_id)
            self._breakers.pop(instance_id, None)

    # --- planning --------------------------------------------------------------------

    def _plan(self, request: router_pb2.ModelRequest) -> Plan:
        snapshot = self.snapshot  # this request's view, whatever reloads happen meanwhile
        try:
            body = orjson.loads(request.openai_json)
        except orjson.JSONDecodeError as exc:
            raise GatewayError.bad_request(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise GatewayError.bad_request("request body must be a JSON object")
        options = body.pop(GATEWAY_FIELD, None)
        body_strategy = options.get("strategy") if isinstance(options, dict) else None
        # About four bytes a token: all the comparison between candidates needs.
        input_tokens = max(1, len(request.openai_json) // 4)
        meta = request.meta
        features = _features(meta, request.task, request.model, modality_of(body), input_tokens)
        routing = apply_rules(snapshot.routing.rules, features, self._candidates(snapshot, request.model, request.task))
        strategy, weights = self._strategy(snapshot, meta.strategy or body_strategy, routing)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        shape = RequestShape(request.task, input_tokens, max_tokens if isinstance(max_tokens, int) else None)
        ranked = snapshot.scorer.score(routing.candidates, shape, weights)
        return Plan(body, shape, strategy, weights, ranked, snapshot)

    @staticmethod
    def _candidates(snapshot: Snapshot, model: str, task: str) -> list[Instance]:
        if not snapshot.registry.knows(model):
            raise GatewayError.model_not_found(model)
        candidates = snapshot.registry.candidates(model, task)
        if not candidates:
            raise GatewayError.bad_request(
                f"The model `{model}` does not serve {task} requests.", "model", "model_not_supported"
            )
        return candidates

    @staticmethod
    def _strategy(snapshot: Snapshot, asked: Any, routing: Routing) -> tuple[str, StrategyWeights]:
        """The caller's explicit choice, else the last matching rule's, else the default."""
        if not (isinstance(asked, str) and asked):
            if routing.weights is not None:
                return f"rule:{routing.applied[-1]}", routing.weights
            asked = routing.strategy
        name = asked if isinstance(asked, str) and asked else snapshot.routing.strategy
        try:
            return name, snapshot.routing.weights(name)
        except KeyError:
            names = ", ".join(s.name for s in snapshot.routing.strategies)
            raise GatewayError.bad_request(
                f"Unknown routing strategy `{name}`; known: {names}.", "strategy", "unknown_strategy"
            ) from None

    def _attempts(self, plan: Plan, context: grpc.aio.ServicerContext) -> Attempts:
        order = [c.instance for c in plan.snapshot.scorer.order(plan.ranked)]
        if not order:
            raise GatewayError.unavailable(
                explain_choice(plan.ranked, None, plan.weights), code="no_available_instance"
            )
        plan.chosen = order[0].id
        budget = plan.snapshot.routing.deadline_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        return Attempts(
            order, self._breakers, plan.snapshot.routing.retry, time.monotonic() + budget, budget=self._retry_budget
        )

    def _decided(self, plan: Plan, instance: Instance, previous: str) -> None:
        """Count where an attempt goes and why there: the scorer's pick, another instance
        (after a failure, or past an open breaker), or the same one again."""
        if not previous:
            reason = "first_choice" if instance.id == plan.chosen else "fallback"
        else:
            reason = "retry" if instance.id == previous else "fallback"
        self._metrics.routing_decisions.labels(plan.strategy, instance.id, reason).inc()

    # --- one call to one instance ------------------------------------------------------

    @contextlib.contextmanager
    def _attempt(self, task: str, instance: Instance, meta: router_pb2.RequestMeta) -> Iterator[Observation]:
        """Its client span (a child of the call's server span, and the parent of the
        worker's), in-flight count, breaker verdict, stats and metrics; the call's
        observation, published by _account on success and here on failure."""
        started = time.perf_counter()
        stats = self._stats.get(instance.id)
        breaker = self._breakers[instance.id]
        with self._tracer.start_as_current_span(f"{task} {instance.upstream_model}", kind=SpanKind.CLIENT) as span:
            span.set_attribute("gen_ai.operation.name", task)
            span.set_attribute("gen_ai.request.model", instance.upstream_model)
            span.set_attribute("clawdbot.instance", instance.id)
            observation = Observation.begin(instance, task, meta.api_key_id, meta.request_id)
            stats.in_flight += 1
            verdict = False
            try:
                yield observation
                verdict = True
                breaker.record_success()
                elapsed = time.perf_counter() - started
                self._metrics.operation_duration.labels(task, instance.name, instance.connector, instance.id).observe(
                    elapsed
                )
            except UpstreamError as err:
                verdict = True
                span.set_status(Status(StatusCode.ERROR, err.message))
                self._metrics.upstream_errors.labels(instance.id, err.kind).inc()
                observation.status, observation.http_status = err.kind, err.status
                observation.latency_s = time.perf_counter() - started
                self._publish(observation)
                if err.kind in _BREAKER_KINDS:
                    breaker.record_failure()
                else:
                    breaker.record_success()  # it answered; the request was at fault
                log.warning(
                    "upstream call failed",
                    extra={
                        "instance": instance.id,
                        "kind": err.kind,
                        "status": err.status,
                        "error": err.message,
                        "retryable": err.retryable,
                    },
                )
                raise
            finally:
                stats.in_flight -= 1
                if not verdict:
                    breaker.release()  # cancelled: no verdict on the instance
                self._metrics.breaker_state.labels(instance.id).set(0 if breaker.status() == "closed" else 1)

    def _publish(self, observation: Observation) -> None:
        if self.telemetry is not None:
            self.telemetry.record(observation)

    def _account(
        self, meta: router_pb2.RequestMeta, task: str, instance: Instance, usage: Any, observation: Observation
    ) -> float:
        prompt, completion = _usage_tokens(usage)
        if prompt:
            self._metrics.token_usage.labels(task, instance.name, "input", instance.id).observe(prompt)
        if completion:
            self._metrics.token_usage.labels(task, instance.name, "output", instance.id).observe(completion)
        cost = instance.expected_cost(prompt, completion, _audio_seconds(usage))
        if cost:
            self._metrics.cost.labels(meta.api_key_id or "none", instance.name, instance.id).inc(cost)
        observation.input_tokens, observation.output_tokens, observation.cost_usd = prompt, completion, cost
        observation.latency_s = time.time() - observation.started_at
        self._publish(observation)
        self._quality.answered(meta.request_id, instance.id, task, meta.api_key_id)
        return cost

    # --- RPCs ------------------------------------------------------------------------

    async def Complete(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ModelResponse:
        return await self._complete(request, context, _describe(request.meta))

    async def _complete(
        self, request: router_pb2.ModelRequest, context: grpc.aio.ServicerContext, span: trace.Span
    ) -> router_pb2.ModelResponse:
        # The name asked for is the same on every attempt: checked once, before anything.
        self._spending.check_model(request.meta.grant, request.model)
        plan = self._plan(request)
        worst = self._estimate(request, plan)
        attempts = self._attempts(plan, context)
        failure: UpstreamError | None = None
        previous = ""
        async for instance, timeout_s in attempts:
            self._decided(plan, instance, previous)
            previous = instance.id
            plan.body["model"] = instance.upstream_model
            # Outside the retry handling below: a refused hold is the 429 the client gets,
            # not a failure to try elsewhere.
            charge = await self._hold(request.meta, instance, worst)
            started = time.perf_counter()
            native = self._native(request, instance)
            try:
                with self._attempt(request.task, instance, request.meta) as observation:
                    if native is not None:
                        answer = await native[0].call_native(
                            instance, native[1], inject_headers(), request.meta.request_id, timeout_s
                        )
                    else:
                        answer = await self._connectors[instance.connector].call(
                            instance,
                            request.task,
                            plan.body,
                            inject_headers(),
                            request.meta.request_id,
                            timeout_s,
                            request.binary,
                        )
            except UpstreamError as err:
                await self._spending.release(charge)
                failure = err
                if attempts.should_retry(err):
                    continue
                raise
            except BaseException:
                # Cancelled by the caller mid-call (or a bug): the upstream had the prompt.
                await self._spending.settle(charge, worst.input_tokens, 0, worst.input_cost(instance))
                raise
            data = answer.data
            # A native answer's usage, read in Chat's terms (input counts cache reads and
            # writes); the answer itself goes back as the upstream sent it.
            usage = native[0].native_usage(data) if native is not None else data.get("usage")
            self._stats.get(instance.id).record_success(time.perf_counter() - started, _usage_tokens(usage)[1])
            cost = self._account(request.meta, request.task, instance, usage, observation)
            prompt, completion = _usage_tokens(usage)
            if not isinstance(usage, dict):
                # No usage reported (speech, some providers): priced on the input estimate
                # and the audio produced, never free.
                prompt, cost = worst.input_tokens, unreported_cost(instance, worst, answer.binary)
            spend = await self._spending.settle(charge, prompt, completion, cost)
            if "model" in data and native is None:
                data["model"] = instance.name
            span.set_attribute("clawdbot.instance", instance.id)
            return router_pb2.ModelResponse(
                openai_json=answer.raw if native is not None else orjson.dumps(data),
                dialect=native[1].dialect if native is not None else "",
                instance=instance.id,
                strategy=plan.strategy,
                cost_usd=cost,
                binary=answer.binary,
                content_type=answer.content_type,
                spend=spend,
            )
        raise failure or GatewayError.unavailable(
            explain_choice(plan.ranked, None, plan.weights), code="no_available_instance"
        )

    def _native(
        self, request: router_pb2.ModelRequest, instance: Instance
    ) -> tuple[NativeConnector, NativeRequest] | None:
        """The pass-through for this attempt: when the caller spoke a dialect natively and
        the instance's connector speaks it too, the caller's own body goes, else the Chat
        translation (openai_json) does."""
        if not (request.dialect and request.native_json):
            return None
        connector = self._connectors[instance.connector]
        if not passes_through(connector, instance, request.dialect):
            return None
        native = cast(NativeConnector, connector)
        return native, NativeRequest(request.dialect, request.native_json, dict(request.native_headers))

    async def _hold(self, meta: router_pb2.RequestMeta, instance: Instance, worst: Estimate) -> Charge:
        """The attempt's budget hold. The attempt already took the instance's breaker (in
        half-open, its one probe slot): a call that will not be made gives it back."""
        try:
            return await self._spending.hold(meta, instance, worst)
        except BaseException:
            self._breakers[instance.id].release()
            raise

    def _estimate(self, request: router_pb2.ModelRequest, plan: Plan) -> Estimate:
        """The call's worst case, for a budget hold (computed whether or not one is needed:
        a few integer operations, no I/O; a transcription reads its WAV header)."""
        return estimate(
            request.task,
            plan.body,
            request.binary,
            plan.shape.input_tokens,
            plan.shape.max_tokens,
            self._spending.default_max_tokens,
            self._max_audio_seconds,
        )

    async def CompleteStream(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.StreamEvent]:
        _describe(request.meta)
        async with contextlib.aclosing(self._stream(request, context)) as events:
            async for event in events:
                yield event

    async def _stream(
        self, request: router_pb2.ModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[router_pb2.StreamEvent, None]:
        self._spending.check_model(request.meta.grant, request.model)
        plan = self._plan(request)
        worst = self._estimate(request, plan)
        strip_usage = _ask_for_usage(plan.body)
        attempts = self._attempts(plan, context)
        failure: UpstreamError | None = None
        previous = ""
        async for instance, timeout_s in attempts:
            self._decided(plan, instance, previous)
            previous = instance.id
            plan.body["model"] = instance.upstream_model
            # A refused hold is the client's 429, outside the retry handling below.
            charge = await self._hold(request.meta, instance, worst)
            started = time.perf_counter()
            first_at: float | None = None
            native = self._native(request, instance)
            counter = _StreamCounter(strip_usage) if native is None else _NativeStreamCounter(native[0].stream_meter())
            try:
                try:
                    with self._attempt(request.task, instance, request.meta) as observation:
                        if native is not None:
                            chunks = native[0].stream_native(
                                instance, native[1], inject_headers(), request.meta.request_id, timeout_s
                            )
                        else:
                            chunks = self._connectors[instance.connector].stream(
                                instance, plan.body, inject_headers(), request.meta.request_id, timeout_s
                            )
                        async for payload in chunks:
                            if first_at is None:
                                first_at = time.perf_counter()
                                self._metrics.time_to_first_token.labels(instance.name, instance.id).observe(
                                    first_at - started
                                )
                                yield router_pb2.StreamEvent(
                                    instance=instance.id,
                                    strategy=plan.strategy,
                                    spend=charge.announced(),
                                    dialect=native[1].dialect if native is not None else "",
                                )
                            relayed = counter.restamp(payload, instance)
                            if relayed is not None:
                                yield router_pb2.StreamEvent(chunk_json=relayed)
                except UpstreamError as err:
                    if counter.produced:
                        await self._settle_stream(charge, instance, counter, worst)  # billed partial
                    else:
                        await self._spending.release(charge)
                    failure = err
                    # The connector clears `retryable` once a chunk went out: never retried then.
                    if attempts.should_retry(err):
                        continue
                    raise
                elapsed = time.perf_counter() - started
                ttft = (first_at - started) if first_at is not None else None
                self._stats.get(instance.id).record_success(elapsed, counter.output_tokens(), ttft)
                observation.ttft_s = ttft
                self._account(request.meta, request.task, instance, counter.usage, observation)
                spend = await self._settle_stream(charge, instance, counter, worst)
                yield router_pb2.StreamEvent(settled=spend)
                return
            finally:
                # Cut by the client (aclose, cancellation) or a failure not handled above:
                # bill what was relayed. Awaiting here is allowed (no yield), and settle
                # shields its work from a second cancellation.
                if not charge.settled:
                    await self._settle_stream(charge, instance, counter, worst)
        raise failure or GatewayError.unavailable(
            explain_choice(plan.ranked, None, plan.weights), code="no_available_instance"
        )

    async def _settle_stream(
        self, charge: Charge, instance: Instance, counter: _StreamCounter, worst: Estimate
    ) -> router_pb2.Spend:
        """A stream's cost: from its usage chunk when it sent one, else from what was
        relayed (output tokens counted, input estimated)."""
        prompt, completion = _usage_tokens(counter.usage)
        if counter.usage is None or not (prompt or completion):
            prompt, completion = worst.input_tokens, counter.output_tokens()
        return await self._spending.settle(charge, prompt, completion, instance.expected_cost(prompt, completion))

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: router_pb2.RouterListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterListModelsResponse:
        registry = self.snapshot.registry
        created = {i.name: i.created for i in registry.instances()}
        models = [
            router_pb2.ModelInfo(id=name, task=task, owned_by="clawdbot", created=created[name])
            for name, task in registry.model_names()
        ]
        return router_pb2.RouterListModelsResponse(models=models)

    async def Feedback(  # noqa: N802 - gRPC method name
        self, request: router_pb2.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.FeedbackResponse:
        if not request.request_id:
            raise GatewayError.bad_request("Missing required parameter: 'request_id'.", "request_id")
        if not math.isfinite(request.score):
            raise GatewayError.bad_request("'score' must be a number between 0 and 1.", "score")
        # The key id in meta is the adapter's, from the caller's authentication.
        instance_id, task = self._quality.rate(request.request_id, request.score, request.meta.api_key_id)
        instance = next((i for i in self.snapshot.registry.instances() if i.id == instance_id), None)
        prior = instance.quality_for(task) if instance else None
        quality = self._quality.estimate(instance_id, task, prior)
        log.info("feedback", extra={"instance": instance_id, "task": task, "score": request.score, "quality": quality})
        return router_pb2.FeedbackResponse(instance=instance_id, task=task, quality=quality)

    async def Reload(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ReloadRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ReloadResponse:
        if self.reloader is None:
            raise GatewayError(501, "Reload is not configured.", "server_error", "not_supported")
        result = await self.reloader.reload(f"requested by {request.meta.api_key_id or 'an operator'}")
        return router_pb2.ReloadResponse(
            version=result.version,
            added=result.added,
            removed=result.removed,
            kept=result.kept,
            unhealthy=result.unhealthy,
            took_ms=result.took_ms,
            source=str(self.reloader.source),
        )

    async def Probe(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ProbeReply:
        """One minimal request straight to the instance: no routing, breaker or telemetry
        (the health service counts its probes apart from the traffic)."""
        instance = next((i for i in self.snapshot.registry.instances() if i.id == request.instance_id), None)
        if instance is None:
            return router_pb2.ProbeReply(ok=False, error=f"unknown instance {request.instance_id!r}")
        body, audio = probe_request(instance.task)
        started = time.perf_counter()
        try:
            await self._connectors[instance.connector].call(
                instance,
                instance.task,
                {**body, "model": instance.upstream_model},
                inject_headers(),
                f"probe-{uuid.uuid4().hex}",
                request.timeout_s or instance.timeout_s,
                audio,
            )
        except UpstreamError as err:
            elapsed = time.perf_counter() - started
            return router_pb2.ProbeReply(ok=False, latency_s=elapsed, error=f"{err.kind}: {err.message}")
        return router_pb2.ProbeReply(ok=True, latency_s=time.perf_counter() - started)

    async def Instances(  # noqa: N802 - gRPC method name
        self, request: router_pb2.RouterInstancesRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterInstancesReply:
        listed = []
        for instance in self.snapshot.registry.instances():
            stats = self._stats.get(instance.id)
            verdict = self.health.verdicts.get(instance.id)
            listed.append(
                {
                    "id": instance.id,
                    "model": instance.name,
                    "tasks": list(instance.tasks),
                    "connector": instance.connector,
                    "breaker": self._breakers[instance.id].status(),
                    "in_flight": stats.in_flight,
                    "latency_s": stats.latency_s,
                    "ttft_s": stats.ttft_s,
                    "quality": {
                        t: self._quality.estimate(instance.id, t, instance.quality_for(t)) for t in instance.tasks
                    },
                    "health": {
                        "watching": self.health.connected,
                        "status": verdict.status if verdict else "available",
                        "penalty": verdict.penalty if verdict else 0.0,
                        "reason": verdict.reason if verdict else "",
                    },
                }
            )
        return router_pb2.RouterInstancesReply(json=orjson.dumps({"object": "list", "data": listed}))

    async def Explain(  # noqa: N802 - gRPC method name
        self, request: router_pb2.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.Explanation:
        snapshot = self.snapshot
        task = request.task or "chat"
        if not request.model:
            raise GatewayError.bad_request("Missing required parameter: 'model'.", "model")
        shape = RequestShape(task, request.input_tokens or 256, request.max_tokens or None)
        meta = request.meta
        features = _features(meta, task, request.model, request.modality or "text", shape.input_tokens)
        routing = apply_rules(snapshot.routing.rules, features, self._candidates(snapshot, request.model, task))
        strategy, weights = self._strategy(snapshot, request.strategy or meta.strategy, routing)
        ranked = snapshot.scorer.score(routing.candidates, shape, weights)
        chosen = next((c for c in ranked if c.eligible), None)
        return router_pb2.Explanation(
            model=request.model,
            task=task,
            strategy=strategy,
            weights=router_pb2.ScoreTerms(latency=weights.latency, accuracy=weights.accuracy, cost=weights.cost),
            candidates=[
                router_pb2.CandidateScore(
                    instance=c.instance.id,
                    eligible=c.eligible,
                    reason=c.reason,
                    expected_latency_s=c.latency_s,
                    expected_cost_usd=c.cost_usd,
                    quality=c.quality,
                    cold=c.cold,
                    breaker=c.breaker,
                    in_flight=c.in_flight,
                    terms=router_pb2.ScoreTerms(latency=c.terms.latency, accuracy=c.terms.accuracy, cost=c.terms.cost),
                    score=c.score,
                    rank=rank,
                    latency_source=c.latency_source,
                    qps=c.qps,
                )
                for rank, c in enumerate(ranked, start=1)
            ],
            chosen=chosen.instance.id if chosen else "",
            why=explain_choice(ranked, chosen, weights),
            rules=routing.applied,
        )


def _ask_for_usage(body: dict[str, Any]) -> bool:
    """Ask the upstream for a chat stream's usage chunk, whatever the client asked: the
    stream's cost is settled from it. True when the client did not ask (the router then
    keeps the usage to itself, see _StreamCounter)."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return False  # not ours to fix; the upstream answers it
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    body["stream_options"] = {**(options or {}), "include_usage": True}
    return True


class _StreamCounter:
    """Per stream: restamps the model name on chunks and keeps the usage chunk (which
    it withholds from the client when only the router asked for it)."""

    def __init__(self, strip_usage: bool = False) -> None:
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self._strip_usage = strip_usage

    def restamp(self, payload: bytes, instance: Instance) -> bytes | None:
        """The chunk to relay, or None for a usage chunk the client did not ask for."""
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload  # not ours to judge; pass the upstream's bytes on untouched
        if not isinstance(chunk, dict):
            return payload
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        if self._strip_usage and "usage" in chunk:
            # As the client asked: no usage chunk, no "usage": null on each chunk.
            if isinstance(usage, dict) and not chunk.get("choices"):
                return None
            del chunk["usage"]
        if chunk.get("choices"):
            self.chunks += 1
        if "model" in chunk:
            chunk["model"] = instance.name
        return orjson.dumps(chunk)

    def output_tokens(self) -> int:
        # Without a usage chunk, content chunks approximate output tokens.
        return _usage_tokens(self.usage)[1] or self.chunks

    @property
    def produced(self) -> bool:
        """Whether anything billable was relayed (content, or usage saying so)."""
        return self.chunks > 0 or any(_usage_tokens(self.usage))


class _NativeStreamCounter(_StreamCounter):
    """For native events: relays them untouched, reading usage off them (the meter
    knows the dialect's events)."""

    def __init__(self, meter: StreamMeter) -> None:
        super().__init__()
        self._meter = meter

    def restamp(self, payload: bytes, instance: Instance) -> bytes | None:
        self._meter.observe(payload)
        self.usage, self.chunks = self._meter.usage, self._meter.chunks
        return payload


def create_server(config: Config, config_source: Path | None = None) -> ServiceHost:
    """config_source: the file reloads read (default: the one CLAWDBOT_SOURCE_CONFIG or
    CLAWDBOT_CONFIG names); it is watched for changes."""
    metrics = Metrics("router")
    host = ServiceHost("router", config.router, metrics, reflection_services=("clawdbot.v1.Router",))
    openai, worker = OpenAIConnector(config.router.max_connections), WorkerConnector()
    anthropic = AnthropicConnector(config.router.max_connections)
    # Budgets and the spend ledger: the key store opened (and migrated) by the background
    # job at start, the ledger flushed by it and, at shutdown, by close().
    spend = RouterSpending(config)
    servicer = RouterServicer(
        config, {"openai": openai, "worker": worker, "anthropic": anthropic}, metrics, spend.spending
    )
    source = config_source or Path(os.environ.get(SOURCE_CONFIG_ENV) or config_path())
    servicer.reloader = Reloader(source, servicer)
    router_pb2_grpc.add_RouterServicer_to_server(servicer, host.grpc_server)
    host.add_service_name("clawdbot.v1.Router")
    host.in_background(servicer.reloader.watch)
    if config.health.enabled:
        health_channel = mesh_channel(config.health)
        health = monitor_pb2_grpc.HealthMonitorStub(health_channel)
        watcher = f"router@{socket.gethostname()}:{os.getpid()}"
        host.in_background(lambda: servicer.health.watch(health, watcher))
        host.on_shutdown(lambda: health_channel.close(grace=None))
    if config.jobs.over_kafka:
        servicer.telemetry = TelemetryPublisher(KafkaEndpoint.from_config(config), metrics)
        host.in_background(servicer.telemetry.run)
    elif config.health.enabled:
        servicer.telemetry = ReportingPublisher(health, metrics)
        host.in_background(servicer.telemetry.run)
    if servicer.fleet is not None:
        host.in_background(servicer.fleet.run)
    host.in_background(spend.run, stop=spend.ledger.stop)
    # Cleanups run once the gRPC server has stopped: every call has settled by then, and
    # close() flushes the ledger before its store and Redis close.
    host.on_shutdown(spend.close)
    host.on_shutdown(servicer.reloader.close)
    host.on_shutdown(openai.close)
    host.on_shutdown(worker.close)
    host.on_shutdown(anthropic.close)
    return host
