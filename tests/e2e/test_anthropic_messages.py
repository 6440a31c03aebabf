"""Anthropic's Messages API through Envoy, with the official `anthropic` SDK as the client,
answered by an OpenAI-compatible upstream (the mock) through the Chat translation:
create (plain, system, tools with a tool_result round trip, an image), stream (text and
tool use: the SDK's accumulated message equals the non-streamed one), count_tokens, the
errors in Anthropic's shape and statuses, the raw SSE bytes, x-api-key on every route,
`?beta=true`, and the typed gRPC twins."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import anthropic
import grpc
import httpx
import orjson
import pytest
from google.protobuf import json_format, struct_pb2

from clawdbot.gen.v1 import gateway_pb2_grpc
from tests.conftest import Mesh, core_mesh_config, running_mesh

pytestmark = pytest.mark.e2e

MODEL = "mock-1"
WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
# A 1x1 PNG.
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


@pytest.fixture(scope="module")
def messages_mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("anthropic")
    with running_mesh(tmp, core_mesh_config(mock_upstream, tmp), mock_upstream) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def client(messages_mesh: Mesh) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=messages_mesh.url, api_key=messages_mesh.api_key, max_retries=0, timeout=60)


def blocks(message: anthropic.types.Message) -> list[dict[str, Any]]:
    """The content without tool ids (the mock makes a new one a call)."""
    out = []
    for block in message.content:
        data = block.model_dump(exclude_none=True)
        data.pop("id", None)
        out.append(data)
    return out


def test_create_plain(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi there"}])
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == MODEL
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == f"Hello from {MODEL}: hi there"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_create_with_system(client: anthropic.Anthropic, messages_mesh: Mesh) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=64,
        system=[{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "with a system prompt"}],
        stop_sequences=["END"],
        # This SDK version has no temperature parameter; the API still takes it.
        extra_body={"temperature": 0.3},
    )
    assert message.content[0].text == f"Hello from {MODEL}: with a system prompt"  # type: ignore[union-attr]
    # What the OpenAI-compatible upstream got: the Chat translation.
    seen = httpx.get(messages_mesh.mock_url.removesuffix("/v1") + "/_mock/last", params={"model": MODEL}, timeout=10)
    assert seen.status_code == 200, seen.text
    last = seen.json()
    body = last["body"]
    assert body["messages"][0] == {"role": "system", "content": "Be terse."}
    assert body["stop"] == ["END"] and body["temperature"] == 0.3 and body["max_tokens"] == 64


def test_tools_and_a_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    question: Any = {"role": "user", "content": "What is the weather in Paris? Use get_weather."}
    first = client.messages.create(model=MODEL, max_tokens=128, tools=[WEATHER_TOOL], messages=[question])
    assert first.stop_reason == "tool_use"
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input, dict) and "city" in call.input
    assert call.id
    second = client.messages.create(
        model=MODEL,
        max_tokens=128,
        tools=[WEATHER_TOOL],
        messages=[
            question,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21C"}]},
        ],
    )
    assert second.stop_reason == "end_turn"
    assert second.content and second.content[0].type == "text" and second.content[0].text


def test_create_with_an_image(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
                    {"type": "text", "text": "describe it"},
                ],
            }
        ],
    )
    assert message.content[0].text == f"Hello from {MODEL}: describe it"  # type: ignore[union-attr]


def test_stream_text_equals_the_whole_answer(client: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": "stream me a few words please"}]
    whole = client.messages.create(model=MODEL, max_tokens=64, messages=messages)
    with client.messages.stream(model=MODEL, max_tokens=64, messages=messages) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert blocks(final) == blocks(whole)
    assert final.stop_reason == whole.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stream_tool_use_equals_the_whole_answer(client: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": "Weather in Oslo and Rome? get_weather"}]
    whole = client.messages.create(model=MODEL, max_tokens=128, tools=[WEATHER_TOOL], messages=messages)
    deltas = []
    with client.messages.stream(model=MODEL, max_tokens=128, tools=[WEATHER_TOOL], messages=messages) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                deltas.append(event.delta.partial_json)
        final = stream.get_final_message()
    assert deltas, "no input_json_delta reached the client"
    assert final.stop_reason == whole.stop_reason == "tool_use"
    assert blocks(final) == blocks(whole)


def test_count_tokens(client: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": "How many tokens is this?"}]
    plain = client.messages.count_tokens(model=MODEL, messages=messages)
    fuller = client.messages.count_tokens(
        model=MODEL, messages=messages, system="You are a precise assistant. " * 10, tools=[WEATHER_TOOL]
    )
    assert 0 < plain.input_tokens < fuller.input_tokens


def test_errors_in_anthropic_shape(client: anthropic.Anthropic, messages_mesh: Mesh) -> None:
    missing = httpx.post(
        f"{messages_mesh.url}/v1/messages",
        headers={"x-api-key": messages_mesh.api_key, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )
    assert missing.status_code == 400, missing.text
    assert missing.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    bad_key = anthropic.Anthropic(base_url=messages_mesh.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as unauthorized:
        bad_key.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert unauthorized.value.status_code == 401
    assert unauthorized.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert unknown.value.status_code == 404
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    document: Any = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [document]}])
    assert "messages.0.content.0.type" in refused.value.message


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    frames = raw.decode().split("\n\n")
    assert frames[-1] == "", "the stream does not end with a whole frame"
    events = []
    for frame in frames[:-1]:
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        data = orjson.loads(lines[1][len("data: ") :])
        assert data["type"] == lines[0][len("event: ") :]
        events.append((data["type"], data))
    return events


def test_raw_sse_bytes_with_beta_query_and_bearer(messages_mesh: Mesh) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "stream": True,
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": "Weather in Lima? get_weather"}],
    }
    headers = {
        "authorization": f"Bearer {messages_mesh.api_key}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "fine-grained-tool-streaming-2025-05-14",
    }
    with httpx.stream(
        "POST", f"{messages_mesh.url}/v1/messages?beta=true", headers=headers, json=body, timeout=60
    ) as reply:
        raw = reply.read()
        assert reply.status_code == 200, raw
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers.get("x-clawdbot-model-instance")
    events = parse_sse(raw)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names.count("message_start") == 1
    assert names[-2:] == ["message_delta", "message_stop"] and "ping" in names
    starts = [data["index"] for name, data in events if name == "content_block_start"]
    assert starts == list(range(len(starts))) and starts
    arguments = "".join(
        data["delta"]["partial_json"]
        for name, data in events
        if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"
    )
    assert isinstance(orjson.loads(arguments), dict)
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_x_api_key_on_the_chat_route_too(messages_mesh: Mesh) -> None:
    reply = httpx.post(
        f"{messages_mesh.v1}/chat/completions",
        headers={"x-api-key": messages_mesh.api_key},
        json={"model": MODEL, "messages": [{"role": "user", "content": "x-api-key"}]},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["object"] == "chat.completion"


@pytest.mark.asyncio
async def test_the_typed_grpc_twins(messages_mesh: Mesh) -> None:
    metadata = (("x-api-key", messages_mesh.api_key),)
    request = json_format.ParseDict(
        {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": "typed hello"}]},
        struct_pb2.Struct(),
    )
    async with grpc.aio.insecure_channel(messages_mesh.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        created = json_format.MessageToDict(await stub.CreateMessage(request, metadata=metadata, timeout=60))
        assert created["type"] == "message" and created["content"][0]["text"] == f"Hello from {MODEL}: typed hello"
        events = [
            json_format.MessageToDict(event)
            async for event in stub.StreamMessage(request, metadata=metadata, timeout=60)
        ]
        names = [event["type"] for event in events]
        assert names[0] == "message_start" and names[-1] == "message_stop" and names.count("message_start") == 1
        text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
        assert text == created["content"][0]["text"]
        counted = json_format.MessageToDict(await stub.CountMessageTokens(request, metadata=metadata, timeout=30))
        assert counted["input_tokens"] > 0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateMessage(request, metadata=(("x-api-key", "sk-wrong"),), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cached_answers_stay_in_their_dialect(messages_mesh: Mesh) -> None:
    """A deterministic Messages request is cached like a Chat one, under a key of its own:
    the same prompt from a Chat caller is a miss, and a streaming Messages caller gets the
    cached answer replayed in Anthropic's grammar."""
    prompt = "cache me in my own dialect"
    headers = {"x-api-key": messages_mesh.api_key, "anthropic-version": "2023-06-01"}
    body = {"model": MODEL, "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
    first = httpx.post(f"{messages_mesh.url}/v1/messages", headers=headers, json=body, timeout=30)
    again = httpx.post(f"{messages_mesh.url}/v1/messages", headers=headers, json=body, timeout=30)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.headers["x-clawdbot-cache"] == "miss"
    assert again.headers["x-clawdbot-cache"].startswith("hit")
    assert again.json()["content"] == first.json()["content"]
    with httpx.stream(
        "POST", f"{messages_mesh.url}/v1/messages", headers=headers, json={**body, "stream": True}, timeout=30
    ) as streamed:
        raw = streamed.read()
        assert streamed.headers["x-clawdbot-cache"].startswith("hit"), raw
    events = parse_sse(raw)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    text = "".join(data["delta"].get("text", "") for name, data in events if name == "content_block_delta")
    assert text == first.json()["content"][0]["text"]
    chat = httpx.post(
        f"{messages_mesh.v1}/chat/completions",
        headers={"authorization": f"Bearer {messages_mesh.api_key}"},
        json={"model": MODEL, "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": prompt}]},
        timeout=30,
    )
    assert chat.status_code == 200, chat.text
    assert chat.headers["x-clawdbot-cache"] == "miss"


# --- the native path: a model served by the Anthropic connector (the mock's Messages API) ---

NATIVE_MODEL = "claude-mock"
# The gateway's own key for the Anthropic upstream (the mock wants one, any one).
UPSTREAM_KEY_ENV = "CLAWDBOT_TEST_ANTHROPIC_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def native_client(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[anthropic.Anthropic]:
    tmp = tmp_path_factory.mktemp("anthropic-native")
    models = [
        {"name": MODEL, "task": "chat", "base_url": mock_upstream},
        {
            "name": NATIVE_MODEL,
            "connector": "anthropic",
            "base_url": mock_upstream,
            "upstream_model": MODEL,
            "api_key_env": UPSTREAM_KEY_ENV,
        },
    ]
    # The runner (and so the router) inherits the environment.
    os.environ[UPSTREAM_KEY_ENV] = "sk-ant-upstream"
    with running_mesh(tmp, core_mesh_config(mock_upstream, tmp, models=models), mock_upstream) as mesh:
        yield anthropic.Anthropic(base_url=mesh.url, api_key=mesh.api_key, max_retries=0, timeout=60)


def test_native_answers_pass_through(native_client: anthropic.Anthropic, mock_upstream: str) -> None:
    document: Any = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "A short doc."}}
    messages: Any = [{"role": "user", "content": [document, {"type": "text", "text": "sum it up"}]}]
    # A document block is refused for a model a Chat upstream serves, not for a native one.
    whole = native_client.messages.create(model=NATIVE_MODEL, max_tokens=64, messages=messages)
    assert whole.type == "message" and whole.content and whole.content[0].type == "text"
    # The upstream got the caller's own body (the document in it) on its Messages API.
    seen = httpx.get(mock_upstream.removesuffix("/v1") + "/_mock/last", params={"model": MODEL}, timeout=10).json()
    assert seen["path"].endswith("/messages")
    assert seen["body"]["messages"] == messages and seen["body"]["max_tokens"] == 64
    assert seen["headers"]["anthropic-version"] and seen["headers"]["x-api-key"] == "sk-ant-upstream"
    with native_client.messages.stream(model=NATIVE_MODEL, max_tokens=64, messages=messages) as stream:
        final = stream.get_final_message()
    assert blocks(final) == blocks(whole)
    question: Any = [{"role": "user", "content": "Weather in Nice? get_weather"}]
    tool = native_client.messages.create(model=NATIVE_MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=question)
    with native_client.messages.stream(
        model=NATIVE_MODEL, max_tokens=64, tools=[WEATHER_TOOL], messages=question
    ) as stream:
        streamed = stream.get_final_message()
    assert tool.stop_reason == streamed.stop_reason == "tool_use"
    assert blocks(streamed) == blocks(tool)


def test_native_stream_failing_midway_ends_with_an_error_event(native_client: anthropic.Anthropic) -> None:
    body = {
        "model": NATIVE_MODEL,
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "a few words before the failure"}],
        "mock": {"stream_error": "overloaded_error"},  # the mock fails after the first delta
    }
    headers = {"x-api-key": str(native_client.api_key), "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", f"{native_client.base_url}/v1/messages", headers=headers, json=body, timeout=60) as reply:
        raw = reply.read()
        assert reply.status_code == 200, raw
    events = parse_sse(raw)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names.count("message_start") == 1
    assert names[-1] == "error" and "message_stop" not in names
    assert events[-1][1]["error"]["type"] == "overloaded_error"
