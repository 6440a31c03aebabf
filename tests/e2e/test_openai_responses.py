"""OpenAI's Responses API through Envoy, with the official openai SDK, against the
OpenAI-compatible mock (a Chat Completions upstream: every call is translated to Chat
and back), responses stored in the mesh's Redis:

- responses.create plain, streamed (the SDK's stream helper; its final response has the
  non-streamed one's text; the raw SSE bytes: one named event per frame, sequence
  numbers from 0, no [DONE]), with function tools and a function_call_output round trip,
  with previous_response_id (the upstream receives the whole conversation);
- responses.retrieve, responses.delete, responses.input_items.list,
  responses.input_tokens.count; another key's response is not found;
- errors: an unknown previous_response_id is a 404 previous_response_not_found, a bad
  input type or a hosted tool a 400 naming the field;
- the typed gRPC twin (CreateResponse) once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import pytest

from tests import support
from tests.conftest import Mesh, core_mesh_config, running_mesh

pytestmark = pytest.mark.e2e

WEATHER: Any = {  # the SDK types tools as TypedDicts
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def responses_mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("responses")
    # Redis on (the runner starts one): the responses are stored there.
    config = core_mesh_config(mock_upstream, tmp, cache={"object_dir": str(tmp / "objects")})
    with running_mesh(tmp, config, mock_upstream) as mesh:
        yield mesh


def sdk(mesh: Mesh, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.v1, api_key=key or mesh.api_key, max_retries=0, timeout=60)


def upstream_request(mesh: Mesh) -> dict[str, Any]:
    """The last Chat request the mock received for mock-1."""
    base = mesh.mock_url.removesuffix("/v1")
    reply = httpx.get(f"{base}/_mock/last", params={"model": "mock-1"}, timeout=30)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()["body"]
    return body


def test_create_plain(responses_mesh: Mesh) -> None:
    client = sdk(responses_mesh)
    response = client.responses.create(model="mock-1", input="hello there", instructions="Be brief.")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed"
    assert response.output_text == "Hello from mock-1: hello there"
    assert response.instructions == "Be brief."
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    sent = upstream_request(responses_mesh)
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]


def test_create_streamed_matches_the_plain_answer(responses_mesh: Mesh) -> None:
    client = sdk(responses_mesh)
    plain = client.responses.create(model="mock-1", input="stream me please")
    kinds: list[str] = []
    with client.responses.stream(model="mock-1", input="stream me please") as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert final.output_text == plain.output_text == "Hello from mock-1: stream me please"
    assert final.status == "completed" and final.usage is not None and final.usage.output_tokens > 0
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    # The streamed response was stored like any other.
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_the_raw_stream_has_one_named_event_per_frame(responses_mesh: Mesh) -> None:
    body = {"model": "mock-1", "input": "raw bytes", "stream": True}
    with httpx.stream(
        "POST", f"{responses_mesh.v1}/responses", json=body, headers=responses_mesh.auth_headers, timeout=60
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(reply.iter_bytes())
    frames = [f for f in raw.decode().split("\n\n") if f]
    assert b"[DONE]" not in raw
    events = []
    for frame in frames:
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        event = json.loads(data_line.removeprefix("data: "))
        assert event["type"] == event_line.removeprefix("event: ")
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello from mock-1: raw bytes"
    assert events[-1]["type"] == "response.completed"


def test_function_tools_and_a_function_call_output_round_trip(responses_mesh: Mesh) -> None:
    client = sdk(responses_mesh)
    first = client.responses.create(model="mock-1", input="What is the weather in Paris?", tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments), dict) and calls[0].call_id
    sent = upstream_request(responses_mesh)
    assert sent["tools"][0] == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER["parameters"],
        },
    }
    # The answer to the call, continuing the stored conversation.
    second = client.responses.create(
        model="mock-1",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],
    )
    assert second.status == "completed" and second.output_text
    messages = upstream_request(responses_mesh)["messages"]
    # The rebuilt history holds the call the output answers, right before it.
    assert messages[-2]["role"] == "assistant"
    assert messages[-2]["tool_calls"][0]["id"] == calls[0].call_id
    assert messages[-1] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny, 21 C"}

    # Stateless, the way a store:false client does it: the call item replayed with its output.
    replayed = client.responses.create(
        model="mock-1",
        store=False,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": "call_x", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_x", "output": "rainy"},
        ],
        tools=[WEATHER],
    )
    assert replayed.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(replayed.id)  # store: false is not stored


def test_streamed_tool_calls(responses_mesh: Mesh) -> None:
    client = sdk(responses_mesh)
    with client.responses.stream(model="mock-1", input="Weather in Oslo?", tools=[WEATHER]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and isinstance(json.loads(calls[0].arguments), dict)
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"


def test_previous_response_id_continues_the_conversation(responses_mesh: Mesh) -> None:
    client = sdk(responses_mesh)
    first = client.responses.create(model="mock-1", input="My name is Ada.", instructions="Only the first turn.")
    second = client.responses.create(model="mock-1", input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.output_text == "Hello from mock-1: What is my name?"
    # The instructions are not carried over (as OpenAI does); the conversation is.
    assert upstream_request(responses_mesh)["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]


def test_retrieve_input_items_count_and_delete(responses_mesh: Mesh) -> None:
    client = sdk(responses_mesh)
    created = client.responses.create(
        model="mock-1",
        input=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ],
        metadata={"topic": "counting"},
    )
    got = client.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == created.output_text and got.metadata == {"topic": "counting"}

    def texts(page: Any) -> list[str]:
        return [item.content[0].text for item in page.data]

    items = client.responses.input_items.list(created.id)
    assert texts(items) == ["three", "two", "one"]
    ascending = client.responses.input_items.list(created.id, order="asc", limit=2)
    assert texts(ascending) == ["one", "two"]
    assert ascending.has_more is True
    rest = client.responses.input_items.list(created.id, order="asc", after=ascending.data[-1].id)
    assert texts(rest) == ["three"]
    assert rest.has_more is False

    counted = client.responses.input_tokens.count(model="mock-1", input="count these words please")
    assert counted.object == "response.input_tokens" and counted.input_tokens > 0
    bigger = client.responses.input_tokens.count(
        model="mock-1", input="count these words please", instructions="x " * 200, tools=[WEATHER]
    )
    assert bigger.input_tokens > counted.input_tokens + 50
    continued = client.responses.input_tokens.count(model="mock-1", input="and more", previous_response_id=created.id)
    assert continued.input_tokens > 0

    reply = httpx.delete(f"{responses_mesh.v1}/responses/{created.id}", headers=responses_mesh.auth_headers, timeout=30)
    assert reply.status_code == 200
    assert reply.json() == {"id": created.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_another_keys_response_is_not_found(responses_mesh: Mesh) -> None:
    created = httpx.post(
        f"{responses_mesh.v1}/admin/keys", headers=responses_mesh.auth_headers, json={"name": "other"}, timeout=30
    )
    assert created.status_code == 201, created.text
    other = sdk(responses_mesh, created.json()["key"])
    mine = sdk(responses_mesh).responses.create(model="mock-1", input="private")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError) as caught:
        other.responses.create(model="mock-1", input="x", previous_response_id=mine.id)
    assert caught.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    assert sdk(responses_mesh).responses.retrieve(mine.id).id == mine.id  # still there


def test_errors_name_the_field(responses_mesh: Mesh) -> None:
    client = sdk(responses_mesh)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="mock-1", input="x", previous_response_id="resp_unknown")
    assert missing.value.status_code == 404
    assert missing.value.code == "previous_response_not_found" and missing.value.param == "previous_response_id"

    unstored = client.responses.create(model="mock-1", input="not kept", store=False)
    with pytest.raises(openai.NotFoundError) as not_kept:
        client.responses.create(model="mock-1", input="x", previous_response_id=unstored.id)
    assert not_kept.value.code == "previous_response_not_found"

    with pytest.raises(openai.BadRequestError) as bad_input:
        client.responses.create(model="mock-1", input=cast(Any, 42))
    assert bad_input.value.status_code == 400 and bad_input.value.param == "input"

    with pytest.raises(openai.BadRequestError) as hosted:
        client.responses.create(model="mock-1", input="x", tools=[{"type": "web_search"}])
    assert hosted.value.param == "tools[0].type"

    with (
        pytest.raises(openai.BadRequestError) as streamed_bad,
        client.responses.stream(model="mock-1", input="x", tools=[{"type": "file_search", "vector_store_ids": ["v"]}]),
    ):
        pass
    assert streamed_bad.value.param == "tools[0].type"

    reply = httpx.post(
        f"{responses_mesh.v1}/responses",
        json={"model": "mock-1", "input": "x"},
        headers={"Authorization": "Bearer wrong"},
        timeout=30,
    )
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_the_typed_grpc_twin(responses_mesh: Mesh) -> None:
    headers = (f"authorization: Bearer {responses_mesh.api_key}",)
    result = support.grpcurl(
        responses_mesh.grpc_target,
        "clawdbot.v1.Gateway/CreateResponse",
        data={"model": "mock-1", "input": "over grpc", "max_output_tokens": 64},
        headers=headers,
    )
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert response["object"] == "response" and response["status"] == "completed"
    assert response["output"][0]["content"][0]["text"] == "Hello from mock-1: over grpc"
    assert response["max_output_tokens"] == 64
    # Stored like a REST one: the REST route finds it.
    got = sdk(responses_mesh).responses.retrieve(response["id"])
    assert got.output_text == "Hello from mock-1: over grpc"


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for frame in (f for f in raw.decode().split("\n\n") if f):
        event_line, data_line = frame.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert event["type"] == event_line.removeprefix("event: ")
        events.append(event)
    return events


def test_a_stream_cut_upstream_ends_with_response_failed(responses_mesh: Mesh) -> None:
    # `mock` is not a Responses field: it passes through to the Chat upstream, as on Chat.
    body = {"model": "mock-1", "input": "cut me off early", "stream": True, "mock": {"drop_midstream": True}}
    with httpx.stream(
        "POST", f"{responses_mesh.v1}/responses", json=body, headers=responses_mesh.auth_headers, timeout=60
    ) as reply:
        assert reply.status_code == 200
        events = sse_events(b"".join(reply.iter_bytes()))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert not any(e["type"] == "response.completed" for e in events)


def test_an_upstream_refusal_before_the_stream_keeps_its_status(responses_mesh: Mesh) -> None:
    client = sdk(responses_mesh)
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="mock-1", input="x", extra_body={"mock": {"status": 429}})
    with (
        pytest.raises(openai.RateLimitError),
        client.responses.stream(model="mock-1", input="x", extra_body={"mock": {"status": 429}}),
    ):
        pass
