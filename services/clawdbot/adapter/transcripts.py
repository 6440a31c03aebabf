"""A transcription in the response format the caller asked for, as OpenAI renders them.

The router answers every transcription in one internal shape ({text, language, duration,
usage}); the formats differ only in how that is written out. The local recogniser gives
no segment timings, so srt and vtt hold the whole text as one cue over the whole audio.
"""

from __future__ import annotations

from typing import Any

import orjson


def _timestamp(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def render_transcription(data: dict[str, Any], response_format: str) -> tuple[bytes, str]:
    text = str(data.get("text", ""))
    duration = float(data.get("duration") or 0.0)
    if response_format == "text":
        return text.encode() + b"\n", "text/plain; charset=utf-8"
    if response_format == "srt":
        return f"1\n{_timestamp(0, ',')} --> {_timestamp(duration, ',')}\n{text}\n\n".encode(), "text/plain"
    if response_format == "vtt":
        cue = f"{_timestamp(0, '.')} --> {_timestamp(duration, '.')}\n{text}\n\n"
        return ("WEBVTT\n\n" + cue).encode(), "text/vtt"
    if response_format == "verbose_json":
        verbose = {
            "task": "transcribe",
            "language": data.get("language", ""),
            "duration": duration,
            "text": text,
            "segments": [{"id": 0, "start": 0.0, "end": duration, "text": text}] if text else [],
        }
        if "usage" in data:
            verbose["usage"] = data["usage"]
        return orjson.dumps(verbose), "application/json"
    plain: dict[str, Any] = {"text": text}
    if "usage" in data:
        plain["usage"] = data["usage"]
    return orjson.dumps(plain), "application/json"
