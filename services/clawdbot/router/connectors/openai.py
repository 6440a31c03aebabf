"""Connector for any OpenAI-compatible HTTP API: pooled aiohttp, streaming, and the
upstream's failures translated into the gateway's OpenAI-shaped errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from clawdbot.common.errors import GatewayError
from clawdbot.router.connectors.base import Answer
from clawdbot.router.registry import Instance

log = logging.getLogger(__name__)

_PATHS = {
    "chat": "/chat/completions",
    "embeddings": "/embeddings",
    "transcription": "/audio/transcriptions",
    "speech": "/audio/speech",
}


class UpstreamError(GatewayError):
    """A failure of the upstream, with whether another instance may be tried instead."""

    retryable: bool = False
    kind: str = "error"

    @classmethod
    def make(
        cls,
        status: int,
        message: str,
        type_: str,
        code: str,
        *,
        retryable: bool,
        kind: str,
        retry_after: str | None = None,
        param: str | None = None,
    ) -> UpstreamError:
        err = cls(status, message, type_, code, param, retry_after)
        err.retryable = retryable
        err.kind = kind
        return err


def _upstream_message(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(message, type, param) from an upstream error body, if it has OpenAI's shape."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return err.get("message"), err.get("type"), err.get("param")
    if isinstance(err, str):
        return err, None, None
    detail = data.get("detail") if isinstance(data, dict) else None
    return (str(detail) if detail else None), None, None


def map_status(instance: Instance, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    message, type_, param = _upstream_message(body)
    where = f"upstream {instance.id}"
    if status == 429:
        return UpstreamError.make(
            429,
            message or f"{where} is rate limiting requests.",
            "rate_limit_error",
            "rate_limit_exceeded",
            retryable=True,
            kind="rate_limited",
            retry_after=headers.get("Retry-After"),
        )
    if status in (401, 403):
        # The caller's key was fine; the gateway's credentials for the provider were not.
        return UpstreamError.make(
            502,
            f"{where} rejected the gateway's credentials ({status}).",
            "upstream_error",
            "upstream_auth_failed",
            retryable=True,
            kind="auth",
        )
    if status in (408, 504):
        return UpstreamError.make(
            504, f"{where} timed out.", "timeout", "upstream_timeout", retryable=True, kind="timeout"
        )
    if 400 <= status < 500:
        code = "model_not_found" if status == 404 else "invalid_request"
        return UpstreamError.make(
            status,
            message or f"{where} refused the request ({status}).",
            type_ or "invalid_request_error",
            code,
            retryable=False,
            kind="client_error",
            param=param,
        )
    return UpstreamError.make(
        502,
        f"{where} failed with HTTP {status}" + (f": {message}" if message else "."),
        "upstream_error",
        "upstream_error",
        retryable=True,
        kind="server_error",
    )


class OpenAIConnector:
    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, json_serialize=lambda o: orjson.dumps(o).decode(), auto_decompress=True
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _headers(
        instance: Instance, trace_headers: Mapping[str, str], request_id: str, json_body: bool = True
    ) -> dict[str, str]:
        headers = {"X-Request-Id": request_id, **trace_headers}
        if json_body:  # a multipart body sets its own type, with its boundary
            headers["Content-Type"] = "application/json"
        if instance.api_key:
            headers["Authorization"] = f"Bearer {instance.api_key}"
        return headers

    def _unreachable(self, instance: Instance, exc: BaseException) -> UpstreamError:
        return UpstreamError.make(
            502,
            f"upstream {instance.id} is unreachable ({type(exc).__name__}).",
            "upstream_error",
            "upstream_unreachable",
            retryable=True,
            kind="unreachable",
        )

    def _timeout(self, instance: Instance, timeout_s: float) -> UpstreamError:
        return UpstreamError.make(
            504,
            f"upstream {instance.id} did not answer within {timeout_s:.3g} s.",
            "timeout",
            "upstream_timeout",
            retryable=True,
            kind="timeout",
        )

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
        url = instance.base_url + _PATHS[task]
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        payload: bytes | aiohttp.FormData = orjson.dumps(body)
        if task == "transcription":
            payload = aiohttp.FormData()
            for name, value in body.items():
                if value is not None:
                    payload.add_field(name, value if isinstance(value, str) else orjson.dumps(value).decode())
            payload.add_field("file", binary, filename="audio.wav", content_type="audio/wav")
        try:
            async with self._client().post(
                url,
                data=payload,
                headers=self._headers(instance, trace_headers, request_id, json_body=task != "transcription"),
                timeout=timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise map_status(instance, resp.status, raw, resp.headers)
                content_type = resp.headers.get("Content-Type", "")
        except TimeoutError as exc:
            raise self._timeout(instance, timeout_s) from exc
        except aiohttp.ClientError as exc:
            raise self._unreachable(instance, exc) from exc
        if task == "speech":
            return Answer({}, raw, content_type or "application/octet-stream")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError.make(
                502,
                f"upstream {instance.id} answered with invalid JSON.",
                "upstream_error",
                "upstream_bad_response",
                retryable=True,
                kind="bad_response",
            ) from exc
        if not isinstance(data, dict):
            raise UpstreamError.make(
                502,
                f"upstream {instance.id} answered with a non-object.",
                "upstream_error",
                "upstream_bad_response",
                retryable=True,
                kind="bad_response",
            )
        return Answer(data)

    async def stream(
        self,
        instance: Instance,
        body: dict[str, Any],
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> AsyncIterator[bytes]:
        """Yield each SSE `data:` payload (one JSON chunk) until [DONE].

        Errors before the first chunk are raised as UpstreamError with retryable set, so
        the caller can fall back; errors after it end the stream with an UpstreamError
        that is not retryable (the client already has part of an answer).
        """
        url = instance.base_url + _PATHS["chat"]
        # Between chunks, not for the whole answer: a long answer is fine, a stall is not.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        started = False
        try:
            async with self._client().post(
                url,
                data=orjson.dumps(body),
                headers=self._headers(instance, trace_headers, request_id),
                timeout=timeout,
            ) as resp:
                if resp.status != 200:
                    raise map_status(instance, resp.status, await resp.read(), resp.headers)
                data_lines: list[bytes] = []
                async for raw_line in resp.content:
                    line = raw_line.rstrip(b"\r\n")
                    if line.startswith(b"data:"):
                        data_lines.append(line[5:].lstrip(b" "))
                        continue
                    if line or not data_lines:
                        continue  # comments, event:/id: fields, keep-alive blank lines
                    payload = b"\n".join(data_lines)
                    data_lines = []
                    if payload == b"[DONE]":
                        return
                    started = True
                    yield payload
                if data_lines and b"\n".join(data_lines) != b"[DONE]":
                    started = True
                    yield b"\n".join(data_lines)
                    return
                if data_lines:
                    return
                raise UpstreamError.make(
                    502,
                    f"upstream {instance.id} ended the stream without [DONE].",
                    "upstream_error",
                    "upstream_stream_truncated",
                    retryable=not started,
                    kind="truncated",
                )
        except UpstreamError as exc:
            exc.retryable = exc.retryable and not started
            raise
        except TimeoutError as exc:
            err = self._timeout(instance, timeout_s)
            err.retryable = not started
            raise err from exc
        except aiohttp.ClientError as exc:
            err = self._unreachable(instance, exc)
            err.retryable = not started
            raise err from exc
