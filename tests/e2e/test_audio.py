"""Speech in, understanding, speech out: the worker's audio and intent models through Envoy."""

from __future__ import annotations

import io
import json
import wave

import httpx
import openai
import pytest

from tests import support
from tests.conftest import Mesh

pytestmark = [pytest.mark.e2e, pytest.mark.local_model]

COMMAND = "turn on the kitchen lights"


def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.v1, api_key=mesh.api_key, max_retries=0, timeout=120)


def http(mesh: Mesh) -> httpx.Client:
    return httpx.Client(headers={"authorization": f"Bearer {mesh.api_key}"}, timeout=120)


def speak(mesh: Mesh, text: str, **options: object) -> bytes:
    reply = client(mesh).audio.speech.create(model="espeak-ng", voice="alloy", input=text, **options)  # type: ignore[arg-type]
    return reply.read()


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getsampwidth() == 2 and wav.getnchannels() == 1
        return wav.getnframes() / wav.getframerate()


def test_speech_to_text_to_intent_round_trip(local_models: Mesh) -> None:
    mesh = local_models
    audio = speak(mesh, COMMAND, response_format="wav")
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
    assert 0.8 < wav_seconds(audio) < 10

    transcript = client(mesh).audio.transcriptions.create(
        model="pocketsphinx-en", file=("command.wav", audio, "audio/wav")
    )
    assert "kitchen" in transcript.text and "lights" in transcript.text, transcript.text

    r = http(mesh).post(f"{mesh.v1}/intents", json={"model": "intent-classifier", "input": transcript.text})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["data"][0]["intent"] == "lights_on"
    assert result["model_version"]
    assert r.headers["x-clawdbot-model-instance"] == "intent-classifier"


def test_speech_options_and_formats(local_models: Mesh) -> None:
    mesh = local_models
    normal = wav_seconds(speak(mesh, "the weather is sunny today"))
    fast = wav_seconds(speak(mesh, "the weather is sunny today", speed=2.0))
    assert fast < normal * 0.75
    pcm = client(mesh).audio.speech.create(model="espeak-ng", voice="en-gb", input="hello", response_format="pcm")
    assert pcm.response.headers["content-type"].startswith("audio/pcm") and len(pcm.read()) > 1000


def test_transcription_response_formats(local_models: Mesh) -> None:
    mesh = local_models
    audio = speak(mesh, "set a timer for ten minutes")
    files = {"file": ("timer.wav", audio, "audio/wav")}
    with http(mesh) as h:
        text = h.post(
            f"{mesh.v1}/audio/transcriptions", files=files, data={"model": "pocketsphinx-en", "response_format": "text"}
        )
        assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
        assert "timer" in text.text
        vtt = h.post(
            f"{mesh.v1}/audio/transcriptions", files=files, data={"model": "pocketsphinx-en", "response_format": "vtt"}
        )
        assert vtt.text.startswith("WEBVTT") and "-->" in vtt.text
        verbose = h.post(
            f"{mesh.v1}/audio/transcriptions",
            files=files,
            data={"model": "pocketsphinx-en", "response_format": "verbose_json"},
        ).json()
        assert verbose["duration"] > 0.5 and verbose["language"] == "english"


def test_intent_over_grpc(local_models: Mesh) -> None:
    mesh = local_models
    result = support.grpcurl(
        mesh.grpc_target,
        "clawdbot.v1.Gateway/ClassifyIntent",
        data={"model": "intent-classifier", "input": ["switch off the bedroom light", "play some jazz"], "top_n": 2},
        headers=(f"authorization: Bearer {mesh.api_key}",),
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert [d["intent"] for d in reply["data"]] == ["lights_off", "music"]
    assert len(reply["data"][0]["ranking"]) == 2


@pytest.mark.parametrize(
    ("route", "request_kwargs", "param"),
    [
        ("audio/speech", {"json": {"model": "espeak-ng", "voice": "alloy", "input": "   "}}, "input"),
        ("audio/speech", {"json": {"model": "espeak-ng", "voice": "robot-9000", "input": "hi"}}, "voice"),
        ("audio/speech", {"json": {"model": "espeak-ng", "voice": "alloy", "input": "a" * 5000}}, "input"),
        (
            "audio/speech",
            {"json": {"model": "espeak-ng", "voice": "alloy", "input": "hi", "response_format": "mp3"}},
            "response_format",
        ),
        (
            "audio/transcriptions",
            {"files": {"file": ("x.wav", b"definitely not audio", "audio/wav")}, "data": {"model": "pocketsphinx-en"}},
            "file",
        ),
        ("audio/transcriptions", {"data": {"model": "pocketsphinx-en"}, "files": {"other": ("a", b"b")}}, "file"),
        ("audio/transcriptions", {"json": {"model": "pocketsphinx-en"}}, None),
        ("intents", {"json": {"model": "intent-classifier", "input": ""}}, "input"),
        ("intents", {"json": {"model": "all-minilm-l6-v2", "input": "hi"}}, "model"),
    ],
)
def test_bad_audio_and_text_input_is_a_clear_400(
    local_models: Mesh, route: str, request_kwargs: dict[str, object], param: str | None
) -> None:
    mesh = local_models
    r = http(mesh).post(f"{mesh.v1}/{route}", **request_kwargs)  # type: ignore[arg-type]
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error
