"""The protocol plugin contract.

A protocol is a module exposing `create_protocol() -> ProtocolPlugin`. Its install()
gets a ProtocolContext and wires itself in: a group of Gateway gRPC methods (registered
in ctx.rpcs as their implementation; adapter/servicer.py defines each method, typed, and
delegates to it), HTTP routes (added to the adapter's aiohttp app), shutdown hooks.
Adding a protocol is a new module plus a line of config (`adapter.protocol_modules:
{name: module}` and the name in `adapter.types` / ADAPTER_TYPES).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import orjson
from google.protobuf import json_format
from google.protobuf.message import Message

from clawdbot.adapter.gateway import Gateway
from clawdbot.adapter.limits import budget_headers, rate_headers
from clawdbot.adapter.servicer import GatewayRpcs
from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError
from clawdbot.common.service import ServiceHost
from clawdbot.gen.v1 import gateway_pb2, router_pb2

BUILTIN_PROTOCOLS: Mapping[str, str] = {
    "rest": "clawdbot.adapter.protocols.rest",
    "grpc": "clawdbot.adapter.protocols.grpc_typed",
    "ws": "clawdbot.adapter.protocols.websocket",
}


@dataclass(frozen=True)
class ProtocolContext:
    config: Config
    gateway: Gateway
    host: ServiceHost
    # Filled by the plugins; then rpcs.servicer() is what the gRPC server registers.
    rpcs: GatewayRpcs = field(default_factory=GatewayRpcs)


class ProtocolPlugin(Protocol):
    name: str

    def install(self, ctx: ProtocolContext) -> None: ...


def load_protocols(config: Config) -> list[ProtocolPlugin]:
    modules = {**BUILTIN_PROTOCOLS, **config.adapter.protocol_modules}
    plugins: list[ProtocolPlugin] = []
    for name in config.adapter.types:
        module = importlib.import_module(modules[name])
        plugin: ProtocolPlugin = module.create_protocol()
        plugins.append(plugin)
    return plugins


def message_json(message: Message) -> bytes:
    """A typed reply as JSON with OpenAI-style snake_case names and every field present."""
    return orjson.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )


def explain_request(
    request: gateway_pb2.ExplainRoutingRequest, meta: router_pb2.RequestMeta
) -> router_pb2.ExplainRequest:
    return router_pb2.ExplainRequest(
        meta=meta,
        model=request.model,
        task=request.task,
        strategy=request.strategy,
        input_tokens=request.input_tokens,
        max_tokens=request.max_tokens,
        modality=request.modality,
    )


def routing_headers(served: router_pb2.ModelResponse | router_pb2.StreamEvent) -> list[tuple[str, str]]:
    """Response headers that explain and account for a routed call: who served it, chosen
    how, at what cost (not known at the start of a stream), whether the cache did; the
    key's budget left (a stream's: after its hold, from the announcement) and the request's
    x-ratelimit-* headers (as of its admission), when the key has a budget or limits."""
    headers = [("x-clawdbot-model-instance", served.instance), ("x-clawdbot-strategy", served.strategy)]
    if isinstance(served, router_pb2.ModelResponse):
        headers.append(("x-clawdbot-cost-usd", f"{served.cost_usd:.8f}"))
    if served.cache:
        headers.append(("x-clawdbot-cache", served.cache))
    headers += budget_headers(served.spend)
    headers += rate_headers()
    return headers


async def send_headers(context: grpc.aio.ServicerContext, headers: Sequence[tuple[str, str]]) -> None:
    """Response headers (initial metadata), when there are any: without, gRPC sends its
    own with the first message."""
    if headers:
        await context.send_initial_metadata(headers)


# An answer's HTTP status, for REST routes (HttpBody carries none): Envoy's Lua filter
# moves it into :status.
STATUS_HEADER = "x-clawdbot-status"


def error_headers(status: int, err: GatewayError) -> list[tuple[str, str]]:
    """The headers of an error answer on a REST route, whatever its body's dialect: its
    status, Retry-After, and the x-ratelimit-* of the rate limiter's refusal, or else of
    the request's admission."""
    headers = [(STATUS_HEADER, str(status))]
    if err.retry_after:
        headers.append(("retry-after", err.retry_after))
    headers.extend(err.headers or rate_headers())
    return headers


def metadata_dict(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Invocation metadata as a dict of text values (what Envoy forwarded as headers)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
