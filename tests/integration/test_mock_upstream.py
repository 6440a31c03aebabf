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
