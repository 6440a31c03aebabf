"""Between a streamed chat answer and a whole one: assemble chunks into a chat.completion
(so a streamed answer can be cached once complete) and replay a chat.completion as a
well-formed chunk stream (so a cached answer can serve a streaming client)."""

from __future__ import annotations

from typing import Any

import orjson


def assemble_chat(chunks: list[bytes]) -> dict[str, Any] | None:
    """The chat.completion the chunks spell out; None when they hold more than text
    (tool calls, refusals, errors), which is then not worth the risk of a wrong replay."""
    texts: dict[int, list[str]] = {}
    roles: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    head: dict[str, Any] = {}
    usage: Any = None
    for raw in chunks:
        chunk = orjson.loads(raw)
        if not isinstance(chunk, dict) or "error" in chunk:
            return None
        head = head or chunk
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            delta = choice.get("delta") or {}
            if set(delta) - {"role", "content"}:
                return None
            roles[index] = delta.get("role") or roles.get(index, "assistant")
            if delta.get("content"):
                texts.setdefault(index, []).append(delta["content"])
            finish[index] = choice.get("finish_reason") or finish.get(index)
    if not head or not finish or any(reason is None for reason in finish.values()):
        return None  # the stream ended before every choice finished
    completion: dict[str, Any] = {
        "id": head.get("id", ""),
        "object": "chat.completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        "choices": [
            {
                "index": i,
                "message": {"role": roles.get(i, "assistant"), "content": "".join(texts.get(i, []))},
                "finish_reason": finish[i],
            }
            for i in sorted(finish)
        ],
    }
    if usage:
        completion["usage"] = usage
    if head.get("system_fingerprint"):
        completion["system_fingerprint"] = head["system_fingerprint"]
    return completion


def replay_chat(completion: dict[str, Any], include_usage: bool) -> list[bytes]:
    """chat.completion.chunk payloads for a whole answer: role, content, finish, usage."""
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return orjson.dumps({**base, "choices": choices, **extra})

    payloads = []
    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        payloads.append(
            chunk(
                [
                    {
                        "index": index,
                        "delta": {"role": message.get("role", "assistant"), "content": ""},
                        "finish_reason": None,
                    }
                ]
            )
        )
        if message.get("content"):
            payloads.append(chunk([{"index": index, "delta": {"content": message["content"]}, "finish_reason": None}]))
        payloads.append(chunk([{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}]))
    if include_usage and completion.get("usage"):
        payloads.append(chunk([], usage=completion["usage"]))
    return payloads
