"""The transcription task on a local recogniser: an OpenAI /v1/audio/transcriptions request in, its text out."""

from __future__ import annotations

import asyncio
from typing import Any, Final

from clawdbot.common.audio_bounds import MIN_SECONDS
from clawdbot.common.errors import GatewayError
from clawdbot.worker.audio import AudioError, AudioTooLong, decode_wav, resample
from clawdbot.worker.runtimes.sphinx import Sphinx

# PocketSphinx decodes in about a tenth of real time with a domain vocabulary (a sixth
# with its general model) on one core, and a request holds the decoder's lock for all of
# it: five minutes keeps one request under about 30 s (50 s) on an idle machine.
MAX_SECONDS: Final = 300.0


class TranscriptionTask:
    def __init__(self, name: str, runtime: Sphinx, max_seconds: float = MAX_SECONDS) -> None:
        self.name = name
        self._runtime = runtime
        self._max_seconds = max_seconds

    async def answer(self, params: dict[str, Any], audio: bytes) -> dict[str, Any]:
        """{"text", "language", "duration"} for the WAV file `audio`; `params` are the request's other form fields.

        The adapter renders it in the requested response_format; prompt and temperature
        have no counterpart in this recogniser and are ignored.
        """
        language = params.get("language")
        if language not in (None, "", "en"):
            raise GatewayError.bad_request(
                f"{self.name} transcribes English only; 'language' must be 'en' or absent, not {language!r}.",
                "language",
                "unsupported_language",
            )
        if not audio:
            raise GatewayError.bad_request("The audio file is empty.", "file", "empty_file")
        # Decoding, resampling and recognition are all CPU work, so none of it runs on the event loop.
        text, duration = await asyncio.to_thread(self._transcribe, audio)
        # Usage as OpenAI reports it for audio, so per-second pricing applies to local models too.
        usage = {"type": "duration", "seconds": round(duration, 3)}
        return {"text": text, "language": "english", "duration": duration, "usage": usage}

    def _transcribe(self, audio: bytes) -> tuple[str, float]:
        try:
            samples, rate = decode_wav(audio, max_seconds=self._max_seconds)
        except AudioTooLong as exc:
            raise GatewayError.bad_request(str(exc), "file", "audio_too_long") from exc
        except AudioError as exc:
            raise GatewayError.bad_request(
                f"The audio file could not be decoded: {exc}", "file", "invalid_audio"
            ) from exc
        duration = round(len(samples) / rate, 3)
        if len(samples) / rate < MIN_SECONDS:
            raise GatewayError.bad_request(
                f"The audio is {len(samples) / rate:.4f} seconds long; at least {MIN_SECONDS:g} seconds are needed.",
                "file",
                "invalid_audio",
            )
        text = self._runtime.transcribe(resample(samples, rate, self._runtime.sample_rate))
        return text, duration
