"""Any model serves any dialect, through Envoy with the official SDKs: an OpenAI client
(Chat Completions and Responses) answered by a Claude model through the native Anthropic
connector (the mock speaks Anthropic's API), and Anthropic's and OpenAI's Responses clients
answered by the local Gemma through the worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import Mesh, core_mesh_config, running_mesh

pytestmark = pytest.mark.e2e

CLAUDE = "claude-mock"
UPSTREAM_KEY_ENV = "CLAWDBOT_TEST_ACROSS_ANTHROPIC_KEY"
GEMMA = "gemma-3-270m"
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def claude_mesh(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("across")
    models = [
        {
            "name": CLAUDE,
            "task": "chat",
            "connector": "anthropic",
            "base_url": mock_upstream,
            "api_key_env": UPSTREAM_KEY_ENV,
            "upstream_model": "claude-mock-1",
        }
    ]
    with pytest.MonkeyPatch.context() as patch:
        # The runner (and so the router) inherits the environment.
        patch.setenv(UPSTREAM_KEY_ENV, "sk-ant-upstream")
        config = core_mesh_config(mock_upstream, tmp, models=models, cache={"object_dir": str(tmp / "objects")})
        with running_mesh(tmp, config, mock_upstream) as mesh:
            yield mesh


def openai_client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=120)


def test_chat_completions_reach_claude_streamed_with_tools(claude_mesh: Mesh) -> None:
    client = openai_client(claude_mesh)
    plain = client.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hello claude"}])
    assert plain.choices[0].message.content == "Hello from claude-mock-1: hello claude"
    assert plain.choices[0].finish_reason == "stop" and plain.usage is not None and plain.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model=CLAUDE,
        messages=[{"role": "user", "content": "Weather in Nice? get_weather"}],
        tools=[WEATHER],
        stream=True,
        stream_options={"include_usage": True},
    )
    names: list[str] = []
    arguments = ""
    finish = None
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    arguments += call.function.arguments
            finish = choice.finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    assert isinstance(json.loads(arguments), dict)  # the deltas concatenate to valid JSON
    assert usage is not None and usage.completion_tokens > 0


def test_responses_reach_claude(claude_mesh: Mesh) -> None:
    client = openai_client(claude_mesh)
    first = client.responses.create(model=CLAUDE, input="hello from responses")
    assert first.status == "completed" and first.output_text == "Hello from claude-mock-1: hello from responses"
    follow = client.responses.create(model=CLAUDE, input="and again", previous_response_id=first.id)
    assert follow.output_text == "Hello from claude-mock-1: and again"
    with client.responses.stream(model=CLAUDE, input="hello from responses") as stream:
        final = stream.get_final_response()
    assert final.output_text == first.output_text


@pytest.mark.local_model
def test_anthropic_and_responses_clients_reach_the_local_gemma(local_models: Mesh) -> None:
    claude_sdk = anthropic.Anthropic(
        base_url=local_models.url, api_key=local_models.api_key, max_retries=0, timeout=300
    )
    question: Any = [{"role": "user", "content": "What is the capital of Japan?"}]
    message = claude_sdk.messages.create(model=GEMMA, max_tokens=8, messages=question, extra_body={"temperature": 0})
    assert message.type == "message" and message.content and message.content[0].type == "text"
    assert message.content[0].text.strip() and message.usage.output_tokens > 0
    assert message.stop_reason in ("end_turn", "max_tokens")

    with claude_sdk.messages.stream(
        model=GEMMA, max_tokens=8, messages=question, extra_body={"temperature": 0}
    ) as stream:
        streamed = stream.get_final_message()
    # Greedy decoding: the stream says what the plain call said.
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in message.content]

    response = openai_client(local_models).responses.create(
        model=GEMMA, input="What is the capital of Japan?", max_output_tokens=8, temperature=0
    )
    assert response.status in ("completed", "incomplete") and response.output_text.strip()
    assert response.usage is not None and response.usage.output_tokens > 0


def test_the_upstream_key_never_leaks_into_answers(claude_mesh: Mesh) -> None:
    """The router's x-api-key for the upstream stays between it and the upstream."""
    raw = openai_client(claude_mesh).chat.completions.with_raw_response.create(
        model=CLAUDE, messages=[{"role": "user", "content": "hi"}]
    )
    assert "sk-ant-upstream" not in raw.text and "sk-ant-upstream" not in str(dict(raw.headers))
