"""OpenAI Responses <-> Chat Completions (common/dialects/responses.py): the request
translation table, what is refused (400 naming the field), the Response object as the
openai SDK's own types read it, and the streaming encoder checked by the SDK's own
stream accumulator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from clawdbot.adapter.openai_requests import parse_chat
from clawdbot.common.dialects.responses import (
    MAX_HISTORY_MESSAGES,
    ResponsesStream,
    Turn,
    check_history_bounds,
    estimate_input_tokens,
    output_to_chat,
    to_chat,
)
from clawdbot.common.errors import GatewayError

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def refused(body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        to_chat(body)
    assert caught.value.status == 400
    return caught.value


# --- requests ---------------------------------------------------------------------------------


def test_a_string_input_and_instructions_become_system_and_user_messages() -> None:
    turn = to_chat({"model": "mock-1", "input": "hi", "instructions": "be brief"})
    assert turn.chat == {
        "model": "mock-1",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    }
    # The instructions are not part of the conversation a continuation carries over.
    assert turn.conversation == [{"role": "user", "content": "hi"}]
    (item,) = turn.input_items
    assert item["type"] == "message" and item["id"].startswith("msg_")
    assert item["content"] == [{"type": "input_text", "text": "hi"}]
    parse_chat(turn.chat)  # the Chat route's own checks accept it


def test_the_translation_table() -> None:
    body = {
        "model": "mock-1",
        "input": "x",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
        "reasoning": {"effort": "low"},
        "max_output_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "u-1",
        "parallel_tool_calls": False,
        "metadata": {"team": "a"},
        "stream": True,
        "mock": {"content": "unknown fields pass through"},
    }
    chat = to_chat(body).chat
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": WEATHER["parameters"],
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
    }
    assert chat["reasoning_effort"] == "low"
    assert chat["max_tokens"] == 64
    assert (chat["temperature"], chat["top_p"], chat["user"], chat["parallel_tool_calls"]) == (0.5, 0.9, "u-1", False)
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert chat["mock"] == {"content": "unknown fields pass through"}
    # Responses-only fields stay on our side: echoed on the Response, not sent upstream.
    for key in ("metadata", "store", "instructions", "text", "reasoning", "max_output_tokens", "input"):
        assert key not in chat
    assert to_chat({**body, "tool_choice": "required"}).chat["tool_choice"] == "required"
    assert to_chat({**body, "text": {"format": {"type": "json_object"}}}).chat["response_format"] == {
        "type": "json_object"
    }


def test_items_function_calls_and_outputs_and_images() -> None:
    items = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "what is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
            ],
        },
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "snow"}]},
    ]
    messages = to_chat({"model": "m", "input": items}).chat["messages"]
    assert messages[0] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        ],
    }
    # The text and both calls after it are one assistant message, as Chat wants them.
    assert messages[1]["role"] == "assistant" and messages[1]["content"] == "Let me look."
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_1", "call_2"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert messages[3] == {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "snow"}]}


def test_a_function_call_output_answers_a_call_in_the_stored_history() -> None:
    history = output_to_chat(
        [
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_9",
                "name": "get_weather",
                "arguments": "{}",
                "status": "completed",
            }
        ]
    )
    assert history == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        }
    ]
    turn = to_chat(
        {"model": "m", "input": [{"type": "function_call_output", "call_id": "call_9", "output": "ok"}]}, history
    )
    assert turn.chat["messages"] == [*history, {"role": "tool", "tool_call_id": "call_9", "content": "ok"}]
    # ... and one that answers no call is refused, naming it.
    err = refused({"model": "m", "input": [{"type": "function_call_output", "call_id": "nope", "output": "ok"}]})
    assert err.param == "input[0].call_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": 42}, "input"),
        ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "custom_tool_call", "call_id": "c", "name": "n", "input": ""}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, None),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "custom", "name": "apply_patch"}]}, "tools[0].type"),
        ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "store": "yes"}, "store"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"input": "x", "metadata": {"n": 1}}, "metadata"),
        ({}, "input"),
    ],
)
def test_what_cannot_translate_is_refused_naming_the_field(body: dict[str, Any], param: str | None) -> None:
    err = refused({"model": "m", **body})
    if param is not None:
        assert err.param == param
    else:
        assert err.param and err.param.startswith("input[0].content[0]")


def test_history_is_bounded() -> None:
    check_history_bounds(1000, MAX_HISTORY_MESSAGES)
    with pytest.raises(GatewayError) as caught:
        check_history_bounds(10, MAX_HISTORY_MESSAGES + 1)
    assert caught.value.param == "previous_response_id" and caught.value.code == "conversation_too_long"


def test_the_input_token_estimate_counts_instructions_and_tools() -> None:
    bare = estimate_input_tokens(to_chat({"model": "m", "input": "hello"}).chat, json_dumps)
    more = estimate_input_tokens(
        to_chat({"model": "m", "input": "hello", "instructions": "x" * 400, "tools": [WEATHER]}).chat, json_dumps
    )
    assert 0 < bare < more and more > 100


def json_dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- answers ----------------------------------------------------------------------------------


def chat_answer(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "mock-1",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    }


def test_a_chat_answer_becomes_a_response_the_sdk_reads() -> None:
    turn = to_chat({"model": "mock-1", "input": "hi", "instructions": "be brief", "metadata": {"a": "b"}})
    response = turn.response(chat_answer({"content": "Hello!"}))
    parsed = Response.model_validate(response)
    assert parsed.id.startswith("resp_") and parsed.object == "response" and parsed.status == "completed"
    assert parsed.output_text == "Hello!"
    (item,) = response["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_") and item["status"] == "completed"
    assert item["content"] == [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]
    assert parsed.usage is not None
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == (7, 3, 10)
    assert parsed.usage.input_tokens_details.cached_tokens == 4
    assert parsed.usage.output_tokens_details.reasoning_tokens == 1
    assert (parsed.instructions, parsed.metadata, parsed.model) == ("be brief", {"a": "b"}, "mock-1")
    assert parsed.tool_choice == "auto" and parsed.tools == [] and parsed.parallel_tool_calls is True


def test_tool_calls_become_function_call_items_and_length_is_incomplete() -> None:
    turn = to_chat({"model": "mock-1", "input": "weather?", "tools": [WEATHER]})
    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    response = turn.response(chat_answer({"content": None, "tool_calls": [call]}, "tool_calls"))
    Response.model_validate(response)
    (item,) = response["output"]
    assert item["type"] == "function_call" and item["id"].startswith("fc_")
    assert (item["call_id"], item["name"], item["arguments"]) == ("call_7", "get_weather", '{"city":"Oslo"}')
    assert response["status"] == "completed" and response["tools"][0]["name"] == "get_weather"

    cut = turn.response(chat_answer({"content": "It is"}, "length"))
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["status"] == "incomplete"
    filtered = turn.response(chat_answer({"content": "no"}, "content_filter"))
    assert filtered["incomplete_details"] == {"reason": "content_filter"}


# --- streams ----------------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c", "object": "chat.completion.chunk", "model": "mock-1", "choices": choices, **extra}


def tool_delta(index: int, call_id: str | None = None, name: str | None = None, args: str = "") -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


USAGE = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def run(turn: Turn, chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ResponsesStream]:
    encoder = ResponsesStream(turn)
    events = encoder.start()
    for c in chunks:
        events += encoder.feed(c)
    events += encoder.finish()
    return events, encoder


def accumulate(events: list[dict[str, Any]]) -> Any:
    """The openai SDK's own stream accumulator over the events: it raises on a grammar it
    does not accept (content before its item, a duplicate output index, ...)."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in events:
        state.handle_event(EVENTS.validate_python(json.loads(json.dumps(event))))
    return state


def test_a_text_stream_in_order_with_sequence_numbers_from_zero() -> None:
    turn = to_chat({"model": "mock-1", "input": "hi", "stream": True})
    pieces = ["Hel", "lo", " there"]
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": p}) for p in pieces[:-1]]
    chunks.append(chunk({"content": pieces[-1]}, "stop"))  # content and finish in one chunk
    chunks.append(chunk(None, usage=USAGE))
    events, encoder = run(turn, chunks)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(d["logprobs"] == [] for d in deltas)
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert "".join(d["delta"] for d in deltas) == done["text"] == "Hello there"
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] == turn.response_id
    assert final["usage"]["input_tokens"] == 5 and final["usage"]["total_tokens"] == 9
    assert Response.model_validate(final).output_text == "Hello there"
    assert encoder.response == final
    state = accumulate(events)
    assert state._completed_response is not None
    assert state._completed_response.output_text == "Hello there"
    # The non-streamed translation of the same answer has the same text.
    whole = turn.response(chat_answer({"content": "Hello there"}))
    assert Response.model_validate(whole).output_text == Response.model_validate(final).output_text


def test_tool_call_items_keep_their_output_index_and_arguments_concatenate() -> None:
    turn = to_chat({"model": "mock-1", "input": "weather?", "tools": [WEATHER], "stream": True})
    chunks = [
        chunk({"role": "assistant", "content": "Checking."}),
        # id, name and a first piece of arguments in one chunk; id-less follow-ups by index.
        chunk(tool_delta(0, "call_a", "get_weather", '{"ci')),
        chunk(tool_delta(1, "call_b", "get_weather", "")),
        chunk(tool_delta(0, args='ty":"Paris"}')),
        chunk(tool_delta(1, args='{"city":"Oslo"}')),
        chunk({}, "tool_calls"),
        chunk(None, usage=USAGE),
    ]
    events, _ = run(turn, chunks)
    types = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    # The text message closes before the first call opens.
    assert types.index("response.output_item.done") < types.index("response.function_call_arguments.delta")
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "message"),
        (1, "function_call"),
        (2, "function_call"),
    ]
    index_of = {e["item"]["call_id"]: e["output_index"] for e in added if e["item"]["type"] == "function_call"}
    for e in events:
        if e["type"].startswith("response.function_call_arguments"):
            item = next(a["item"] for a in added if a["output_index"] == e["output_index"])
            assert e["item_id"] == item["id"]
    for call_id, index in index_of.items():
        deltas = [
            e["delta"]
            for e in events
            if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == index
        ]
        done = next(
            e for e in events if e["type"] == "response.function_call_arguments.done" and e["output_index"] == index
        )
        assert "".join(deltas) == done["arguments"]
        json.loads(done["arguments"])
        item_done = next(e for e in events if e["type"] == "response.output_item.done" and e["output_index"] == index)
        assert item_done["item"]["call_id"] == call_id and item_done["item"]["status"] == "completed"
    # Each item's lifecycle: added, deltas, arguments.done, item.done, in that order.
    for index in index_of.values():
        lifecycle = [e["type"] for e in events if e.get("output_index") == index]
        assert lifecycle[0] == "response.output_item.added" and lifecycle[-1] == "response.output_item.done"
        assert lifecycle[-2] == "response.function_call_arguments.done"
    final = events[-1]
    assert final["type"] == "response.completed"
    assert [i["type"] for i in final["response"]["output"]] == ["message", "function_call", "function_call"]
    assert final["response"]["output"][1]["arguments"] == '{"city":"Paris"}'
    accumulate(events)


def test_the_same_tool_index_reused_with_another_id_opens_a_new_item() -> None:
    turn = to_chat({"model": "mock-1", "input": "x", "tools": [WEATHER], "stream": True})
    events, _ = run(
        turn,
        [
            chunk(tool_delta(0, "call_a", "get_weather", "{}")),
            chunk(tool_delta(0, "call_b", "get_weather", "{}")),
            chunk({}, "tool_calls"),
        ],
    )
    output = events[-1]["response"]["output"]
    assert [(i["call_id"], i["arguments"]) for i in output] == [("call_a", "{}"), ("call_b", "{}")]
    accumulate(events)


def test_a_length_stop_ends_with_response_incomplete() -> None:
    turn = to_chat({"model": "mock-1", "input": "x", "stream": True, "max_output_tokens": 2})
    events, _ = run(turn, [chunk({"content": "It is"}), chunk({}, "length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    item_done = next(e for e in events if e["type"] == "response.output_item.done")
    assert item_done["item"]["status"] == "incomplete"


def test_a_failure_after_the_start_is_response_failed_with_the_next_sequence_number() -> None:
    turn = to_chat({"model": "mock-1", "input": "x", "stream": True})
    encoder = ResponsesStream(turn)
    events = encoder.start() + encoder.feed(chunk({"content": "Hal"}))
    events += encoder.fail(GatewayError(502, "upstream went away", "upstream_error"))
    assert events[-1]["type"] == "response.failed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {"code": "server_error", "message": "upstream went away"}
    assert failed["output"][0]["status"] == "incomplete"
    Response.model_validate(failed)
    assert not any(e["type"] == "response.completed" for e in events)


# --- storage without Redis --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_in_process_store_is_per_key_expires_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from clawdbot.adapter.dialects import responses_api

    monkeypatch.setattr(responses_api, "LOCAL_MAX_RESPONSES", 2)
    store = responses_api.ResponseStore(None, ttl_s=60)
    await store.put("resp_a", {"key": "k1", "response": {"id": "resp_a"}})
    assert (await store.get("k1", "resp_a") or {})["response"] == {"id": "resp_a"}
    assert await store.get("k2", "resp_a") is None  # another key's: not found
    assert not await store.delete("k2", "resp_a")
    await store.put("resp_b", {"key": "k1"})
    await store.put("resp_c", {"key": "k1"})
    assert await store.get("k1", "resp_a") is None  # the oldest went first
    assert await store.delete("k1", "resp_c") and await store.get("k1", "resp_c") is None
    expired = responses_api.ResponseStore(None, ttl_s=-1)
    await expired.put("resp_d", {"key": "k1"})
    assert await expired.get("k1", "resp_d") is None


@pytest.mark.asyncio
async def test_input_items_pages_after_limit_and_order() -> None:
    from clawdbot.adapter.dialects import responses_api
    from clawdbot.gen.v1 import gateway_pb2, router_pb2

    store = responses_api.ResponseStore(None)
    service = responses_api.ResponsesService(None, store)  # type: ignore[arg-type]
    items = [{"id": f"msg_{i}", "type": "message"} for i in range(5)]
    await store.put("resp_1", {"key": "k", "input_items": items})
    meta = router_pb2.RequestMeta(api_key_id="k")

    def ids(page: dict[str, Any]) -> list[str]:
        return [item["id"] for item in page["data"]]

    first = await service.input_items(meta, gateway_pb2.ResponseRequest(id="resp_1", limit=2))
    assert ids(first) == ["msg_4", "msg_3"] and first["has_more"] is True
    assert (first["first_id"], first["last_id"]) == ("msg_4", "msg_3")
    rest = await service.input_items(meta, gateway_pb2.ResponseRequest(id="resp_1", after="msg_3"))
    assert ids(rest) == ["msg_2", "msg_1", "msg_0"] and rest["has_more"] is False
    asc = await service.input_items(meta, gateway_pb2.ResponseRequest(id="resp_1", order="asc", limit=100))
    assert ids(asc) == [f"msg_{i}" for i in range(5)]
    for bad_request in (
        gateway_pb2.ResponseRequest(id="resp_1", order="sideways"),
        gateway_pb2.ResponseRequest(id="resp_1", limit=101),
    ):
        with pytest.raises(GatewayError) as caught:
            await service.input_items(meta, bad_request)
        assert caught.value.status == 400
    with pytest.raises(GatewayError) as missing:
        await service.input_items(router_pb2.RequestMeta(api_key_id="other"), gateway_pb2.ResponseRequest(id="resp_1"))
    assert missing.value.status == 404


def test_reasoning_becomes_a_reasoning_item_and_a_replayed_one_is_accepted() -> None:
    turn = to_chat({"model": "m", "input": "think"})
    response = turn.response(chat_answer({"content": "42", "reasoning_content": "6 times 7"}))
    Response.model_validate(response)
    assert [i["type"] for i in response["output"]] == ["reasoning", "message"]
    assert response["output"][0]["content"] == [{"type": "reasoning_text", "text": "6 times 7"}]
    assert response["output"][0]["id"].startswith("rs_")
    # A client that keeps its own history sends the reasoning item back: not an error,
    # and nothing Chat could take (its text is not re-sent upstream).
    replay = to_chat({"model": "m", "input": [{"role": "user", "content": "think"}, *response["output"]]})
    assert replay.chat["messages"] == [{"role": "user", "content": "think"}, {"role": "assistant", "content": "42"}]
    assert [i["type"] for i in replay.input_items] == ["message", "reasoning", "message"]


def test_a_stream_switching_from_reasoning_to_text() -> None:
    turn = to_chat({"model": "m", "input": "think", "stream": True})
    events, _ = run(
        turn,
        [
            chunk({"role": "assistant", "reasoning_content": "6 times"}),
            chunk({"reasoning_content": " 7", "content": "4"}),  # the switch, in one chunk
            chunk({"content": "2"}, "stop"),
        ],
    )
    types = [e["type"] for e in events]
    assert types[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"][0]["text"] == "6 times 7"
    assert Response.model_validate(final).output_text == "42"  # the first token after the switch kept
    accumulate(events)


# --- pass-through: an upstream's own Responses events ---------------------------------------


@pytest.mark.asyncio
async def test_native_events_are_relayed_under_our_id_and_sequence_and_stored() -> None:
    from clawdbot.adapter.dialects import responses_api
    from clawdbot.gen.v1 import router_pb2

    store = responses_api.ResponseStore(None)
    service = responses_api.ResponsesService(None, store)  # type: ignore[arg-type]
    body = {"model": "m", "input": "hi", "stream": True}
    prepared = responses_api.Prepared(to_chat(body), parse_chat(to_chat(body).chat))
    upstream_response = {"id": "resp_upstream", "object": "response", "status": "completed", "output": []}
    native = [
        {"type": "response.created", "sequence_number": 7, "response": {**upstream_response, "status": "in_progress"}},
        {"type": "response.output_text.delta", "sequence_number": 9, "delta": "x", "item_id": "msg_1"},
        {"type": "response.completed", "sequence_number": 12, "response": upstream_response},
    ]

    async def events() -> Any:
        for event in native:
            yield router_pb2.StreamEvent(chunk_json=json_dumps(event))

    meta = router_pb2.RequestMeta(api_key_id="k")
    relayed = [event async for event in service.relay(prepared, meta, events())]
    assert [e["sequence_number"] for e in relayed] == [0, 1, 2]
    assert [e["type"] for e in relayed] == [e["type"] for e in native]
    assert relayed[1]["delta"] == "x" and relayed[1]["item_id"] == "msg_1"  # fields kept
    assert relayed[0]["response"]["id"] == relayed[2]["response"]["id"] == prepared.turn.response_id
    stored = await store.get("k", prepared.turn.response_id)
    assert stored is not None and stored["response"]["status"] == "completed"
