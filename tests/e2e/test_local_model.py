"""The default local model, Gemma 3 270M on llama.cpp, answers through the gateway."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.local_model]


def test_gemma_generates_text(local_models: Mesh) -> None:
    mesh = local_models
    client = openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "The capital of France is"}],
        max_tokens=16,
        temperature=0,
    )
    text = reply.choices[0].message.content or ""
    assert len(text.strip()) > 0
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=8, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed.strip()
