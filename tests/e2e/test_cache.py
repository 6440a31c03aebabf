"""The cache through the whole mesh: Envoy -> adapter -> cache service (memory, Redis,
objects) -> router -> mock upstream, counted at the mock."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from typing import Any

import grpc
import httpx
import openai
import pytest

from clawdbot.gen.v1 import cache_pb2, cache_pb2_grpc
from tests.conftest import Mesh
from tests.support import INTERNAL_METADATA, wait_for

pytestmark = pytest.mark.e2e

CACHE = "x-clawdbot-cache"


def http(mesh: Mesh) -> httpx.Client:
    return httpx.Client(headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=60)


def upstream_calls(mesh: Mesh, marker: str) -> int:
    """Chat requests that reached the mock upstream with `marker` in their messages."""
    recorded = httpx.get(mesh.mock_url.removesuffix("/v1") + "/_mock/requests", timeout=10).json()
    return sum(1 for r in recorded if r["path"].endswith("/chat/completions") and marker in json.dumps(r["body"]))


def chat_body(marker: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "mock-1",
        "messages": [{"role": "user", "content": f"cache me {marker}"}],
        "temperature": 0,
        **extra,
    }


def post_raw(mesh: Mesh, raw: str, **headers: str) -> httpx.Response:
    return http(mesh).post(
        f"{mesh.v1}/chat/completions", content=raw, headers={"content-type": "application/json", **headers}
    )


def test_a_repeated_deterministic_request_is_served_from_memory(mesh: Mesh) -> None:
    marker = uuid.uuid4().hex
    first = http(mesh).post(f"{mesh.v1}/chat/completions", json=chat_body(marker))
    second = http(mesh).post(f"{mesh.v1}/chat/completions", json=chat_body(marker))
    assert (first.headers[CACHE], second.headers[CACHE]) == ("miss", "hit-l1")
    assert first.json() == second.json()
    assert second.headers["x-clawdbot-model-instance"] == "mock-1"
    assert float(second.headers["x-clawdbot-cost-usd"]) == 0.0
    assert upstream_calls(mesh, marker) == 1


def test_key_order_and_whitespace_share_an_entry_temperature_and_model_do_not(mesh: Mesh) -> None:
    marker = uuid.uuid4().hex
    compact = json.dumps(chat_body(marker), separators=(",", ":"))
    reordered = json.dumps(dict(reversed(list(chat_body(marker).items()))), indent=4)
    assert post_raw(mesh, compact).headers[CACHE] == "miss"
    assert post_raw(mesh, reordered).headers[CACHE] == "hit-l1"
    assert (
        post_raw(mesh, json.dumps(chat_body(marker, temperature=0.0, user="someone-else"))).headers[CACHE] == "hit-l1"
    )
    assert post_raw(mesh, json.dumps(chat_body(marker, seed=1, temperature=0.5))).headers[CACHE] == "miss"
    other_model = {**chat_body(marker), "model": "mock-ha"}
    assert post_raw(mesh, json.dumps(other_model)).headers[CACHE] == "miss"
    assert upstream_calls(mesh, marker) == 3


def test_sampled_requests_are_not_cached_unless_the_caller_opts_in(mesh: Mesh) -> None:
    marker = uuid.uuid4().hex
    body = json.dumps({"model": "mock-1", "messages": [{"role": "user", "content": f"sampled {marker}"}]})
    assert [post_raw(mesh, body).headers[CACHE] for _ in range(2)] == ["miss", "miss"]
    assert [post_raw(mesh, body, **{CACHE: "on"}).headers[CACHE] for _ in range(2)] == ["miss", "hit-l1"]


def test_cache_control_is_honoured(mesh: Mesh) -> None:
    marker = uuid.uuid4().hex
    raw = json.dumps(chat_body(marker))
    assert post_raw(mesh, raw, **{"cache-control": "no-store"}).headers[CACHE] == "miss"
    assert post_raw(mesh, raw).headers[CACHE] == "miss"  # no-store stored nothing
    assert post_raw(mesh, raw).headers[CACHE] == "hit-l1"
    assert post_raw(mesh, raw, **{"cache-control": "no-cache"}).headers[CACHE] == "miss"  # fetched fresh
    assert post_raw(mesh, raw, **{"cache-control": "max-age=3600"}).headers[CACHE] == "hit-l1"
    assert upstream_calls(mesh, marker) == 3


@pytest.mark.asyncio
async def test_a_hundred_identical_concurrent_requests_make_one_upstream_call(mesh: Mesh) -> None:
    marker = uuid.uuid4().hex
    # The upstream takes 300 ms, so every request arrives while the first is in flight.
    body = chat_body(marker, mock={"delay_ms": 300})
    async with httpx.AsyncClient(
        headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=60, limits=httpx.Limits(max_connections=100)
    ) as client:
        replies = await asyncio.gather(*(client.post(f"{mesh.v1}/chat/completions", json=body) for _ in range(100)))
    assert all(r.status_code == 200 for r in replies), {r.status_code for r in replies}
    assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1
    assert sorted(r.headers[CACHE] for r in replies).count("miss") == 1
    assert upstream_calls(mesh, marker) == 1


def test_a_cached_answer_replays_as_a_stream_and_a_streamed_one_is_cached(mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=60)
    marker = uuid.uuid4().hex
    messages = [{"role": "user", "content": f"stream me {marker}"}]
    whole = client.chat.completions.with_raw_response.create(model="mock-1", messages=messages, temperature=0)
    assert whole.headers[CACHE] == "miss"
    answer = whole.parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
        model="mock-1", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
    ) as streamed:
        assert streamed.headers[CACHE] == "hit-l1"
        chunks = list(streamed.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    # The other way round: a streamed miss is stored once complete, then served whole.
    marker = uuid.uuid4().hex
    messages = [{"role": "user", "content": f"stream first {marker}"}]
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="mock-1", messages=messages, temperature=0, stream=True)
        if c.choices
    )
    again = client.chat.completions.with_raw_response.create(model="mock-1", messages=messages, temperature=0)
    assert again.headers[CACHE] == "hit-l1" and again.parse().choices[0].message.content == text
    assert upstream_calls(mesh, marker) == 1


def test_embeddings_are_cached_per_encoding(mesh: Mesh) -> None:
    body = {"model": "mock-embed", "input": [f"embed {uuid.uuid4().hex}"], "encoding_format": "float"}
    with http(mesh) as h:
        first, second = (h.post(f"{mesh.v1}/embeddings", json=body) for _ in range(2))
        assert (first.headers[CACHE], second.headers[CACHE]) == ("miss", "hit-l1")
        assert first.json() == second.json()
        assert h.post(f"{mesh.v1}/embeddings", json={**body, "encoding_format": "base64"}).headers[CACHE] == "miss"


def cache_stats(mesh: Mesh) -> dict[str, bool]:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.info()['ports']['cache_grpc']}") as channel:
        reply = cache_pb2_grpc.CacheServiceStub(channel).Stats(
            cache_pb2.CacheStatsRequest(), timeout=10, metadata=INTERNAL_METADATA
        )
    return {level.level: level.up for level in reply.levels}


def test_requests_keep_succeeding_while_redis_hangs_and_l2_comes_back(mesh: Mesh) -> None:
    redis_pid = mesh.info()["services"]["redis"]["pid"]
    marker = uuid.uuid4().hex
    os.kill(redis_pid, signal.SIGSTOP)  # hung, not gone: the nastier failure
    try:
        with http(mesh) as h:
            for i in range(10):
                for expected in ("miss", "hit-l1"):
                    r = h.post(f"{mesh.v1}/chat/completions", json=chat_body(f"{marker}-{i}"))
                    assert r.status_code == 200 and r.headers[CACHE] == expected
        assert cache_stats(mesh)["l2"] is False
    finally:
        os.kill(redis_pid, signal.SIGCONT)

    def l2_up() -> bool:
        # A write after the level's retry interval brings it back.
        http(mesh).post(f"{mesh.v1}/chat/completions", json=chat_body(uuid.uuid4().hex))
        return cache_stats(mesh)["l2"]

    wait_for(l2_up, 30, "the cache's Redis level to come back", interval=0.5)


def ask(mesh: Mesh, model: str, question: str, system: str = "You are terse.") -> httpx.Response:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return http(mesh).post(f"{mesh.v1}/chat/completions", json={"model": model, "messages": messages, "temperature": 0})


@pytest.mark.local_model
def test_a_paraphrase_hits_the_semantic_cache_only_where_enabled(local_models: Mesh) -> None:
    mesh = local_models  # the embeddings come from the worker's all-MiniLM-L6-v2
    # (each test session has a fresh cache, so these are new questions to it)
    question, paraphrase = "What is the capital of France?", "What's the capital city of France?"
    first = ask(mesh, "mock-semantic", question)
    assert first.headers[CACHE] == "miss"
    similar = ask(mesh, "mock-semantic", paraphrase)
    assert similar.headers[CACHE] == "semantic", similar.headers
    assert similar.json()["choices"] == first.json()["choices"]  # the stored answer, said so
    assert ask(mesh, "mock-semantic", paraphrase).headers[CACHE] == "hit-l1"  # now an exact entry too
    assert ask(mesh, "mock-semantic", "How do I bake bread at home?").headers[CACHE] == "miss"
    assert ask(mesh, "mock-semantic", paraphrase, system="You are verbose.").headers[CACHE] == "miss"
    # Not enabled for mock-1: the same paraphrase pair never matches.
    assert ask(mesh, "mock-1", question).headers[CACHE] == "miss"
    assert ask(mesh, "mock-1", paraphrase).headers[CACHE] == "miss"
