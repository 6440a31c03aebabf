"""gRPC (grpcurl, generated stubs) and WebSocket clients, through Envoy."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import grpc
import pytest
import websockets

from clawdbot.gen.v1 import gateway_pb2, gateway_pb2_grpc
from tests import support
from tests.conftest import Mesh

pytestmark = pytest.mark.e2e


def grpcurl(mesh: Mesh, *args: str, data: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    return support.grpcurl(mesh.grpc_target, *args, data=data, headers=(f"authorization: Bearer {mesh.api_key}",))


def test_grpcurl_lists_and_describes_the_gateway(mesh: Mesh) -> None:
    listed = grpcurl(mesh, "list")
    assert listed.returncode == 0, listed.stderr
    assert "clawdbot.v1.Gateway" in listed.stdout.split()
    described = grpcurl(mesh, "describe", "clawdbot.v1.Gateway")
    assert "rpc CreateChatCompletion" in described.stdout


def test_grpcurl_calls_a_completion(mesh: Mesh) -> None:
    chat = {"model": "mock-1", "messages": [{"role": "user", "content": "over grpc"}]}
    result = grpcurl(mesh, "clawdbot.v1.Gateway/CreateChatCompletion", data=chat)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["choices"][0]["message"]["content"] == "Hello from mock-1: over grpc"
    streamed = grpcurl(mesh, "clawdbot.v1.Gateway/StreamChatCompletion", data=chat)
    assert streamed.returncode == 0, streamed.stderr
    assert "over" in streamed.stdout and "grpc" in streamed.stdout


def test_grpcurl_errors_carry_grpc_codes(mesh: Mesh) -> None:
    result = grpcurl(
        mesh,
        "clawdbot.v1.Gateway/CreateChatCompletion",
        data={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    )
    assert result.returncode != 0
    assert "NotFound" in result.stderr


@pytest.mark.asyncio
async def test_generated_stub_through_envoy(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.ChatCompletionRequest(
            model="mock-1", messages=[gateway_pb2.ChatMessage(role="user", content="typed")]
        )
        reply = await stub.CreateChatCompletion(
            request, metadata=(("authorization", f"Bearer {mesh.api_key}"),), timeout=60
        )
        assert reply.choices[0].message.content == "Hello from mock-1: typed"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateChatCompletion(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def ws_url(mesh: Mesh) -> str:
    return mesh.url.replace("http://", "ws://") + "/v1/ws"


async def frames_until_done(ws: Any, frame_id: Any) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert frame.get("id") == frame_id, frame
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames


@pytest.mark.asyncio
async def test_websocket_streams_a_chat(mesh: Mesh) -> None:
    headers = {"Authorization": f"Bearer {mesh.api_key}"}
    async with websockets.connect(ws_url(mesh), additional_headers=headers) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "chat.completions",
                    "id": "a",
                    "body": {"model": "mock-1", "messages": [{"role": "user", "content": "ws hi"}]},
                }
            )
        )
        frames = await frames_until_done(ws, "a")
        chunks = [f for f in frames if f["type"] == "chat.completion.chunk"]
        assert len(chunks) > 2
        assert (
            "".join(c["data"]["choices"][0]["delta"].get("content", "") for c in chunks if c["data"]["choices"])
            == "Hello from mock-1: ws hi"
        )
        assert frames[-1]["type"] == "done"

        # A binary frame: the same request as UTF-8 JSON bytes.
        await ws.send(
            json.dumps(
                {
                    "id": "b",
                    "body": {"model": "mock-1", "stream": False, "messages": [{"role": "user", "content": "bin"}]},
                }
            ).encode()
        )
        frames = await frames_until_done(ws, "b")
        assert frames[0]["type"] == "chat.completion"
        assert frames[0]["data"]["choices"][0]["message"]["content"] == "Hello from mock-1: bin"

        # A broken frame gets an error frame; the socket stays usable.
        await ws.send("{broken")
        frames = await frames_until_done(ws, None)
        assert frames[-1]["type"] == "error" and frames[-1]["status"] == 400
        await ws.send(
            json.dumps({"id": "c", "body": {"model": "missing", "messages": [{"role": "user", "content": "x"}]}})
        )
        frames = await frames_until_done(ws, "c")
        assert frames[-1]["status"] == 404 and frames[-1]["error"]["code"] == "model_not_found"


@pytest.mark.asyncio
async def test_websocket_needs_a_key(mesh: Mesh) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(ws_url(mesh)):
            pass
    assert info.value.response.status_code == 401
    async with websockets.connect(ws_url(mesh) + f"?api_key={mesh.api_key}") as ws:
        await ws.send(json.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "q"}]}))
        assert (await frames_until_done(ws, None))[-1]["type"] == "done"
