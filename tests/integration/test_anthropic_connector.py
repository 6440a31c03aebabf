"""The router's Anthropic connector (connector: anthropic) against the Anthropic mock,
through the router's gRPC API: Chat translated both ways, plain and streamed, with tools;
the Messages pass-through (the caller's body byte for byte but for the model, its beta
header, never its Authorization); errors mapped and 529 retried elsewhere; usage priced."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from clawdbot.common.config import ANTHROPIC_BASE_URL, Config, ModelEntry
from clawdbot.common.errors import GatewayError
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.devtools.mock_upstream import MOCK_KEY, Fault, MockUpstream, start_mock
from clawdbot.gen.v1 import router_pb2, router_pb2_grpc
from clawdbot.router.connectors.anthropic import AnthropicStreamMeter, map_status
from clawdbot.router.connectors.native import NotAnObject, passed_body, replace_model
from clawdbot.router.registry import Registry
from clawdbot.router.server import create_server as create_router

UPSTREAM_KEY = "sk-ant-gateway"
KEY_ENV = "TEST_ANTHROPIC_CONNECTOR_KEY"
PRICE = {"input_per_1k": 1.0, "output_per_1k": 2.0}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@dataclass
class Stack:
    router: ServiceHost
    channel: grpc.aio.Channel
    mock: MockUpstream
    overloaded: MockUpstream

    @property
    def stub(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel)


@pytest_asyncio.fixture
async def stack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    # The mock requires the gateway's key: a request without it (or with the caller's) fails.
    runners: list[web.AppRunner] = []
    live_runner, live_port = await start_mock(api_key=UPSTREAM_KEY)
    runners.append(live_runner)
    busy_runner, busy_port = await start_mock(api_key=UPSTREAM_KEY)
    runners.append(busy_runner)
    busy: MockUpstream = busy_runner.app[MOCK_KEY]
    busy.default_fault = Fault(status=529)
    live_url, busy_url = f"http://127.0.0.1:{live_port}/v1", f"http://127.0.0.1:{busy_port}/v1"
    claude = {"connector": "anthropic", "api_key_env": KEY_ENV, "pricing": PRICE}
    config = Config.model_validate(
        {
            "router": {"grpc_port": 0, "http_port": 0, "shutdown_grace_s": 5},
            # The best-scored instance first, always (no exploration, no power of two choices):
            # the fallback tests count on the failing instance being tried first.
            "model_router": {"top_k": 1, "exploration": 0},
            "models": [
                {**claude, "name": "claude", "base_url": live_url, "upstream_model": "claude-up"},
                # The overloaded one is free, so that cost_optimized tries it first.
                {
                    **claude,
                    "name": "claude-ha",
                    "instance": "ha-busy",
                    "base_url": busy_url,
                    "upstream_model": "claude-up",
                    "pricing": {},
                },
                {
                    **claude,
                    "name": "claude-ha",
                    "instance": "ha-live",
                    "base_url": live_url,
                    "upstream_model": "claude-up",
                },
            ],
        }
    )
    router = create_router(config)
    await router.start()
    channel = internal_channel(f"127.0.0.1:{router.grpc_port}")
    try:
        yield Stack(router, channel, live_runner.app[MOCK_KEY], busy)
    finally:
        await channel.close(grace=None)
        await router.stop(grace=1, drain_notice=0)
        for runner in runners:
            await runner.cleanup()


def chat_request(model: str, *, stream: bool = False, strategy: str = "", **extra: Any) -> router_pb2.ModelRequest:
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "stream": stream, **extra}
    return router_pb2.ModelRequest(
        meta=router_pb2.RequestMeta(request_id="r-chat", strategy=strategy),
        task="chat",
        model=model,
        stream=stream,
        openai_json=orjson.dumps(body),
    )


def native_request(
    raw: bytes, headers: dict[str, str], *, stream: bool = False, model: str = "claude"
) -> router_pb2.ModelRequest:
    """As the Messages route sends it: the Chat translation beside the caller's bytes."""
    body = json.loads(raw)
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": body["max_tokens"]}
    return router_pb2.ModelRequest(
        meta=router_pb2.RequestMeta(request_id="r-native"),
        task="chat",
        model=model,
        stream=stream,
        openai_json=orjson.dumps({**chat, "stream": stream}),
        dialect="anthropic",
        native_json=raw,
        native_headers=headers,
    )


def error_of(err: grpc.aio.AioRpcError) -> GatewayError:
    return GatewayError.from_rpc_error(err, "test")


# --- translated: Chat in, Chat out -------------------------------------------------------


@pytest.mark.asyncio
async def test_translated_plain_answer_and_cost(stack: Stack) -> None:
    reply = await stack.stub.Complete(chat_request("claude", max_tokens=64))
    data = orjson.loads(reply.openai_json)
    assert reply.dialect == "" and reply.instance == "claude"
    assert data["object"] == "chat.completion" and data["model"] == "claude"
    assert data["choices"][0]["message"]["content"] == "Hello from claude-up: hi there"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert (data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]) == (2, 5)
    assert reply.cost_usd == pytest.approx((2 * 1.0 + 5 * 2.0) / 1000)
    sent = stack.mock.last_request("claude-up")
    assert sent is not None and sent["path"] == "/v1/messages"
    assert sent["body"]["max_tokens"] == 64
    assert sent["body"]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}]
    assert sent["headers"]["x-api-key"] == UPSTREAM_KEY
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent["headers"]


@pytest.mark.asyncio
async def test_translated_stream_with_usage_settled(stack: Stack) -> None:
    events = [e async for e in stack.stub.CompleteStream(chat_request("claude", stream=True))]
    assert events[0].instance == "claude" and events[0].dialect == ""
    chunks = [orjson.loads(e.chunk_json) for e in events if e.WhichOneof("event") == "chunk_json"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello from claude-up: hi there"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    # The client did not ask for usage: the router kept the usage chunk to itself...
    assert all("usage" not in c for c in chunks)
    settled = events[-1].settled
    # ...and settled on it.
    assert (settled.input_tokens, settled.output_tokens) == (2, 5)
    assert settled.cost_usd == pytest.approx((2 * 1.0 + 5 * 2.0) / 1000)


@pytest.mark.asyncio
async def test_translated_tools_plain_and_streamed(stack: Stack) -> None:
    reply = await stack.stub.Complete(chat_request("claude", tools=[WEATHER]))
    choice = orjson.loads(reply.openai_json)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "hi there"}
    sent = stack.mock.last_request("claude-up")
    assert sent is not None
    assert sent["body"]["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]  # type: ignore[index]

    events = [e async for e in stack.stub.CompleteStream(chat_request("claude", stream=True, tools=[WEATHER]))]
    chunks = [orjson.loads(e.chunk_json) for e in events if e.WhichOneof("event") == "chunk_json"]
    deltas = [d for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert deltas[0]["id"].startswith("toolu_") and deltas[0]["function"]["name"] == "get_weather"
    assert all(d["index"] == 0 for d in deltas)
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"city": "hi there"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"

    # The tool's result goes back as a tool_result block; the answer is text.
    follow = chat_request(
        "claude",
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ],
    )
    answer = orjson.loads((await stack.stub.Complete(follow)).openai_json)
    assert answer["choices"][0]["message"]["content"] == "Hello from claude-up: hi there"
    sent = stack.mock.last_request("claude-up")
    assert sent is not None
    assert sent["body"]["messages"][-1]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": call["id"],
        "content": "sunny",
    }


@pytest.mark.asyncio
async def test_translated_reasoning(stack: Stack) -> None:
    reply = await stack.stub.Complete(chat_request("claude", reasoning_effort="low"))
    message = orjson.loads(reply.openai_json)["choices"][0]["message"]
    assert message["reasoning_content"] == "Thinking about: hi there"
    assert message["content"] == "Hello from claude-up: hi there"
    sent = stack.mock.last_request("claude-up")
    assert sent is not None and sent["body"]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    events = [e async for e in stack.stub.CompleteStream(chat_request("claude", stream=True, reasoning_effort="low"))]
    chunks = [orjson.loads(e.chunk_json) for e in events if e.WhichOneof("event") == "chunk_json"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Thinking about: hi there"
    assert "".join(d.get("content") or "" for d in deltas) == "Hello from claude-up: hi there"


@pytest.mark.asyncio
async def test_translation_refusal_is_a_400_naming_the_field(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Complete(chat_request("claude", logprobs=True))
    err = error_of(caught.value)
    assert err.status == 400 and err.param == "logprobs"


# --- pass-through: Messages in, Messages out ----------------------------------------------

NATIVE = {
    "model": "claude",
    "max_tokens": 64,
    "system": [{"type": "text", "text": "a long system prompt", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there", "citations": None}]}],
    "metadata": {"user_id": "u1"},
    "a_field_nobody_knows": {"nested": [1.50, "\u00e9", {"model": "not-this-one"}]},
}
# Not compact, a float with a trailing zero, a non-ASCII escape: bytes any re-serializer
# would change.
NATIVE_RAW = json.dumps(NATIVE, indent=2).replace("1.5,", "1.50,").encode()
NATIVE_HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31,files-api"}


@pytest.mark.asyncio
async def test_pass_through_is_byte_for_byte_but_the_model(stack: Stack) -> None:
    # The router is handed only what the adapter would pass on; the caller's own
    # Authorization never is, and the connector adds the gateway's key.
    reply = await stack.stub.Complete(native_request(NATIVE_RAW, NATIVE_HEADERS))
    sent = stack.mock.last_request("claude-up")
    assert sent is not None
    assert sent["body_raw"].encode() == replace_model(NATIVE_RAW, "claude-up")
    assert sent["body_raw"].encode() == NATIVE_RAW.replace(b'"model": "claude"', b'"model": "claude-up"', 1)
    assert sent["headers"]["anthropic-beta"] == NATIVE_HEADERS["anthropic-beta"]
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["headers"]["x-api-key"] == UPSTREAM_KEY
    assert "authorization" not in sent["headers"]

    # The answer is the upstream's Message, as it sent it.
    assert reply.dialect == "anthropic"
    message = orjson.loads(reply.openai_json)
    assert message["type"] == "message" and message["id"].startswith("msg_")
    assert message["content"] == [{"type": "text", "text": "Hello from claude-up: hi there"}]
    # cache_control reached the upstream: the prefix was written, and is read next time.
    usage = message["usage"]
    assert (usage["input_tokens"], usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"]) == (2, 4, 0)
    # Priced on every input token (fresh, written and read) and the output.
    assert reply.cost_usd == pytest.approx(((2 + 4) * 1.0 + 5 * 2.0) / 1000)
    assert (reply.spend.input_tokens, reply.spend.output_tokens) == (6, 5)
    again = orjson.loads((await stack.stub.Complete(native_request(NATIVE_RAW, NATIVE_HEADERS))).openai_json)
    assert (again["usage"]["cache_creation_input_tokens"], again["usage"]["cache_read_input_tokens"]) == (0, 4)


@pytest.mark.asyncio
async def test_only_anthropic_headers_are_passed_on(stack: Stack) -> None:
    headers = {**NATIVE_HEADERS, "authorization": "Bearer the-callers-gateway-key", "x-api-key": "callers"}
    await stack.stub.Complete(native_request(NATIVE_RAW, headers))
    sent = stack.mock.last_request("claude-up")
    assert sent is not None
    assert "authorization" not in sent["headers"]
    assert sent["headers"]["x-api-key"] == UPSTREAM_KEY


@pytest.mark.asyncio
async def test_pass_through_stream_relays_native_events_and_settles(stack: Stack) -> None:
    tool = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}
    body = {**NATIVE, "stream": True, "tools": [tool]}
    raw = json.dumps(body).encode()
    events = [e async for e in stack.stub.CompleteStream(native_request(raw, NATIVE_HEADERS, stream=True))]
    assert events[0].instance == "claude" and events[0].dialect == "anthropic"
    chunks = [e.chunk_json for e in events if e.WhichOneof("event") == "chunk_json"]
    data = [orjson.loads(c) for c in chunks]
    types = [d["type"] for d in data]
    assert types[:3] == ["message_start", "content_block_start", "ping"]
    assert types[-2:] == ["message_delta", "message_stop"]
    assert types.count("message_start") == 1
    # Each chunk is the upstream's data, byte for byte (the mock writes compact JSON).
    assert all(c == orjson.dumps(d) for c, d in zip(chunks, data, strict=True))
    deltas = [d["delta"] for d in data if d["type"] == "content_block_delta"]
    assert deltas[0] == {"type": "input_json_delta", "partial_json": ""}
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {}
    assert data[-2]["delta"]["stop_reason"] == "tool_use"
    sent = stack.mock.last_request("claude-up")
    assert sent is not None and sent["body_raw"].encode() == replace_model(raw, "claude-up")
    # Usage: input (fresh + cache write) off message_start, output off message_delta.
    settled = events[-1].settled
    start_usage = data[0]["message"]["usage"]
    assert settled.input_tokens == start_usage["input_tokens"] + start_usage["cache_creation_input_tokens"]
    assert settled.output_tokens == data[-2]["usage"]["output_tokens"]
    assert settled.cost_usd == pytest.approx((settled.input_tokens * 1.0 + settled.output_tokens * 2.0) / 1000)


@pytest.mark.asyncio
async def test_a_chat_caller_is_never_passed_through(stack: Stack) -> None:
    """dialect set but no native body, or a dialect the connector does not speak: the
    Chat translation goes."""
    request = chat_request("claude")
    request.dialect = "responses"
    request.native_json = b'{"model": "claude", "input": "hi"}'
    reply = await stack.stub.Complete(request)
    assert reply.dialect == ""
    assert orjson.loads(reply.openai_json)["object"] == "chat.completion"


# --- errors --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_overloaded_instance_is_retried_elsewhere(stack: Stack) -> None:
    reply = await stack.stub.Complete(chat_request("claude-ha", strategy="cost_optimized"))
    assert reply.instance == "ha-live"
    assert any(r["path"] == "/v1/messages" for r in stack.overloaded.requests())
    stack.overloaded.recorded.clear()
    events = [e async for e in stack.stub.CompleteStream(chat_request("claude-ha", stream=True))]
    assert events[0].instance == "ha-live"


@pytest.mark.asyncio
async def test_overloaded_alone_is_a_503_overloaded(stack: Stack) -> None:
    """With no other instance, the caller gets our 503 `overloaded` (which the Messages
    route answers as Anthropic's 529 overloaded_error)."""
    stack.mock.default_fault = Fault(status=529)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Complete(chat_request("claude"))
    err = error_of(caught.value)
    assert (err.status, err.code) == (503, "overloaded")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"status": 429, "retry_after": 1}, 429, "rate_limit_exceeded"),
        ({"status": 400}, 400, "invalid_request_error"),
        ({"status": 404}, 404, "model_not_found"),
        ({"status": 500}, 502, "upstream_error"),
        ({"status": 401}, 502, "upstream_auth_failed"),
    ],
)
async def test_http_errors_mapped(stack: Stack, fault: dict[str, Any], status: int, code: str) -> None:
    stack.mock.default_fault = Fault.parse(fault)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Complete(native_request(NATIVE_RAW, NATIVE_HEADERS))
    err = error_of(caught.value)
    assert (err.status, err.code) == (status, code)
    if status == 429:
        assert err.retry_after == "1"
    if status == 400:
        assert err.message == "Bad request (mock)."  # the upstream's own words


@pytest.mark.asyncio
async def test_error_event_midstream_ends_the_stream_with_the_error(stack: Stack) -> None:
    stack.mock.default_fault = Fault(stream_error="overloaded_error")
    raw = json.dumps({**NATIVE, "stream": True}).encode()
    events: list[router_pb2.StreamEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in stack.stub.CompleteStream(native_request(raw, NATIVE_HEADERS, stream=True)):
            events.append(event)
    assert error_of(caught.value).code == "overloaded"
    types = [orjson.loads(e.chunk_json)["type"] for e in events if e.WhichOneof("event") == "chunk_json"]
    assert types[0] == "message_start" and "error" not in types and "message_stop" not in types


def test_config_defaults_and_limits() -> None:
    entry = ModelEntry.model_validate({"name": "c", "connector": "anthropic", "api_key_env": "K"})
    assert entry.base_url == ANTHROPIC_BASE_URL
    with pytest.raises(ValueError, match="chat only"):
        ModelEntry.model_validate({"name": "c", "connector": "anthropic", "task": "embeddings"})
    with pytest.raises(ValueError):
        ModelEntry.model_validate({"name": "c"})  # other connectors still need a base_url


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"a","x":1}', b'{"model":"b","x":1}'),
        (b' {\n "x" : {"model": "a"},\n "model" : "a" }', b' {\n "x" : {"model": "a"},\n "model" : "b" }'),
        (b'{"x":"\\"model\\": 1","model":null}', b'{"x":"\\"model\\": 1","model":"b"}'),
        (b'{"x":[1,{"y":"]"}]}', b'{"model":"b","x":[1,{"y":"]"}]}'),
        (b"{}", b'{"model":"b"}'),
        (b'{"mod\\u0065l":"a"}', b'{"mod\\u0065l":"b"}'),
    ],
)
def test_replace_model_touches_nothing_else(body: bytes, expected: bytes) -> None:
    assert replace_model(body, "b") == expected
    assert orjson.loads(replace_model(body, "b"))["model"] == "b"


def test_stream_is_set_to_match_the_call_and_only_then() -> None:
    body = b'{"model": "a", "stream": true, "x": 1}'
    assert passed_body(body, "b", stream=True) == b'{"model": "b", "stream": true, "x": 1}'
    assert passed_body(body, "b", stream=False) == b'{"model": "b", "stream": false, "x": 1}'
    assert passed_body(b'{"model": "a"}', "b", stream=False) == b'{"model": "b"}'
    assert passed_body(b'{"x": 1}', "b", stream=True) == b'{"model":"b","stream":true,"x": 1}'
    with pytest.raises(NotAnObject):
        passed_body(b"[1]", "b", stream=False)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"clawdbot": {"x": 1}, "model": "a", "y": 2}', b'{"model": "b", "y": 2}'),
        (b'{"model": "a", "clawdbot": {"x": [1]} , "y": 2}', b'{"model": "b", "y": 2}'),
        (b'{"model": "a", "y": 2, "clawdbot": 1 }', b'{"model": "b", "y": 2 }'),
        (b'{"model": "a", "clawdbot": 1, "clawdbot": 2}', b'{"model": "b"}'),
        (b'{"clawdbot": 1}', b'{"model":"b"}'),
    ],
)
def test_the_gateway_options_are_dropped(body: bytes, expected: bytes) -> None:
    assert passed_body(body, "b", stream=False, drop=("clawdbot",)) == expected


# --- streams as real upstreams send them ---------------------------------------------------

# A recorded-style stream: CRLF line ends, `data:` without its space on some frames, a
# comment line, parallel tool blocks after a text block, escapes in the JSON pieces.
RECORDED_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_rec",
            "type": "message",
            "role": "assistant",
            "model": "claude-up",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 30, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me \u00e9 check"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}},
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}},
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": 'ris \\"FR\\""}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": '{"city":"Oslo"}'},
    },
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 7},
    },
    {"type": "message_stop"},
]


def recorded_stream() -> tuple[bytes, list[bytes]]:
    """The stream's bytes and each event's data as written in them."""
    wire, datas = b": a comment\r\n\r\n", []
    for i, event in enumerate(RECORDED_EVENTS):
        data = json.dumps(event).encode()  # spaced JSON: proof the data is not re-encoded
        datas.append(data)
        sep = b"data:" if i % 2 else b"data: "
        wire += b"event: " + event["type"].encode() + b"\r\n" + sep + data + b"\r\n\r\n"
    return wire, datas


OVERLOADED_AT_START = (
    b"event: message_start\ndata: "
    + orjson.dumps(RECORDED_EVENTS[0])
    + b'\n\nevent: ping\ndata: {"type": "ping"}\n\n'
    + b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
)


@dataclass
class Fake:
    """An Anthropic upstream that sends fixed bytes a few at a time."""

    body: bytes = b""
    piece: int = 7
    hits: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.hits += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(self.body), self.piece):
            await resp.write(self.body[i : i + self.piece])
        await resp.write_eof()
        return resp


@pytest_asyncio.fixture
async def fake_stack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Fake, router_pb2_grpc.RouterStub]]:
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    fake = Fake()
    app = web.Application()
    app.router.add_post("/v1/messages", fake.handle)
    fake_runner = web.AppRunner(app)
    await fake_runner.setup()
    site = web.TCPSite(fake_runner, "127.0.0.1", 0)
    await site.start()
    fake_port = fake_runner.addresses[0][1]
    live_runner, live_port = await start_mock(api_key=UPSTREAM_KEY)
    claude = {"connector": "anthropic", "api_key_env": KEY_ENV, "upstream_model": "claude-up"}
    fake_url = f"http://127.0.0.1:{fake_port}/v1"
    config = Config.model_validate(
        {
            "router": {"grpc_port": 0, "http_port": 0, "shutdown_grace_s": 5},
            # The best-scored instance first, always (no exploration, no power of two choices):
            # the fallback tests count on the failing instance being tried first.
            "model_router": {"top_k": 1, "exploration": 0},
            "models": [
                {**claude, "name": "fake", "base_url": fake_url},
                {**claude, "name": "fake-ha", "instance": "ha-fake", "base_url": fake_url},
                {
                    **claude,
                    "name": "fake-ha",
                    "instance": "ha-live",
                    "base_url": f"http://127.0.0.1:{live_port}/v1",
                    "pricing": PRICE,
                },
            ],
        }
    )
    router = create_router(config)
    await router.start()
    channel = internal_channel(f"127.0.0.1:{router.grpc_port}")
    try:
        yield fake, router_pb2_grpc.RouterStub(channel)
    finally:
        await channel.close(grace=None)
        await router.stop(grace=1, drain_notice=0)
        await live_runner.cleanup()
        await fake_runner.cleanup()


@pytest.mark.asyncio
@pytest.mark.parametrize("piece", [1, 7, 4096])
async def test_native_events_relayed_as_sent_whatever_the_split(
    fake_stack: tuple[Fake, router_pb2_grpc.RouterStub], piece: int
) -> None:
    fake, stub = fake_stack
    fake.body, datas = recorded_stream()
    fake.piece = piece
    raw = json.dumps({**NATIVE, "model": "fake", "stream": True}).encode()
    events = [e async for e in stub.CompleteStream(native_request(raw, NATIVE_HEADERS, stream=True, model="fake"))]
    chunks = [e.chunk_json for e in events if e.WhichOneof("event") == "chunk_json"]
    assert chunks == datas
    settled = events[-1].settled
    assert (settled.input_tokens, settled.output_tokens) == (40, 7)


@pytest.mark.asyncio
async def test_recorded_stream_translated_to_chat(fake_stack: tuple[Fake, router_pb2_grpc.RouterStub]) -> None:
    fake, stub = fake_stack
    fake.body, _ = recorded_stream()
    request = chat_request("fake", stream=True, stream_options={"include_usage": True})
    events = [e async for e in stub.CompleteStream(request)]
    chunks = [orjson.loads(e.chunk_json) for e in events if e.WhichOneof("event") == "chunk_json"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Let me \u00e9 check"
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for d in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            call = calls.setdefault(d["index"], {"id": "", "args": ""})
            call["id"] = d.get("id") or call["id"]
            call["args"] += d["function"].get("arguments") or ""
    assert {i: (c["id"], json.loads(c["args"])) for i, c in calls.items()} == {
        0: ("toolu_a", {"city": 'Paris "FR"'}),
        1: ("toolu_b", {"city": "Oslo"}),
    }
    usage = chunks[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (40, 7)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 30


@pytest.mark.asyncio
async def test_overload_right_after_message_start_falls_back(
    fake_stack: tuple[Fake, router_pb2_grpc.RouterStub],
) -> None:
    """message_start and ping are held until something follows: an error right after
    them has relayed nothing, so another instance takes the request."""
    fake, stub = fake_stack
    fake.body = OVERLOADED_AT_START
    raw = json.dumps({**NATIVE, "model": "fake-ha", "stream": True}).encode()
    request = native_request(raw, NATIVE_HEADERS, stream=True, model="fake-ha")
    request.meta.strategy = "cost_optimized"  # the fake is free: tried first
    events = [e async for e in stub.CompleteStream(request)]
    assert fake.hits == 1
    assert events[0].instance == "ha-live"
    types = [orjson.loads(e.chunk_json)["type"] for e in events if e.WhichOneof("event") == "chunk_json"]
    assert types.count("message_start") == 1 and types[-1] == "message_stop"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.CompleteStream(native_request(raw, NATIVE_HEADERS, stream=True, model="fake")):
            pass
    assert error_of(caught.value).code == "overloaded"


def test_a_cut_native_stream_bills_what_was_relayed() -> None:
    meter = AnthropicStreamMeter()
    for event in RECORDED_EVENTS[:9]:  # up to the second tool's arguments; no message_delta
        meter.observe(orjson.dumps(event))
    assert meter.usage is not None
    assert (meter.usage["prompt_tokens"], meter.usage["completion_tokens"]) == (40, 4)
    for event in RECORDED_EVENTS[9:]:
        meter.observe(orjson.dumps(event))
    assert meter.usage["completion_tokens"] == 7


@pytest.mark.parametrize(
    ("status", "kind", "expected"),
    [
        (529, "overloaded_error", (503, "overloaded", True, "server_error")),
        (0, "overloaded_error", (503, "overloaded", True, "server_error")),
        (0, "api_error", (502, "upstream_error", True, "server_error")),
        (0, "rate_limit_error", (429, "rate_limit_exceeded", True, "rate_limited")),
        (0, "invalid_request_error", (400, "invalid_request_error", False, "client_error")),
        (413, "request_too_large", (413, "request_too_large", False, "client_error")),
        (403, "permission_error", (502, "upstream_auth_failed", True, "auth")),
        (503, "api_error", (502, "upstream_error", True, "server_error")),
        (504, "timeout_error", (504, "upstream_timeout", True, "timeout")),
    ],
)
def test_error_mapping(status: int, kind: str, expected: tuple[int, str, bool, str]) -> None:
    instance = Registry((ModelEntry.model_validate({"name": "c", "connector": "anthropic"}),), env={}).instances()[0]
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": "words"}})
    err = map_status(instance, status, body, {})
    assert (err.status, err.code, err.retryable, err.kind) == expected
