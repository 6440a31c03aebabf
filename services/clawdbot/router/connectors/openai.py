"""Connector for any OpenAI-compatible HTTP API: pooled aiohttp, streaming, and the
upstream's failures translated into the gateway's OpenAI-shaped errors.

An instance whose upstream also serves OpenAI's Responses API (`responses_api: true`)
takes Responses callers natively: their own body is POSTed to {base_url}/responses,
untouched but for the model name, and the upstream's Response (or its events) comes back
as it was sent; usage for budgets is read off it (ResponsesStreamMeter)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from clawdbot.common.dialects.anthropic import SseParser
from clawdbot.common.errors import GatewayError
from clawdbot.router.connectors.base import Answer, NativeRequest
from clawdbot.router.connectors.native import NotAnObject, passed_body
from clawdbot.router.registry import Instance

log = logging.getLogger(__name__)

_PATHS = {
    "chat": "/chat/completions",
    "embeddings": "/embeddings",
    "transcription": "/audio/transcriptions",
    "speech": "/audio/speech",
}


# The Responses API (pass-through): the dialect's name in ModelRequest.dialect, its path.
RESPONSES_DIALECT = "responses"
_RESPONSES_PATH = "/responses"
# The gateway's options in a request body (router/server.py GATEWAY_FIELD).
_GATEWAY_FIELD = "clawdbot"
# Events that open a Responses stream without saying anything yet: held back until the
# next one, so that a failure right after them is still one another instance may take over.
_RESPONSES_PREAMBLE = frozenset({"response.created", "response.in_progress"})
# The events that end a Responses stream well (a failure raises instead).
_RESPONSES_END = frozenset({"response.completed", "response.incomplete"})
# A failed response's error code -> the HTTP status the same failure has as a reply.
_RESPONSES_ERROR_STATUS = {"rate_limit_exceeded": 429, "invalid_prompt": 400}


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

    @classmethod
    def unreachable(cls, instance: Instance, exc: BaseException) -> UpstreamError:
        """The upstream could not be reached (refused, reset, DNS): another may be tried."""
        return cls.make(
            502,
            f"upstream {instance.id} is unreachable ({type(exc).__name__}).",
            "upstream_error",
            "upstream_unreachable",
            retryable=True,
            kind="unreachable",
        )

    @classmethod
    def timed_out(cls, instance: Instance, timeout_s: float) -> UpstreamError:
        return cls.make(
            504,
            f"upstream {instance.id} did not answer within {timeout_s:.3g} s.",
            "timeout",
            "upstream_timeout",
            retryable=True,
            kind="timeout",
        )


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


def provider_failure(
    instance: Instance, status: int, message: str | None, retry_after: str | None
) -> UpstreamError | None:
    """What any provider's HTTP status means whatever its dialect: rate limited (429,
    another instance may take it), the gateway's own credentials refused (401/403: a
    502, the caller's key was fine), timed out (408/504). None for the other statuses,
    which each connector reads in its provider's terms."""
    where = f"upstream {instance.id}"
    if status == 429:
        return UpstreamError.make(
            429,
            message or f"{where} is rate limiting requests.",
            "rate_limit_error",
            "rate_limit_exceeded",
            retryable=True,
            kind="rate_limited",
            retry_after=retry_after,
        )
    if status in (401, 403):
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
    return None


def map_status(instance: Instance, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    message, type_, param = _upstream_message(body)
    where = f"upstream {instance.id}"
    common = provider_failure(instance, status, message, headers.get("Retry-After"))
    if common is not None:
        return common
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
            raise UpstreamError.timed_out(instance, timeout_s) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError.unreachable(instance, exc) from exc
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
            err = UpstreamError.timed_out(instance, timeout_s)
            err.retryable = not started
            raise err from exc
        except aiohttp.ClientError as exc:
            err = UpstreamError.unreachable(instance, exc)
            err.retryable = not started
            raise err from exc

    # --- Responses pass-through (instances with responses_api) ---------------------------

    native_dialect = RESPONSES_DIALECT

    @staticmethod
    def serves_native(instance: Instance) -> bool:
        """Only an upstream said to serve the Responses API gets Responses bodies."""
        return instance.responses_api

    @staticmethod
    def _passed(native: NativeRequest, instance: Instance, stream: bool) -> bytes:
        try:
            # The gateway's own options (the body's "clawdbot" field) never reach a provider.
            return passed_body(native.body, instance.upstream_model, stream, drop=(_GATEWAY_FIELD,))
        except NotAnObject as exc:
            raise UpstreamError.make(
                400,
                f"The request body is not a JSON object ({exc}).",
                "invalid_request_error",
                "invalid_request",
                retryable=False,
                kind="client_error",
            ) from exc

    async def call_native(
        self,
        instance: Instance,
        native: NativeRequest,
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> Answer:
        """The upstream's Response: Answer.raw its bytes untouched, Answer.data decoded."""
        payload = self._passed(native, instance, stream=False)
        try:
            async with self._client().post(
                instance.base_url + _RESPONSES_PATH,
                data=payload,
                headers=self._headers(instance, trace_headers, request_id),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise map_status(instance, resp.status, raw, resp.headers)
        except TimeoutError as exc:
            raise UpstreamError.timed_out(instance, timeout_s) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError.unreachable(instance, exc) from exc
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _bad_response(instance, "answered with invalid JSON") from exc
        if not isinstance(data, dict) or data.get("object") != "response":
            raise _bad_response(instance, "answered with something other than a Response")
        return Answer(data, raw=raw)

    async def stream_native(
        self,
        instance: Instance,
        native: NativeRequest,
        trace_headers: Mapping[str, str],
        request_id: str,
        timeout_s: float,
    ) -> AsyncIterator[bytes]:
        """Each event's data JSON as the upstream sent it, up to response.completed (or
        response.incomplete). An `error` event or response.failed raises its UpstreamError
        (retryable while nothing but the preamble came); a stream cut before its end is
        `truncated`."""
        payload = self._passed(native, instance, stream=True)
        # Between reads, not for the whole answer: a long answer is fine, a stall is not.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        started = False
        held: list[bytes] = []
        parser = SseParser()
        try:
            async with self._client().post(
                instance.base_url + _RESPONSES_PATH,
                data=payload,
                headers=self._headers(instance, trace_headers, request_id),
                timeout=timeout,
            ) as resp:
                if resp.status != 200:
                    raise map_status(instance, resp.status, await resp.read(), resp.headers)
                async for piece in resp.content.iter_any():
                    for name, data in parser.feed(piece):
                        kind = _event_type(name, data)
                        if kind in ("error", "response.failed"):
                            raise _failed_event(instance, kind, data)
                        if not started and kind in _RESPONSES_PREAMBLE:
                            held.append(data)
                            continue
                        started = True
                        for early in held:
                            yield early
                        held.clear()
                        yield data
                        if kind in _RESPONSES_END:
                            return
                for name, data in parser.close():
                    kind = _event_type(name, data)
                    if kind in ("error", "response.failed"):
                        raise _failed_event(instance, kind, data)
                raise UpstreamError.make(
                    502,
                    f"upstream {instance.id} ended the Responses stream before response.completed.",
                    "upstream_error",
                    "upstream_stream_truncated",
                    retryable=True,
                    kind="truncated",
                )
        except UpstreamError as exc:
            exc.retryable = exc.retryable and not started
            raise
        except TimeoutError as exc:
            err = UpstreamError.timed_out(instance, timeout_s)
            err.retryable = not started
            raise err from exc
        except aiohttp.ClientError as exc:
            err = UpstreamError.unreachable(instance, exc)
            err.retryable = not started
            raise err from exc

    def native_usage(self, data: dict[str, Any]) -> dict[str, Any] | None:
        return responses_chat_usage(data.get("usage"))

    def stream_meter(self) -> ResponsesStreamMeter:
        return ResponsesStreamMeter()


def _bad_response(instance: Instance, what: str) -> UpstreamError:
    return UpstreamError.make(
        502,
        f"upstream {instance.id} {what}.",
        "upstream_error",
        "upstream_bad_response",
        retryable=True,
        kind="bad_response",
    )


def _event_type(name: str, data: bytes) -> str:
    """A Responses event's type: its data's "type" (what the adapter relays by), else the
    SSE event name."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return name
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) else name


def _failed_event(instance: Instance, kind: str, data: bytes) -> UpstreamError:
    """An `error` event ({code, message, param}) or response.failed (response.error
    {code, message}) as the UpstreamError the same failure gets as an HTTP reply."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        event = None
    error: Any = event if isinstance(event, dict) else {}
    if kind == "response.failed":
        response = error.get("response")
        error = response.get("error") if isinstance(response, dict) else None
        error = error if isinstance(error, dict) else {}
    code = error.get("code")
    message = error.get("message")
    status = _RESPONSES_ERROR_STATUS.get(code, 500) if isinstance(code, str) else 500
    if status >= 500:
        return UpstreamError.make(
            502,
            f"upstream {instance.id} failed the response ({code or kind})" + (f": {message}" if message else "."),
            "upstream_error",
            "upstream_error",
            retryable=True,
            kind="server_error",
        )
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": error.get("param")}})
    return map_status(instance, status, body, {})


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def responses_chat_usage(usage: Any) -> dict[str, Any] | None:
    """A Response's usage (input_tokens, output_tokens and their details) in Chat's terms;
    None when it reports none. Responses' input_tokens include the cached ones, as Chat's
    prompt_tokens do."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    chat: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": _count(usage.get("total_tokens")) or prompt + completion,
    }
    input_details, output_details = usage.get("input_tokens_details"), usage.get("output_tokens_details")
    if isinstance(input_details, dict) and "cached_tokens" in input_details:
        chat["prompt_tokens_details"] = {"cached_tokens": _count(input_details["cached_tokens"])}
    if isinstance(output_details, dict) and "reasoning_tokens" in output_details:
        chat["completion_tokens_details"] = {"reasoning_tokens": _count(output_details["reasoning_tokens"])}
    return chat


class ResponsesStreamMeter:
    """Usage off native Responses events, the events untouched: the final response's
    usage (response.completed / response.incomplete); until then, each delta event
    (text, arguments, reasoning) counts as a token of output."""

    def __init__(self) -> None:
        self._usage: dict[str, Any] | None = None
        self._chunks = 0

    def observe(self, payload: bytes) -> None:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if isinstance(kind, str) and kind.endswith(".delta"):
            self._chunks += 1
        response = event.get("response")
        usage = responses_chat_usage(response.get("usage")) if isinstance(response, dict) else None
        if usage is not None:
            self._usage = usage

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._usage

    @property
    def chunks(self) -> int:
        return self._chunks
