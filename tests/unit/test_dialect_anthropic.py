"""Anthropic's Messages API <-> Chat Completions (common/dialects/anthropic.py): both
directions as tables, the stream encoder's grammar, the SSE reader on bytes split anywhere,
the connector's event decoder, errors and count_tokens."""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import pytest

from clawdbot.adapter.dialects.anthropic_api import Prepared, frames, native_frame, stream_events
from clawdbot.common.clients.cache_keys import cache_key
from clawdbot.common.dialects import NATIVE_REPLAY
from clawdbot.common.dialects import anthropic as a
from clawdbot.common.errors import GatewayError
from clawdbot.gen.v1 import router_pb2

# --- a grammar validator for Anthropic event sequences ----------------------------------

_DELTA_FOR = {"text": "text_delta", "tool_use": "input_json_delta", "thinking": "thinking_delta"}


def check_grammar(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Assert the sequence is one well-formed Messages stream; the accumulated message."""
    assert events, "no events"
    assert events[0]["type"] == "message_start"
    assert [e["type"] for e in events].count("message_start") == 1
    message = dict(events[0]["message"], content=[])
    open_block: dict[str, Any] | None = None
    expected_index = 0
    stopped = False
    for position, event in enumerate(events[1:], 1):
        kind = event["type"]
        assert not stopped, f"event after the end: {kind}"
        if kind == "ping":
            continue
        if kind == "content_block_start":
            assert open_block is None, "a block started while another is open"
            assert event["index"] == expected_index
            expected_index += 1
            open_block = dict(event["content_block"])
            open_block["_json"] = ""
            message["content"].append(open_block)
        elif kind == "content_block_delta":
            assert open_block is not None and event["index"] == expected_index - 1
            delta = event["delta"]
            allowed = {_DELTA_FOR[open_block["type"]]} | (
                {"signature_delta"} if open_block["type"] == "thinking" else set()
            )
            assert delta["type"] in allowed, (delta, open_block["type"])
            if delta["type"] == "text_delta":
                open_block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                open_block["thinking"] += delta["thinking"]
            elif delta["type"] == "input_json_delta":
                open_block["_json"] += delta["partial_json"]
        elif kind == "content_block_stop":
            assert open_block is not None and event["index"] == expected_index - 1
            if open_block["type"] == "tool_use":
                open_block["input"] = orjson.loads(open_block["_json"] or "{}")  # valid JSON, whole
            open_block = None
        elif kind == "message_delta":
            assert open_block is None, "message_delta with a block open"
            assert "message_delta" not in message
            message["message_delta"] = True
            message["stop_reason"] = event["delta"]["stop_reason"]
            message["usage"] = {**message["usage"], **event["usage"]}
        elif kind == "message_stop":
            assert message.get("message_delta"), "message_stop without message_delta"
            assert position == len(events) - 1
            stopped = True
        elif kind == "error":
            assert position == len(events) - 1
            message["error"] = event["error"]
            stopped = True
        else:
            raise AssertionError(f"unknown event {kind}")
    assert stopped, "the stream never ended"
    for block in message["content"]:
        block.pop("_json", None)
    if message["content"] and any(b["type"] == "tool_use" for b in message["content"]) and "error" not in message:
        assert message["stop_reason"] in ("tool_use", "max_tokens")
    return message


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: Any = None) -> dict[str, Any]:
    c: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}
    c["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        c["usage"] = usage
    return c


def encode(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    encoder = a.MessagesStreamEncoder("claude-x", "msg_1", input_tokens=7)
    events = encoder.start()
    for c in chunks:
        events += encoder.chunk(c)
    events += encoder.finish()
    assert encoder.finish() == [] and encoder.chunk(chunk({"content": "late"})) == []  # nothing after
    return events


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


# --- inbound: Messages request -> Chat request ------------------------------------------

REQUESTS = [
    (
        "plain",
        {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
        {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
    ),
    (
        "system blocks, sampling, stop, user",
        {
            "model": "m",
            "max_tokens": 10,
            "system": [
                {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "b"},
            ],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "stop_sequences": ["X"],
            "metadata": {"user_id": "u1"},
            "stream": True,
        },
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "hi"}],
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "stop": ["X"],
            "user": "u1",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    (
        "image",
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                        {"type": "text", "text": "what?"},
                    ],
                }
            ],
        },
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                        {"type": "text", "text": "what?"},
                    ],
                }
            ],
        },
    ),
    (
        "tools, tool_choice, tool round trip, thinking dropped from history",
        {
            "model": "m",
            "max_tokens": 10,
            "tools": [{"name": "get", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "thinking": {"type": "enabled", "budget_tokens": 4000},
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "text", "text": "calling"},
                        {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"a": 1}},
                        {"type": "tool_use", "id": "toolu_2", "name": "get", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "r1"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "r2"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "go on"},
                    ],
                },
            ],
        },
        {
            "model": "m",
            "max_tokens": 10,
            "tools": [
                {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}, "description": "d"}}
            ],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "reasoning_effort": "medium",
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": "calling",
                    "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}},
                        {"id": "toolu_2", "type": "function", "function": {"name": "get", "arguments": "{}"}},
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_1", "content": "r1"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: r2"},
                {"role": "user", "content": "go on"},
            ],
        },
    ),
    (
        "output_config (effort, json schema) and serving hints",
        {
            "model": "m",
            "max_tokens": 5,
            "cache_control": {"type": "ephemeral"},
            "speed": "fast",
            "service_tier": "auto",
            "thinking": {"type": "adaptive"},
            "output_config": {"effort": "xhigh", "format": {"type": "json_schema", "schema": {"type": "object"}}},
            "messages": [{"role": "user", "content": "x"}],
        },
        {
            "model": "m",
            "max_tokens": 5,
            "reasoning_effort": "high",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True},
            },
            "messages": [{"role": "user", "content": "x"}],
        },
    ),
    (
        "named tool choice, custom tool without type",
        {
            "model": "m",
            "max_tokens": 1,
            "tools": [{"type": "custom", "name": "t", "input_schema": {}}],
            "tool_choice": {"type": "tool", "name": "t"},
            "messages": [{"role": "user", "content": "x"}],
        },
        {
            "model": "m",
            "max_tokens": 1,
            "tools": [{"type": "function", "function": {"name": "t", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "t"}},
            "messages": [{"role": "user", "content": "x"}],
        },
    ),
]


@pytest.mark.parametrize(("name", "body", "expected"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_messages_request_to_chat(name: str, body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert a.messages_to_chat(body) == expected


REFUSED = [
    ({"max_tokens": 1, "messages": []}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": "9", "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": 0, "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": 1}, "messages"),
    (
        {
            "model": "m",
            "max_tokens": 1,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "x"}}
                    ],
                }
            ],
        },
        "messages.0.content.0.type",
    ),
    (
        {
            "model": "m",
            "max_tokens": 1,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            "messages": [{"role": "user", "content": "x"}],
        },
        "tools.0.type",
    ),
    ({"model": "m", "max_tokens": 1, "thinking": {"type": "sometimes"}, "messages": []}, "thinking.type"),
    ({"model": "m", "max_tokens": 1, "mcp_servers": [{}], "messages": []}, "mcp_servers"),
    ({"model": "m", "max_tokens": 1, "output_config": {"effort": "huge"}, "messages": []}, "output_config.effort"),
    ({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 1, "tool_choice": {"type": "maybe"}, "messages": []}, "tool_choice.type"),
]


@pytest.mark.parametrize(("body", "param"), REFUSED)
def test_messages_request_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        a.messages_to_chat(body)
    assert caught.value.status == 400
    assert caught.value.param == param
    status, shaped = a.anthropic_error(caught.value)
    assert status == 400 and shaped["type"] == "error" and shaped["error"]["type"] == "invalid_request_error"
    assert param in shaped["error"]["message"]


def test_native_only_fields_pass_when_served_natively() -> None:
    body = {
        "model": "m",
        "max_tokens": 1,
        "container": "c",
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}},
                    {"type": "text", "text": "sum up"},
                ],
            }
        ],
    }
    assert a.messages_to_chat(body, native_only_ok=True)["messages"] == [{"role": "user", "content": "sum up"}]


# --- inbound: Chat answer -> Message -------------------------------------------------------


def test_chat_answer_to_message() -> None:
    completion = {
        "id": "chatcmpl-abc",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me look.",
                    "reasoning_content": "thinking...",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"q": "x"}'}},
                        {"id": "call.2", "type": "function", "function": {"name": "put", "arguments": "not json"}},
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 60}},
    }
    message = a.chat_to_message(completion, "claude-x")
    assert message["id"].startswith("msg_") and message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "claude-x"
    assert message["content"][0] == {"type": "thinking", "thinking": "thinking...", "signature": ""}
    assert message["content"][1] == {"type": "text", "text": "Let me look."}
    assert message["content"][2] == {"type": "tool_use", "id": "call_1", "name": "get", "input": {"q": "x"}}
    rewritten = message["content"][3]
    assert rewritten["id"].startswith("toolu_") and rewritten["input"] == {}
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    # Cached tokens are not counted twice.
    assert message["usage"] == {
        "input_tokens": 40,
        "output_tokens": 20,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 60,
    }


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        ("odd", "end_turn"),
        (None, "end_turn"),
    ],
)
def test_stop_reasons(finish: str | None, reason: str) -> None:
    completion = {"choices": [{"message": {"content": "x"}, "finish_reason": finish}]}
    assert a.chat_to_message(completion)["stop_reason"] == reason


# --- inbound: the stream encoder -----------------------------------------------------------


def test_text_stream() -> None:
    events = encode(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}, "stop"),  # content and finish in one chunk: kept
            chunk(None, usage=USAGE),
        ]
    )
    message = check_grammar(events)
    assert [b["text"] for b in message["content"]] == ["Hello"]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"]["output_tokens"] == 5 and message["usage"]["input_tokens"] == 10
    assert events[1] == {"type": "ping"}


def test_first_chunk_a_tool_call_and_parallel_tools() -> None:
    events = encode(
        [
            chunk(
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"x":'},
                        }
                    ],
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"y": [1, 2]}'}}]}),
            chunk({}, "tool_calls"),
            chunk(None, usage=USAGE),
        ]
    )
    assert events[0]["type"] == "message_start"
    message = check_grammar(events)
    assert [(b["type"], b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("tool_use", "call_a", "f", {"x": 1}),
        ("tool_use", "call_b", "g", {"y": [1, 2]}),
    ]
    assert message["stop_reason"] == "tool_use"


def test_text_then_tool_with_arguments_in_one_burst_and_stop_finish() -> None:
    events = encode(
        [
            chunk({"content": "Checking."}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a": "b"}'}}]}),
            chunk({}, "stop"),  # some upstreams say stop after a tool call: still tool_use
        ]
    )
    message = check_grammar(events)
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"]
    assert message["stop_reason"] == "tool_use"


def test_same_tool_index_reused_with_another_id() -> None:
    events = encode(
        [
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}),
            chunk({"tool_calls": [{"index": 0, "id": "call_2", "function": {"name": "g", "arguments": "{}"}}]}),
            chunk({}, "tool_calls"),
        ]
    )
    assert [b["id"] for b in check_grammar(events)["content"]] == ["call_1", "call_2"]


def test_thinking_then_text_keeps_the_first_text_token() -> None:
    events = encode(
        [
            chunk({"reasoning_content": "Let me "}),
            chunk({"reasoning_content": "think."}),
            chunk({"content": "A"}),
            chunk({"content": "nswer"}, "stop"),
        ]
    )
    message = check_grammar(events)
    assert [(b["type"], b.get("thinking") or b.get("text")) for b in message["content"]] == [
        ("thinking", "Let me think."),
        ("text", "Answer"),
    ]


def test_max_tokens_and_empty_answer() -> None:
    assert check_grammar(encode([chunk({"content": "x"}, "length")]))["stop_reason"] == "max_tokens"
    message = check_grammar(encode([chunk({}, "stop")]))
    assert message["content"] == [] and message["stop_reason"] == "end_turn"


def test_stream_without_finish_ends_with_an_error() -> None:
    message = check_grammar(encode([chunk({"content": "cut"})]))
    assert message["error"]["type"] == "api_error"


def test_error_midstream_is_the_last_event() -> None:
    encoder = a.MessagesStreamEncoder("m")
    events = encoder.start() + encoder.chunk(chunk({"content": "partial"}))
    events += encoder.error(GatewayError(503, "busy", "service_unavailable", "overloaded"))
    events += encoder.finish() + encoder.error(GatewayError(500, "again"))
    message = check_grammar(events)
    assert message["error"] == {"type": "overloaded_error", "message": "busy"}


def test_interleaved_parallel_tool_arguments_are_refused_clearly() -> None:
    encoder = a.MessagesStreamEncoder("m")
    encoder.chunk(chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]}))
    encoder.chunk(chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "g", "arguments": ""}}]}))
    with pytest.raises(GatewayError) as caught:
        encoder.chunk(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
    assert caught.value.status == 502


def test_frames_have_event_lines_and_reparse_split_anywhere() -> None:
    events = encode(
        [
            chunk({"content": "Hi \n there"}),
            chunk(
                {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"s": "a\\nb"}'}}]}
            ),
            chunk({}, "tool_calls", USAGE),
        ]
    )
    raw = b"".join(a.sse_frame(e) for e in events)
    assert raw.count(b"event: ") == len(events) == raw.count(b"\n\n")
    rng = random.Random(17)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(raw)), 12))
        parser = a.SseParser()
        parsed = []
        for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            parsed += parser.feed(raw[start:end])
        parsed += parser.close()
        assert [name for name, _ in parsed] == [e["type"] for e in events]
        assert [orjson.loads(data) for _, data in parsed] == events


def test_sse_parser_variants() -> None:
    parser = a.SseParser()
    raw = b': comment\r\nevent:ping\r\ndata:{"type":"ping"}\r\n\r\ndata: {"a":\ndata: 1}\n\n'
    got = []
    for i in range(len(raw)):  # one byte at a time, \r\n split included
        got += parser.feed(raw[i : i + 1])
    assert got == [("ping", b'{"type":"ping"}'), ("message", b'{"a":\n1}')]


# --- outbound: Chat request -> Anthropic request --------------------------------------------


def test_chat_request_to_anthropic() -> None:
    body = {
        "model": "claude",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            {"role": "developer", "content": "mid-conversation rule"},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": "END",
        "user": "u",
        "temperature": 0.2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 3,
    }
    assert a.chat_to_anthropic(body) == {
        "model": "claude",
        "system": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "mid-conversation rule"}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
                ],
            },
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "42"},
                    {"type": "text", "text": "thanks"},
                ],
            },
        ],
        "max_tokens": a.DEFAULT_MAX_TOKENS,
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "stream": True,
        "metadata": {"user_id": "u"},
        "tools": [{"name": "f", "input_schema": {"type": "object"}, "description": "d"}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }


def test_chat_request_reasoning_and_caps() -> None:
    out = a.chat_to_anthropic({"model": "c", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low"})
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert out["max_tokens"] > 1024
    out = a.chat_to_anthropic(
        {"model": "c", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 50}
    )
    assert out["max_tokens"] == 50


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_chat_request_refusals(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        a.chat_to_anthropic({"model": "c", "messages": [{"role": "user", "content": "x"}], **extra})
    assert caught.value.status == 400 and caught.value.param == param


def test_anthropic_message_to_chat() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-up",
        "content": [
            {"type": "thinking", "thinking": "hm", "signature": "s"},
            {"type": "text", "text": "Sure."},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "usage": {
            "input_tokens": 10,
            "output_tokens": 4,
            "cache_read_input_tokens": 30,
            "cache_creation_input_tokens": 5,
        },
    }
    chat = a.message_to_chat(message, "claude")
    choice = chat["choices"][0]
    assert chat["model"] == "claude" and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure." and choice["message"]["reasoning_content"] == "hm"
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    assert chat["usage"]["prompt_tokens"] == 45 and chat["usage"]["prompt_tokens_details"] == {"cached_tokens": 30}
    assert chat["usage"]["completion_tokens"] == 4 and chat["usage"]["total_tokens"] == 49
    # And back: input_tokens is what was neither read from nor written to the cache.
    assert a.anthropic_usage(chat["usage"]) == {
        "input_tokens": 10,
        "output_tokens": 4,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 30,
    }


@pytest.mark.parametrize("reason", sorted(a.FINISH_BY_STOP_REASON))
def test_every_stop_reason_maps(reason: str) -> None:
    assert a.finish_reason(reason) in ("stop", "length", "tool_calls", "content_filter")


def test_anthropic_events_to_chat_chunks() -> None:
    native = {
        "id": "msg_9",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [
            {"type": "thinking", "thinking": "t", "signature": "sig"},
            {"type": "text", "text": "Hello"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"k": "v"}},
            {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 9},
    }
    events = a.message_events(native)
    check_grammar(events)
    decoder = a.AnthropicChunkDecoder()
    chunks = [c for e in events for c in decoder.feed(e)]
    assert decoder.done
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello"
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for call in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.get("id", "")
            entry["name"] += call.get("function", {}).get("name", "")
            entry["arguments"] += call["function"].get("arguments", "")
    assert calls == {
        0: {"id": "toolu_1", "name": "f", "arguments": '{"k":"v"}'},
        1: {"id": "toolu_2", "name": "g", "arguments": "{}"},
    }
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    # Chat chunks back through the encoder give the same message (thinking signature aside).
    round_trip = check_grammar(encode(chunks))
    assert [b["type"] for b in round_trip["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert round_trip["content"][2]["input"] == {"k": "v"}


def test_anthropic_error_event_raises() -> None:
    decoder = a.AnthropicChunkDecoder()
    with pytest.raises(GatewayError) as caught:
        decoder.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert (caught.value.status, caught.value.code) == (503, "overloaded")


def test_native_replay_of_a_cached_message() -> None:
    message = a.chat_to_message({"choices": [{"message": {"content": "cached"}, "finish_reason": "stop"}]}, "m")
    events = [orjson.loads(p) for p in NATIVE_REPLAY["anthropic"](message)]
    replayed = check_grammar(events)
    assert replayed["content"] == [{"type": "text", "text": "cached"}]


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "status", "kind"),
    [
        (GatewayError.bad_request("bad"), 400, "invalid_request_error"),
        (GatewayError(422, "bad"), 400, "invalid_request_error"),
        (GatewayError.unauthorized("who"), 401, "authentication_error"),
        (GatewayError.model_not_allowed("m"), 403, "permission_error"),
        (GatewayError.model_not_found("m"), 404, "not_found_error"),
        (GatewayError(413, "big"), 413, "request_too_large"),
        (GatewayError(429, "budget", "insufficient_quota", "insufficient_quota"), 429, "rate_limit_error"),
        (GatewayError(429, "slow", "requests", "rate_limit_exceeded"), 429, "rate_limit_error"),
        (GatewayError(500, "bug", "server_error"), 500, "api_error"),
        (GatewayError(502, "up", "upstream_error"), 502, "api_error"),
        (GatewayError(503, "busy", "service_unavailable", "overloaded"), 529, "overloaded_error"),
        (GatewayError(503, "down", "service_unavailable"), 503, "api_error"),
        (GatewayError(504, "slow", "timeout"), 504, "timeout_error"),
    ],
)
def test_error_shapes(err: GatewayError, status: int, kind: str) -> None:
    assert a.anthropic_error(err) == (status, {"type": "error", "error": {"type": kind, "message": err.message}})


@pytest.mark.parametrize(
    ("status", "kind", "ours"),
    [
        (529, "overloaded_error", 503),
        (429, "rate_limit_error", 429),
        (500, "api_error", 502),
        (400, "invalid_request_error", 400),
        (404, "not_found_error", 404),
    ],
)
def test_upstream_anthropic_errors(status: int, kind: str, ours: int) -> None:
    err = a.error_from_anthropic(status, orjson.dumps(a.error_body(kind, "why")))
    assert err.status == ours and err.message == "why"


# --- count_tokens -------------------------------------------------------------------------


def test_count_tokens_counts_system_tools_and_messages() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    plain = a.count_tokens_estimate(base)
    with_system = a.count_tokens_estimate({**base, "system": "You are a careful assistant. " * 20})
    tools = [{"name": "lookup", "description": "Look a thing up " * 10, "input_schema": {"type": "object"}}]
    with_tools = a.count_tokens_estimate({**base, "tools": tools})
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with_image = a.count_tokens_estimate({**base, "messages": [{"role": "user", "content": [image]}]})
    assert 0 < plain < with_system and plain < with_tools and plain < with_image
    with pytest.raises(GatewayError):
        a.count_tokens_estimate({"model": "m"})


# --- the route's stream relay (adapter/dialects/anthropic_api.py) ---------------------------


async def _events(*items: router_pb2.StreamEvent | GatewayError) -> AsyncGenerator[router_pb2.StreamEvent, None]:
    for item in items:
        if isinstance(item, GatewayError):
            raise item
        yield item


def _prepared() -> Prepared:
    return Prepared(router_pb2.ModelRequest(), "claude-x", True, 5)


async def _steps(first: router_pb2.StreamEvent, *items: router_pb2.StreamEvent | GatewayError) -> bytes:
    out = b""
    async for native, encoded in stream_events(_prepared(), first, _events(*items)):
        out += native_frame(native) if native else frames(encoded)
    return out


def _sse_events(raw: bytes) -> list[dict[str, Any]]:
    parser = a.SseParser()
    parsed = parser.feed(raw) + parser.close()
    assert all(name == orjson.loads(data)["type"] for name, data in parsed)
    return [orjson.loads(data) for _, data in parsed]


@pytest.mark.asyncio
async def test_native_events_are_relayed_as_they_came() -> None:
    native = a.message_events(
        {"id": "msg_n", "model": "claude-x", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"}
    )
    first = router_pb2.StreamEvent(instance="claude#1", dialect="anthropic")
    payloads = [orjson.dumps(e) for e in native]
    raw = await _steps(first, *(router_pb2.StreamEvent(chunk_json=p) for p in payloads))
    assert raw == b"".join(b"event: " + orjson.loads(p)["type"].encode() + b"\ndata: " + p + b"\n\n" for p in payloads)
    # A native stream failing midway ends with Anthropic's error event.
    raw = await _steps(
        first, router_pb2.StreamEvent(chunk_json=payloads[0]), GatewayError(503, "busy", "x", "overloaded")
    )
    assert [e["type"] for e in _sse_events(raw)] == ["message_start", "error"]


@pytest.mark.asyncio
async def test_chat_chunks_are_encoded_and_a_failure_ends_the_stream() -> None:
    first = router_pb2.StreamEvent(instance="mock#1")
    chunks = [chunk({"content": "Hi"}), chunk({}, "stop"), chunk(None, usage=USAGE)]
    raw = await _steps(first, *(router_pb2.StreamEvent(chunk_json=orjson.dumps(c)) for c in chunks))
    message = check_grammar(_sse_events(raw))
    assert message["content"] == [{"type": "text", "text": "Hi"}] and message["model"] == "claude-x"
    raw = await _steps(first, router_pb2.StreamEvent(chunk_json=orjson.dumps(chunks[0])), GatewayError(502, "gone"))
    assert check_grammar(_sse_events(raw))["error"] == {"type": "api_error", "message": "gone"}


def test_cache_keys_differ_by_dialect() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0}
    chat = cache_key("chat", "m", "", "s", body)
    assert chat == cache_key("chat", "m", "", "s", body, dialect="")  # Chat keys unchanged
    assert chat != cache_key("chat", "m", "", "s", body, dialect="anthropic")
    # The caller's own body too (what the translation leaves out for a native upstream),
    # its stream flag aside.
    native = {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}], "max_tokens": 5}
    other = {**native, "messages": [{"role": "user", "content": "x"}]}
    key = cache_key("chat", "m", "", "s", body, dialect="anthropic", native=orjson.dumps(native))
    assert key != cache_key("chat", "m", "", "s", body, dialect="anthropic", native=orjson.dumps(other))
    streamed = orjson.dumps({**native, "stream": True})
    assert key == cache_key("chat", "m", "", "s", body, dialect="anthropic", native=streamed)
