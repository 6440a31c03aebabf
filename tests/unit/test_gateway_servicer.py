"""The adapter's public servicer (adapter/servicer.py): every Gateway RPC is a real,
typed method whose types are the proto's, a protocol that is off leaves its RPCs to the
generated base class (UNIMPLEMENTED, never counted or refused for load), and a relayed
stream closes the protocol's own generator when it is closed."""

from __future__ import annotations

import collections.abc
import inspect
import socket
import typing
from collections.abc import AsyncGenerator
from typing import Any, cast

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import empty_pb2

from clawdbot.adapter.protocols.grpc_typed import GrpcProtocol
from clawdbot.adapter.protocols.rest import RestProtocol
from clawdbot.adapter.server import create_server
from clawdbot.adapter.servicer import GatewayRpcs, GatewayServicer, RestServicer, TypedServicer
from clawdbot.common.config import Config
from clawdbot.common.service import internal_channel
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
BASE = gateway_pb2_grpc.GatewayServicer


def full_name(annotation: Any) -> str:
    return str(annotation.DESCRIPTOR.full_name)


@pytest.mark.parametrize("method", list(GATEWAY.methods), ids=lambda m: m.name)
def test_every_rpc_is_defined_with_the_protos_types(method: Any) -> None:
    # The REST group is the *Http methods; the typed group is the rest of the service.
    group = RestServicer if method.name.endswith("Http") else TypedServicer
    defined = group.__dict__.get(method.name)
    assert defined is not None, f"{group.__name__} does not define {method.name}"
    assert getattr(GatewayServicer, method.name) is defined
    hints = typing.get_type_hints(defined)
    assert list(hints) == ["request", "context", "return"]
    assert full_name(hints["request"]) == method.input_type.full_name
    assert hints["context"] is grpc.aio.ServicerContext
    assert not method.client_streaming  # no such method yet: this test would need a case for it
    if method.server_streaming:
        assert inspect.isasyncgenfunction(defined)
        assert typing.get_origin(hints["return"]) is collections.abc.AsyncIterator
        (item,) = typing.get_args(hints["return"])
        assert full_name(item) == method.output_type.full_name
    else:
        assert inspect.iscoroutinefunction(defined)
        assert full_name(hints["return"]) == method.output_type.full_name


def test_the_servicer_defines_nothing_the_service_does_not_have() -> None:
    rpcs = {m.name for m in GATEWAY.methods}
    for group in (RestServicer, TypedServicer):
        public = {name for name in vars(group) if not name.startswith("_")}
        assert public <= rpcs, public - rpcs


@pytest.mark.parametrize(
    ("rest", "typed", "expected"),
    [
        (True, True, GatewayServicer),
        (True, False, RestServicer),
        (False, True, TypedServicer),
        (False, False, BASE),
    ],
)
def test_a_group_nobody_serves_keeps_the_generated_unimplemented_method(
    rest: bool, typed: bool, expected: type[gateway_pb2_grpc.GatewayServicer]
) -> None:
    rpcs = GatewayRpcs()
    if rest:
        rpcs.serve_rest(RestProtocol())
    if typed:
        rpcs.serve_typed(GrpcProtocol())
    servicer = rpcs.servicer()
    assert type(servicer) is expected
    for method in GATEWAY.methods:
        served = rest if method.name.endswith("Http") else typed
        behaviour = getattr(type(servicer), method.name)
        # The generated method itself: synchronous, so the server gate neither counts it
        # nor refuses it for load (common/server_gate.py _gated_sync).
        assert (behaviour is getattr(BASE, method.name)) is not served, method.name


def test_one_group_cannot_be_served_twice() -> None:
    rpcs = GatewayRpcs()
    rpcs.serve_rest(RestProtocol())
    with pytest.raises(ValueError, match="REST"):
        rpcs.serve_rest(RestProtocol())
    rpcs.serve_typed(GrpcProtocol())
    with pytest.raises(ValueError, match="typed"):
        rpcs.serve_typed(GrpcProtocol())


class _Streams:
    """Stands in for GrpcProtocol: one stream that notes when its generator is closed."""

    def __init__(self) -> None:
        self.closed = False

    async def stream_workflow(self, request: Any, context: Any) -> AsyncGenerator[str, None]:
        try:
            for i in range(10):
                yield f"event {i}"
        finally:
            self.closed = True


@pytest.mark.asyncio
async def test_closing_a_relayed_stream_closes_the_protocols_generator_at_once() -> None:
    protocol = _Streams()
    servicer = TypedServicer(cast(GrpcProtocol, protocol))
    stream = cast(AsyncGenerator[Any, None], servicer.StreamWorkflow(gateway_pb2.WorkflowRunRequest(), cast(Any, None)))
    assert await anext(stream) == "event 0"
    # What the server gate does when the client goes away.
    await stream.aclose()
    assert protocol.closed


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.asyncio
async def test_an_rpc_of_a_protocol_that_is_off_is_unimplemented_even_at_the_in_flight_limit() -> None:
    config = Config.model_validate(
        {"adapter": {"grpc_port": 0, "http_port": 0, "types": "grpc"}, "router": {"grpc_port": _closed_port()}}
    )
    host = create_server(config, api_keys=["k"])
    await host.start()
    try:
        # At the limit: a served method is refused, one nobody serves is not counted.
        host.admission.in_flight = host.admission.limit
        async with internal_channel(f"127.0.0.1:{host.grpc_port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            metadata = (("authorization", "Bearer k"),)
            with pytest.raises(grpc.aio.AioRpcError) as off:
                await stub.EmbeddingsHttp(httpbody_pb2.HttpBody(data=b"{}"), metadata=metadata, timeout=20)
            assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.aio.AioRpcError) as off:
                async for _ in stub.ChatCompletionsHttp(
                    httpbody_pb2.HttpBody(data=b"{}"), metadata=metadata, timeout=20
                ):
                    pass
            assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert host.admission.refused == 0
            with pytest.raises(grpc.aio.AioRpcError) as busy:
                await stub.GetHealth(empty_pb2.Empty(), metadata=metadata, timeout=20)
            assert busy.value.code() == grpc.StatusCode.UNAVAILABLE
            assert host.admission.refused == 1
    finally:
        host.admission.in_flight = 0
        await host.stop(grace=1, drain_notice=0)
