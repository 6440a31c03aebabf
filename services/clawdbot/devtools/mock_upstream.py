"""Fast local mock of an OpenAI-compatible HTTP API, of OpenAI's Responses API and of
Anthropic's Messages API.

Tests and benchmarks use it as the "external provider". Behaviour is
deterministic, and faults are injected per request through an extra ``mock``
object in the JSON body, which doubles as proof that a gateway forwards
fields it does not know about (every dialect takes the same faults).

Tool calls: a request with tools whose last turn is the user's (not tool results)
and whose tool choice is not "none" gets tool calls instead of text: the tool the
choice forces, else every tool the user's text names (one when parallel calls are
off), else the first tool; arguments are made up from the tool's schema. The answer
to tool results is text, as without tools.

GET /_mock/last?model=NAME shows the last request for a model as it arrived (raw
body and headers), for byte-for-byte pass-through checks.

Run it with::

    python -m clawdbot.devtools.mock_upstream --host 127.0.0.1 --port 0 \
        [--ready-file PATH] [--api-key KEY] [--model NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import hmac
import json
import math
import os
import re
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is an optional speed-up
    orjson = None  # type: ignore[assignment]

DEFAULT_MODELS: tuple[str, ...] = ("mock-1",)
DEFAULT_EMBEDDING_DIMS = 8
MAX_EMBEDDING_DIMS = 8192
MAX_CHOICES = 128
MAX_RECORDED = 1000
HTTP_ERROR_MIN = 400
HTTP_SERVER_ERROR_MIN = 500
# Embedding batches can be large; aiohttp's 1 MiB default would reject them.
CLIENT_MAX_SIZE = 64 * 1024 * 1024

# (type, code, message) per status; the shapes follow what api.openai.com sends.
_ERROR_KINDS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request (mock)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (mock)."),
    403: ("permission_error", None, "You are not allowed to access this resource (mock)."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist (mock)."),
    408: ("timeout", None, "Request timed out (mock)."),
    409: ("invalid_request_error", "conflict", "Conflict (mock)."),
    413: ("invalid_request_error", None, "Request too large (mock)."),
    422: ("invalid_request_error", None, "Unprocessable entity (mock)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests (mock)."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that! (mock)",
    ),
    502: ("server_error", "bad_gateway", "Bad gateway (mock)."),
    503: (
        "server_error",
        "service_unavailable",
        "The engine is currently overloaded, please try again later. (mock)",
    ),
    504: ("server_error", "timeout", "Gateway timeout (mock)."),
}

MOCK_KEY: web.AppKey[MockUpstream] = web.AppKey("clawdbot_mock_upstream")


def dumps(obj: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes | str) -> Any:
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data)


class BadRequestError(Exception):
    """A client error that should be answered with an OpenAI-shaped 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Fault:
    """Parsed ``mock`` body field."""

    status: int | None = None
    retry_after: float | None = None
    delay_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    content: str | None = None
    usage: bool = True
    drop_midstream: bool = False
    # With `status`: the share of requests that fail (evenly spread: 0.5 fails every
    # other one), the rest answering normally; 1 fails them all.
    error_rate: float = 1.0
    # Anthropic and Responses streams: fail after the first delta with this error type
    # (an `event: error` frame, or `response.failed`), the way an overloaded provider does.
    stream_error: str | None = None

    @classmethod
    def parse(cls, raw: Any) -> Fault | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise BadRequestError("'mock' must be an object", "mock")
        status = raw.get("status")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599):
            raise BadRequestError("'mock.status' must be an HTTP status code", "mock.status")
        content = raw.get("content")
        if content is not None and not isinstance(content, str):
            raise BadRequestError("'mock.content' must be a string", "mock.content")
        stream_error = raw.get("stream_error")
        if stream_error is not None and not isinstance(stream_error, str):
            raise BadRequestError("'mock.stream_error' must be an error type", "mock.stream_error")
        return cls(
            status=status,
            retry_after=_opt_number(raw, "retry_after"),
            delay_ms=_opt_number(raw, "delay_ms") or 0.0,
            chunk_delay_ms=_opt_number(raw, "chunk_delay_ms") or 0.0,
            content=content,
            usage=bool(raw.get("usage", True)),
            drop_midstream=bool(raw.get("drop_midstream", False)),
            error_rate=_rate(raw),
            stream_error=stream_error,
        )


def _rate(raw: dict[str, Any]) -> float:
    rate = _opt_number(raw, "error_rate")
    if rate is None:
        return 1.0
    if rate > 1:
        raise BadRequestError("'mock.error_rate' must be between 0 and 1", "mock.error_rate")
    return rate


def _opt_number(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BadRequestError(f"'mock.{key}' must be a non-negative number", f"mock.{key}")
    return float(value)


def error_body(message: str, err_type: str, code: str | None = None, param: str | None = None) -> bytes:
    return dumps({"error": {"message": message, "type": err_type, "param": param, "code": code}})


def error_response(
    status: int,
    message: str,
    err_type: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, err_type, code, param),
        content_type="application/json",
        headers=headers,
    )


def injected_error(fault: Fault, status: int) -> web.Response:
    default_type = "server_error" if status >= HTTP_SERVER_ERROR_MIN else "invalid_request_error"
    err_type, code, message = _ERROR_KINDS.get(status, (default_type, None, f"Injected error {status} (mock)."))
    headers: dict[str, str] | None = None
    if fault.retry_after is not None:
        seconds = fault.retry_after
        # Retry-After is integral per RFC 9110; retry-after-ms carries the exact
        # value, and the openai SDK honours it first.
        headers = {
            "Retry-After": str(math.ceil(seconds)),
            "retry-after-ms": str(round(seconds * 1000)),
        }
    return error_response(status, message, err_type, code, headers=headers)


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return " ".join(parts)
    return ""


def count_tokens(text: str) -> int:
    # Word count stands in for a tokenizer: cheap, deterministic, easy to assert.
    return len(text.split())


def stream_pieces(text: str) -> list[str]:
    """Split into one piece per word, keeping separators so ''.join() == text."""
    words = text.split(" ")
    pieces = [words[0]] if words[0] else []
    pieces.extend(" " + w for w in words[1:])
    return pieces


def json_pieces(text: str, size: int = 8) -> list[str]:
    """A JSON text in pieces that are not JSON on their own, as providers stream them."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _chat_message(text: str, tool_calls: list[ToolCall]) -> dict[str, Any]:
    if not tool_calls:
        return {"role": "assistant", "content": text}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": _new_id("call_"), "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in tool_calls
        ],
    }


def embed(text: str, dims: int) -> list[float]:
    raw = hashlib.shake_256(text.encode()).digest(4 * dims)
    vec = [i / 2147483647.5 - 1.0 for i in struct.unpack(f"<{dims}I", raw)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    # Round-trip through float32 so the float and base64 encodings agree exactly.
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(v / norm for v in vec))))


def embedding_inputs(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            return [" ".join(map(str, raw))]
        out: list[str] = []
        for item in raw:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, list) and all(isinstance(t, int) for t in item):
                out.append(" ".join(map(str, item)))
            else:
                raise BadRequestError("'input' items must be strings or token arrays", "input")
        return out
    raise BadRequestError("'input' must be a non-empty string, array of strings or tokens", "input")


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


# -- tool calls (every dialect) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    schema: Any


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return dumps(self.arguments).decode()

    def tokens(self) -> int:
        return 1 + count_tokens(self.arguments_json.replace(",", " "))


def _schema_value(schema: Any, text: str) -> Any:
    if not isinstance(schema, dict):
        return text or "mock"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return text or "mock"
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        keys = required if isinstance(required, list) and required else list(props)
        return {k: _schema_value(props.get(k), text) for k in keys if isinstance(k, str)}
    return text or "mock"


def choose_tools(tools: list[ToolSpec], choice: str, parallel: bool, text: str) -> list[ToolCall]:
    """The calls a turn makes. `choice`: "none", "auto", "any" or a tool's name."""
    if not tools or choice == "none":
        return []
    if choice not in ("auto", "any"):
        picked = [t for t in tools if t.name == choice]
        if not picked:
            raise BadRequestError(f"tool_choice names an unknown tool: {choice}", "tool_choice")
    else:
        picked = [t for t in tools if t.name and t.name in text] or tools[:1]
    if not parallel:
        picked = picked[:1]
    calls = []
    for tool in picked:
        args = _schema_value(tool.schema, text) if isinstance(tool.schema, dict) else {}
        calls.append(ToolCall(tool.name, args if isinstance(args, dict) else {}))
    return calls


def _chat_tools(body: dict[str, Any], messages: list[Any], text: str) -> list[ToolCall]:
    tools = body.get("tools")
    if not isinstance(tools, list) or not messages or not isinstance(messages[-1], dict):
        return []
    if messages[-1].get("role") != "user":
        return []  # tool results (role "tool") are answered with text
    specs = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            specs.append(ToolSpec(fn["name"], fn.get("parameters")))
    raw = body.get("tool_choice", "auto")
    if raw == "required":
        choice = "any"
    elif isinstance(raw, dict):
        fn = raw.get("function")
        choice = fn.get("name", "auto") if isinstance(fn, dict) else "auto"
    else:
        choice = raw if raw in ("none", "auto") else "auto"
    return choose_tools(specs, choice, body.get("parallel_tool_calls") is not False, text)


class MockUpstream:
    """Request handlers plus the recorded-request log, bound to one app."""

    def __init__(self, api_key: str | None, models: Sequence[str], max_recorded: int) -> None:
        self.api_key = api_key
        self._expected_auth = f"Bearer {api_key}".encode() if api_key else b""
        self.models = list(models) or list(DEFAULT_MODELS)
        self.created = int(time.time())
        # Entries are kept serialized: 1000 live dicts made every gen-2 GC pass walk them,
        # which tripled the p99 at 64 connections; bytes are invisible to the collector.
        self.recorded: deque[bytes] = deque(maxlen=max_recorded)
        # Applied to every request without its own "mock" field: makes this upstream slow
        # or failing as a whole (PUT /_mock/fault), the way a real provider degrades.
        self.default_fault: Fault | None = None
        self._faulted = 0  # requests that met a fault with a status (for error_rate)
        # Per model, the last request as it arrived (GET /_mock/last): raw bytes, so a
        # test can prove a gateway passed a body through byte for byte.
        self.last: dict[str, tuple[str, str, str, list[tuple[str, str]], bytes]] = {}
        # Prompt-cache prefixes seen (Anthropic) and stored response ids (Responses);
        # dicts as insertion-ordered sets, trimmed oldest first.
        self._cache_seen: dict[bytes, None] = {}
        self._response_ids: dict[str, None] = {}

    # -- plumbing ---------------------------------------------------------

    async def _read(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """Read, record and authenticate; returns (body, early_response)."""
        raw = await request.read()
        body: Any = None
        bad_json: str | None = None
        if raw:
            try:
                body = loads(raw)
            except ValueError as exc:
                bad_json = f"We could not parse the JSON body of your request. ({exc})"
        else:
            bad_json = "We could not parse the JSON body of your request. (empty body)"
        self._record(request, body)
        self._remember(request, raw, body)
        denied = self._check_auth(request)
        if denied is not None:
            return None, denied
        if bad_json is not None:
            return None, error_response(400, bad_json, "invalid_request_error")
        if not isinstance(body, dict):
            return None, error_response(400, "The request body must be a JSON object.", "invalid_request_error")
        return body, None

    def _record(self, request: web.Request, body: Any) -> None:
        self.recorded.append(
            dumps(
                {
                    "method": request.method,
                    "path": request.path,
                    "query": request.query_string,
                    "headers": {k.lower(): v for k, v in request.headers.items()},
                    "body": body,
                    "ts": time.time(),
                }
            )
        )

    def _remember(self, request: web.Request, raw: bytes, body: Any) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            return
        self.last.pop(model, None)
        self.last[model] = (request.method, request.path, request.query_string, list(request.headers.items()), raw)
        if len(self.last) > MAX_RECORDED:
            self.last.pop(next(iter(self.last)))

    def last_request(self, model: str) -> dict[str, Any] | None:
        """The last request for `model`: method, path, query, headers (lower-cased
        names), body_raw (the bytes as text) and body (parsed)."""
        entry = self.last.get(model)
        if entry is None:
            return None
        method, path, query, headers, raw = entry
        try:
            body = loads(raw) if raw else None
        except ValueError:
            body = None
        return {
            "method": method,
            "path": path,
            "query": query,
            "headers": {k.lower(): v for k, v in headers},
            "body_raw": raw.decode(errors="replace"),
            "body": body,
        }

    async def get_last(self, request: web.Request) -> web.StreamResponse:
        """GET /_mock/last?model=NAME"""
        found = self.last_request(request.query.get("model", ""))
        if found is None:
            return error_response(404, "no request recorded for that model", "invalid_request_error")
        return web.Response(body=dumps(found), content_type="application/json")

    async def set_fault(self, request: web.Request) -> web.Response:
        """PUT /_mock/fault {same fields as the "mock" body field}, or null to clear."""
        try:
            self.default_fault = Fault.parse(loads(await request.read() or b"null"))
        except (ValueError, BadRequestError) as exc:
            return error_response(400, str(exc), "invalid_request_error")
        return web.json_response({"fault": None if self.default_fault is None else repr(self.default_fault)})

    def requests(self) -> list[dict[str, Any]]:
        """The recorded requests, oldest first, as GET /_mock/requests returns them."""
        return [loads(entry) for entry in self.recorded]

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if not self.api_key:
            return None
        header = request.headers.get("Authorization")
        if not header:
            return error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
            )
        if not hmac.compare_digest(header.encode(), self._expected_auth):
            return error_response(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return None

    async def _apply_fault(
        self, fault: Fault | None, shape: Callable[[Fault, int], web.Response] | None = None
    ) -> web.Response | None:
        if fault is None:
            return None
        if fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault.status is not None and fault.status >= HTTP_ERROR_MIN:
            self._faulted += 1
            n = self._faulted
            # Fail when the running count of failures due rises: evenly spread, exact share.
            if math.floor(n * fault.error_rate) > math.floor((n - 1) * fault.error_rate):
                return (shape or injected_error)(fault, fault.status)
        return None

    @staticmethod
    def _drop(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            # abort() (not close()) so the peer sees a reset rather than a tidy EOF.
            transport.abort()

    # -- /v1 --------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._read(request)
        if early is not None:
            return early
        try:
            fault = Fault.parse(body.get("mock")) or self.default_fault
            model, messages, n = _chat_params(body)
        except BadRequestError as exc:
            return error_response(400, exc.message, "invalid_request_error", param=exc.param)
        failed = await self._apply_fault(fault)
        if failed is not None:
            return failed

        last_user = ""
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                last_user = message_text(msg.get("content"))
                break
        text = f"Hello from {model}: {last_user}"
        if fault is not None and fault.content is not None:
            text = fault.content
        try:
            tool_calls = _chat_tools(body, messages, last_user)
        except BadRequestError as exc:
            return error_response(400, exc.message, "invalid_request_error", param=exc.param)
        prompt_tokens = sum(count_tokens(message_text(m.get("content"))) for m in messages if isinstance(m, dict))
        per_choice = sum(c.tokens() for c in tool_calls) if tool_calls else count_tokens(text)
        completion_tokens = per_choice * n
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        want_usage = fault is None or fault.usage

        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = want_usage and isinstance(opts, dict) and opts.get("include_usage") is True
            return await self._stream_chat(request, fault, model, text, n, usage if include_usage else None, tool_calls)

        if fault is not None and fault.drop_midstream:
            self._drop(request)
            return web.Response(status=500)
        payload: dict[str, Any] = {
            "id": _new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": _chat_message(text, tool_calls),
                    "logprobs": None,
                    "finish_reason": "tool_calls" if tool_calls else "stop",
                }
                for i in range(n)
            ],
        }
        if want_usage:
            payload["usage"] = usage
        return web.Response(body=dumps(payload), content_type="application/json")

    async def _stream_chat(
        self,
        request: web.Request,
        fault: Fault | None,
        model: str,
        text: str,
        n: int,
        usage: dict[str, int] | None,
        tool_calls: list[ToolCall] | None = None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await resp.prepare(request)
        chunk_id = _new_id("chatcmpl-")
        created = int(time.time())
        with_usage_field = usage is not None

        def frame(choices: list[dict[str, Any]]) -> bytes:
            chunk: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if with_usage_field:
                # OpenAI sends usage: null on every chunk but the last when asked for usage.
                chunk["usage"] = None
            return b"data: " + dumps(chunk) + b"\n\n"

        def delta(i: int, d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish}

        if tool_calls:
            frames: list[bytes] = []
            content_frames: list[bytes] = []
            for i in range(n):
                for t, call in enumerate(tool_calls):
                    # OpenAI's shape: id, type and name on the first delta of a call, then
                    # the arguments in pieces keyed by index alone.
                    opener = {"index": t, "id": _new_id("call_"), "type": "function"}
                    first: dict[str, Any] = {
                        "tool_calls": [{**opener, "function": {"name": call.name, "arguments": ""}}]
                    }
                    if t == 0:
                        first = {"role": "assistant", "content": None, **first}
                    frames.append(frame([delta(i, first)]))
                    content_frames.extend(
                        frame([delta(i, {"tool_calls": [{"index": t, "function": {"arguments": piece}}]})])
                        for piece in json_pieces(call.arguments_json)
                    )
            finish = "tool_calls"
        else:
            frames = [frame([delta(i, {"role": "assistant", "content": ""})]) for i in range(n)]
            content_frames = [frame([delta(i, {"content": piece})]) for piece in stream_pieces(text) for i in range(n)]
            finish = "stop"
        drop = fault is not None and fault.drop_midstream
        if drop:
            frames.extend(content_frames[:1])
            await resp.write(b"".join(frames))
            self._drop(request)
            return resp
        frames.extend(content_frames)
        frames.extend(frame([delta(i, {}, finish)]) for i in range(n))
        if usage is not None:
            final: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            frames.append(b"data: " + dumps(final) + b"\n\n")
        frames.append(b"data: [DONE]\n\n")

        chunk_delay = fault.chunk_delay_ms / 1000 if fault is not None else 0.0
        if chunk_delay <= 0:
            # Same bytes on the wire, but one write keeps the mock off the benchmark's hot path.
            await resp.write(b"".join(frames))
        else:
            for i, f in enumerate(frames):
                if i:
                    await asyncio.sleep(chunk_delay)
                await resp.write(f)
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._read(request)
        if early is not None:
            return early
        try:
            fault = Fault.parse(body.get("mock")) or self.default_fault
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise BadRequestError("you must provide a model parameter", "model")
            inputs = embedding_inputs(body.get("input"))
            dims = body.get("dimensions", DEFAULT_EMBEDDING_DIMS)
            if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= MAX_EMBEDDING_DIMS:
                raise BadRequestError(f"'dimensions' must be an integer in [1, {MAX_EMBEDDING_DIMS}]", "dimensions")
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise BadRequestError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        except BadRequestError as exc:
            return error_response(400, exc.message, "invalid_request_error", param=exc.param)
        failed = await self._apply_fault(fault)
        if failed is not None:
            return failed
        if fault is not None and fault.drop_midstream:
            self._drop(request)
            return web.Response(status=500)

        data: list[dict[str, Any]] = []
        for i, text in enumerate(inputs):
            vec = embed(text, dims)
            value: list[float] | str = (
                base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if encoding == "base64" else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": value})
        payload: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if fault is None or fault.usage:
            tokens = sum(max(1, count_tokens(t)) for t in inputs)
            payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.Response(body=dumps(payload), content_type="application/json")

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's multipart upload; answers with what it received, so tests can check it."""
        try:
            form = await request.post()
        except ValueError as exc:
            return error_response(400, f"could not parse the multipart body ({exc})", "invalid_request_error")
        upload = form.get("file")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        is_file = isinstance(upload, web.FileField)
        self._record(
            request, {**fields, "file_bytes": len(upload.file.read()) if isinstance(upload, web.FileField) else 0}
        )
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        if not is_file:
            return error_response(400, "you must provide a file", "invalid_request_error", param="file")
        payload = {
            "text": f"mock transcript by {fields.get('model', '?')}",
            "usage": {"type": "duration", "seconds": 1.0},
        }
        return web.Response(body=dumps(payload), content_type="application/json")

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's text to speech: a WAV of silence, a tenth of a second per word."""
        body, early = await self._read(request)
        if early is not None:
            return early
        text = body.get("input")
        if not isinstance(text, str) or not text:
            return error_response(400, "you must provide an input", "invalid_request_error", param="input")
        frames = 1600 * len(text.split())
        header = struct.pack(
            "<4sI4s4sIHHIIHH4sI",
            b"RIFF",
            36 + 2 * frames,
            b"WAVE",
            b"fmt ",
            16,
            1,
            1,
            16000,
            32000,
            2,
            16,
            b"data",
            2 * frames,
        )
        return web.Response(body=header + bytes(2 * frames), content_type="audio/wav")

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        self._record(request, None)
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        payload = {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": self.created, "owned_by": "mock"} for m in self.models],
        }
        return web.Response(body=dumps(payload), content_type="application/json")

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        body: Any = None
        raw = await request.read()
        if raw:
            try:
                body = loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        self._record(request, body)
        return error_response(
            404,
            f"Invalid URL ({request.method} {request.path})",
            "invalid_request_error",
        )

    # -- Anthropic Messages -------------------------------------------------------------

    async def _read_anthropic(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """Read, record and check the headers Anthropic requires; errors in its shape."""
        raw = await request.read()
        body: Any = None
        try:
            body = loads(raw) if raw else None
        except ValueError:
            body = None
        self._record(request, body)
        self._remember(request, raw, body)
        # Anthropic takes the key as x-api-key or, as its SDK sends it since 2.x, as a
        # bearer token.
        key = request.headers.get("x-api-key", "")
        bearer = request.headers.get("Authorization", "")
        if not key and bearer.startswith("Bearer "):
            key = bearer.removeprefix("Bearer ")
        if not key:
            return None, anthropic_error(401, "authentication_error", "x-api-key header is required")
        if self.api_key and not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return None, anthropic_error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return None, anthropic_error(400, "invalid_request_error", "anthropic-version: header is required")
        if not isinstance(body, dict):
            return None, anthropic_error(400, "invalid_request_error", "The request body is not valid JSON.")
        return body, None

    def _cache_usage(self, body: dict[str, Any], total: int) -> tuple[int, int, int]:
        """(input, cache_creation, cache_read) tokens, simulating prompt caching: the
        prefix up to a `cache_control` breakpoint is written on first sight and read on
        later requests with the same prefix (no minimum length, unlike the real one)."""
        digest = hashlib.sha256()
        tokens = 0
        breakpoints: list[tuple[int, bytes]] = []
        for block, block_tokens in _anthropic_blocks(body):
            digest.update(dumps(block))
            tokens += block_tokens
            if isinstance(block, dict) and block.get("cache_control"):
                breakpoints.append((tokens, digest.copy().digest()))
        if not breakpoints:
            return total, 0, 0
        read = max((t for t, d in breakpoints if d in self._cache_seen), default=0)
        written = breakpoints[-1][0] - read
        for _, d in breakpoints:
            self._cache_seen[d] = None
        while len(self._cache_seen) > MAX_RECORDED:
            self._cache_seen.pop(next(iter(self._cache_seen)))
        return max(0, total - read - written), written, read

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._read_anthropic(request)
        if early is not None:
            return early
        try:
            fault = Fault.parse(body.get("mock")) or self.default_fault
            model, max_tokens, messages = _anthropic_params(body)
            text = anthropic_last_user_text(messages)
            calls = _anthropic_tools(body, messages, text)
            thinks = _thinking_on(body, max_tokens)
        except BadRequestError as exc:
            return anthropic_error(400, "invalid_request_error", exc.message)
        failed = await self._apply_fault(fault, anthropic_injected_error)
        if failed is not None:
            return failed
        answer = fault.content if fault is not None and fault.content is not None else f"Hello from {model}: {text}"
        stop_reason, stop_sequence = ("tool_use" if calls else "end_turn"), None
        if not calls:
            answer, stop_reason, stop_sequence = _apply_stops(answer, body.get("stop_sequences"), max_tokens)
        total = _anthropic_input_tokens(body)
        input_tokens, written, read = self._cache_usage(body, total)
        output_tokens = sum(c.tokens() for c in calls) if calls else count_tokens(answer)
        thought = f"Thinking about: {text}"
        if thinks:
            output_tokens += count_tokens(thought)
        usage = {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }
        blocks: list[dict[str, Any]] = (
            [{"type": "thinking", "thinking": thought, "signature": thinking_signature(thought)}] if thinks else []
        )
        blocks.extend(
            [{"type": "tool_use", "id": _new_id("toolu_"), "name": c.name, "input": c.arguments} for c in calls]
            if calls
            else [{"type": "text", "text": answer}]
        )
        message: dict[str, Any] = {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }
        if body.get("stream") is True:
            return await self._stream_anthropic(request, fault, message)
        if fault is not None and fault.drop_midstream:
            self._drop(request)
            return web.Response(status=500)
        return web.Response(body=dumps(message), content_type="application/json", headers=_anthropic_headers())

    async def _stream_anthropic(
        self, request: web.Request, fault: Fault | None, message: dict[str, Any]
    ) -> web.StreamResponse:
        """Anthropic's grammar: message_start, then per block content_block_start, deltas
        and content_block_stop (a ping after the first start), message_delta with the
        stop reason and cumulative usage, message_stop; an `event:` line on every frame."""
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                **_anthropic_headers(),
            }
        )
        await resp.prepare(request)
        usage = message["usage"]
        start_usage = {**usage, "output_tokens": 1}
        frames: list[bytes] = [
            sse_frame(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        **message,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": start_usage,
                    },
                },
            )
        ]
        first_delta = 0
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                opener: dict[str, Any] = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": piece} for piece in stream_pieces(block["text"])]
            elif block["type"] == "thinking":
                # The signature comes last, in its own delta, as Anthropic sends it.
                opener = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": piece} for piece in stream_pieces(block["thinking"])]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            else:
                opener = {**block, "input": {}}
                # As Anthropic does: an empty first piece, then the JSON in fragments.
                deltas = [{"type": "input_json_delta", "partial_json": ""}]
                deltas.extend(
                    {"type": "input_json_delta", "partial_json": p} for p in json_pieces(dumps(block["input"]).decode())
                )
            frames.append(
                sse_frame(
                    "content_block_start", {"type": "content_block_start", "index": index, "content_block": opener}
                )
            )
            if index == 0:
                frames.append(sse_frame("ping", {"type": "ping"}))
                first_delta = len(frames)
            frames.extend(
                sse_frame("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
                for d in deltas
            )
            frames.append(sse_frame("content_block_stop", {"type": "content_block_stop", "index": index}))
        frames.append(
            sse_frame(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            )
        )
        frames.append(sse_frame("message_stop", {"type": "message_stop"}))
        return await self._write_frames(request, resp, fault, frames, first_delta, _anthropic_stream_error)

    async def _write_frames(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        fault: Fault | None,
        frames: list[bytes],
        first_delta: int,
        stream_error: Callable[[str], bytes],
    ) -> web.StreamResponse:
        """Frames as the faults say: all, cut after the first delta (reset or an error
        event), or paced by chunk_delay_ms."""
        if fault is not None and (fault.drop_midstream or fault.stream_error):
            await resp.write(b"".join(frames[: first_delta + 1]))
            if fault.drop_midstream:
                self._drop(request)
                return resp
            await resp.write(stream_error(fault.stream_error or "api_error"))
            await resp.write_eof()
            return resp
        chunk_delay = fault.chunk_delay_ms / 1000 if fault is not None else 0.0
        if chunk_delay <= 0:
            await resp.write(b"".join(frames))
        else:
            for i, f in enumerate(frames):
                if i:
                    await asyncio.sleep(chunk_delay)
                await resp.write(f)
        await resp.write_eof()
        return resp

    async def count_message_tokens(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._read_anthropic(request)
        if early is not None:
            return early
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            return anthropic_error(400, "invalid_request_error", "model: Field required")
        if not isinstance(messages, list):
            return anthropic_error(400, "invalid_request_error", "messages: Field required")
        return web.Response(
            body=dumps({"input_tokens": _anthropic_input_tokens(body)}),
            content_type="application/json",
            headers=_anthropic_headers(),
        )

    # -- OpenAI Responses ---------------------------------------------------------------

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._read(request)
        if early is not None:
            return early
        try:
            fault = Fault.parse(body.get("mock")) or self.default_fault
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise BadRequestError("Missing required parameter: 'model'.", "model")
            items = _responses_items(body.get("input"))
            text = _responses_last_user_text(items)
            calls = _responses_tools(body, items, text)
        except BadRequestError as exc:
            return error_response(400, exc.message, "invalid_request_error", param=exc.param)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self._response_ids:
            return error_response(
                400,
                f"Previous response with id '{previous}' not found.",
                "invalid_request_error",
                "previous_response_not_found",
                "previous_response_id",
            )
        failed = await self._apply_fault(fault)
        if failed is not None:
            return failed
        answer = fault.content if fault is not None and fault.content is not None else f"Hello from {model}: {text}"
        instructions = body.get("instructions")
        input_tokens = count_tokens(instructions if isinstance(instructions, str) else "") + sum(
            count_tokens(_responses_item_text(i)) for i in items
        )
        output_tokens = sum(c.tokens() for c in calls) if calls else count_tokens(answer)
        output: list[dict[str, Any]]
        if calls:
            output = [
                {
                    "id": _new_id("fc_"),
                    "type": "function_call",
                    "status": "completed",
                    "arguments": c.arguments_json,
                    "call_id": _new_id("call_"),
                    "name": c.name,
                }
                for c in calls
            ]
        else:
            output = [
                {
                    "id": _new_id("msg_"),
                    "type": "message",
                    "status": "completed",
                    "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": answer}],
                    "role": "assistant",
                }
            ]
        response = _response_object(body, model, output, input_tokens, output_tokens)
        if body.get("store", True) is not False:
            self._response_ids[response["id"]] = None
            while len(self._response_ids) > MAX_RECORDED:
                self._response_ids.pop(next(iter(self._response_ids)))
        if body.get("stream") is True:
            return await self._stream_responses(request, fault, response)
        if fault is not None and fault.drop_midstream:
            self._drop(request)
            return web.Response(status=500)
        return web.Response(body=dumps(response), content_type="application/json")

    async def _stream_responses(
        self, request: web.Request, fault: Fault | None, response: dict[str, Any]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        seq = iter(range(1 << 30))
        frames: list[bytes] = []

        def emit(event: dict[str, Any]) -> None:
            event["sequence_number"] = next(seq)
            frames.append(sse_frame(event["type"], event))

        pending = {**response, "status": "in_progress", "output": [], "usage": None}
        emit({"type": "response.created", "response": pending})
        emit({"type": "response.in_progress", "response": pending})
        first_delta = 0
        for index, item in enumerate(response["output"]):
            if item["type"] == "message":
                part = item["content"][0]
                emit(
                    {
                        "type": "response.output_item.added",
                        "output_index": index,
                        "item": {**item, "status": "in_progress", "content": []},
                    }
                )
                emit(
                    {
                        "type": "response.content_part.added",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "part": {**part, "text": ""},
                    }
                )
                for piece in stream_pieces(part["text"]):
                    emit(
                        {
                            "type": "response.output_text.delta",
                            "item_id": item["id"],
                            "output_index": index,
                            "content_index": 0,
                            "delta": piece,
                            "logprobs": [],
                        }
                    )
                    first_delta = first_delta or len(frames)
                emit(
                    {
                        "type": "response.output_text.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "text": part["text"],
                        "logprobs": [],
                    }
                )
                emit(
                    {
                        "type": "response.content_part.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "part": part,
                    }
                )
            else:
                emit(
                    {
                        "type": "response.output_item.added",
                        "output_index": index,
                        "item": {**item, "status": "in_progress", "arguments": ""},
                    }
                )
                for piece in json_pieces(item["arguments"]):
                    emit(
                        {
                            "type": "response.function_call_arguments.delta",
                            "item_id": item["id"],
                            "output_index": index,
                            "delta": piece,
                        }
                    )
                    first_delta = first_delta or len(frames)
                emit(
                    {
                        "type": "response.function_call_arguments.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "name": item["name"],
                        "arguments": item["arguments"],
                    }
                )
            emit({"type": "response.output_item.done", "output_index": index, "item": item})
        emit({"type": "response.completed", "response": response})

        def failed(err_type: str) -> bytes:
            event = {
                "type": "response.failed",
                "sequence_number": first_delta,
                "response": {
                    **pending,
                    "status": "failed",
                    "error": {"code": "server_error", "message": f"{err_type} (mock)"},
                },
            }
            return sse_frame("response.failed", event)

        return await self._write_frames(request, resp, fault, frames, first_delta - 1, failed)

    # -- /_mock -----------------------------------------------------------

    async def get_recorded(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"[" + b",".join(self.recorded) + b"]", content_type="application/json")

    async def clear_recorded(self, _request: web.Request) -> web.StreamResponse:
        self.recorded.clear()
        return web.Response(status=204)


def _chat_params(body: dict[str, Any]) -> tuple[str, list[Any], int]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' must be a non-empty array", "messages")
    n = body.get("n")
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise BadRequestError(f"'n' must be an integer in [1, {MAX_CHOICES}]", "n")
    return model, messages, n


# -- Anthropic Messages helpers -------------------------------------------------------

# Status → error type, as api.anthropic.com answers.
ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Bad request (mock)."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found (mock)."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit (mock)."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def _anthropic_headers() -> dict[str, str]:
    return {"request-id": _new_id("req_")}


def anthropic_error_body(err_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": err_type, "message": message}, "request_id": _new_id("req_")}


def anthropic_error(status: int, err_type: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=dumps(anthropic_error_body(err_type, message)),
        content_type="application/json",
        headers={**_anthropic_headers(), **(headers or {})},
    )


def anthropic_injected_error(fault: Fault, status: int) -> web.Response:
    default = "api_error" if status >= HTTP_SERVER_ERROR_MIN else "invalid_request_error"
    err_type, message = ANTHROPIC_ERRORS.get(status, (default, f"Injected error {status} (mock)."))
    headers = None
    if fault.retry_after is not None:
        headers = {"retry-after": str(math.ceil(fault.retry_after))}
    return anthropic_error(status, err_type, message, headers)


def _anthropic_stream_error(err_type: str) -> bytes:
    message = dict(ANTHROPIC_ERRORS.values()).get(err_type, f"{err_type} (mock)")
    return sse_frame("error", anthropic_error_body(err_type, message))


def sse_frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _anthropic_params(body: dict[str, Any]) -> tuple[str, int, list[Any]]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("model: Field required", "model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise BadRequestError("max_tokens: Field required", "max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequestError("max_tokens: Input should be a valid integer greater than 0", "max_tokens")
    for name in _CHAT_ONLY_FIELDS:
        if name in body:
            raise BadRequestError(f"{name}: Extra inputs are not permitted", name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("messages: at least one message is required", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            raise BadRequestError(f"messages.{i}.role: Input should be 'user' or 'assistant'", "messages")
        if not isinstance(msg.get("content"), (str, list)):
            raise BadRequestError(f"messages.{i}.content: Field required", "messages")
    _check_turns(messages)
    return model, max_tokens, messages


# Chat Completions fields Anthropic refuses ("Extra inputs are not permitted"): a
# translation that leaks one fails here as it would against the real API. Fields the
# mock does not know otherwise pass (new API fields, and proof of pass-through).
_CHAT_ONLY_FIELDS = (
    "stream_options",
    "n",
    "max_completion_tokens",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "stop",
    "parallel_tool_calls",
    "reasoning_effort",
    "functions",
    "function_call",
)
_ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
MIN_THINKING_BUDGET = 1024


def thinking_signature(thinking: str) -> str:
    """What the mock signs a thinking block with, and checks when it comes back."""
    return "sig_" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _check_turns(messages: list[Any]) -> None:
    """Anthropic's checks on a conversation: every tool_use answered by a tool_result in
    the next message and every tool_result answering one, tool ids of its alphabet, and
    thinking blocks replayed with the signature they came with."""
    for i, msg in enumerate(messages):
        blocks = [b for b in _blocks_of(msg.get("content")) if isinstance(b, dict)]
        if msg.get("role") == "assistant":
            for j, block in enumerate(blocks):
                if block.get("type") == "tool_use" and not _ANTHROPIC_ID.match(str(block.get("id", ""))):
                    raise BadRequestError(
                        f"messages.{i}.content.{j}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'",
                        "messages",
                    )
                if block.get("type") == "thinking" and block.get("signature") != thinking_signature(
                    str(block.get("thinking", ""))
                ):
                    raise BadRequestError(
                        f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block", "messages"
                    )
            uses = [str(b.get("id")) for b in blocks if b.get("type") == "tool_use"]
            following = messages[i + 1] if i + 1 < len(messages) else None
            answered = set()
            if isinstance(following, dict) and following.get("role") == "user":
                answered = {
                    str(b.get("tool_use_id"))
                    for b in _blocks_of(following.get("content"))
                    if isinstance(b, dict) and b.get("type") == "tool_result"
                }
            missing = [u for u in uses if u not in answered]
            if missing and following is not None:  # a last assistant turn is a prefill
                raise BadRequestError(
                    f"messages.{i + 1}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block "
                    "in the next message.",
                    "messages",
                )
        else:
            previous = messages[i - 1] if i else None
            offered = set()
            if isinstance(previous, dict) and previous.get("role") == "assistant":
                offered = {
                    str(b.get("id"))
                    for b in _blocks_of(previous.get("content"))
                    if isinstance(b, dict) and b.get("type") == "tool_use"
                }
            for j, block in enumerate(blocks):
                if block.get("type") == "tool_result" and str(block.get("tool_use_id")) not in offered:
                    raise BadRequestError(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in the previous message.",
                        "messages",
                    )


def _thinking_on(body: dict[str, Any], max_tokens: int) -> bool:
    thinking = body.get("thinking")
    if thinking is None:
        return False
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return False
    if kind == "adaptive":
        return True
    if kind != "enabled":
        raise BadRequestError("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'", "thinking")
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < MIN_THINKING_BUDGET:
        raise BadRequestError(
            f"thinking.enabled.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}",
            "thinking",
        )
    if max_tokens <= budget:
        raise BadRequestError("`max_tokens` must be greater than `thinking.budget_tokens`.", "max_tokens")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        raise BadRequestError("Thinking may not be enabled when tool_choice forces tool use.", "tool_choice")
    return True


def _blocks_of(content: Any) -> list[Any]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def anthropic_last_user_text(messages: list[Any]) -> str:
    """The last user turn that says something (a turn of tool results alone says
    nothing), as the Chat mock echoes the last `user` message."""
    for msg in reversed(messages):
        if msg.get("role") != "user":
            continue
        texts = [
            b["text"]
            for b in _blocks_of(msg.get("content"))
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        ]
        if texts:
            return " ".join(texts)
    return ""


def _anthropic_tools(body: dict[str, Any], messages: list[Any], text: str) -> list[ToolCall]:
    tools = body.get("tools")
    if not isinstance(tools, list) or messages[-1].get("role") != "user":
        return []
    blocks = _blocks_of(messages[-1].get("content"))
    if blocks and all(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
        return []  # answered with text
    # Client tools have an input_schema; server tools (web search…) are not ours to call.
    specs = [
        ToolSpec(t["name"], t.get("input_schema"))
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("name"), str) and "input_schema" in t
    ]
    raw = body.get("tool_choice")
    raw = raw if isinstance(raw, dict) else {"type": "auto"}
    kind = raw.get("type")
    choice = raw.get("name", "auto") if kind == "tool" else (kind if kind in ("none", "any") else "auto")
    return choose_tools(specs, str(choice), raw.get("disable_parallel_tool_use") is not True, text)


def _apply_stops(text: str, stops: Any, max_tokens: int) -> tuple[str, str, str | None]:
    """(text, stop_reason, stop_sequence) once stop sequences and max_tokens applied."""
    if isinstance(stops, list):
        hits = [(text.find(s), s) for s in stops if isinstance(s, str) and s and s in text]
        if hits:
            at, seq = min(hits)
            text = text[:at]
            if count_tokens(text) <= max_tokens:
                return text, "stop_sequence", seq
    words = text.split(" ")
    if count_tokens(text) > max_tokens:
        kept: list[str] = []
        for word in words:
            kept.append(word)
            if count_tokens(" ".join(kept)) >= max_tokens:
                break
        return " ".join(kept), "max_tokens", None
    return text, "end_turn", None


def _block_text(block: Any) -> str:
    """What a block counts as, in words: its text, a tool's name and input, a tool
    result's content; images and documents a flat few."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return str(block["text"])
    if kind == "tool_use":
        return f"{block.get('name', '')} {dumps(block.get('input', {})).decode()}"
    if kind == "tool_result":
        content = block.get("content")
        return " ".join(_block_text(b) for b in _blocks_of(content)) if content is not None else ""
    if kind in ("image", "document"):
        return "media " * 4
    if kind in ("thinking", "redacted_thinking"):
        return str(block.get("thinking", ""))
    if "input_schema" in block or "name" in block:  # a tool definition
        return f"{block.get('name', '')} {block.get('description', '')}"
    return ""


def _anthropic_blocks(body: dict[str, Any]) -> list[tuple[Any, int]]:
    """The prompt's blocks with their token counts, in the order caching sees them:
    tools, then system, then messages."""
    out: list[tuple[Any, int]] = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        out.append((tool, count_tokens(_block_text(tool))))
    system = body.get("system")
    for block in _blocks_of(system) if isinstance(system, (str, list)) else []:
        out.append((block, count_tokens(_block_text(block))))
    messages = body.get("messages")
    for msg in messages if isinstance(messages, list) else []:
        content = msg.get("content") if isinstance(msg, dict) else None
        for block in _blocks_of(content) if isinstance(content, (str, list)) else []:
            out.append((block, count_tokens(_block_text(block))))
    return out


def _anthropic_input_tokens(body: dict[str, Any]) -> int:
    return sum(tokens for _, tokens in _anthropic_blocks(body))


# -- OpenAI Responses helpers ---------------------------------------------------------


def _responses_items(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if isinstance(raw, list) and all(isinstance(i, dict) for i in raw):
        return list(raw)
    raise BadRequestError("'input' must be a string or an array of input items.", "input")


def _responses_item_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"]
            for p in content
            if isinstance(p, dict)
            and p.get("type") in ("input_text", "output_text", "text")
            and isinstance(p.get("text"), str)
        )
    output = item.get("output")
    return output if isinstance(output, str) else ""


def _responses_last_user_text(items: list[dict[str, Any]]) -> str:
    for item in reversed(items):
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return _responses_item_text(item)
    return ""


def _responses_tools(body: dict[str, Any], items: list[dict[str, Any]], text: str) -> list[ToolCall]:
    tools = body.get("tools")
    if not isinstance(tools, list) or not items:
        return []
    last = items[-1]
    if last.get("type", "message") != "message" or last.get("role") != "user":
        return []  # function_call_output items are answered with text
    specs = [
        ToolSpec(t["name"], t.get("parameters"))
        for t in tools
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)
    ]
    raw = body.get("tool_choice", "auto")
    if raw == "required":
        choice = "any"
    elif isinstance(raw, dict):
        choice = raw.get("name", "auto") if raw.get("type") == "function" else "auto"
    else:
        choice = raw if raw in ("none", "auto") else "auto"
    return choose_tools(specs, str(choice), body.get("parallel_tool_calls") is not False, text)


def _response_object(
    body: dict[str, Any], model: str, output: list[dict[str, Any]], input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    tools = body.get("tools")
    text = body.get("text")
    return {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": text if isinstance(text, dict) else {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": tools if isinstance(tools, list) else [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def create_app(
    api_key: str | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
    max_recorded: int = MAX_RECORDED,
) -> web.Application:
    """Build the mock app; the handler object is reachable as ``app[MOCK_KEY]``."""
    mock = MockUpstream(api_key, models, max_recorded)
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[MOCK_KEY] = mock
    app.router.add_post("/v1/chat/completions", mock.chat_completions)
    app.router.add_post("/v1/embeddings", mock.embeddings)
    app.router.add_post("/v1/audio/transcriptions", mock.transcriptions)
    app.router.add_post("/v1/audio/speech", mock.speech)
    app.router.add_get("/v1/models", mock.list_models)
    app.router.add_post("/v1/messages", mock.messages)
    app.router.add_post("/v1/messages/count_tokens", mock.count_message_tokens)
    app.router.add_post("/v1/responses", mock.responses)
    app.router.add_get("/_mock/last", mock.get_last)
    app.router.add_get("/_mock/requests", mock.get_recorded)
    app.router.add_delete("/_mock/requests", mock.clear_recorded)
    app.router.add_put("/_mock/fault", mock.set_fault)
    # Registered last so the real endpoints win; unknown /v1 paths get an OpenAI-shaped 404.
    app.router.add_route("*", "/v1/{tail:.*}", mock.not_found)
    return app


def _bind(host: str, port: int) -> socket.socket:
    # Binding ourselves (instead of letting aiohttp do it) gives us the real port for port 0.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_mock(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    api_key: str | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
) -> tuple[web.AppRunner, int]:
    """Serve the mock on the running loop; call ``await runner.cleanup()`` when done."""
    app = create_app(api_key=api_key, models=models)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    sock = _bind(host, port)
    try:
        site = web.SockSite(runner, sock)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner, sock.getsockname()[1]


def write_ready_file(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(dumps(data))
    os.replace(tmp, path)


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, port = await start_mock(
        args.host, args.port, api_key=args.api_key or None, models=args.model or DEFAULT_MODELS
    )
    # Modules and the app live until exit; freezing them keeps gen-2 GC passes short,
    # which shows up directly in the benchmark's p99.
    gc.freeze()
    try:
        if args.ready_file:
            write_ready_file(args.ready_file, {"port": port, "pid": os.getpid()})
        sys.stdout.write(dumps({"event": "ready", "port": port}).decode() + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clawdbot.devtools.mock_upstream",
        description="Fast local mock of OpenAI's (Chat, Responses) and Anthropic's (Messages) APIs.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 lets the OS pick")
    parser.add_argument("--ready-file", help="write {'port', 'pid'} here once listening")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MOCK_API_KEY"),
        help="require 'Authorization: Bearer KEY' (Anthropic: that or 'x-api-key: KEY'; a key is"
        " always required there, any value without this) (default: $MOCK_API_KEY; unset = no auth)",
    )
    parser.add_argument(
        "--model",
        action="extend",
        nargs="+",
        help="model ids served by /v1/models (repeatable; default: mock-1)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
