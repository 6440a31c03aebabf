"""What the router needs from a connector: one call, one stream, and closing its pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from clawdbot.router.registry import Instance


@dataclass
class Answer:
    """An upstream's answer: OpenAI JSON, or (speech) binary content with its type. A
    native answer (call_native) has its decoded JSON in `data` and, in `raw`, the bytes
    as the upstream sent them, which are what the caller gets."""

    data: dict[str, Any]
    binary: bytes = b""
    content_type: str = ""
    raw: bytes = b""


@dataclass(frozen=True)
class NativeRequest:
    """A caller's own request in its dialect (ModelRequest.dialect/native_json/
    native_headers), for an upstream that speaks that dialect."""

    dialect: str
    body: bytes
    headers: Mapping[str, str]


class StreamMeter(Protocol):
    """Reads usage off a native stream's events without changing them."""

    def observe(self, payload: bytes) -> None: ...

    @property
    def usage(self) -> dict[str, Any] | None:
        """The usage so far in Chat's terms (prompt_tokens, completion_tokens), or None."""
        ...

    @property
    def chunks(self) -> int:
        """Content events seen (what approximates output tokens without usage)."""
        ...


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


class NativeConnector(Connector, Protocol):
    """A connector that also speaks a caller's dialect natively (pass-through)."""

    native_dialect: str

    async def call_native(
        self,
        instance: Instance,
        native: NativeRequest,
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> Answer:
        """The upstream's native answer (Answer.raw untouched, Answer.data decoded)."""
        ...

    def stream_native(
        self,
        instance: Instance,
        native: NativeRequest,
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> AsyncIterator[bytes]:
        """Each native event's data JSON as the upstream sent it (the event name is its
        "type"); UpstreamError, retryable only before the first."""
        ...

    def native_usage(self, data: dict[str, Any]) -> dict[str, Any] | None:
        """A native answer's usage in Chat's terms, or None when it reports none."""
        ...

    def stream_meter(self) -> StreamMeter: ...


def passes_through(connector: Connector, instance: Instance, dialect: str) -> bool:
    """Whether `instance` takes a `dialect` caller's own body: its connector speaks the
    dialect (`native_dialect`) and, where that depends on the upstream (OpenAI's Responses
    API: `serves_native(instance)`), this instance's upstream does. A connector without
    `serves_native` speaks its dialect on every instance (Anthropic's)."""
    if not dialect or getattr(connector, "native_dialect", "") != dialect:
        return False
    serves = getattr(connector, "serves_native", None)
    return serves is None or bool(serves(instance))
