"""WebSocket: streaming chat and workflow progress on GET /v1/ws.

Frames, client -> server (text, or binary holding the same JSON as UTF-8, optionally
gzip-compressed):
    {"type": "chat.completions", "id": "c1", "body": {<OpenAI chat request>}}
or just the OpenAI chat request itself. Streaming is the default on a socket; say
"stream": false in the body for one answer.
    {"type": "workflow.run", "id": "w1", "name": "<workflow>", "input": <any JSON>}
runs a workflow (config/workflows/) and streams its progress.

Frames, server -> client (always text JSON; `id` echoes the request's):
    {"type": "chat.completion.chunk", "id", "data": {<chunk>}}   one per chunk
    {"type": "chat.completion", "id", "data": {<completion>}}    non-streamed answer
    {"type": "workflow.event", "id", "data": {<event>}}          one per workflow event
                                   (as over SSE: run.started, step.started, step.retrying,
                                   step.finished, and run.completed with the whole run)
    {"type": "done", "id", "instance", "cache", "request_id"}    end of one chat request
                                   (with "budget_remaining_usd" when the key has a budget)
    {"type": "done", "id", "request_id"}                         end of one workflow run
    {"type": "error", "id", "status", "error": {<OpenAI error>}} the request failed;
                                                                  the socket stays open
        (a 429 over the key's rate limits also has "retry_after": seconds, as text, and
        "headers": {x-ratelimit-*}, what an HTTP answer would carry)
Several requests may be in flight on one socket; their frames interleave by id. At most
adapter.ws_max_in_flight (16) at once: one more is answered with an error frame of status
429 (too_many_in_flight), and the socket stays open.
A frame may be at most gateway.max_request_bytes, and so may what a gzip-compressed one
inflates to: past that it is answered with an error frame of status 413
(request_too_large) and the socket stays open. (permessage-deflate is bounded the same
way by aiohttp's max_msg_size, which closes the socket with 1009 instead.)
Auth: Authorization: Bearer <key> on the upgrade, or ?api_key= for browsers, which
cannot set headers on a WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from clawdbot.adapter.openai_requests import parse_chat
from clawdbot.adapter.protocols.base import ProtocolContext
from clawdbot.common.bounded import gunzip, is_gzip, off_loop_if_large
from clawdbot.common.errors import GatewayError, internal_error
from clawdbot.common.logging import request_id_var
from clawdbot.gen.v1 import router_pb2

log = logging.getLogger(__name__)

WS_PATH = "/v1/ws"
_CHAT_TYPES = frozenset({"chat.completions", "chat.completions.create", "chat"})
WORKFLOW_TYPE = "workflow.run"


@dataclass(frozen=True)
class Frame:
    """One client request: a chat (body: the OpenAI request) or a workflow run."""

    kind: str  # "chat" | "workflow"
    id: Any
    body: dict[str, Any] = field(default_factory=dict)
    workflow: str = ""
    input: Any = None


def load_frame(data: str | bytes, max_bytes: int) -> dict[str, Any]:
    """The frame's JSON object; GatewayError(400) if it is not one, 413 if it inflates
    past `max_bytes` (gateway.max_request_bytes, the limit of an uncompressed frame too)."""
    if isinstance(data, bytes):
        if is_gzip(data):
            data = gunzip(data, max_bytes, what="The gzip-compressed frame", code="invalid_frame")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise GatewayError.bad_request(
                "Binary frames must hold UTF-8 JSON (optionally gzip-compressed).", None, "invalid_frame"
            ) from None
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise GatewayError.bad_request(f"Frame is not valid JSON ({exc}).", None, "invalid_json") from None
    if not isinstance(frame, dict):
        raise GatewayError.bad_request("A frame must be a JSON object.", None, "invalid_frame")
    return frame


def is_bare_chat(frame: dict[str, Any]) -> bool:
    """A plain OpenAI chat request sent as the frame itself (its "id", if any, is not ours)."""
    return frame.get("type") != WORKFLOW_TYPE and "messages" in frame and "body" not in frame


def correlation_id(frame: dict[str, Any]) -> Any:
    """The id the server's frames for this request echo."""
    return None if is_bare_chat(frame) else frame.get("id")


def read_frame(frame: dict[str, Any]) -> Frame:
    """What a frame asks for; GatewayError(400) if it is not a request we know."""
    if is_bare_chat(frame):
        return Frame("chat", None, frame)
    frame_id = frame.get("id")
    frame_type = frame.get("type", "chat.completions")
    if frame_type == WORKFLOW_TYPE:
        name = frame.get("name")
        if not isinstance(name, str) or not name:
            raise GatewayError.bad_request(
                "A workflow.run frame needs a 'name' string: the workflow to run.", "name", "invalid_frame"
            )
        return Frame("workflow", frame_id, workflow=name, input=frame.get("input"))
    if frame_type not in _CHAT_TYPES:
        raise GatewayError.bad_request(
            f"Unknown frame type {frame_type!r}; send 'chat.completions' or 'workflow.run'.", "type", "invalid_frame"
        )
    body = frame.get("body")
    if not isinstance(body, dict):
        raise GatewayError.bad_request(
            "The frame needs a 'body' object with the chat request.", "body", "invalid_frame"
        )
    return Frame("chat", frame_id, body)


def error_frame(frame_id: Any, err: GatewayError) -> dict[str, Any]:
    """The error frame of a failed request: what REST would answer as status, body and
    (for a refusal by the rate limiter) Retry-After and x-ratelimit-* headers."""
    frame: dict[str, Any] = {"type": "error", "id": frame_id, "status": err.status, **err.to_dict()}
    if err.retry_after:
        frame["retry_after"] = err.retry_after
    if err.headers:
        frame["headers"] = dict(err.headers)
    return frame


def decode_frame(data: str | bytes, max_bytes: int) -> Frame:
    """The request a raw frame holds; GatewayError(400) if it is broken, 413 if too large."""
    return read_frame(load_frame(data, max_bytes))


class WebSocketProtocol:
    name = "ws"

    def install(self, ctx: ProtocolContext) -> None:
        self._gateway = ctx.gateway
        self._max_frame = ctx.config.gateway.max_request_bytes
        self._grace = ctx.config.adapter.shutdown_grace_s
        self._max_in_flight = ctx.config.adapter.ws_max_in_flight
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[None]] = set()
        ctx.host.http_app.router.add_get(WS_PATH, self.handle)
        ctx.host.on_shutdown(self.shutdown)

    async def shutdown(self) -> None:
        """Let in-flight requests finish (within the grace period), then say goodbye."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=self._grace)
            for task in pending:
                task.cancel()
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"server shutting down")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        api_key = request.query.get("api_key")
        try:
            meta = await self._gateway.accept(headers, "ws", request.remote or "", api_key=api_key)
        except GatewayError as err:
            return web.Response(status=err.status, body=err.to_json(), content_type="application/json")
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=self._max_frame)
        await ws.prepare(request)
        self._sockets.add(ws)
        mine: set[asyncio.Task[None]] = set()
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    if len(mine) >= self._max_in_flight:
                        await self._too_many(ws, msg.data)
                        continue
                    task = asyncio.create_task(self._serve_frame(ws, msg.data, meta, headers, api_key))
                    for group in (mine, self._tasks):
                        group.add(task)
                        task.add_done_callback(group.discard)
                elif msg.type == WSMsgType.ERROR:
                    log.warning("websocket error", extra={"error": str(ws.exception())})
        finally:
            # A client that hangs up abandons its requests: stop them upstream as well.
            for task in mine:
                task.cancel()
        return ws

    async def _too_many(self, ws: web.WebSocketResponse, data: str | bytes) -> None:
        """Past the socket's cap on requests in flight: this one gets a 429 error frame
        and the socket stays open. Answered inline, so a client that floods waits for
        its refusals instead of piling up tasks."""
        started = time.perf_counter()
        frame_id: Any = None
        # The id is worth echoing, not worth a decompression: compressed frames get none.
        if isinstance(data, str) or not is_gzip(data):
            with contextlib.suppress(GatewayError):
                frame_id = correlation_id(await off_loop_if_large(len(data), load_frame, data, self._max_frame))
        err = GatewayError(
            429,
            f"Too many requests in flight on this WebSocket (at most {self._max_in_flight}); "
            "wait for an answer before sending more.",
            "rate_limit_error",
            "too_many_in_flight",
        )
        await self._send(ws, {"type": "error", "id": frame_id, "status": err.status, **err.to_dict()})
        self._gateway.record("chat", "ws", err.status, started)

    async def _send(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        if not ws.closed:
            await ws.send_str(orjson.dumps(frame).decode())

    async def _serve_frame(
        self,
        ws: web.WebSocketResponse,
        data: str | bytes,
        conn_meta: router_pb2.RequestMeta,
        headers: dict[str, str],
        api_key: str | None = None,
    ) -> None:
        started = time.perf_counter()
        status = 200
        operation = "chat"
        frame_id: Any = None
        meta = router_pb2.RequestMeta()
        meta.CopyFrom(conn_meta)
        # Each frame is its own request, with its own id.
        meta.request_id = uuid.uuid4().hex
        request_id_var.set(meta.request_id)
        gateway = self._gateway
        with gateway.span("ws chat.completions", headers, "ws") as span:
            try:
                # A large frame is inflated and parsed in a thread: up to max_request_bytes
                # of JSON would otherwise hold up every other socket and request meanwhile.
                raw = await off_loop_if_large(len(data), load_frame, data, self._max_frame)
                frame_id = correlation_id(raw)
                # The key again, for each frame (from memory): a key revoked or changed
                # while the socket is open holds from the next frame on, grant included.
                fresh = await gateway.accept(headers, "ws", api_key=api_key)
                meta.grant.CopyFrom(fresh.grant)
                meta.strategy = fresh.strategy
                request_id_var.set(meta.request_id)
                frame = read_frame(raw)
                if frame.kind == "workflow":
                    operation = "workflow.run"
                    span.update_name("ws workflow.run")
                    await self._run_workflow(ws, frame, meta)
                else:
                    await self._chat(ws, frame, meta)
            except GatewayError as err:
                status = err.status
                await self._send(ws, error_frame(frame_id, err))
            except (ConnectionResetError, asyncio.CancelledError):
                status = 499
                raise
            except Exception:
                log.exception("websocket request failed")
                status = 500
                await self._send(ws, {"type": "error", "id": frame_id, "status": 500, **internal_error().to_dict()})
            finally:
                gateway.record(operation, "ws", status, started)

    async def _chat(self, ws: web.WebSocketResponse, frame: Frame, meta: router_pb2.RequestMeta) -> None:
        gateway = self._gateway
        body = frame.body
        body.setdefault("stream", True)
        parsed = parse_chat(body)
        model_request = await gateway.model_request(parsed, meta, None)
        instance = cache = ""
        spend = router_pb2.Spend()
        if parsed.stream:
            async with contextlib.aclosing(gateway.stream(model_request)) as events:
                async for event in events:
                    if event.HasField("instance"):
                        instance, cache, spend = event.instance, event.cache, event.spend
                    else:
                        await self._send(
                            ws,
                            {
                                "type": "chat.completion.chunk",
                                "id": frame.id,
                                "data": orjson.Fragment(event.chunk_json),
                            },
                        )
        else:
            response = await gateway.complete(model_request)
            instance, cache, spend = response.instance, response.cache, response.spend
            await self._send(
                ws, {"type": "chat.completion", "id": frame.id, "data": orjson.Fragment(response.openai_json)}
            )
        done: dict[str, Any] = {
            "type": "done",
            "id": frame.id,
            "instance": instance,
            "cache": cache,
            "request_id": meta.request_id,
        }
        if spend.budgeted:
            # What x-clawdbot-budget-remaining-usd says over HTTP (a stream's: after its hold).
            done["budget_remaining_usd"] = round(max(spend.remaining_usd, 0.0), 8)
        await self._send(ws, done)

    async def _run_workflow(self, ws: web.WebSocketResponse, frame: Frame, meta: router_pb2.RequestMeta) -> None:
        events = self._gateway.stream_workflow(meta, frame.workflow, orjson.dumps(frame.input))
        async with contextlib.aclosing(events):
            async for event in events:
                await self._send(ws, {"type": "workflow.event", "id": frame.id, "data": orjson.Fragment(event)})
        await self._send(ws, {"type": "done", "id": frame.id, "request_id": meta.request_id})


def create_protocol() -> WebSocketProtocol:
    return WebSocketProtocol()
