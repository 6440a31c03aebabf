"""The Responses pass-through (ModelEntry.responses_api) against the mock, through the
router's gRPC API: a Responses caller's body reaches {base_url}/responses byte for byte
but for the model, with the gateway's key; the upstream's Response (or its events) comes
back untouched with dialect "responses"; usage off it prices the call and settles the
stream; upstream errors are mapped as on the Chat path; an instance without the flag (or
a caller without a native body) still gets the Chat translation."""

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

from clawdbot.common.config import Config, ModelEntry
from clawdbot.common.errors import GatewayError
from clawdbot.common.service import ServiceHost, internal_channel
from clawdbot.devtools.mock_upstream import MOCK_KEY, Fault, MockUpstream, start_mock
from clawdbot.gen.v1 import router_pb2, router_pb2_grpc
from clawdbot.router.connectors.native import replace_model
from clawdbot.router.connectors.openai import ResponsesStreamMeter, responses_chat_usage
from clawdbot.router.server import create_server as create_router

UPSTREAM_KEY = "sk-gateway-responses"
KEY_ENV = "TEST_RESPONSES_PASSTHROUGH_KEY"
PRICE = {"input_per_1k": 1.0, "output_per_1k": 2.0}
UPSTREAM = "gpt-rsp-up"
# A caller's body as it wrote it: odd spacing, an escaped character, a number format and a
# field the gateway does not know; all of it must reach the upstream as it is.
NATIVE_RAW = (
    b'{ "input" : "hi there",\n  "model": "gpt-rsp", "instructions": "Be brief.\\u0021",'
    b' "temperature": 1.0e0, "x_unknown_field": {"keep": [1, 2.50]},'
    b' "metadata": {"k": "v"} }'
)


@dataclass
class Stack:
    router: ServiceHost
    channel: grpc.aio.Channel
    mock: MockUpstream
    failing: MockUpstream

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
    failing_runner, failing_port = await start_mock(api_key=UPSTREAM_KEY)
    runners.append(failing_runner)
    failing: MockUpstream = failing_runner.app[MOCK_KEY]
    failing.default_fault = Fault(status=500)
    live_url, failing_url = f"http://127.0.0.1:{live_port}/v1", f"http://127.0.0.1:{failing_port}/v1"
    gpt = {"api_key_env": KEY_ENV, "pricing": PRICE, "responses_api": True}
    config = Config.model_validate(
        {
            "router": {"grpc_port": 0, "http_port": 0, "shutdown_grace_s": 5},
            # The best-scored instance first, always: the fallback test counts on the
            # failing (free) instance being tried first under cost_optimized.
            "model_router": {"top_k": 1, "exploration": 0},
            "models": [
                {**gpt, "name": "gpt-rsp", "base_url": live_url, "upstream_model": UPSTREAM},
                # The same upstream, not said to serve Responses: translated to Chat.
                {
                    "name": "gpt-chat",
                    "base_url": live_url,
                    "upstream_model": "gpt-chat-up",
                    "api_key_env": KEY_ENV,
                    "pricing": PRICE,
                },
                {
                    **gpt,
                    "name": "gpt-ha",
                    "instance": "ha-failing",
                    "base_url": failing_url,
                    "upstream_model": UPSTREAM,
                    "pricing": {},
                },
                {**gpt, "name": "gpt-ha", "instance": "ha-live", "base_url": live_url, "upstream_model": UPSTREAM},
            ],
        }
    )
    router = create_router(config)
    await router.start()
    channel = internal_channel(f"127.0.0.1:{router.grpc_port}")
    try:
        yield Stack(router, channel, live_runner.app[MOCK_KEY], failing)
    finally:
        await channel.close(grace=None)
        await router.stop(grace=1, drain_notice=0)
        for runner in runners:
            await runner.cleanup()


def native_request(
    raw: bytes, *, stream: bool = False, model: str = "gpt-rsp", strategy: str = ""
) -> router_pb2.ModelRequest:
    """As the Responses route sends it: the Chat translation beside the caller's bytes."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "stream": stream}
    return router_pb2.ModelRequest(
        meta=router_pb2.RequestMeta(request_id="r-native", strategy=strategy),
        task="chat",
        model=model,
        stream=stream,
        openai_json=orjson.dumps(chat),
        dialect="responses",
        native_json=raw,
    )


def chat_request(model: str, **extra: Any) -> router_pb2.ModelRequest:
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}], **extra}
    return router_pb2.ModelRequest(
        meta=router_pb2.RequestMeta(request_id="r-chat"),
        task="chat",
        model=model,
        openai_json=orjson.dumps(body),
    )


def error_of(err: grpc.aio.AioRpcError) -> GatewayError:
    return GatewayError.from_rpc_error(err, "test")


def streamed_body(**extra: Any) -> bytes:
    return json.dumps({"model": "gpt-rsp", "input": "stream me", "stream": True, **extra}).encode()


# --- pass-through ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_plain_is_byte_for_byte_but_the_model_and_priced_off_usage(stack: Stack) -> None:
    reply = await stack.stub.Complete(native_request(NATIVE_RAW))
    sent = stack.mock.last_request(UPSTREAM)
    assert sent is not None
    assert (sent["method"], sent["path"]) == ("POST", "/v1/responses")
    assert sent["body_raw"].encode() == replace_model(NATIVE_RAW, UPSTREAM)
    assert sent["body_raw"].encode() == NATIVE_RAW.replace(b'"model": "gpt-rsp"', b'"model": "gpt-rsp-up"', 1)
    # The gateway's credentials, never the caller's.
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"

    # The answer is the upstream's Response, as it sent it.
    assert reply.dialect == "responses" and reply.instance == "gpt-rsp"
    response = orjson.loads(reply.openai_json)
    assert response["object"] == "response" and response["id"].startswith("resp_")
    assert response["model"] == UPSTREAM  # untouched, as the Anthropic pass-through leaves it
    assert response["output"][0]["content"][0]["text"] == f"Hello from {UPSTREAM}: hi there"
    usage = response["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert (reply.spend.input_tokens, reply.spend.output_tokens) == (usage["input_tokens"], usage["output_tokens"])
    assert reply.cost_usd == pytest.approx((usage["input_tokens"] * 1.0 + usage["output_tokens"] * 2.0) / 1000)
    assert reply.spend.cost_usd == pytest.approx(reply.cost_usd)


@pytest.mark.asyncio
async def test_the_gateway_options_and_a_stream_mismatch_are_fixed_only(stack: Stack) -> None:
    """A body saying stream: true served by Complete is sent as stream: false; the
    gateway's own "clawdbot" options never reach the provider."""
    raw = b'{"model":"gpt-rsp","input":"hi","stream":true,"clawdbot":{"strategy":"cost_optimized"}}'
    reply = await stack.stub.Complete(native_request(raw))
    assert orjson.loads(reply.openai_json)["status"] == "completed"
    sent = stack.mock.last_request(UPSTREAM)
    assert sent is not None and sent["body_raw"] == '{"model":"gpt-rsp-up","input":"hi","stream":false}'


@pytest.mark.asyncio
async def test_stream_relays_native_events_and_settles_off_completed(stack: Stack) -> None:
    raw = streamed_body()
    events = [e async for e in stack.stub.CompleteStream(native_request(raw, stream=True))]
    assert events[0].instance == "gpt-rsp" and events[0].dialect == "responses"
    chunks = [e.chunk_json for e in events if e.WhichOneof("event") == "chunk_json"]
    data = [orjson.loads(c) for c in chunks]
    types = [d["type"] for d in data]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-1] == "response.completed" and types.count("response.created") == 1
    # Each chunk is the upstream's event data, byte for byte (the mock writes compact
    # JSON), its own sequence numbers included (the adapter renumbers).
    assert all(c == orjson.dumps(d) for c, d in zip(chunks, data, strict=True))
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    text = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    assert text == f"Hello from {UPSTREAM}: stream me"
    sent = stack.mock.last_request(UPSTREAM)
    assert sent is not None and sent["path"] == "/v1/responses"
    assert sent["body_raw"].encode() == replace_model(raw, UPSTREAM)
    # Settled on response.completed's usage.
    usage = data[-1]["response"]["usage"]
    settled = events[-1].settled
    assert (settled.input_tokens, settled.output_tokens) == (usage["input_tokens"], usage["output_tokens"])
    assert settled.cost_usd == pytest.approx((usage["input_tokens"] * 1.0 + usage["output_tokens"] * 2.0) / 1000)


@pytest.mark.asyncio
async def test_stream_with_function_calls(stack: Stack) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    raw = streamed_body(tools=[tool])
    events = [e async for e in stack.stub.CompleteStream(native_request(raw, stream=True))]
    data = [orjson.loads(e.chunk_json) for e in events if e.WhichOneof("event") == "chunk_json"]
    arguments = "".join(d["delta"] for d in data if d["type"] == "response.function_call_arguments.delta")
    assert json.loads(arguments) == {}
    assert data[-1]["response"]["output"][0]["name"] == "get_weather"


@pytest.mark.asyncio
async def test_without_the_flag_or_a_native_body_chat_is_translated(stack: Stack) -> None:
    reply = await stack.stub.Complete(native_request(NATIVE_RAW.replace(b"gpt-rsp", b"gpt-chat"), model="gpt-chat"))
    assert reply.dialect == ""
    assert orjson.loads(reply.openai_json)["object"] == "chat.completion"
    sent = stack.mock.last_request("gpt-chat-up")
    assert sent is not None and sent["path"] == "/v1/chat/completions"

    # A continued conversation: the adapter sends no native body; Chat goes.
    request = native_request(b"")
    reply = await stack.stub.Complete(request)
    assert reply.dialect == "" and orjson.loads(reply.openai_json)["object"] == "chat.completion"
    sent = stack.mock.last_request(UPSTREAM)
    assert sent is not None and sent["path"] == "/v1/chat/completions"


# --- errors --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_failing_instance_is_retried_elsewhere(stack: Stack) -> None:
    reply = await stack.stub.Complete(native_request(NATIVE_RAW, model="gpt-ha", strategy="cost_optimized"))
    assert reply.instance == "ha-live" and reply.dialect == "responses"
    assert any(r["path"] == "/v1/responses" for r in stack.failing.requests())
    stack.failing.recorded.clear()
    raw = streamed_body(model="gpt-ha")
    events = [
        e
        async for e in stack.stub.CompleteStream(
            native_request(raw, model="gpt-ha", stream=True, strategy="cost_optimized")
        )
    ]
    assert events[0].instance == "ha-live" and events[0].dialect == "responses"
    assert any(r["path"] == "/v1/responses" for r in stack.failing.requests())


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"status": 429, "retry_after": 1}, 429, "rate_limit_exceeded"),
        ({"status": 400}, 400, "invalid_request"),
        ({"status": 404}, 404, "model_not_found"),
        ({"status": 500}, 502, "upstream_error"),
        ({"status": 401}, 502, "upstream_auth_failed"),
    ],
)
async def test_http_errors_mapped_as_on_the_chat_path(
    stack: Stack, fault: dict[str, Any], status: int, code: str
) -> None:
    stack.mock.default_fault = Fault.parse(fault)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Complete(native_request(NATIVE_RAW))
    native = error_of(caught.value)
    assert (native.status, native.code) == (status, code)
    assert stack.mock.last_request(UPSTREAM)["path"] == "/v1/responses"  # type: ignore[index]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Complete(chat_request("gpt-rsp"))
    chat = error_of(caught.value)
    assert (chat.status, chat.code, chat.type, chat.message) == (
        native.status,
        native.code,
        native.type,
        native.message,
    )
    if status == 429:
        assert native.retry_after == "1"
    if status == 400:
        assert native.message == "Bad request (mock)."  # the upstream's own words


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [({"status": 429}, 429, "rate_limit_exceeded"), ({"status": 400}, 400, "invalid_request")],
)
async def test_stream_errors_before_the_first_event_keep_their_status(
    stack: Stack, fault: dict[str, Any], status: int, code: str
) -> None:
    # A router of its own per case: repeated failures would open the instance's breaker.
    stack.mock.default_fault = Fault.parse(fault)
    events: list[router_pb2.StreamEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in stack.stub.CompleteStream(native_request(streamed_body(), stream=True)):
            events.append(event)
    assert not events
    assert (error_of(caught.value).status, error_of(caught.value).code) == (status, code)


@pytest.mark.asyncio
async def test_response_failed_midstream_ends_the_stream_with_the_error(stack: Stack) -> None:
    stack.mock.default_fault = Fault(stream_error="server_error")
    events: list[router_pb2.StreamEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in stack.stub.CompleteStream(native_request(streamed_body(), stream=True)):
            events.append(event)
    assert (error_of(caught.value).status, error_of(caught.value).code) == (502, "upstream_error")
    types = [orjson.loads(e.chunk_json)["type"] for e in events if e.WhichOneof("event") == "chunk_json"]
    # What came before is relayed; the failure is not (the adapter writes its own).
    assert types[0] == "response.created" and "response.output_text.delta" in types
    assert "response.failed" not in types and "response.completed" not in types


# --- usage and config -----------------------------------------------------------------------


def test_usage_in_chat_terms() -> None:
    usage = {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 17,
    }
    assert responses_chat_usage(usage) == {
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    assert responses_chat_usage(None) is None


def test_stream_meter_counts_deltas_until_the_final_usage() -> None:
    meter = ResponsesStreamMeter()
    meter.observe(b'{"type":"response.created","response":{"usage":null}}')
    meter.observe(b'{"type":"response.output_text.delta","delta":"a"}')
    meter.observe(b'{"type":"response.function_call_arguments.delta","delta":"{"}')
    meter.observe(b"not json")
    assert (meter.usage, meter.chunks) == (None, 2)
    meter.observe(b'{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":9}}}')
    assert meter.usage == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}


def test_config_flag_is_for_openai_chat_only() -> None:
    entry = ModelEntry.model_validate({"name": "g", "base_url": "http://x/v1", "responses_api": True})
    assert entry.responses_api
    assert not ModelEntry.model_validate({"name": "g", "base_url": "http://x/v1"}).responses_api
    with pytest.raises(ValueError, match="responses_api"):
        ModelEntry.model_validate({"name": "c", "connector": "anthropic", "responses_api": True})
    with pytest.raises(ValueError, match="responses_api"):
        ModelEntry.model_validate({"name": "e", "base_url": "http://x/v1", "task": "embeddings", "responses_api": True})
