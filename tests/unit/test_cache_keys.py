"""Canonical cache keys, the adapter's caching policy, and streamed answers assembled and
replayed."""

from __future__ import annotations

import orjson

from clawdbot.adapter.chat_streams import assemble_chat, replay_chat
from clawdbot.common.clients.cache import ResponseCache
from clawdbot.common.clients.cache_keys import cache_key
from clawdbot.common.config import CacheConfig, ModelEntry
from clawdbot.gen.v1 import router_pb2

BODY = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5, "stop": ["x"]}


def key(body: dict, **kw: str) -> str:
    args = {"task": "chat", "model": "m", "version": "1", "scope": "key_a", **kw}
    return cache_key(args["task"], args["model"], args["version"], args["scope"], body)


def test_keys_ignore_order_formatting_and_what_does_not_change_the_answer() -> None:
    reordered = dict(reversed(list(BODY.items())))
    assert key(BODY) == key(reordered) == key({**BODY, "temperature": 0.0})
    assert key(BODY) == key({**BODY, "stream": True, "user": "u", "metadata": {"a": 1}, "clawdbot": {"x": 1}})


def test_keys_differ_on_everything_that_changes_the_answer() -> None:
    variants = [
        key({**BODY, "temperature": 0.2}),
        key({**BODY, "max_tokens": 6}),
        key({**BODY, "stop": ["y"]}),
        key({**BODY, "seed": 3}),
        key({**BODY, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        key({**BODY, "response_format": {"type": "json_object"}}),
        key({**BODY, "messages": [{"role": "user", "content": "hi "}]}),
        key(BODY, model="other"),
        key(BODY, version="2"),
        key(BODY, scope="key_b"),
        key(BODY, task="embeddings"),
        key(BODY),
    ]
    assert len(set(variants)) == len(variants)
    assert cache_key("transcription", "m", "", "s", {}, b"a") != cache_key("transcription", "m", "", "s", {}, b"b")


def plan(body: dict, cache_control: str = "", opt: str = "", task: str = "chat", shared: bool = False):  # type: ignore[no-untyped-def]
    cache = ResponseCache(
        stub=None,  # type: ignore[arg-type]  # plan() never calls the service
        config=CacheConfig(shared=shared),
        models=(ModelEntry(name="m", base_url="http://x", version="7"),),
    )
    headers = {"x-clawdbot-cache": opt} if opt else {}
    meta = router_pb2.RequestMeta(api_key_id="key_a", cache_control=cache_control, headers=headers)
    request = router_pb2.ModelRequest(meta=meta, task=task, model="m", openai_json=orjson.dumps(body))
    return cache.plan(request)


def test_what_is_cached_and_how() -> None:
    sampled = {"messages": [{"role": "user", "content": "hi"}]}
    assert plan(BODY) is not None and plan({**sampled, "seed": 1}) is not None
    assert plan(sampled) is None and plan(sampled, opt="on") is not None
    assert plan(BODY, opt="off") is None and plan(BODY, "no-store") is None
    assert plan({"input": "x"}, task="embeddings") is not None
    assert plan({"input": "x"}, task="transcription") is None  # not among the cached tasks by default
    no_cache = plan(BODY, "no-cache")
    assert no_cache is not None and not no_cache.read
    aged = plan(BODY, 'public, max-age="30"')
    assert aged is not None and aged.read and aged.max_age_s == 30
    assert plan(BODY).key != plan(BODY, shared=True).key  # per API key unless shared


def chunk(delta: dict, finish: str | None = None, **extra: object) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return orjson.dumps(
        {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": [choice], **extra}
    )


def test_a_stream_assembles_into_a_completion_and_replays_as_the_same_text() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": " world"}),
        chunk({}, "stop"),
        orjson.dumps(
            {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": [], "usage": usage}
        ),
    ]
    whole = assemble_chat(chunks)
    assert whole is not None
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    assert whole["choices"][0]["finish_reason"] == "stop" and whole["usage"] == usage
    replayed = [orjson.loads(c) for c in replay_chat(whole, include_usage=True)]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in replayed if c["choices"]) == "Hello world"
    assert replayed[-1]["usage"] == usage and replayed[-2]["choices"][0]["finish_reason"] == "stop"
    assert not any("usage" in c for c in (orjson.loads(p) for p in replay_chat(whole, include_usage=False)))


def test_streams_that_cannot_be_replayed_faithfully_are_not_assembled() -> None:
    assert assemble_chat([chunk({"content": "cut"})]) is None  # never finished
    assert assemble_chat([chunk({"tool_calls": [{"index": 0}]}), chunk({}, "tool_calls")]) is None
    assert assemble_chat([orjson.dumps({"error": {"message": "boom"}})]) is None
