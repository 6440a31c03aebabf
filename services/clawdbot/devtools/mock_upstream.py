"""Fast local mock of an OpenAI-compatible HTTP API.

Tests and benchmarks use it as the "external provider". Behaviour is
deterministic, and faults are injected per request through an extra ``mock``
object in the JSON body, which doubles as proof that a gateway forwards
fields it does not know about.

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
        return cls(
            status=status,
            retry_after=_opt_number(raw, "retry_after"),
            delay_ms=_opt_number(raw, "delay_ms") or 0.0,
            chunk_delay_ms=_opt_number(raw, "chunk_delay_ms") or 0.0,
            content=content,
            usage=bool(raw.get("usage", True)),
            drop_midstream=bool(raw.get("drop_midstream", False)),
            error_rate=_rate(raw),
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

    async def _apply_fault(self, fault: Fault | None) -> web.Response | None:
        if fault is None:
            return None
        if fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault.status is not None and fault.status >= HTTP_ERROR_MIN:
            self._faulted += 1
            n = self._faulted
            # Fail when the running count of failures due rises: evenly spread, exact share.
            if math.floor(n * fault.error_rate) > math.floor((n - 1) * fault.error_rate):
                return injected_error(fault, fault.status)
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

        if fault is not None and fault.content is not None:
            text = fault.content
        else:
            last_user = ""
            for msg in reversed(messages):
                if isinstance(msg, dict) and msg.get("role") == "user":
                    last_user = message_text(msg.get("content"))
                    break
            text = f"Hello from {model}: {last_user}"

        prompt_tokens = sum(count_tokens(message_text(m.get("content"))) for m in messages if isinstance(m, dict))
        completion_tokens = count_tokens(text) * n
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        want_usage = fault is None or fault.usage

        if body.get("stream") is True:
            opts = body.get("stream_options")
            include_usage = want_usage and isinstance(opts, dict) and opts.get("include_usage") is True
            return await self._stream_chat(request, fault, model, text, n, usage if include_usage else None)

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
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
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

        frames: list[bytes] = [frame([delta(i, {"role": "assistant", "content": ""})]) for i in range(n)]
        content_frames = [frame([delta(i, {"content": piece})]) for piece in stream_pieces(text) for i in range(n)]
        drop = fault is not None and fault.drop_midstream
        if drop:
            frames.extend(content_frames[:1])
            await resp.write(b"".join(frames))
            self._drop(request)
            return resp
        frames.extend(content_frames)
        frames.extend(frame([delta(i, {}, "stop")]) for i in range(n))
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
        description="Fast local mock of an OpenAI-compatible API.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 lets the OS pick")
    parser.add_argument("--ready-file", help="write {'port', 'pid'} here once listening")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MOCK_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $MOCK_API_KEY; unset = no auth)",
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
