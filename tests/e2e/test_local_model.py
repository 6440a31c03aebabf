"""The local chat model, Gemma 3 270M on llama.cpp in the worker, answers through the gateway."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.local_model]

MODEL = "gemma-3-270m"


def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=120)


def test_the_base_model_answers_as_an_assistant(local_models: Mesh) -> None:
    reply = client(local_models).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of Japan?"}],
        max_tokens=32,
        temperature=0,
    )
    text = reply.choices[0].message.content or ""
    assert "Tokyo" in text, text
    # The prompt's stop sequences end the answer before the model writes the user's turn.
    assert "User:" not in text and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and 0 < reply.usage.completion_tokens < 32 and reply.usage.prompt_tokens > 0


def test_chat_streams_token_by_token_with_usage(local_models: Mesh) -> None:
    stream = client(local_models).chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You tell very short stories."},
            {"role": "user", "content": "Tell me a story about a cat."},
        ],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces).strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])


def test_a_prompt_over_the_context_window_is_a_400(local_models: Mesh) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(local_models).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=8
        )
    assert caught.value.code == "context_length_exceeded"
