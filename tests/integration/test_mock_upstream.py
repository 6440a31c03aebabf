from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from clawdbot.devtools.mock_upstream import start_mock

CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "hi there"}]}


@pytest_asyncio.fixture
async def base_url() -> AsyncIterator[str]:
    runner, port = await start_mock("127.0.0.1", 0, models=["mock-1", "mock-2"])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


@pytest.mark.asyncio
async def test_chat_non_stream(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {
        "model": "mock-1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        ],
    }
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["model"] == "mock-1"
    assert data["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello from mock-1: hi there",
    }
    assert data["choices"][0]["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.asyncio
async def test_chat_n_and_overrides(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "n": 3, "mock": {"content": "custom", "usage": False}}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        data = await resp.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in data["choices"]} == {"custom"}
    assert "usage" not in data


@pytest.mark.asyncio
async def test_chat_stream_with_usage(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    finish = chunks[-2]["choices"][0]
    assert finish["finish_reason"] == "stop"
    assert finish["delta"] == {}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert text == "Hello from mock-1: hi there"
    assert len(chunks[1:-2]) == 5


@pytest.mark.asyncio
async def test_chat_stream_without_usage(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "stream": True}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in last


@pytest.mark.asyncio
async def test_drop_midstream(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "stream": True, "mock": {"drop_midstream": True}}
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received += chunk
    assert b"[DONE]" not in received
    assert b'"content":"Hello"' in received


@pytest.mark.asyncio
async def test_embeddings(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {"model": "emb-1", "input": ["alpha", "beta"]}
    async with session.post(f"{base_url}/v1/embeddings", json=body) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["object"] == "list"
    assert data["model"] == "emb-1"
    vectors = [d["embedding"] for d in data["data"]]
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert all(len(v) == 8 for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[0] != vectors[1]
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] == 2

    b64_body = {"model": "emb-1", "input": "alpha", "dimensions": 4, "encoding_format": "base64"}
    async with session.post(f"{base_url}/v1/embeddings", json=b64_body) as resp:
        encoded = (await resp.json())["data"][0]["embedding"]
    decoded = list(struct.unpack("<4f", base64.b64decode(encoded)))
    async with session.post(f"{base_url}/v1/embeddings", json={**b64_body, "encoding_format": "float"}) as resp:
        assert (await resp.json())["data"][0]["embedding"] == decoded
    # Deterministic: the same input gives the same vector on another request.
    async with session.post(f"{base_url}/v1/embeddings", json={**body, "input": "alpha"}) as r:
        assert (await r.json())["data"][0]["embedding"] == vectors[0]


@pytest.mark.asyncio
async def test_models(base_url: str, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{base_url}/v1/models") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["mock-1", "mock-2"]
    assert {m["owned_by"] for m in data["data"]} == {"mock"}


@pytest.mark.asyncio
async def test_injected_429_with_retry_after(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "mock": {"status": 429, "retry_after": 3}}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
        data = await resp.json()
    assert data["error"]["code"] == "rate_limit_exceeded"
    assert data["error"]["type"] == "requests"
    assert set(data["error"]) == {"message", "type", "param", "code"}


@pytest.mark.asyncio
async def test_bad_json_is_400(base_url: str, session: aiohttp.ClientSession) -> None:
    async with session.post(
        f"{base_url}/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        data = await resp.json()
    assert data["error"]["type"] == "invalid_request_error"
    assert data["error"]["param"] is None
    assert data["error"]["code"] is None


@pytest.mark.asyncio
async def test_api_key_enforced(session: aiohttp.ClientSession) -> None:
    runner, port = await start_mock("127.0.0.1", 0, api_key="sekret")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with session.post(url, json=CHAT) as resp:
            assert resp.status == 401
        async with session.post(url, json=CHAT, headers={"Authorization": "Bearer no"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with session.post(url, json=CHAT, headers={"Authorization": "Bearer sekret"}) as resp:
            assert resp.status == 200
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_recorded_requests(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "extra_field": {"kept": True}}
    async with session.post(f"{base_url}/v1/chat/completions", json=body, headers={"X-Trace": "abc"}) as resp:
        assert resp.status == 200
    async with session.get(f"{base_url}/_mock/requests") as resp:
        recorded = await resp.json()
    assert len(recorded) == 1
    entry = recorded[0]
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/chat/completions"
    assert entry["headers"]["x-trace"] == "abc"
    assert entry["body"] == body
    async with session.delete(f"{base_url}/_mock/requests") as resp:
        assert resp.status == 204
    async with session.get(f"{base_url}/_mock/requests") as resp:
        assert await resp.json() == []


# --- tool calls on Chat ------------------------------------------------------------------

WEATHER_FN = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.asyncio
async def test_chat_tool_call_then_text_after_the_result(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "tools": [WEATHER_FN]}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        data = await resp.json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "hi there"}
    # The tool's result is answered with text; tool_choice none never calls.
    follow = {
        **body,
        "messages": [
            *CHAT["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ],
    }
    async with session.post(f"{base_url}/v1/chat/completions", json=follow) as resp:
        assert (await resp.json())["choices"][0]["message"]["content"] == "Hello from mock-1: hi there"
    async with session.post(f"{base_url}/v1/chat/completions", json={**body, "tool_choice": "none"}) as resp:
        assert (await resp.json())["choices"][0]["finish_reason"] == "stop"


@pytest.mark.asyncio
async def test_chat_tool_call_streamed_in_openai_shape(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**CHAT, "tools": [WEATHER_FN], "stream": True}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        events = sse_events(await resp.read())
    chunks = [json.loads(e) for e in events[:-1]]
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert first["tool_calls"][0]["id"].startswith("call_")
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:-1]]
    assert len(pieces) > 1
    assert all("id" not in p and p["index"] == 0 for p in pieces)
    assert json.loads("".join(p["function"]["arguments"] for p in pieces)) == {"city": "hi there"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --- Anthropic Messages ------------------------------------------------------------------

ANTHROPIC_HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
MESSAGE = {"model": "claude-mock", "max_tokens": 64, "messages": [{"role": "user", "content": "hi there"}]}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def anthropic_frames(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) per SSE frame, asserting each frame has exactly one event line and
    one data line, and that the event name is the data's type."""
    text = raw.decode()
    assert text.endswith("\n\n")
    out = []
    for frame in text.split("\n\n")[:-1]:
        lines = frame.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        event, data = lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))
        assert data["type"] == event
        out.append((event, data))
    return out


@pytest.mark.asyncio
async def test_anthropic_message(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**MESSAGE, "system": "be brief"}
    async with session.post(f"{base_url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        assert resp.status == 200
        assert resp.headers["request-id"].startswith("req_")
        data = await resp.json()
    assert data["id"].startswith("msg_")
    assert (data["type"], data["role"], data["model"]) == ("message", "assistant", "claude-mock")
    assert data["content"] == [{"type": "text", "text": "Hello from claude-mock: hi there"}]
    assert (data["stop_reason"], data["stop_sequence"]) == ("end_turn", None)
    assert data["usage"] == {
        "input_tokens": 4,  # "be brief" + "hi there"
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 5,
        "service_tier": "standard",
    }


@pytest.mark.asyncio
async def test_anthropic_stop_sequence_and_max_tokens(base_url: str, session: aiohttp.ClientSession) -> None:
    url = f"{base_url}/v1/messages"
    async with session.post(url, json={**MESSAGE, "stop_sequences": ["there"]}, headers=ANTHROPIC_HEADERS) as r:
        data = await r.json()
    assert (data["stop_reason"], data["stop_sequence"]) == ("stop_sequence", "there")
    assert data["content"][0]["text"] == "Hello from claude-mock: hi "
    async with session.post(url, json={**MESSAGE, "max_tokens": 2}, headers=ANTHROPIC_HEADERS) as r:
        data = await r.json()
    assert (data["stop_reason"], data["content"][0]["text"]) == ("max_tokens", "Hello from")
    assert data["usage"]["output_tokens"] == 2


@pytest.mark.asyncio
async def test_anthropic_stream_grammar(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**MESSAGE, "stream": True}
    async with session.post(f"{base_url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        frames = anthropic_frames(await resp.read())
    names = [e for e, _ in frames]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 2
    assert frames[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for e, d in frames if e == "content_block_delta")
    assert text == "Hello from claude-mock: hi there"
    delta = frames[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 5}


@pytest.mark.asyncio
async def test_anthropic_tool_use_streamed(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {**MESSAGE, "tools": [WEATHER_TOOL], "stream": True}
    async with session.post(f"{base_url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as resp:
        frames = anthropic_frames(await resp.read())
    opener = frames[1][1]["content_block"]
    assert opener["type"] == "tool_use" and opener["name"] == "get_weather" and opener["input"] == {}
    assert opener["id"].startswith("toolu_")
    deltas = [d["delta"] for e, d in frames if e == "content_block_delta"]
    assert all(d["type"] == "input_json_delta" for d in deltas)
    assert deltas[0]["partial_json"] == ""
    assert len(deltas) > 2
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "hi there"}
    assert frames[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.asyncio
async def test_anthropic_sdk_reads_the_mock(base_url: str) -> None:
    """The official SDK as the oracle: its parser, its stream accumulator (the streamed
    message equals the plain one), its tool round trip, its error classes."""
    import anthropic

    client = anthropic.AsyncAnthropic(api_key="k", base_url=base_url, max_retries=0)
    # The SDK's typed params want literals; these dicts are what it sends all the same.
    message: Any = MESSAGE
    tools: Any = [WEATHER_TOOL]
    try:
        plain = await client.messages.create(**message, tools=tools)
        async with client.messages.stream(**message, tools=tools) as stream:
            streamed = await stream.get_final_message()
        strip = {"id": ..., "content": {0: {"id"}}}
        assert plain.model_dump(exclude=strip) == streamed.model_dump(exclude=strip)  # type: ignore[arg-type]
        tool_use = plain.content[0]
        assert tool_use.type == "tool_use" and tool_use.input == {"city": "hi there"}
        answer = await client.messages.create(
            model="claude-mock",
            max_tokens=64,
            tools=tools,
            messages=[
                {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": [tool_use.model_dump()]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}]},
            ],
        )
        assert answer.stop_reason == "end_turn"
        assert answer.content[0].type == "text" and answer.content[0].text == "Hello from claude-mock: hi there"
        counted = await client.messages.count_tokens(
            model="claude-mock", system="be brief", messages=[{"role": "user", "content": "hi there"}]
        )
        assert counted.input_tokens == 4
        with pytest.raises(anthropic.OverloadedError) as caught:
            await client.messages.create(**message, extra_body={"mock": {"status": 529}})
        assert caught.value.status_code == 529
        body = caught.value.body
        assert isinstance(body, dict)
        assert (body["type"], body["error"]) == ("error", {"type": "overloaded_error", "message": "Overloaded"})
        with pytest.raises(anthropic.APIStatusError) as mid:
            async with client.messages.stream(
                **message,
                extra_body={"mock": {"stream_error": "overloaded_error"}},
            ) as failing:
                async for _ in failing:
                    pass
        assert "Overloaded" in str(mid.value)
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_anthropic_errors_in_anthropic_shape(base_url: str, session: aiohttp.ClientSession) -> None:
    url = f"{base_url}/v1/messages"
    cases: list[tuple[dict[str, str], dict[str, Any], int, str]] = [
        ({"anthropic-version": "2023-06-01"}, MESSAGE, 401, "authentication_error"),
        ({"x-api-key": "k"}, MESSAGE, 400, "invalid_request_error"),
        (ANTHROPIC_HEADERS, {k: v for k, v in MESSAGE.items() if k != "max_tokens"}, 400, "invalid_request_error"),
        (ANTHROPIC_HEADERS, {**MESSAGE, "mock": {"status": 429, "retry_after": 2}}, 429, "rate_limit_error"),
        (ANTHROPIC_HEADERS, {**MESSAGE, "mock": {"status": 403}}, 403, "permission_error"),
        (ANTHROPIC_HEADERS, {**MESSAGE, "mock": {"status": 404}}, 404, "not_found_error"),
        (ANTHROPIC_HEADERS, {**MESSAGE, "mock": {"status": 500}}, 500, "api_error"),
        (ANTHROPIC_HEADERS, {**MESSAGE, "mock": {"status": 529}}, 529, "overloaded_error"),
    ]
    for headers, body, status, err_type in cases:
        async with session.post(url, json=body, headers=headers) as resp:
            assert resp.status == status, (body, await resp.text())
            data = await resp.json()
            if status == 429:
                assert resp.headers["retry-after"] == "2"
        assert data["type"] == "error"
        assert data["error"]["type"] == err_type
        assert isinstance(data["error"]["message"], str) and data["error"]["message"]


@pytest.mark.asyncio
async def test_anthropic_required_key(session: aiohttp.ClientSession) -> None:
    runner, port = await start_mock("127.0.0.1", 0, api_key="sekret")
    url = f"http://127.0.0.1:{port}/v1/messages"
    try:
        async with session.post(url, json=MESSAGE, headers={**ANTHROPIC_HEADERS, "x-api-key": "no"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"
        async with session.post(url, json=MESSAGE, headers={**ANTHROPIC_HEADERS, "x-api-key": "sekret"}) as resp:
            assert resp.status == 200
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_anthropic_prompt_cache_and_last_request(base_url: str, session: aiohttp.ClientSession) -> None:
    """cache_control breakpoints are written, then read: proof they reached the mock.
    /_mock/last shows the request's raw bytes and headers."""
    body = {
        **MESSAGE,
        "system": [{"type": "text", "text": "a long system prompt", "cache_control": {"type": "ephemeral"}}],
    }
    raw = json.dumps(body, indent=1).encode()  # not compact: bytes a re-serializer would change
    headers = {**ANTHROPIC_HEADERS, "anthropic-beta": "prompt-caching-2024-07-31", "Content-Type": "application/json"}
    usages = []
    for _ in range(2):
        async with session.post(f"{base_url}/v1/messages", data=raw, headers=headers) as resp:
            usages.append((await resp.json())["usage"])
    assert (usages[0]["cache_creation_input_tokens"], usages[0]["cache_read_input_tokens"]) == (4, 0)
    assert (usages[1]["cache_creation_input_tokens"], usages[1]["cache_read_input_tokens"]) == (0, 4)
    assert usages[0]["input_tokens"] == usages[1]["input_tokens"] == 2
    async with session.get(f"{base_url}/_mock/last", params={"model": "claude-mock"}) as resp:
        last = await resp.json()
    assert last["body_raw"].encode() == raw
    assert last["path"] == "/v1/messages"
    assert last["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"
    async with session.get(f"{base_url}/_mock/last", params={"model": "nobody"}) as resp:
        assert resp.status == 404


# --- OpenAI Responses --------------------------------------------------------------------

RESPONSE_TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.mark.asyncio
async def test_responses_with_the_openai_sdk(base_url: str) -> None:
    import openai

    client = openai.AsyncOpenAI(api_key="k", base_url=f"{base_url}/v1", max_retries=0)
    try:
        plain = await client.responses.create(model="mock-1", input="hi there", instructions="be brief")
        assert plain.id.startswith("resp_") and plain.status == "completed"
        assert plain.output_text == "Hello from mock-1: hi there"
        assert plain.usage is not None and (plain.usage.input_tokens, plain.usage.output_tokens) == (4, 5)

        events = []
        stream = await client.responses.create(model="mock-1", input="hi there", stream=True)
        async for event in stream:
            events.append(event)
        assert [e.sequence_number for e in events] == list(range(len(events)))
        types = [e.type for e in events]
        assert types[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert types[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text

        called = await client.responses.create(model="mock-1", input="hi there", tools=[RESPONSE_TOOL])  # type: ignore[list-item]
        call = called.output[0]
        assert call.type == "function_call" and json.loads(call.arguments) == {"city": "hi there"}
        followed = await client.responses.create(
            model="mock-1",
            previous_response_id=called.id,
            tools=[RESPONSE_TOOL],  # type: ignore[list-item]
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        )
        assert followed.output[0].type == "message"

        async with client.responses.stream(model="mock-1", input="hi there", tools=[RESPONSE_TOOL]) as s:  # type: ignore[list-item]
            final = await s.get_final_response()
        assert final.output[0].type == "function_call"

        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="mock-1", input="x", previous_response_id="resp_unknown")
        assert caught.value.code == "previous_response_not_found"
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_responses_failed_midstream(base_url: str, session: aiohttp.ClientSession) -> None:
    body = {"model": "mock-1", "input": "hi there", "stream": True, "mock": {"stream_error": "server_error"}}
    async with session.post(f"{base_url}/v1/responses", json=body) as resp:
        frames = anthropic_frames(await resp.read())  # the same framing: event + data
    assert frames[-1][0] == "response.failed"
    assert [d["sequence_number"] for _, d in frames] == list(range(len(frames)))
    assert frames[-2][0] == "response.output_text.delta"


@pytest.mark.asyncio
async def test_anthropic_thinking_plain_streamed_and_replayed(base_url: str) -> None:
    """A thinking block first, its signature in its own delta when streamed; replayed
    with a tool result it must keep its signature."""
    import anthropic

    client = anthropic.AsyncAnthropic(api_key="k", base_url=base_url, max_retries=0)
    params: Any = {**MESSAGE, "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    tools: Any = [WEATHER_TOOL]
    try:
        plain = await client.messages.create(**params, tools=tools)
        thinking, tool_use = plain.content
        assert thinking.type == "thinking" and thinking.thinking == "Thinking about: hi there"
        assert thinking.signature.startswith("sig_")
        assert tool_use.type == "tool_use"
        async with client.messages.stream(**params, tools=tools) as stream:
            deltas = [e.delta.type async for e in stream if e.type == "content_block_delta"]
            streamed = await stream.get_final_message()
        assert deltas.index("signature_delta") == deltas.index("input_json_delta") - 1
        assert streamed.content[0] == thinking
        replay = [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": [thinking.model_dump(), tool_use.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}]},
        ]
        answer = await client.messages.create(**{**params, "messages": replay}, tools=tools)
        assert answer.content[-1].type == "text"
        replay[1]["content"][0]["signature"] = "forged"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError, match="signature"):
            await client.messages.create(**{**params, "messages": replay}, tools=tools)
    finally:
        await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options: Extra inputs are not permitted"),
        ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "greater than or equal to 1024"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "call.1", "name": "f", "input": {}}]},
                ]
            },
            "should match pattern",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
                    {"role": "user", "content": "and?"},
                ]
            },
            "without `tool_result` blocks immediately after: toolu_1",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}]},
            "unexpected `tool_use_id`",
        ),
    ],
)
async def test_anthropic_refuses_what_anthropic_refuses(
    base_url: str, session: aiohttp.ClientSession, change: dict[str, Any], words: str
) -> None:
    async with session.post(f"{base_url}/v1/messages", json={**MESSAGE, **change}, headers=ANTHROPIC_HEADERS) as r:
        assert r.status == 400
        data = await r.json()
    assert data["error"]["type"] == "invalid_request_error"
    assert words in data["error"]["message"]
