"""The base model's prompt: a transcript ending on the assistant's cue, and sampling checks."""

from __future__ import annotations

import pytest

from clawdbot.common.errors import GatewayError
from clawdbot.worker.chat import STOP_SEQUENCES, build_prompt, parse_sampling


def test_the_prompt_is_a_transcript_ending_on_the_assistants_cue() -> None:
    prompt = build_prompt(
        [
            {"role": "system", "content": "You speak like a pirate."},
            {"role": "user", "content": "Hello\n  there"},
            {"role": "assistant", "content": "Ahoy."},
            {"role": "user", "content": [{"type": "text", "text": "Where is"}, {"type": "text", "text": "the gold?"}]},
        ]
    )
    assert prompt.endswith("User: Hello there\nAssistant: Ahoy.\nUser: Where is the gold?\nAssistant:")
    assert prompt.splitlines()[1] == "You speak like a pirate."  # system text describes the assistant
    # Every turn is one line, so a newline-led stop sequence can only mean a new turn.
    assert all(stop.startswith("\n") or stop.startswith("<") for stop in STOP_SEQUENCES)


def test_images_are_refused_by_a_text_model() -> None:
    with pytest.raises(GatewayError) as caught:
        build_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert caught.value.status == 400 and caught.value.param == "messages[0].content"


def test_sampling_defaults_and_limits() -> None:
    sampling = parse_sampling({"stop": "END", "seed": 7})
    assert sampling.stop == (*STOP_SEQUENCES, "END") and sampling.seed == 7 and sampling.max_tokens is None
    assert 0 < sampling.temperature < 1
    for body, param in (
        ({"temperature": 3}, "temperature"),
        ({"top_p": "x"}, "top_p"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
    ):
        with pytest.raises(GatewayError) as caught:
            parse_sampling(body)
        assert caught.value.param == param, body
