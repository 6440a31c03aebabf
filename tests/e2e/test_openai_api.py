"""The official openai SDK against the gateway, through Envoy."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Mesh

pytestmark = pytest.mark.e2e


def client(mesh: Mesh, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=60, **kw)  # type: ignore[arg-type]


def recorded(mesh: Mesh) -> list[dict]:
    return httpx.get(mesh.mock_url.removesuffix("/v1") + "/_mock/requests", timeout=10).json()


def test_chat_completion(mesh: Mesh) -> None:
    reply = client(mesh).chat.completions.create(
        model="mock-1", messages=[{"role": "user", "content": "hello there"}], temperature=0
    )
    assert reply.choices[0].message.content == "Hello from mock-1: hello there"
    assert reply.model == "mock-1"
    assert reply.usage is not None and reply.usage.total_tokens > 0


def test_streamed_chat_with_usage(mesh: Mesh) -> None:
    stream = client(mesh).chat.completions.create(
        model="mock-1",
        messages=[{"role": "user", "content": "stream me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from mock-1: stream me"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_sse_bytes_are_exact(mesh: Mesh) -> None:
    with httpx.stream(
        "POST",
        f"{mesh.v1}/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {mesh.api_key}"},
        json={"model": "mock-1", "stream": True, "messages": [{"role": "user", "content": "a b"}]},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read()
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[:-2])


def test_embeddings(mesh: Mesh) -> None:
    reply = client(mesh).embeddings.create(model="mock-embed", input=["one", "two"])
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) > 0
    assert reply.data[0].embedding != reply.data[1].embedding


def test_models_list(mesh: Mesh) -> None:
    ids = [m.id for m in client(mesh).models.list()]
    assert {"mock-1", "mock-embed", "gemma-3-270m"} <= set(ids)


def test_unknown_fields_pass_through(mesh: Mesh) -> None:
    client(mesh).chat.completions.create(
        model="mock-1",
        messages=[{"role": "user", "content": "passthrough-check"}],
        extra_body={"brand_new_option": {"nested": [1, 2]}, "reasoning_effort": "low"},
    )
    sent = [r for r in recorded(mesh) if "passthrough-check" in str(r.get("body"))][-1]["body"]
    assert sent["brand_new_option"] == {"nested": [1, 2]}
    assert sent["reasoning_effort"] == "low"


def test_auto_routes_through_the_strategy(mesh: Mesh) -> None:
    http = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {mesh.api_key}"})
    r = http.post(
        f"{mesh.v1}/chat/completions",
        headers={"x-clawdbot-strategy": "cost_optimized"},
        json={"model": "auto", "messages": [{"role": "user", "content": "route me"}]},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-clawdbot-model-instance"]
    r = http.post(
        f"{mesh.v1}/chat/completions",
        headers={"x-clawdbot-strategy": "nonsense"},
        json={"model": "auto", "messages": [{"role": "user", "content": "route me"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "strategy"


def test_group_falls_back_to_live_instance(mesh: Mesh) -> None:
    http = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {mesh.api_key}"})
    r = http.post(
        f"{mesh.v1}/chat/completions", json={"model": "mock-ha", "messages": [{"role": "user", "content": "ha"}]}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-clawdbot-model-instance"] == "mock-ha-live"
    assert r.json()["model"] == "mock-ha"


def test_hosted_audio_models_through_the_openai_connector(mesh: Mesh) -> None:
    audio = client(mesh).audio.speech.create(model="mock-tts", voice="alloy", input="three short words")
    assert audio.read()[:4] == b"RIFF" and len(audio.content) == 44 + 3 * 3200
    transcript = client(mesh).audio.transcriptions.create(
        model="mock-whisper", file=("a.wav", audio.content, "audio/wav"), language="en"
    )
    assert transcript.text == "mock transcript by mock-whisper"
    uploads = [r for r in recorded(mesh) if r["path"] == "/v1/audio/transcriptions"]
    assert uploads[-1]["body"] == {"model": "mock-whisper", "language": "en", "file_bytes": len(audio.content)}
