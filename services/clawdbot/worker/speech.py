"""The speech task on a local synthesiser: an OpenAI /v1/audio/speech request in, audio bytes out."""

from __future__ import annotations

import asyncio
from typing import Any, Final

import numpy as np

from clawdbot.common.errors import GatewayError
from clawdbot.worker.audio import encode_wav, resample, to_int16
from clawdbot.worker.runtimes.espeak import OPENAI_VOICES, Espeak, UnknownVoice

MAX_INPUT_CHARS: Final = 4096  # OpenAI's limit
MIN_SPEED: Final = 0.25
MAX_SPEED: Final = 4.0
# OpenAI defaults to mp3 and also offers opus, aac and flac; this task encodes only
# uncompressed audio, so it defaults to wav rather than refusing requests that name no format.
DEFAULT_FORMAT: Final = "wav"
FORMATS: Final = ("wav", "pcm")
# OpenAI's "pcm" is headerless 16-bit little-endian mono at 24 kHz, and clients hard-code
# that rate, so pcm is resampled to it; wav carries its rate in the header and keeps the
# synthesiser's own.
PCM_RATE: Final = 24000


class SpeechTask:
    def __init__(self, name: str, runtime: Espeak) -> None:
        self.name = name
        self._runtime = runtime

    async def answer(self, body: dict[str, Any]) -> tuple[bytes, str]:
        """The audio for `body` and its content type: ("RIFF...", "audio/wav") or raw PCM with its rate."""
        text = body.get("input")
        if not isinstance(text, str):
            raise GatewayError.bad_request("'input' must be a string: the text to speak.", "input", "invalid_type")
        if not text.strip():
            raise GatewayError.bad_request("'input' is empty.", "input", "empty_input")
        if len(text) > MAX_INPUT_CHARS:
            raise GatewayError.bad_request(
                f"'input' has {len(text)} characters; the limit is {MAX_INPUT_CHARS}.",
                "input",
                "string_above_max_length",
            )

        voice = body.get("voice")
        if not isinstance(voice, str) or not voice:
            raise GatewayError.bad_request(
                f"'voice' is required: one of {', '.join(OPENAI_VOICES)}, or an espeak-ng voice such as en+f3.",
                "voice",
                "invalid_type" if voice is not None else "missing_required_parameter",
            )
        try:
            self._runtime.resolve_voice(voice)
        except UnknownVoice as exc:
            raise GatewayError.bad_request(
                f"Unknown voice {voice!r} for {self.name}. Use one of {', '.join(OPENAI_VOICES)}, or an "
                f"espeak-ng language voice, optionally with a variant such as '+f3' "
                f"({', '.join(exc.accepted[len(OPENAI_VOICES) :])}).",
                "voice",
                "invalid_value",
            ) from exc

        speed = body.get("speed")
        if speed is None:
            speed = 1.0
        # bool is an int in Python; true/false is not a speed.
        if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
            raise GatewayError.bad_request(
                f"'speed' must be a number from {MIN_SPEED} to {MAX_SPEED}.", "speed", "invalid_value"
            )

        response_format = body.get("response_format")
        if response_format is None:
            response_format = DEFAULT_FORMAT
        if response_format not in FORMATS:
            raise GatewayError.bad_request(
                f"response_format {response_format!r} is not supported by {self.name}; "
                f"use {' or '.join(repr(f) for f in FORMATS)} (16-bit mono).",
                "response_format",
                "unsupported_value",
            )
        # 'instructions' (tone, accent) cannot steer a formant synthesiser; it is accepted and ignored,
        # as OpenAI ignores it for tts-1.

        # Synthesis and encoding are both CPU work (seconds for a long input), so both run off the event loop.
        return await asyncio.to_thread(self._render, text, voice, float(speed), response_format)

    def _render(self, text: str, voice: str, speed: float, response_format: str) -> tuple[bytes, str]:
        samples, rate = self._runtime.synthesize(text, voice, speed)
        if response_format == "pcm":
            pcm = to_int16(resample(samples.astype(np.float32) / np.float32(32768.0), rate, PCM_RATE))
            return pcm.astype("<i2", copy=False).tobytes(), f"audio/pcm;rate={PCM_RATE}"
        return encode_wav(samples, rate), "audio/wav"
