"""The adapter's side of the audio routes: multipart uploads and transcript formats."""

from __future__ import annotations

import os

import httpx
import orjson
import pytest

from clawdbot.adapter.openai_requests import parse_speech, parse_transcription
from clawdbot.adapter.transcripts import render_transcription
from clawdbot.common.errors import GatewayError


def multipart(files: dict[str, tuple[str, bytes, str]], data: dict[str, str]) -> tuple[str, bytes]:
    """A body exactly as an HTTP client encodes it."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.headers["content-type"], request.read()


def test_an_upload_round_trips_binary_audio_byte_for_byte() -> None:
    audio = os.urandom(70_000) + b"\r\n--\r\n\r\n" + bytes(range(256))
    content_type, body = multipart(
        {"file": ("a.wav", audio, "audio/wav")},
        {"model": "pocketsphinx-en", "language": "en", "temperature": "0.2", "response_format": "srt"},
    )
    parsed, response_format = parse_transcription(content_type, body)
    assert parsed.binary == audio
    assert parsed.body == {"model": "pocketsphinx-en", "language": "en", "temperature": 0.2}
    assert (parsed.task, parsed.model, response_format) == ("transcription", "pocketsphinx-en", "srt")


@pytest.mark.parametrize(
    ("files", "data", "content_type", "param", "needle"),
    [
        ({}, {"model": "m"}, None, "file", "file"),
        ({"file": ("a.wav", b"", "audio/wav")}, {"model": "m"}, None, "file", "empty"),
        ({"file": ("a.wav", b"RIFF", "audio/wav")}, {}, None, "model", "model"),
        (
            {"file": ("a.wav", b"RIFF", "audio/wav")},
            {"model": "m", "response_format": "mp3"},
            None,
            "response_format",
            "mp3",
        ),
        (
            {"file": ("a.wav", b"RIFF", "audio/wav")},
            {"model": "m", "temperature": "warm"},
            None,
            "temperature",
            "decimal",
        ),
        ({"file": ("a.wav", b"RIFF", "audio/wav")}, {"model": "m"}, "application/json", None, "multipart"),
        ({"file": ("a.wav", b"RIFF", "audio/wav")}, {"model": "m"}, "multipart/form-data", None, "boundary"),
    ],
)
def test_bad_uploads_are_400s_naming_the_field(
    files: dict[str, tuple[str, bytes, str]],
    data: dict[str, str],
    content_type: str | None,
    param: str | None,
    needle: str,
) -> None:
    sent_type, body = multipart(files or {"other": ("x", b"y", "text/plain")}, data)
    with pytest.raises(GatewayError) as caught:
        parse_transcription(content_type or sent_type, body)
    assert caught.value.status == 400 and caught.value.param == param
    assert needle in caught.value.message


def test_a_truncated_multipart_body_is_a_400() -> None:
    content_type, body = multipart({"file": ("a.wav", b"RIFF....", "audio/wav")}, {"model": "m"})
    with pytest.raises(GatewayError) as caught:
        parse_transcription(content_type, body[: len(body) // 2])
    assert caught.value.status == 400


def test_speech_requests_need_text_and_a_voice() -> None:
    assert parse_speech({"model": "espeak-ng", "input": "hi", "voice": "alloy"}).task == "speech"
    for body, param in (
        ({"model": "espeak-ng", "voice": "alloy"}, "input"),
        ({"model": "espeak-ng", "input": "hi"}, "voice"),
        ({"model": "espeak-ng", "input": " ", "voice": "alloy"}, "input"),
        ({"model": "espeak-ng", "input": "hi", "voice": "alloy", "speed": "fast"}, "speed"),
    ):
        with pytest.raises(GatewayError) as caught:
            parse_speech(body)
        assert caught.value.param == param


def test_transcripts_render_in_every_openai_format() -> None:
    data = {"text": "turn on the lights", "language": "english", "duration": 3661.5, "usage": {"seconds": 3661.5}}
    assert render_transcription(data, "text") == (b"turn on the lights\n", "text/plain; charset=utf-8")
    assert orjson.loads(render_transcription(data, "json")[0]) == {
        "text": "turn on the lights",
        "usage": {"seconds": 3661.5},
    }
    srt = render_transcription(data, "srt")[0].decode()
    assert srt == "1\n00:00:00,000 --> 01:01:01,500\nturn on the lights\n\n"
    vtt = render_transcription(data, "vtt")[0].decode()
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 01:01:01.500\n")
    verbose = orjson.loads(render_transcription(data, "verbose_json")[0])
    assert verbose["segments"][0]["end"] == 3661.5 and verbose["language"] == "english"
