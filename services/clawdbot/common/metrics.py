"""Prometheus metrics shared by every service, each on its own registry.

Names follow the OpenTelemetry GenAI semantic conventions where one exists
(gen_ai.client.token.usage -> gen_ai_client_token_usage, ...), clawdbot_* otherwise.
A model instance is labelled `model_instance`: Prometheus keeps `instance` for the
scrape target.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


class Metrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "clawdbot_requests",
            "Requests handled, by operation, protocol and HTTP-equivalent status.",
            ["service", "operation", "protocol", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "clawdbot_request_duration_seconds",
            "Time to serve a request (to the last byte for streams).",
            ["service", "operation", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Both kept by the gate around every gRPC handler (common/server_gate.py), for
        # every service alike; no handler counts them itself.
        self.in_flight = Gauge(
            "clawdbot_requests_in_flight",
            "Requests being served right now.",
            ["service"],
            registry=self.registry,
        )
        self.rpc_duration = Histogram(
            "rpc_server_duration_seconds",
            "Time to serve a gRPC call (to its last message for streams), by method and status"
            " (OTel semconv rpc.server.duration).",
            ["service", "rpc_method", "rpc_grpc_status_code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "clawdbot_upstream_errors",
            "Failed calls to a model instance, by kind of failure.",
            ["model_instance", "kind"],
            registry=self.registry,
        )
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of a model call (GenAI semconv gen_ai.client.operation.duration).",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_system", "model_instance"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request to first streamed token (GenAI semconv).",
            ["gen_ai_request_model", "model_instance"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per model call, by input/output (GenAI semconv gen_ai.client.token.usage).",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type", "model_instance"],
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )

        self.cost = Counter(
            "clawdbot_cost_usd",
            "Money spent on model calls, from reported usage and configured prices.",
            ["api_key_id", "model", "model_instance"],
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "clawdbot_circuit_breaker_open",
            "1 while an instance's circuit breaker is open or half-open.",
            ["model_instance"],
            registry=self.registry,
        )
        self.routing_decisions = Counter(
            "clawdbot_routing_decisions",
            "Instances the router sent an attempt to, by strategy and why that one: first_choice"
            " (the top-ranked), fallback (another after a failure or an open breaker), retry (the same again).",
            ["strategy", "model_instance", "reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def handle(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
