"""What the router needs from a connector: one call, one stream, and closing its pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from clawdbot.router.registry import Instance


class Connector(Protocol):
    async def call(
        self,
        instance: Instance,
        task: str,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> dict[str, Any]:
        """The upstream's OpenAI JSON answer; UpstreamError when it fails."""
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
