"""What the router needs from a connector: one call, one stream, and closing its pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from clawdbot.router.registry import Instance


@dataclass
class Answer:
    """An upstream's answer: OpenAI JSON, or (speech) binary content with its type."""

    data: dict[str, Any]
    binary: bytes = b""
    content_type: str = ""


class Connector(Protocol):
    async def call(
        self,
        instance: Instance,
        task: str,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
        binary: bytes = b"",
    ) -> Answer:
        """The upstream's answer; UpstreamError when it fails. `binary` is the audio file
        of a transcription, whose other form fields are in `body`."""
        ...

    def stream(
        self,
        instance: Instance,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> AsyncIterator[bytes]:
        """Each streamed chunk's JSON; UpstreamError, retryable only before the first."""
        ...

    async def close(self) -> None: ...
