"""Router and adapter servers on port 0 against the mock provider, in one event loop."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import pytest_asyncio
from google.api import httpbody_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clawdbot.adapter.server import create_server as create_adapter
from clawdbot.common.config import Config
from clawdbot.common.errors import GatewayError
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.devtools.mock_upstream import start_mock
from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc, router_pb2, router_pb2_grpc
from clawdbot.router.server import create_server as create_router
from tests.support import INTERNAL_METADATA

KEY = "test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    router: ServiceHost
    adapter: ServiceHost
    router_channel: grpc.aio.Channel
    adapter_channel: grpc.aio.Channel
    mock_url: str

    @property
    def router_stub(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.router_channel)

    @property
    def gateway(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.adapter_channel)


@pytest_asyncio.fixture
async def stack() -> AsyncIterator[Stack]:
    mock_runner, mock_port = await start_mock(models=["mock-1"])
    mock_url = f"http://127.0.0.1:{mock_port}/v1"
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    config = Config.model_validate(
        {
            "adapter": {"grpc_port": 0, "http_port": 0, "shutdown_grace_s": 10},
            "router": {"grpc_port": 0, "http_port": 0, "shutdown_grace_s": 10},
            "models": [
                {"name": "mock-1", "base_url": mock_url},
                {"name": "embed", "task": "embeddings", "base_url": mock_url},
                {"name": "ha", "instance": "ha-dead", "base_url": dead, "upstream_model": "mock-1"},
                {"name": "ha", "instance": "ha-live", "base_url": mock_url, "upstream_model": "mock-1"},
                {"name": "dead", "base_url": dead},
                {"name": "impatient", "base_url": mock_url, "timeout_s": 0.5},
            ],
        }
    )
    router = create_router(config)
    await router.start()
    config = config.model_copy(update={"router": config.router.model_copy(update={"grpc_port": router.grpc_port})})
    adapter = create_adapter(config, api_keys=[KEY])
    await adapter.start()
    router_channel = internal_channel(f"127.0.0.1:{router.grpc_port}")
    # Calls to the adapter carry the internal credential, as Envoy's do.
    adapter_channel = internal_channel(f"127.0.0.1:{adapter.grpc_port}")
    yield Stack(router, adapter, router_channel, adapter_channel, mock_url)
    await adapter_channel.close()
    await router_channel.close()
    await adapter.stop(grace=1, drain_notice=0)
    await router.stop(grace=1, drain_notice=0)
    await mock_runner.cleanup()


def model_request(model: str, stream: bool = False, **extra: Any) -> router_pb2.ModelRequest:
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "stream": stream, **extra}
    return router_pb2.ModelRequest(
        meta=router_pb2.RequestMeta(request_id="r1"),
        task="chat",
        model=model,
        stream=stream,
        openai_json=orjson.dumps(body),
    )


def error_of(err: grpc.aio.AioRpcError) -> GatewayError:
    return GatewayError.from_rpc_error(err, "test")


# --- router ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_router_completes_and_names_the_instance(stack: Stack) -> None:
    reply = await stack.router_stub.Complete(model_request("mock-1"))
    data = orjson.loads(reply.openai_json)
    assert reply.instance == "mock-1"
    assert data["model"] == "mock-1"
    assert data["choices"][0]["message"]["content"] == "Hello from mock-1: ping"


@pytest.mark.asyncio
async def test_router_streams_instance_first_then_chunks(stack: Stack) -> None:
    events = [e async for e in stack.router_stub.CompleteStream(model_request("mock-1", True))]
    assert events[0].instance == "mock-1"
    chunks = [orjson.loads(e.chunk_json) for e in events[1:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello from mock-1: ping"
    assert events[-1].HasField("settled")  # last: what the stream used (never relayed)


@pytest.mark.asyncio
async def test_router_falls_back_within_a_group(stack: Stack) -> None:
    reply = await stack.router_stub.Complete(model_request("ha"))
    assert reply.instance == "ha-live"
    events = [e async for e in stack.router_stub.CompleteStream(model_request("ha", True))]
    assert events[0].instance == "ha-live"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("model", "extra", "status", "code"),
    [
        ("nope", {}, 404, "model_not_found"),
        ("embed", {}, 400, "model_not_supported"),
        ("dead", {}, 502, "upstream_unreachable"),
        ("mock-1", {"mock": {"status": 429, "retry_after": 7}}, 429, "rate_limit_exceeded"),
        ("mock-1", {"mock": {"status": 500}}, 502, "upstream_error"),
        ("mock-1", {"mock": {"status": 400}}, 400, "invalid_request"),
        ("impatient", {"mock": {"delay_ms": 3000}}, 504, "upstream_timeout"),
    ],
)
async def test_router_errors(stack: Stack, model: str, extra: dict[str, Any], status: int, code: str) -> None:
    for stream in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if stream:
                [e async for e in stack.router_stub.CompleteStream(model_request(model, True, **extra))]
            else:
                await stack.router_stub.Complete(model_request(model, **extra))
        err = error_of(info.value)
        assert (err.status, err.code) == (status, code), err
        if status == 429:
            assert err.retry_after == "7"


# --- adapter, typed gRPC --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_typed_grpc_chat_stream_embeddings_models(stack: Stack) -> None:
    request = gateway_pb2.ChatCompletionRequest(
        model="mock-1", messages=[gateway_pb2.ChatMessage(role="user", content="hey")], max_tokens=5
    )
    reply = await stack.gateway.CreateChatCompletion(request, metadata=AUTH)
    assert reply.choices[0].message.content == "Hello from mock-1: hey"
    assert reply.usage.total_tokens > 0
    chunks = [c async for c in stack.gateway.StreamChatCompletion(request, metadata=AUTH)]
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "Hello from mock-1: hey"
    emb = await stack.gateway.CreateEmbeddings(
        gateway_pb2.EmbeddingsRequest(model="embed", input=["a", "b"]), metadata=AUTH
    )
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    models = await stack.gateway.ListModels(gateway_pb2.ListModelsRequest(), metadata=AUTH)
    assert "mock-1" in [m.id for m in models.data]


@pytest.mark.asyncio
async def test_typed_grpc_errors(stack: Stack) -> None:
    request = gateway_pb2.ChatCompletionRequest(model="nope", messages=[gateway_pb2.ChatMessage(role="user")])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.CreateChatCompletion(request)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.CreateChatCompletion(request, metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_of(info.value).code == "model_not_found"


# --- adapter, REST as the transcoder delivers it -----------------------------------------------


@pytest.mark.asyncio
async def test_rest_body_passes_through_and_errors_carry_status(stack: Stack) -> None:
    body = httpbody_pb2.HttpBody(
        content_type="application/json",
        data=orjson.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "x"}], "stream": True}),
    )
    call = stack.gateway.ChatCompletionsHttp(body, metadata=AUTH)
    parts = [m.data async for m in call]
    assert dict(await call.initial_metadata()).get("x-clawdbot-model-instance") == "mock-1"
    assert parts[-1] == b"data: [DONE]\n\n"
    assert all(p.startswith(b"data: ") and p.endswith(b"\n\n") for p in parts)

    bad = httpbody_pb2.HttpBody(content_type="application/json", data=b"{oops")
    call = stack.gateway.ChatCompletionsHttp(bad, metadata=AUTH)
    parts = [m.data async for m in call]
    assert dict(await call.initial_metadata())["x-clawdbot-status"] == "400"
    assert orjson.loads(parts[0])["error"]["code"] == "invalid_json"


# --- adapter, WebSocket -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_websocket_text_binary_and_broken_frames(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.adapter.http_port}/v1/ws"
    chat = {"model": "mock-1", "messages": [{"role": "user", "content": "yo"}]}
    # The internal credential, as Envoy adds it: without it the socket is refused (401).
    internal = dict(INTERNAL_METADATA)
    async with aiohttp.ClientSession(headers=internal) as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url)
        assert refused.value.status == 401
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}", **internal}) as session,
        session.ws_connect(url) as ws,
    ):
        await ws.send_str(orjson.dumps({"type": "chat.completions", "id": "t1", "body": chat}).decode())
        frames = await collect(ws, "t1")
        assert frames[-1]["type"] == "done" and frames[-1]["instance"] == "mock-1"
        text = "".join(
            f["data"]["choices"][0]["delta"].get("content", "")
            for f in frames
            if f["type"] == "chat.completion.chunk" and f["data"]["choices"]
        )
        assert text == "Hello from mock-1: yo"

        await ws.send_bytes(gzip.compress(orjson.dumps({"id": "t2", "body": {**chat, "stream": False}})))
        frames = await collect(ws, "t2")
        assert frames[0]["type"] == "chat.completion"

        await ws.send_bytes(b"\xff\xfe not utf8")
        error = (await collect(ws, None))[-1]
        assert error["type"] == "error" and error["status"] == 400
        await ws.send_str(orjson.dumps(chat).decode())  # a bare OpenAI body also works
        assert (await collect(ws, None))[-1]["type"] == "done"


async def collect(ws: aiohttp.ClientWebSocketResponse, frame_id: Any) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = orjson.loads((await asyncio.wait_for(ws.receive(), 30)).data)
        assert frame.get("id") == frame_id, frame
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames


# --- lifecycle --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_health_and_graceful_stop_finishes_a_stream(stack: Stack) -> None:
    for channel in (stack.router_channel, stack.adapter_channel):
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    slow = model_request("mock-1", True, mock={"chunk_delay_ms": 150})
    events_task = asyncio.create_task(collect_events(stack.router_stub, slow))
    await asyncio.sleep(0.3)  # let the stream get going; the assertion below does not depend on it
    await stack.router.stop(grace=10, drain_notice=0.2)
    events = await events_task
    assert events[0].instance == "mock-1"
    assert b"Hello" in b"".join(e.chunk_json for e in events[1:])
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.router_stub.Complete(model_request("mock-1"), timeout=2)


async def collect_events(stub: router_pb2_grpc.RouterStub, request: router_pb2.ModelRequest) -> list[Any]:
    return [e async for e in stub.CompleteStream(request)]


# --- protocol plugins on and off --------------------------------------------------------------


@pytest.mark.asyncio
async def test_adapter_types_turn_protocols_off() -> None:
    config = Config.model_validate(
        {"adapter": {"grpc_port": 0, "http_port": 0, "types": "grpc"}, "router": {"grpc_port": closed_port()}}
    )
    adapter = create_adapter(config, api_keys=[KEY])
    await adapter.start()
    try:
        async with internal_channel(f"127.0.0.1:{adapter.grpc_port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.EmbeddingsHttp(httpbody_pb2.HttpBody(data=b"{}"), metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # gRPC is on: the call gets as far as the (absent) router.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=AUTH, timeout=20)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        async with (
            aiohttp.ClientSession(headers=dict(INTERNAL_METADATA)) as session,
            session.get(f"http://127.0.0.1:{adapter.http_port}/v1/ws") as resp,
        ):
            assert resp.status == 404
    finally:
        await adapter.stop(grace=1, drain_notice=0)
